"""Barge-in on the first sign of speech: the onset detector, its policy, and pauses that resume.

The segmenter tests run the real Silero VAD on real speech (the LibriVox clips the benchmarks ship)
and generated sounds; the call tests drive a real MediaHandler through the in-memory harness.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from parley.benchmarks.common import load_clips
from parley.media.bargein import ActiveTurn, BargeInPolicy, Signal
from parley.media.bridge import OnsetLost, SpeechOnset, SpeechStarted
from parley.media.echo import EchoGate, EchoReference
from parley.media.recognition import SegmenterConfig, SpeechSegmenter
from parley.speech.silent import NoPartials
from parley.speech.vad import SileroVad
from parley.testing.harness import CallHarness, ScriptedSynthesizer
from parley.transports import acs
from tests.test_media_units import start_player

RATE = 16000
FRAME = 320  # 20 ms


class Bridge:
    """Records what the segmenter reports, in order."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def schedule_barge_in(self, event: object) -> None:
        self.events.append(event)

    def queue_partial(self, event: object) -> None:
        pass

    def queue_speech_result(self, event: object) -> None:
        pass

    def kinds(self) -> list[str]:
        return [type(event).__name__ for event in self.events]


def level_pcm(seconds: float, dbfs: float, kind: str = "white", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    if kind == "white":
        signal = rng.standard_normal(n)
    else:  # a 1 kHz tone
        signal = np.sin(2 * np.pi * 1000 * np.arange(n) / RATE)
    signal = signal / np.sqrt(np.mean(signal**2)) * 10 ** (dbfs / 20)
    return np.clip(signal * 32767, -32768, 32767).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


def agent_playing(level_db: float = -120.0, seconds: float = 30.0) -> EchoReference:
    """An echo reference whose agent audio plays from now on for `seconds` at `level_db`."""
    reference = EchoReference(horizon_frames=round(seconds / 0.02))
    now = time.monotonic()
    for k in range(round(seconds / 0.02)):
        reference.add(now + k * 0.02, level_db)
    return reference


def run_line(pcm: np.ndarray, reference: EchoReference | None = None, **config: object) -> tuple[Bridge, list[float]]:
    """Feed `pcm` to a segmenter, frame by frame on a clock starting now; returns what it reported
    and each event's position in the line (seconds)."""
    bridge = Bridge()
    segmenter = SpeechSegmenter(
        SileroVad(),
        NoPartials(),
        bridge,  # type: ignore[arg-type]
        SegmenterConfig(onset_events=True, **config),  # type: ignore[arg-type]
        echo_gate=EchoGate(reference) if reference is not None else None,
    )
    t0 = time.monotonic()
    at: list[float] = []
    for k in range(len(pcm) // FRAME):
        before = len(bridge.events)
        segmenter.push(pcm[k * FRAME : (k + 1) * FRAME].tobytes(), t0 + (k + 1) * 0.02)
        at.extend([(k + 1) * 0.02] * (len(bridge.events) - before))
    return bridge, at


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_clips(None)[1].pcm  # "he was not an ill disposed young man"


def first_loud_frame_s(pcm: np.ndarray, dbfs: float = -40.0) -> float:
    frames = pcm[: len(pcm) // FRAME * FRAME].reshape(-1, FRAME).astype(np.float64) / 32768
    levels = 10 * np.log10(np.maximum((frames**2).mean(axis=1), 1e-12))
    return float((np.argmax(levels > dbfs) + 1) * 0.02)


# ------------------------------------------------------------------------------- the detector
def test_speech_on_a_quiet_line_is_an_onset_at_its_first_loud_frame(speech: np.ndarray) -> None:
    line = np.concatenate([silence(1.0), speech[: RATE * 2]])
    bridge, at = run_line(line, agent_playing())
    assert bridge.kinds()[:2] == ["SpeechOnset", "SpeechStarted"]  # never lost: no OnsetLost between
    onset = bridge.events[0]
    assert isinstance(onset, SpeechOnset) and onset.cue == "level" and onset.utterance_id == 1
    assert at[0] == pytest.approx(1.0 + first_loud_frame_s(speech), abs=1e-6)  # that very frame
    started = bridge.events[1]
    assert isinstance(started, SpeechStarted) and started.utterance_id == 1


def test_while_the_agent_is_silent_only_the_vad_shows_an_onset(speech: np.ndarray) -> None:
    line = np.concatenate([silence(1.0), speech[: RATE * 2]])
    bridge, at = run_line(line, EchoReference())  # nothing played: no level onsets (and no frame wakeups)
    onset = bridge.events[0]
    assert isinstance(onset, SpeechOnset) and onset.cue == "vad"
    assert at[0] > 1.0 + first_loud_frame_s(speech)


def test_a_click_is_an_onset_lost_soon_after_and_the_same_click_again_is_not(speech: np.ndarray) -> None:
    click = level_pcm(0.02, -15.0)
    line = np.concatenate([silence(1.0), click, silence(0.5), click, silence(0.5)])
    bridge, at = run_line(line, agent_playing())
    assert bridge.kinds() == ["SpeechOnset", "OnsetLost"]
    lost = bridge.events[1]
    assert isinstance(lost, OnsetLost) and lost.utterance_id == 1
    assert 0.15 <= at[1] - at[0] <= 0.26  # onset_lost_ms (192) of windows, to the next window


def test_a_steady_noise_bed_gives_no_onset_and_a_new_loud_sound_gives_one_pause() -> None:
    bed = level_pcm(3.0, -35.0, seed=1)
    bridge, _ = run_line(bed, agent_playing())
    assert bridge.kinds() == []  # there from the start: the line's background
    fan = np.concatenate([silence(1.0), level_pcm(4.0, -25.0, seed=2)])  # a fan turned on mid-call
    bridge, at = run_line(fan, agent_playing())
    assert bridge.kinds() == ["SpeechOnset", "OnsetLost"]  # then it is the line's background
    assert at[0] == pytest.approx(1.02, abs=1e-6)


def test_the_agents_own_echo_is_no_onset(speech: np.ndarray) -> None:
    """The echo gate vetoes a loud frame that the agent's own voice, played back, explains."""
    agent = speech[: RATE * 3]
    reference = EchoReference()
    now = time.monotonic()
    frames = agent[: len(agent) // FRAME * FRAME].reshape(-1, FRAME).astype(np.float64) / 32768
    for k, frame in enumerate(frames):
        reference.add(now + (k + 1) * 0.02, 10 * np.log10(max(float(np.mean(frame**2)), 1e-12)))
    echo = (agent.astype(np.float32) * 10 ** (-20 / 20)).astype(np.int16)  # -20 dB, no delay
    bridge, _ = run_line(echo, reference)
    assert bridge.kinds() == []


def test_onset_events_are_off_unless_asked(speech: np.ndarray) -> None:
    bridge = Bridge()
    segmenter = SpeechSegmenter(SileroVad(), NoPartials(), bridge, SegmenterConfig())  # type: ignore[arg-type]
    line = np.concatenate([silence(1.0), speech[: RATE * 2]])
    for k in range(len(line) // FRAME):
        segmenter.push(line[k * FRAME : (k + 1) * FRAME].tobytes(), time.monotonic())
    assert bridge.kinds()[0] == "SpeechStarted"


def test_a_replaced_engine_loses_a_pending_onset() -> None:
    bridge = Bridge()
    segmenter = SpeechSegmenter(
        SileroVad(),
        NoPartials(),
        bridge,  # type: ignore[arg-type]
        SegmenterConfig(onset_events=True),
    )
    for _ in range(60):
        segmenter.push(bytes(FRAME * 2), time.monotonic())
    segmenter.push(level_pcm(0.02, -15.0).tobytes(), time.monotonic())
    assert bridge.kinds() == ["SpeechOnset"]
    segmenter.use_engines(SileroVad(), NoPartials())
    assert bridge.kinds() == ["SpeechOnset", "OnsetLost"]  # the pause it caused must not wait for nothing


# ------------------------------------------------------------------------------- the policy
SPEAKING = ActiveTurn(1, True, 1, state="speaking")
ONSET_PAUSED = ActiveTurn(1, True, 1, state="speaking", pending=True, pending_onset=True)
PAUSED = ActiveTurn(1, True, 1, state="speaking", pending=True)
THINKING = ActiveTurn(1, True, 1, state="thinking")


@pytest.mark.parametrize(
    ("mode", "signal", "turn", "action", "reason"),
    [
        ("pause", Signal("onset", 2), SPEAKING, "pause", "onset"),
        ("stop", Signal("onset", 2), SPEAKING, "pause", "onset"),  # stop cancels on proof, pauses first
        ("confirm", Signal("onset", 2), SPEAKING, "none", "onset_not_used"),
        ("off", Signal("onset", 2), SPEAKING, "none", "onset_not_used"),
        ("pause", Signal("onset", 2), THINKING, "none", "onset_not_used"),  # nothing playing to pause
        ("pause", Signal("onset", 2), PAUSED, "none", "already_pending"),
        ("pause", Signal("onset", 1), SPEAKING, "none", "same_utterance"),
        ("pause", Signal("onset_lost", 2), ONSET_PAUSED, "resume", "onset_lost"),
        ("pause", Signal("onset_lost", 2), PAUSED, "none", "not_pending"),  # speech backs that pause now
        ("pause", Signal("onset_lost", 2), SPEAKING, "none", "not_pending"),
        ("pause", Signal("vad", 2), ONSET_PAUSED, "pause", "vad"),  # sustained: now wait for words
        ("stop", Signal("vad", 2), ONSET_PAUSED, "cancel", "vad"),
        ("pause", Signal("timeout"), ONSET_PAUSED, "resume", "onset_not_sustained"),
        ("pause", Signal("timeout"), PAUSED, "resume", "no_words"),
    ],
)
def test_onset_policy(mode: str, signal: Signal, turn: ActiveTurn, action: str, reason: str) -> None:
    decision = BargeInPolicy(speaking=mode).decide(signal, turn)  # type: ignore[arg-type]
    assert (decision.action, decision.reason) == (action, reason)


# ------------------------------------------------------------------------------- the player
async def test_a_short_pause_resumes_where_it_stopped_not_at_the_clause() -> None:
    _socket, writer, writer_task, player, track = start_player(lead_ms=40)

    async def speak() -> None:
        for text in ("one two", "three four"):
            await player.play(track, bytes(640 * 10), text=text)  # 200 ms each
        await player.finish(track)

    speaking = asyncio.create_task(speak())
    await asyncio.sleep(0.3)
    writer.pause_audio(1)
    heard = player.pause(track, time.monotonic())
    assert player.resume(track, replay_clause=False) == (heard // 20) * 20  # not 200 (the clause)
    await asyncio.wait_for(speaking, 2)
    writer_task.cancel()


# ------------------------------------------------------------------------------- a call
GREETING = "Welcome to Tony's, we have a long list of specials today, starting with the garlic bread."
# A click: a frame loud enough to be an onset (-29 dBFS on a silent line) that no VAD window, which
# also holds silence, calls speech (the harness's VAD hears speech over -30 dBFS).
CLICK = (0.05 * np.sin(2 * np.pi * 300 * np.arange(FRAME) / RATE) * 32767).astype("<i2").tobytes()


def onset_harness(**settings: object) -> CallHarness:
    return CallHarness(synthesizer=ScriptedSynthesizer(ms_per_char=30), greeting=GREETING, **settings)


async def test_a_click_pauses_the_agent_briefly_and_it_goes_on_where_it_stopped() -> None:
    async with onset_harness() as call:
        call.frames(0.6, loud=False)  # the line, quiet
        await call.until(lambda: call.sent_audio_ms() > 400)
        call.send(acs.inbound_audio_message(CLICK))
        call.frames(0.4, loud=False)
        paused = await call.wait_for("barge_in_paused", turn_id=1)
        resumed = await call.wait_for("barge_in_resumed", turn_id=1)
        assert paused["trigger"] == "onset" and resumed["reason"] == "onset_lost"
        assert resumed["t"] - paused["t"] < call.settings.onset_resume_ms / 1000
        assert resumed["from_ms"] == (paused["heard_ms"] // 20) * 20  # where it stopped
        onset = call.named("speech_onset")[0]
        assert onset["cue"] == "level" and onset["t"] <= paused["t"]
        await call.wait_for("turn_completed", turn_id=1, timeout=10)
        assert call.stop_audio_count() == 1 and not call.named("barge_in_decided")


async def test_speech_after_an_onset_keeps_the_one_pause_and_its_words_cancel_the_turn() -> None:
    async with onset_harness(bargein_confirm_ms=5000) as call:
        await call.until(lambda: call.sent_audio_ms() > 400)
        await call.say("No, I want a large pepperoni")
        decided = await call.wait_for("barge_in_decided", turn_id=1)
        assert decided["trigger"] == "final"
        paused = call.named("barge_in_paused", turn_id=1)
        assert [p["trigger"] for p in paused] == ["onset"]  # sustained speech did not pause it again
        assert not call.named("barge_in_resumed") and call.stop_audio_count() == 1


async def test_an_onset_that_nothing_follows_resumes_after_onset_resume_ms() -> None:
    """No frame after the onset (the stream stalls): no window decides, the timer resumes."""
    async with onset_harness(onset_resume_ms=150) as call:
        call.frames(0.6, loud=False)
        await call.until(lambda: call.sent_audio_ms() > 400)
        call.send(acs.inbound_audio_message(CLICK))
        paused = await call.wait_for("barge_in_paused", turn_id=1)
        resumed = await call.wait_for("barge_in_resumed", turn_id=1)
        assert resumed["reason"] == "onset_not_sustained"
        assert 0.14 <= resumed["t"] - paused["t"] < 0.3
        assert resumed["from_ms"] == (paused["heard_ms"] // 20) * 20


async def test_a_long_pause_resumes_at_the_clause_it_cut() -> None:
    async with onset_harness(resume_after_ms=400) as call:
        await call.until(lambda: call.sent_audio_ms() > 900)  # in the second clause (540-1680 ms)
        await call.say("", seconds=0.2)  # sustained sound with no words
        resumed = await call.wait_for("barge_in_resumed", turn_id=1, timeout=5)
        assert resumed["reason"] == "no_words" and resumed["from_ms"] == 540  # that clause's start


@pytest.mark.parametrize(("mode", "first_trigger"), [("pause", "vad"), ("stop", None)])
async def test_without_onsets_the_vad_gate_pauses_as_before(mode: str, first_trigger: str | None) -> None:
    async with onset_harness(bargein_onset=False, bargein_speaking=mode) as call:
        await call.until(lambda: call.sent_audio_ms() > 400)
        await call.say("No, stop")
        await call.wait_for("barge_in_decided", turn_id=1)
        assert not call.named("speech_onset")
        assert [p["trigger"] for p in call.named("barge_in_paused")] == ([first_trigger] if first_trigger else [])


async def test_in_stop_mode_an_onset_pauses_and_speech_then_cancels_with_one_stop() -> None:
    async with onset_harness(bargein_speaking="stop") as call:
        await call.until(lambda: call.sent_audio_ms() > 400)
        await call.say("No, stop")
        decided = await call.wait_for("barge_in_decided", turn_id=1)
        assert decided["trigger"] == "vad"
        assert [p["trigger"] for p in call.named("barge_in_paused")] == ["onset"]
        assert call.stop_audio_count() == 1


async def test_in_confirm_mode_an_onset_does_not_pause() -> None:
    async with onset_harness(bargein_speaking="confirm") as call:
        await call.until(lambda: call.sent_audio_ms() > 400)
        call.frames(0.02, loud=True)
        call.frames(0.4, loud=False)
        await asyncio.sleep(0.3)
        assert not call.named("speech_onset")  # (confirm mode does not even look for onsets)
        assert not call.named("barge_in_paused") and call.stop_audio_count() == 0


def test_frames_with_sound_wake_the_thread_only_while_the_agent_plays() -> None:
    def segmenter(reference: EchoReference | None, onset: bool = True) -> SpeechSegmenter:
        return SpeechSegmenter(
            SileroVad(),
            NoPartials(),
            Bridge(),  # type: ignore[arg-type]
            SegmenterConfig(onset_events=onset),
            echo_gate=EchoGate(reference) if reference is not None else None,
        )

    assert segmenter(agent_playing()).watches_level()
    assert not segmenter(EchoReference()).watches_level()  # nothing playing
    assert not segmenter(agent_playing(), onset=False).watches_level()
    assert segmenter(None).watches_level()  # no echo reference: always watched
