"""The recognition thread of one call: VAD segmentation plus the streaming recognizer.

The event loop hands it every inbound frame in arrival order (silent frames included: a recognizer
that never hears silence endpoints late). It blocks only on its input queue; everything it finds
goes to the loop through the ThreadBridge.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from parley.audio import SILENCE_DBFS, StreamResampler, pcm_to_float
from parley.media.bridge import Final, OnsetLost, Partial, SpeechContinues, SpeechOnset, SpeechStarted, ThreadBridge
from parley.media.echo import EchoGate
from parley.media.handoff import FrameHandoff
from parley.pool import EnginePool
from parley.protocols import Recognizer, ScoringTranscriber, Transcriber, Vad
from parley.speech.silent import NoPartials

log = logging.getLogger(__name__)

_STOP = None  # queue sentinel
FRAME_S = 0.02  # one inbound frame
# A resampled frame may come out a few samples longer than nominal: ask to be woken that much early,
# rather than leave a complete window waiting a frame.
_WAKE_SLACK_SAMPLES = 32
_MAX_RESTARTS = 3  # engines replaced after a failure, per call
_RESTART_PAUSE_S = 0.25  # before the first replacement; doubled each time
_COMPLETE = 0.5  # Smart Turn's own threshold: above it the turn is complete
_TURN_AUDIO_BYTES = 8 * 16000 * 2  # what the model hears: the utterance's last 8 s
_FLOOR_FRAMES = 50  # the line's background is judged over the last second
_FLOOR_HOLD_DECAY_DB = 0.02  # per frame (1 dB/s): how fast a rejected sound's level is forgotten


def _power(samples: np.ndarray) -> float:
    """Mean square of float samples (full scale 1.0)."""
    return float(np.dot(samples, samples)) / max(1, samples.size)


def _level_db(power: float) -> float:
    return 10 * math.log10(power) if power > 1e-12 else SILENCE_DBFS


@dataclass(frozen=True, slots=True)
class FinalText:
    """The second pass's text, with its confidence when the transcriber reports one."""

    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


# Words a finished English sentence does not end on: articles, possessives, prepositions and
# conjunctions that need what follows, the copula, and fillers ("I'd like a ...", "my number is ...").
_DANGLING = frozenset(
    "a an the my your our their its to for of with from at and or but because if than is are uh um er erm".split()
)


def text_says_complete(text: str, model_says: bool) -> bool:
    """Refine a turn verdict with the words heard: a dangling last word means more is coming; a
    question mark means the question is asked. Otherwise the model's verdict stands."""
    stripped = text.strip()
    words = stripped.lower().replace(",", " ").replace(".", " ").replace("?", " ").replace("!", " ").split()
    if words and words[-1].strip("'\"") in _DANGLING:
        return False
    if stripped.endswith("?"):
        return True
    return model_says


class TurnDecider(Protocol):
    """Semantic end of turn (parley.speech.turn.TurnDetector): the probability that the caller's
    turn is over, from the utterance's last <= 8 s of 16 kHz PCM, decided off this thread."""

    def submit(self, pcm: bytes) -> Future[float]: ...


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    threshold: float = 0.5
    speech_start_ms: int = 64
    # Report the first sign of speech (SpeechOnset) and, when no utterance follows, its loss
    # (OnsetLost): the handler pauses the agent on the onset. A sign is a frame `onset_rise_db`
    # louder than the line's floor (and than `onset_min_dbfs`) that the agent's echo does not
    # explain, or a VAD window over the threshold. It is lost after `onset_lost_ms` of windows
    # under the release threshold (the VAD, not the level, judges whether it was speech).
    onset_events: bool = False
    onset_rise_db: float = 25.0
    onset_min_dbfs: float = -40.0
    onset_lost_ms: int = 192
    endpoint_silence_ms: int = 500
    preroll_ms: int = 300
    max_utterance_s: float = 30.0
    # Windows quieter than this are not speech whatever the model says, so the model is not run:
    # callers are silent most of a call and ACS sends (near-)digital silence then.
    silence_floor_dbfs: float = -65.0
    # Two-pass: start the accurate pass this far into the closing silence, so its text is ready
    # when the endpoint is declared (thrown away if the caller goes on speaking).
    early_final_ms: int = 200
    # Voiced speech this long within one utterance is "more than a backchannel" (SpeechContinues).
    long_speech_ms: int = 600
    # Semantic end of turn (None: `endpoint_silence_ms` of silence ends every utterance). With a
    # detector it is asked after `turn_short_silence_ms`: complete ends the utterance then;
    # incomplete waits for more speech up to `turn_max_silence_ms`. If the model fails, the
    # silence rule decides.
    turn_detector: TurnDecider | None = None
    turn_short_silence_ms: int = 100
    turn_max_silence_ms: int = 1500

    @property
    def release_threshold(self) -> float:
        # Hysteresis: once in speech, a dip slightly below the start threshold is not yet silence.
        return max(0.05, self.threshold - 0.15)


class FinalPass:
    """The accurate second pass (Whisper) shared by every call of the process.

    A bounded executor (`stt_workers` threads) runs it; recognition threads only submit and never
    wait, so a slow final cannot delay barge-in detection.
    """

    def __init__(self, transcriber: Transcriber, executor: Executor) -> None:
        self.transcriber = transcriber
        self._executor = executor

    def submit(self, pcm: bytes) -> Future[FinalText]:
        return self._executor.submit(self._transcribe, pcm)

    def _transcribe(self, pcm: bytes) -> FinalText:
        transcriber = self.transcriber
        if isinstance(transcriber, ScoringTranscriber):
            scored = transcriber.transcribe_detailed(pcm)
            return FinalText(scored.text, scored.avg_logprob, scored.no_speech_prob)
        return FinalText(transcriber.transcribe(pcm))


class _InOrder:
    """Finals leave in utterance order, whatever order their passes finish in: with stt_workers > 1
    a later, shorter utterance's pass can finish first, and the caller's words must be answered
    in the order they were said. Called from the recognition thread and the passes' threads."""

    def __init__(self, bridge: ThreadBridge) -> None:
        self._bridge = bridge
        self._lock = threading.Lock()
        self._slots: dict[int, Final | None] = {}  # utterance id -> its final once made (insertion order)

    def expect(self, utterance_id: int) -> None:
        with self._lock:
            self._slots[utterance_id] = None

    def ready(self, final: Final) -> None:
        with self._lock:
            if final.utterance_id in self._slots:  # else abandoned: the call ended or the engine failed
                self._slots[final.utterance_id] = final
                self._send_ready()

    def abandon(self, utterance_id: int) -> None:
        """An utterance whose final will never come: later ones must not wait behind it."""
        with self._lock:
            self._slots.pop(utterance_id, None)
            self._send_ready()

    def _send_ready(self) -> None:
        while self._slots:
            head_id, head = next(iter(self._slots.items()))
            if head is None:
                return
            del self._slots[head_id]
            self._bridge.queue_speech_result(head)


@dataclass(frozen=True, slots=True)
class _FinalOf:
    """What the segmenter knows of an ended utterance while its final text is being made."""

    utterance_id: int
    speech_end_t: float
    endpoint_t: float
    voiced_ms: int

    def made(self, heard: FinalText) -> Final:
        return Final(
            self.utterance_id,
            heard.text,
            time.monotonic(),
            self.speech_end_t,
            self.endpoint_t,
            voiced_ms=self.voiced_ms,
            avg_logprob=heard.avg_logprob,
            no_speech_prob=heard.no_speech_prob,
        )


class SpeechSegmenter:
    """Turns VAD windows into utterances and drives the recognizer. Runs on the recognition thread.

    An utterance starts after `speech_start_ms` of consecutive speech windows (that run, plus a
    pre-roll, is what the recognizer hears first) and ends after `endpoint_silence_ms` of silence,
    or with a turn detector when the model judges the turn complete after a short silence (see
    SegmenterConfig).
    The streaming recognizer gives partials; with a `final_pass` its text is only the fallback
    and the final comes from the accurate pass over the whole utterance. A recognizer that returns
    a Future from `end` (a cloud service) gives the final itself, delivered when it resolves.
    With an `echo_gate`, windows explained by the agent's own echo do not count towards a start.
    """

    def __init__(
        self,
        vad: Vad,
        recognizer: Recognizer,
        bridge: ThreadBridge,
        config: SegmenterConfig,
        final_pass: FinalPass | None = None,
        echo_gate: EchoGate | None = None,
    ) -> None:
        self._vad = vad
        self._recognizer = recognizer
        self._bridge = bridge
        self._config = config
        self._final_pass = final_pass
        self._echo_gate = echo_gate
        window_ms = 1000 * vad.window_samples / vad.sample_rate
        self._start_windows = max(1, round(config.speech_start_ms / window_ms))
        self._end_windows = max(1, round(config.endpoint_silence_ms / window_ms))
        early_ms = config.early_final_ms
        if config.turn_detector is not None:
            # The model may end the turn as soon as it is asked: the final must be on its way by then.
            early_ms = min(early_ms, config.turn_short_silence_ms)
        self._early_windows = max(1, round(early_ms / window_ms))
        self._long_windows = max(1, round(config.long_speech_ms / window_ms))
        self._turn = config.turn_detector
        self._short_windows = max(1, round(config.turn_short_silence_ms / window_ms))
        self._max_windows = max(self._short_windows + 1, round(config.turn_max_silence_ms / window_ms))
        # Asked again where the silence rule would end the turn: with more silence heard the model
        # is surer, and a turn it first judged incomplete need not wait the whole maximum.
        self._ask_windows = {self._short_windows}
        if self._short_windows < self._end_windows < self._max_windows:
            self._ask_windows.add(self._end_windows)
        self._verdict: Future[float] | None = None  # the model's answer for the current silence
        self._verdict_failed = False  # it failed: this silence ends by the silence rule
        self._window_s = window_ms / 1000
        self._silence_power = 10 ** (config.silence_floor_dbfs / 10)  # mean square of a float window
        self._samples = np.zeros(0, dtype=np.float32)
        self._samples_t = 0.0  # arrival time of the first buffered VAD sample
        self._preroll: deque[bytes] = deque(maxlen=max(1, config.preroll_ms // 20 + 1))
        self._run = 0  # consecutive speech windows while idle
        self._onset_sent = False  # a SpeechOnset awaits its utterance or its loss
        self._onset_quiet = 0  # windows under the threshold since then
        self._onset_peak_db = SILENCE_DBFS  # the loudest frame since then
        self._lost_windows = max(1, round(config.onset_lost_ms / window_ms))
        # The line's background for level onsets (see _line_floor_db).
        self._recent_levels: deque[float] = deque(maxlen=_FLOOR_FRAMES)
        self._frames_seen = 0
        self._floor_hold_db = SILENCE_DBFS  # the level of the last sound the VAD rejected ...
        self._floor_hold_frame = 0  # ... and when (in frames seen)
        self._playout = echo_gate.reference if echo_gate is not None else None
        self._run_start_t = 0.0
        self._silence = 0  # consecutive silent windows while in an utterance
        self._last_speech_t = 0.0
        self._utterance_id = 0
        self._utterance_started_t: float | None = None
        self._audio = bytearray()  # the open utterance, for the final pass
        self._early: Future[FinalText] | None = None
        self._voiced = 0  # speech windows in the open utterance
        self._in_order = _InOrder(bridge)
        self._passes: set[Future[Any]] = set()  # finals being made (cancelled if the call ends first)

    @property
    def in_utterance(self) -> bool:
        return self._utterance_started_t is not None

    @property
    def sample_rate(self) -> int:
        return self._vad.sample_rate

    def frames_to_decide(self, frame_samples: int) -> int:
        """How many more frames of `frame_samples` it takes before there is anything to decide:
        one while in an utterance with a streaming recognizer (its partials come from every
        frame), else enough to complete the next VAD window."""
        if self.in_utterance and (not isinstance(self._recognizer, NoPartials) or self._verdict is not None):
            return 1  # partials, or a turn decision to pick up as soon as it is made
        missing = self._vad.window_samples - self._samples.size - _WAKE_SLACK_SAMPLES
        return max(1, -(-missing // frame_samples))

    def push(self, pcm: bytes, arrival_t: float) -> None:
        """One frame of 16 kHz PCM, received by the server at `arrival_t`."""
        if self.in_utterance:
            self._feed_recognizer(pcm)
        else:
            self._preroll.append(pcm)
        if self._samples.size == 0:
            self._samples_t = arrival_t
        frame = pcm_to_float(pcm)
        if self._config.onset_events:
            self._watch_level(frame, arrival_t)
        self._samples = np.concatenate((self._samples, frame))
        size = self._vad.window_samples
        while self._samples.size >= size:
            window_t = self._samples_t
            probability = self._probability(self._samples[:size], window_t)
            self._samples = self._samples[size:]
            self._samples_t += self._window_s
            self._on_window(probability, window_t)
        if self._verdict is not None and self._verdict.done() and self._turn_over():
            # Decided between two windows: end now rather than up to a window later.
            self._end_utterance(self._last_speech_t)

    def watches_level(self) -> bool:
        """Are level onsets looked for now? While the agent is playing (with no echo reference:
        always) and the caller is not in an utterance. Then a frame that may hold sound should
        wake this thread at once, not when its VAD window is complete: a loud one pauses the agent."""
        if not self._config.onset_events or self.in_utterance:
            return False
        return self._playout is None or self._playout.playing(time.monotonic())

    def _watch_level(self, frame: np.ndarray, arrival_t: float) -> None:
        """Track the line's background, and report a frame well above it as a speech onset."""
        level = _level_db(_power(frame))
        self._recent_levels.append(level)
        self._frames_seen += 1
        if self._onset_sent:
            self._onset_peak_db = max(self._onset_peak_db, level)
            return
        # Cheapest first: most frames are quieter than the minimum.
        if level < self._config.onset_min_dbfs or len(self._recent_levels) < _FLOOR_FRAMES // 2:
            return
        if not self.watches_level() or level - self._line_floor_db() < self._config.onset_rise_db:
            return
        gate = self._echo_gate
        if gate is not None and gate.would_explain(arrival_t - FRAME_S, level, FRAME_S):
            return
        self._send_onset(arrival_t - FRAME_S, "level", level)

    def _line_floor_db(self) -> float:
        """The line's background: the median frame level of the last second (babble or a TV peaks
        well above its quietest frames, not above its median), or the level of a sound the VAD
        rejected, slowly forgotten (such a sound tends to come back at about that level)."""
        held = self._floor_hold_db - _FLOOR_HOLD_DECAY_DB * (self._frames_seen - self._floor_hold_frame)
        return max(statistics.median(self._recent_levels), held)

    def _send_onset(self, onset_t: float, cue: str, level: float = SILENCE_DBFS) -> None:
        self._onset_sent = True
        self._onset_quiet = 0
        self._onset_peak_db = level
        self._bridge.schedule_barge_in(SpeechOnset(self._utterance_id + 1, onset_t, time.monotonic(), cue))
        time.sleep(0)  # give up the GIL: the loop pauses the agent before this thread goes on

    def _probability(self, window: np.ndarray, window_t: float) -> float:
        power = _power(window)
        gate = self._echo_gate
        if gate is not None and not self.in_utterance and gate.explains(window_t, _level_db(power), self._window_s):
            return 0.0  # our own voice coming back: not the caller
        if power < self._silence_power:
            return 0.0
        return self._vad.speech_probability(window)

    def close(self) -> None:
        """The call ended, and no final can reach anyone now (the bridge is closed first). Cancel the
        passes that have not started and start none for an open utterance: on the shared executor
        they would only delay live calls' finals."""
        self._discard_early_final()
        for future in list(self._passes):
            future.cancel()
        self.abandon_utterance()

    def abandon_utterance(self) -> None:
        """Drop the open utterance (the call ended, or its recognizer failed and is replaced)."""
        if self.in_utterance:
            self._utterance_started_t = None
            self._audio.clear()
            self._discard_early_final()
            self._forget_verdict()
            self._in_order.abandon(self._utterance_id)

    def use_engines(self, vad: Vad, recognizer: Recognizer) -> None:
        """Go on with new engines after a failure; utterance ids go on counting."""
        self.abandon_utterance()
        self._lose_onset()
        self._vad = vad
        self._recognizer = recognizer
        self._samples = np.zeros(0, dtype=np.float32)
        self._run = 0

    def _on_window(self, probability: float, window_t: float) -> None:
        started_t = self._utterance_started_t
        if started_t is None:  # not in an utterance
            self._on_idle_window(probability, window_t)
            return
        if probability >= self._config.release_threshold:
            self._silence = 0
            self._last_speech_t = window_t + self._window_s
            self._voiced += 1
            self._discard_early_final()
            self._forget_verdict()  # the caller went on: this silence's decision no longer applies
            if self._voiced == self._long_windows:
                self._bridge.schedule_barge_in(SpeechContinues(self._utterance_id, time.monotonic()))
        else:
            self._silence += 1
            if self._silence == self._early_windows:
                self._start_early_final()
            if self._turn is not None and self._silence in self._ask_windows:
                self._ask_turn(self._turn)
        too_long = time.monotonic() - started_t > self._config.max_utterance_s
        if too_long or self._turn_over():
            self._end_utterance(self._last_speech_t)

    def _turn_over(self) -> bool:
        """Has the silence so far ended the caller's turn?"""
        if self._turn is None:
            return self._silence >= self._end_windows
        if self._silence == 0:
            return False
        if self._silence >= self._max_windows:
            return True  # judged incomplete (or still undecided), and the caller did not go on
        verdict = self._verdict
        if verdict is not None and verdict.done():
            failure = "cancelled" if verdict.cancelled() else verdict.exception()
            if failure is None:
                return self._complete(verdict.result() > _COMPLETE)
            log.error("turn detection failed, this turn ends on silence: %s", failure)
            self._verdict = None
            self._verdict_failed = True
        return self._verdict_failed and self._silence >= self._end_windows

    def _complete(self, model_says: bool) -> bool:
        """The model's verdict, checked against the early Whisper text when there is one.

        The model hears prosody, and a fragment spoken with a falling voice ("my account number
        is") sounds finished; Whisper's words say it is not. A question mark says the opposite of
        a low probability. The final waits for that text anyway, so waiting for it before ending
        the utterance costs the answer nothing.
        """
        early = self._early
        if early is None:  # no second pass (or it starts later): the model decides alone
            return model_says
        if not early.done():
            return False  # asked again on the next frame
        if early.cancelled() or early.exception() is not None:
            return model_says
        return text_says_complete(early.result().text, model_says)

    def _ask_turn(self, turn: TurnDecider) -> None:
        if self._verdict_failed:
            return  # this silence ends by the silence rule
        self._forget_verdict()  # a second ask: the first said incomplete (or has not answered yet)
        try:
            self._verdict = turn.submit(bytes(self._audio[-_TURN_AUDIO_BYTES:]))
        except RuntimeError as exc:  # its executor shut down: the silence rule still ends the turn
            log.error("turn detection unavailable, this turn ends on silence: %s", exc)
            self._verdict_failed = True

    def _forget_verdict(self) -> None:
        self._verdict_failed = False
        if self._verdict is not None:
            self._verdict.cancel()  # a no-op once it runs; its answer is simply not used
            self._verdict = None

    def _on_idle_window(self, probability: float, window_t: float) -> None:
        if probability < self._config.threshold:
            if self._onset_sent:
                # A voiced but soft start ("and", "had") hovers under the threshold for a few windows:
                # only windows under the release threshold count towards losing the onset.
                quiet = probability < self._config.release_threshold
                self._onset_quiet = self._onset_quiet + 1 if quiet else 0
                if self._onset_quiet >= self._lost_windows:
                    self._lose_onset()
            self._run = 0
            return
        self._onset_quiet = 0
        if self._run == 0:
            self._run_start_t = window_t
        self._run += 1
        if self._run >= self._start_windows:
            self._onset_sent = False  # SpeechStarted confirms it
            self._start_utterance()
        elif self._run == 1 and self._config.onset_events and not self._onset_sent:
            self._send_onset(window_t, "vad")

    def _lose_onset(self) -> None:
        """What the onset heard was not speech: tell the handler at once. A level that loud with no
        speech in it is the line's background now (a fan, a noise bed), not a new onset each time."""
        if self._onset_sent:
            self._onset_sent = False
            self._floor_hold_db, self._floor_hold_frame = self._onset_peak_db, self._frames_seen
            self._bridge.schedule_barge_in(OnsetLost(self._utterance_id + 1, time.monotonic()))

    def _start_utterance(self) -> None:
        now = time.monotonic()
        self._utterance_id += 1
        self._utterance_started_t = now
        self._silence = 0
        self._voiced = self._run
        self._run = 0
        self._last_speech_t = now
        self._bridge.schedule_barge_in(SpeechStarted(self._utterance_id, self._run_start_t, now))
        # Give up the GIL now, so the loop runs the barge-in before this thread goes on with the
        # pre-roll's ~15 decoder calls and their Python glue (measured: 8 ms hop -> < 1 ms).
        time.sleep(0)
        self._recognizer.begin()
        for frame in self._preroll:
            self._feed_recognizer(frame)
        self._preroll.clear()

    def _end_utterance(self, speech_end_t: float) -> None:
        endpoint_t = time.monotonic()
        result = self._recognizer.end()
        self._utterance_started_t = None
        self._forget_verdict()
        final = _FinalOf(self._utterance_id, speech_end_t, endpoint_t, round(self._voiced * self._window_s * 1000))
        self._in_order.expect(self._utterance_id)
        if isinstance(result, Future):  # the recognizer finalizes itself (a cloud service)
            self._discard_early_final()
            self._audio.clear()
            self._deliver_when_done(result, "", final)
            return
        if self._final_pass is None:
            self._audio.clear()  # kept for the turn detector only
            self._in_order.ready(final.made(FinalText(result)))
            return
        future = self._early or self._final_pass.submit(bytes(self._audio))
        self._early = None
        self._audio.clear()
        self._deliver_when_done(future, result, final)

    def _deliver_when_done(self, future: Future[Any], fallback: str, final: _FinalOf) -> None:
        """Queue the future's text as the utterance's final once it is resolved (`fallback` if it
        failed). Runs on whichever thread resolves it: only the bridge is touched there."""
        in_order, passes = self._in_order, self._passes

        def deliver(done: Future[Any]) -> None:  # str from a cloud recognizer, FinalText from the pass
            passes.discard(done)
            if done.cancelled():  # only when the call ended: nobody is waiting for it
                in_order.abandon(final.utterance_id)
                return
            heard = FinalText(fallback)
            if done.exception() is None:
                result = done.result()
                heard = result if isinstance(result, FinalText) else FinalText(result)
            else:
                log.error("final recognition failed, using the streaming text: %s", done.exception())
            in_order.ready(final.made(heard))

        passes.add(future)
        future.add_done_callback(deliver)

    def _start_early_final(self) -> None:
        if self._final_pass is not None and self._early is None:
            self._early = self._final_pass.submit(bytes(self._audio))

    def _discard_early_final(self) -> None:
        if self._early is not None:
            self._early.cancel()  # a no-op once it runs; its result is simply not used
            self._early = None

    def _feed_recognizer(self, pcm: bytes) -> None:
        if self._final_pass is not None or self._turn is not None:
            self._audio += pcm
        partial = self._recognizer.feed(pcm)
        if partial:
            self._bridge.queue_partial(Partial(self._utterance_id, partial, time.monotonic()))


class RecognitionThread:
    """Owns one call's VAD + recognizer on a dedicated thread fed by a bounded queue.

    Drop policy: if the thread falls `capacity` frames behind (10 s by default) new frames are
    dropped and counted; the loop never waits for recognition.
    """

    def __init__(
        self,
        *,
        call_id: str,
        input_rate: int,
        vads: EnginePool[Vad],
        recognizers: EnginePool[Recognizer],
        bridge: ThreadBridge,
        config: SegmenterConfig,
        capacity: int = 500,
        final_pass: FinalPass | None = None,
        echo_gate: EchoGate | None = None,
    ) -> None:
        # The bound is enforced in `submit`; the thread is woken only when it has a window to decide.
        self._queue: FrameHandoff[tuple[bytes, float] | None] = FrameHandoff()
        self._capacity = capacity
        self._vads = vads
        self._recognizers = recognizers
        self._bridge = bridge
        self._config = config
        self._final_pass = final_pass
        self.echo_gate = echo_gate
        self._input_rate = input_rate
        self._stopping = threading.Event()
        self.dropped_frames = 0
        self._thread = threading.Thread(target=self._run, name=f"recognition-{call_id[:12]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, pcm: bytes, arrival_t: float, *, sound: bool = True) -> bool:
        """Called on the event loop for every inbound frame; never blocks. `sound`: the far end did
        not flag the frame silent (it may hold a speech onset: see FrameHandoff)."""
        if len(self._queue) >= self._capacity:
            self.dropped_frames += 1
            if self.dropped_frames in (1, 50) or self.dropped_frames % 500 == 0:
                log.warning("recognition is behind: %d frames dropped", self.dropped_frames)
            return False
        self._queue.put((pcm, arrival_t), sound=sound)
        return True

    def stop(self) -> None:
        """Ask the thread to finish (non-blocking); `join` waits for it."""
        self._stopping.set()
        self._queue.put(_STOP, urgent=True)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def backlog(self) -> int:
        """Frames waiting for the thread."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        """Recognize until the call ends. An engine that fails (to load, or mid-call) is replaced,
        up to `_MAX_RESTARTS` times with a growing pause, so one bad moment does not leave the call
        deaf; each failure is reported to the loop (which stops waiting for the lost final)."""
        segmenter: SpeechSegmenter | None = None
        for attempt in range(_MAX_RESTARTS + 1):
            vad: Vad | None = None
            recognizer: Recognizer | None = None
            try:
                vad = self._vads.acquire()
                recognizer = self._recognizers.acquire()
                if segmenter is None:
                    segmenter = SpeechSegmenter(
                        vad, recognizer, self._bridge, self._config, self._final_pass, self.echo_gate
                    )
                else:
                    segmenter.use_engines(vad, recognizer)
                self._consume(segmenter, StreamResampler(self._input_rate, vad.sample_rate))
                segmenter.close()
                return
            except Exception as exc:  # an engine failure must not end the server, nor this call's hearing
                log.exception("recognition failed (attempt %d of %d)", attempt + 1, _MAX_RESTARTS + 1)
                self._bridge.report_failure(f"recognition failed: {exc}")
                if segmenter is not None:
                    segmenter.abandon_utterance()
            finally:
                if vad is not None:
                    self._vads.release(vad)
                if recognizer is not None:
                    self._recognizers.release(recognizer)
            if self._stopping.wait(_RESTART_PAUSE_S * 2**attempt):
                return
        log.error("recognition gave up after %d failures; the call hears DTMF only", _MAX_RESTARTS + 1)
        self._drain()

    def _consume(self, segmenter: SpeechSegmenter, resampler: StreamResampler) -> None:
        frame_samples = round(segmenter.sample_rate * FRAME_S)  # what one inbound frame becomes
        while not self._stopping.is_set():
            item = self._queue.get(segmenter.frames_to_decide(frame_samples), wake_on_sound=segmenter.watches_level())
            if item is _STOP:
                return
            pcm, arrival_t = item
            converted = resampler.process(pcm)
            if converted:
                segmenter.push(converted, arrival_t)

    def _drain(self) -> None:
        """Keep accepting (and discarding) frames until stopped, so `submit` never fills up silently."""
        while not self._stopping.is_set():
            if self._queue.get() is _STOP:
                return
