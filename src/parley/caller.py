"""A simulated ACS caller: dials a parley server the way Azure Communication Services does.

`run_call` connects to a media-streaming WebSocket with the ACS upgrade headers, sends
AudioMetadata and then one 20 ms AudioData frame every 20 ms on an absolute real-time schedule
(silence when not speaking, as ACS does), speaks a clip at a chosen moment, and records the
agent's audio. ACS queues the audio an app sends and plays it in real time, flushing the queue on
StopAudio; `PlayoutEmulator` models that with a virtual playout clock, so the report and the `out`
WAV reflect what a real caller would have heard, not merely what arrived on the socket. A caller
on a speakerphone (`echo_db`) or in a noisy room (`background`) also sends the agent's own audio
and the room noise back up the line (`UplinkMix`).

Every timestamp is `time.monotonic()` seconds. The server logs its events on the same clock (same
machine), so caller-side times (speech onset, StopAudio received) and server-side events
(barge-in decided, StopAudio sent) can be subtracted directly.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import Enum, auto
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import numpy as np
import websockets
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from parley.audio import SPEECH_ONSET_DBFS as ONSET_DBFS
from parley.audio import loud_frames, read_wav, to_frames, write_wav
from parley.transports.acs import (
    AcsProtocolError,
    AudioFormat,
    OutboundAudio,
    OutboundStop,
    UnknownMessage,
    audio_metadata_message,
    dtmf_message,
    inbound_audio_message,
    parse_outbound,
)

__all__ = [
    "CallOptions",
    "CallReport",
    "PlayoutEmulator",
    "print_report",
    "run_call",
]

FRAME_S: Final = 0.020
"""ACS sends one frame every 20 ms."""

STRETCH_GAP_S: Final = 0.060
"""A pause in agent playout longer than this starts a new stretch (a few lost frames do not)."""

GREETING_QUIET_S: Final = 0.7
"""Agent silence after which the greeting is taken to be over and the caller speaks."""

LEAK_WINDOW_S: Final = 0.5
"""Without server events, audio received this soon after a StopAudio counts as leaked."""

EVENT_RACE_S: Final = 0.005
"""Server and caller read the same clock from different processes; a frame the server logged as
sent can reach us a hair before the logged time. This slack keeps such frames out of the leak."""

CLOSE_TIMEOUT_S: Final = 2.0
"""How long to wait for the receive task to finish after the socket is closed."""

EVENTS_TIMEOUT_S: Final = 5.0
"""Timeout for fetching the server's event log."""

_SERVER_EVENTS_IN_TIMELINE: Final = frozenset(
    {
        "speech_started",
        "partial",
        "final",
        "turn_started",
        "agent_text",
        "agent_handoff",
        "tool_called",
        "transfer_requested",
        "barge_in_paused",
        "barge_in_resumed",
        "barge_in_decided",
        "stop_audio_sent",
        "turn_cancelled",
        "call_ended",
    }
)


# --------------------------------------------------------------------------------------------
# Options and audio input
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallOptions:
    """What to say, when to say it, and where to call."""

    url: str
    audio: Path | None = None
    pcm: np.ndarray | None = None
    sample_rate: int = 16000
    barge_in_at: float | None = None
    out: Path | None = None
    call_id: str | None = None
    correlation_id: str | None = None
    max_wait_s: float = 15.0
    quiet_after_s: float = 1.5
    greeting_wait_s: float = 6.0
    progress: bool = False
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    fetch_events: bool = True
    end_after_stop_s: float | None = None  # hang up this long after a StopAudio (barge-in trials)
    end_after_answer_s: float | None = None  # hang up this long after the answer starts (latency trials)
    # A speakerphone: every uplink frame also carries the agent audio that played echo_delay_ms
    # earlier, at echo_db relative to it (None: a headset, no echo).
    echo_db: float | None = None
    echo_delay_ms: int = 40
    background: np.ndarray | None = None  # int16 at sample_rate, looped under every uplink frame


def _clip_samples(options: CallOptions) -> np.ndarray:
    """The clip to speak, from `pcm` or `audio`, validated."""
    if (options.audio is None) == (options.pcm is None):
        raise ValueError("give exactly one of CallOptions.audio or CallOptions.pcm")
    if options.pcm is not None:
        pcm = np.asarray(options.pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("CallOptions.pcm must be a 1-D int16 array at the call's sample rate")
    else:
        assert options.audio is not None
        pcm = read_wav(options.audio, options.sample_rate)
    if pcm.size == 0:
        raise ValueError("the clip to speak is empty")
    return pcm


@dataclass(frozen=True, slots=True)
class ClipFrames:
    """The clip cut into 20 ms frames, with each frame's speech/zero flags computed up front so
    the sender does no analysis on its real-time path."""

    frames: np.ndarray  # (n, samples_per_frame) int16
    loud: np.ndarray  # bool per frame: RMS above ONSET_DBFS
    zero: np.ndarray  # bool per frame: all samples zero (sent with silent=true, like ACS)

    @classmethod
    def from_pcm(cls, pcm: np.ndarray, samples_per_frame: int) -> ClipFrames:
        frames = to_frames(pcm, samples_per_frame)
        return cls(frames=frames, loud=loud_frames(frames), zero=np.asarray(~frames.any(axis=1)))

    def __len__(self) -> int:
        return len(self.frames)


# --------------------------------------------------------------------------------------------
# ACS playout emulation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stretch:
    """A span of continuous agent playout, in monotonic seconds; `cut` says whether a StopAudio
    ended it (rather than the agent's audio simply running out)."""

    start: float
    end: float
    cut: bool = False


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    cut: bool = False


class PlayoutEmulator:
    """ACS's outbound queue on a virtual playout clock.

    Positions are whole samples since call start (`t0`), so consecutive chunks join without
    rounding gaps and the `out` WAV can be rendered sample-exactly. A chunk received at r plays
    from max(r, end of the queue); StopAudio at s drops chunks not yet started and cuts the one
    playing at s.
    """

    def __init__(self, t0: float, sample_rate: int) -> None:
        self.t0 = t0
        self.rate = sample_rate
        self._gap = round(STRETCH_GAP_S * sample_rate)
        self._segments: list[tuple[int, bytes]] = []  # (start sample, pcm)
        self._stretches: list[_Span] = []
        self._end = 0  # where the queue runs dry
        self.stop_times: list[float] = []  # when each StopAudio arrived

    def _pos(self, t: float) -> int:
        return max(0, round((t - self.t0) * self.rate))

    def _time(self, pos: int) -> float:
        return self.t0 + pos / self.rate

    def receive(self, at: float, pcm: bytes) -> None:
        """Queue agent audio that arrived at `at`."""
        if not pcm:
            return
        start = max(self._pos(at), self._end)
        end = start + len(pcm) // 2
        self._segments.append((start, pcm))
        if self._stretches and start - self._stretches[-1].end <= self._gap:
            self._stretches[-1].end = end
            self._stretches[-1].cut = False  # audio resumed within the gap: one stretch
        else:
            self._stretches.append(_Span(start, end))
        self._end = end

    def stop(self, at: float) -> float:
        """StopAudio at `at`: flush the queue. Returns the seconds of audio that were flushed."""
        self.stop_times.append(at)
        return self._truncate(self._pos(at), by_stop=True) / self.rate

    def finish(self, at: float) -> None:
        """The call ended at `at`: whatever was still queued is never heard."""
        self._truncate(self._pos(at), by_stop=False)

    def _truncate(self, cut: int, *, by_stop: bool) -> int:
        """Drop queued audio from sample `cut` on; returns the number of samples dropped."""
        dropped = 0
        while self._segments and self._segments[-1][0] >= cut:
            dropped += len(self._segments.pop()[1]) // 2
        if self._segments:
            start, pcm = self._segments[-1]
            keep = cut - start
            if start + len(pcm) // 2 > cut:
                dropped += len(pcm) // 2 - keep
                self._segments[-1] = (start, pcm[: 2 * keep])
        while self._stretches and self._stretches[-1].start >= cut:
            self._stretches.pop()
        if self._stretches and self._stretches[-1].end > cut:
            self._stretches[-1].end = cut
            self._stretches[-1].cut = by_stop
        self._end = min(self._end, cut)
        return dropped

    # -- queries the sender makes on its 20 ms ticks ---------------------------------------

    def has_played(self, now: float) -> bool:
        """Whether any agent audio has started playing by `now`."""
        return bool(self._segments) and self._time(self._segments[0][0]) <= now

    @property
    def playout_end(self) -> float | None:
        """When the queued agent audio runs out (may be in the future), or None if none came."""
        return self._time(self._end) if self._segments else None

    def started_since(self, t: float) -> bool:
        """Whether some agent audio plays (or is queued to play) from `t` on."""
        return bool(self._segments) and self._time(self._segments[-1][0]) >= t

    def first_start_since(self, t: float) -> float | None:
        """When the first agent audio that plays from `t` on starts playing."""
        for start, _pcm in self._segments:
            start_t = self._time(start)
            if start_t >= t:
                return start_t
        return None

    def played_between(self, start: float, end: float) -> np.ndarray:
        """The agent audio that played from `start` to `end` (zeros where nothing did), int16."""
        return self.played_samples(round((start - self.t0) * self.rate), round((end - self.t0) * self.rate))

    def played_samples(self, first: int, last: int) -> np.ndarray:
        """Samples [first, last) of the playout timeline (positions since `t0`; may be negative).

        Called every 20 ms for echo, so it touches only the segments overlapping the interval:
        segments are sorted and never overlap, so a bisect finds the last one starting before
        `last` and the scan stops at the first one ending by `first`.
        """
        out = np.zeros(max(0, last - first), dtype=np.int16)
        index = bisect.bisect_left(self._segments, last, key=lambda segment: segment[0])
        while index > 0:
            index -= 1
            start, pcm = self._segments[index]
            end = start + len(pcm) // 2
            if end <= first:
                break
            lo, hi = max(first, start), min(last, end)
            out[lo - first : hi - first] = np.frombuffer(pcm, dtype="<i2", count=hi - lo, offset=2 * (lo - start))
        return out

    def stretch_at(self, now: float) -> Stretch | None:
        """The latest stretch that has started by `now` (possibly already over)."""
        pos = self._pos(now)
        for span in reversed(self._stretches):
            if span.start <= pos:
                return self._stretch(span)
        return None

    def _stretch(self, span: _Span) -> Stretch:
        return Stretch(self._time(span.start), self._time(span.end), span.cut)

    # -- results ---------------------------------------------------------------------------

    @property
    def stretches(self) -> list[Stretch]:
        return [self._stretch(span) for span in self._stretches]

    @property
    def played_s(self) -> float:
        return sum(len(pcm) // 2 for _, pcm in self._segments) / self.rate

    def render(self, until: float) -> np.ndarray:
        """What the caller heard from call start to `until`, as int16 mono."""
        heard = np.zeros(self._pos(until), dtype=np.int16)
        for start, pcm in self._segments:
            chunk = np.frombuffer(pcm, dtype="<i2")[: max(0, heard.size - start)]
            heard[start : start + chunk.size] = chunk
        return heard


# --------------------------------------------------------------------------------------------
# When to speak and when to hang up
# --------------------------------------------------------------------------------------------


class SpeakTrigger(Protocol):
    def ready(self, now: float, playout: PlayoutEmulator) -> bool: ...


@dataclass(frozen=True, slots=True)
class BargeInTrigger:
    """Speak once the current stretch of agent playout has played `after_s` seconds."""

    after_s: float

    def ready(self, now: float, playout: PlayoutEmulator) -> bool:
        stretch = playout.stretch_at(now)
        if stretch is None:
            return False
        due = stretch.start + self.after_s
        # The stretch must really have lasted that long, not merely have started long ago.
        return now >= due and stretch.end >= due


@dataclass(frozen=True, slots=True)
class GreetingOverTrigger:
    """Speak once the greeting is over, or when none came within `wait_s` of call start."""

    t0: float
    wait_s: float
    quiet_s: float = GREETING_QUIET_S

    def ready(self, now: float, playout: PlayoutEmulator) -> bool:
        if not playout.has_played(now):
            return now - self.t0 >= self.wait_s
        end = playout.playout_end
        return end is not None and now - end >= self.quiet_s


@dataclass(frozen=True, slots=True)
class AnswerWatcher:
    """After the clip: done once the agent answered and then fell quiet, or after `max_wait_s`."""

    clip_end: float
    quiet_s: float
    max_wait_s: float
    end_after_answer_s: float | None = None

    def done(self, now: float, playout: PlayoutEmulator) -> bool:
        if now - self.clip_end >= self.max_wait_s:
            return True
        if not playout.started_since(self.clip_end):
            return False
        if self.end_after_answer_s is not None:
            answer = playout.first_start_since(self.clip_end)
            return answer is not None and now - answer >= self.end_after_answer_s
        end = playout.playout_end
        return end is not None and now - end >= self.quiet_s


class Phase(Enum):
    WAITING = auto()
    SPEAKING = auto()
    AFTER = auto()
    DONE = auto()


SILENCE: Final = -1
"""`Script.tick` result: send a silence frame."""


class Script:
    """Decides, tick by tick, whether the caller sends silence, a clip frame, or hangs up."""

    def __init__(
        self,
        n_frames: int,
        trigger: SpeakTrigger,
        playout: PlayoutEmulator,
        options: CallOptions,
        give_up_at: float,
    ) -> None:
        self.phase = Phase.WAITING
        self.clip_start: float | None = None
        self.clip_end: float | None = None
        self.notes: list[str] = []
        self._n = n_frames
        self._next = 0
        self._trigger = trigger
        self._playout = playout
        self._options = options
        self._give_up_at = give_up_at
        self._watcher: AnswerWatcher | None = None

    def tick(self, now: float) -> int | None:
        """Clip frame index to send now, SILENCE, or None when the call should end."""
        if self._ended_by_stop(now):
            self.phase = Phase.DONE
            return None
        if self.phase is Phase.WAITING:
            if not self._should_start(now):
                return SILENCE
            self.phase, self.clip_start = Phase.SPEAKING, now
        if self.phase is Phase.SPEAKING:
            if self._next < self._n:
                self._next += 1
                return self._next - 1
            self._begin_after(now)
        if self.phase is Phase.AFTER:
            assert self._watcher is not None
            if not self._watcher.done(now, self._playout):
                return SILENCE
            self.phase = Phase.DONE
        return None

    def _ended_by_stop(self, now: float) -> bool:
        """With `end_after_stop_s`: the barge-in under test has happened and been watched long enough."""
        limit = self._options.end_after_stop_s
        if limit is None or self.clip_start is None:
            return False
        stops = [t for t in self._playout.stop_times if t >= self.clip_start]
        return bool(stops) and now - stops[0] >= limit

    def _should_start(self, now: float) -> bool:
        if self._trigger.ready(now, self._playout):
            return True
        if now < self._give_up_at:
            return False
        # Never hang forever on an agent that does not behave as expected; say so in the report.
        self.notes.append(f"speech trigger not met after {now - self._playout.t0:.1f} s; spoke anyway")
        return True

    def _begin_after(self, now: float) -> None:
        self.phase, self.clip_end = Phase.AFTER, now
        self._watcher = AnswerWatcher(
            now, self._options.quiet_after_s, self._options.max_wait_s, self._options.end_after_answer_s
        )


# --------------------------------------------------------------------------------------------
# The live call: shared state, sender, receiver
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallState:
    """What the sender and receiver tasks share (both run on one event loop: no locking)."""

    t0: float
    playout: PlayoutEmulator
    received: list[tuple[float, int]] = field(default_factory=list)  # (receive time, samples)
    stops: list[float] = field(default_factory=list)
    stop_flushed_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    server_closed: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    closed_at: float | None = None

    def error(self, at: float, text: str) -> None:
        self.errors.append(f"+{(at - self.t0) * 1000:.0f} ms: {text}")

    def on_message(self, message: str | bytes, at: float) -> None:
        """Apply one server message; anything malformed is recorded, never raised."""
        try:
            parsed = parse_outbound(message)
        except AcsProtocolError as exc:
            self.error(at, f"malformed server message: {exc}")
            return
        if isinstance(parsed, OutboundAudio):
            self.playout.receive(at, parsed.pcm)
            self.received.append((at, len(parsed.pcm) // 2))
        elif isinstance(parsed, OutboundStop):
            self.stop_flushed_s.append(self.playout.stop(at))
            self.stops.append(at)
        elif isinstance(parsed, UnknownMessage):
            self.error(at, f"ignored server message of unknown kind {parsed.kind!r}")


async def _receive(ws: ClientConnection, state: CallState) -> None:
    """Read server messages until the socket closes; a close we did not start is a hang-up."""
    try:
        async for message in ws:
            state.on_message(message, time.monotonic())
    except ConnectionClosed:
        pass  # an abnormal close is still the end of the call; the close code is reported
    finally:
        if not state.closing:
            state.closed_at = time.monotonic()
            state.server_closed.set()


class ClipProgress:
    """A rich progress bar over the clip's frames, or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        # On stderr, so a report or JSON printed to stdout stays clean.
        self._progress = Progress(console=Console(stderr=True), transient=True) if enabled else None
        self._task = self._progress.add_task("speaking", total=total) if self._progress else None

    def __enter__(self) -> ClipProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)


class UplinkMix:
    """What the caller's microphone picks up besides their own voice: a background noise bed and,
    on a speakerphone, the agent's own audio (echo).

    Frame i goes out at t0 + i*20 ms and carries the 20 ms before that, so the audio added to it
    covers timeline samples [(i-1)*N, i*N): consecutive frames join sample-exactly even when the
    sender runs late, and the echo is what played `echo_delay_ms` before each of those samples.
    """

    def __init__(self, options: CallOptions, playout: PlayoutEmulator, samples_per_frame: int) -> None:
        self._playout = playout
        self._n = samples_per_frame
        self._echo_gain = None if options.echo_db is None else 10 ** (options.echo_db / 20)
        self._echo_delay = round(options.echo_delay_ms * options.sample_rate / 1000)
        self._background = options.background

    @classmethod
    def for_options(cls, options: CallOptions, playout: PlayoutEmulator, samples_per_frame: int) -> UplinkMix | None:
        if options.echo_db is None and options.background is None:
            return None
        return cls(options, playout, samples_per_frame)

    def mix(self, own: np.ndarray, index: int) -> np.ndarray:
        """The caller's own frame (int16) with background and echo added, clipped to int16."""
        first = (index - 1) * self._n
        mixed = own.astype(np.float32)
        if self._background is not None:
            mixed += np.take(self._background, np.arange(first, first + self._n), mode="wrap")
        if self._echo_gain is not None:
            echo = self._playout.played_samples(first - self._echo_delay, first - self._echo_delay + self._n)
            mixed += echo * np.float32(self._echo_gain)
        return np.clip(np.round(mixed), -32768, 32767).astype(np.int16)


@dataclass(slots=True)
class SendLog:
    """What the sender did, for the report."""

    frames_sent: int = 0
    lateness_max_s: float = 0.0
    onset: float | None = None
    speech_end: float | None = None
    dtmf: list[tuple[float, str]] = field(default_factory=list)


class Sender:
    """Sends one frame per 20 ms on the absolute schedule t0 + i*20 ms.

    Deadlines are computed from t0, never from the previous send, so lateness never accumulates;
    after a stall the missed frames go out back to back, as the schedule (and ACS) would have it.
    """

    def __init__(
        self,
        ws: ClientConnection,
        state: CallState,
        clip: ClipFrames,
        script: Script,
        dtmf: Sequence[tuple[float, str]],
        progress: ClipProgress,
        mix: UplinkMix | None = None,
    ) -> None:
        self.log = SendLog()
        self._mix = mix
        self._ws = ws
        self._state = state
        self._clip = clip
        self._script = script
        self._dtmf = sorted(dtmf)
        self._progress = progress
        self._silence = bytes(clip.frames.shape[1] * 2)
        self._quiet = np.zeros(clip.frames.shape[1], dtype=np.int16)

    async def run(self) -> None:
        t0 = self._state.t0
        index = 0
        while not self._state.server_closed.is_set():
            deadline = t0 + index * FRAME_S
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._state.server_closed.is_set():
                return
            now = time.monotonic()
            self.log.lateness_max_s = max(self.log.lateness_max_s, now - deadline)
            await self._send_due_dtmf(now)
            frame = self._script.tick(now)
            if frame is None:
                return
            await self._send_frame(frame, index)
            index += 1

    async def _send_due_dtmf(self, now: float) -> None:
        while self._dtmf and self._state.t0 + self._dtmf[0][0] <= now:
            _, digits = self._dtmf.pop(0)
            await self._ws.send(dtmf_message(digits))
            self.log.dtmf.append((now, digits))

    async def _send_frame(self, frame: int, index: int) -> None:
        if self._mix is not None:
            own = self._clip.frames[frame] if frame != SILENCE else self._quiet
            mixed = self._mix.mix(own, index)
            # Like ACS: silent=true only for a frame of digital silence, whatever made it.
            pcm, silent = mixed.tobytes(), not mixed.any()
        elif frame == SILENCE:
            pcm, silent = self._silence, True
        else:
            pcm, silent = self._clip.frames[frame].tobytes(), bool(self._clip.zero[frame])
        message = inbound_audio_message(pcm, timestamp=_acs_timestamp(), silent=silent)
        sent_at = time.monotonic()
        await self._ws.send(message)
        self.log.frames_sent += 1
        if frame != SILENCE:
            self._note_clip_frame(frame, sent_at)

    def _note_clip_frame(self, frame: int, sent_at: float) -> None:
        if self._clip.loud[frame]:
            if self.log.onset is None:
                self.log.onset = sent_at
            self.log.speech_end = sent_at
        self._progress.advance()


def _acs_timestamp() -> str:
    """Wall-clock time in ACS's format, e.g. 2024-11-15T19:16:12.925Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Server events
# --------------------------------------------------------------------------------------------


def events_url(ws_url: str, call_id: str) -> str:
    """http(s)://host:port/api/calls/{call_id}/events for a ws(s):// media-streaming URL."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    path = f"/api/calls/{quote(call_id, safe='')}/events"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


async def fetch_events(ws_url: str, call_id: str, settle_s: float = 2.0) -> list[dict[str, Any]]:
    """The server's event log for the call; raises on any failure (the caller records it).

    The server finishes a call (and logs `call_ended`) just after the socket closes, so poll
    briefly until that last event is there: a report should hold the whole call.
    """
    url = events_url(ws_url, call_id)
    # Plain http needs no TLS context; building one loads the CA bundle (~50 ms of CPU per call).
    verify = url.startswith("https:")
    deadline = time.monotonic() + settle_s
    async with httpx.AsyncClient(timeout=EVENTS_TIMEOUT_S, verify=verify) as client:
        while True:
            response = await client.get(url)
            response.raise_for_status()
            body = response.json()
            events = body.get("events") if isinstance(body, dict) else None
            if not isinstance(events, list):
                raise ValueError("events response has no 'events' list")
            ended = any(isinstance(e, dict) and e.get("event") == "call_ended" for e in events)
            if ended or time.monotonic() >= deadline:
                return [e for e in events if isinstance(e, dict)]
            await asyncio.sleep(0.05)


def _valid_events(raw: list[dict[str, Any]], t0: float, errors: list[str]) -> list[dict[str, Any]]:
    """Events with a numeric `t` and a name, sorted by time, with `t_ms` relative to call start."""
    events = []
    for event in raw:
        t = event.get("t")
        if not isinstance(event.get("event"), str) or not isinstance(t, (int, float)):
            errors.append(f"server event without name or time ignored: {event!r}"[:200])
            continue
        events.append({**event, "t_ms": _ms(t - t0)})
    return sorted(events, key=lambda e: e["t"])


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def onset_to_stop_ms(onset: float | None, stops: Sequence[float], since: float | None = None) -> list[float]:
    """For each StopAudio received after the clip started (`since`, default the onset): onset send
    time -> StopAudio receive time. Negative when the VAD fired on sound before the first frame above
    -40 dBFS (a breath, a quiet first syllable): still a response to the caller, not a miss."""
    if onset is None:
        return []
    start = onset if since is None else min(since, onset)
    return [_ms(s - onset) for s in stops if s >= start]


def decision_to_stop_ms(events: Sequence[dict[str, Any]]) -> list[float]:
    """Per barge-in: the server's decision to stop the audio (`barge_in_paused` in the default
    pause mode, else `barge_in_decided`) -> its stop_audio_sent for the same turn."""
    stops = [e for e in events if e["event"] == "stop_audio_sent"]
    result = []
    paused_turns = {e.get("turn_id") for e in events if e["event"] == "barge_in_paused"}
    decisions = [
        e
        for e in events
        if e["event"] == "barge_in_paused"
        or (e["event"] == "barge_in_decided" and e.get("turn_id") not in paused_turns)
    ]
    for decided in decisions:
        match = next(
            (s for s in stops if s.get("turn_id") == decided.get("turn_id") and s["t"] >= decided["t"]),
            None,
        )
        if match is not None:
            result.append(_ms(match["t"] - decided["t"]))
    return result


def _next_turn_audio(stop_at: float, events: Sequence[dict[str, Any]]) -> float:
    """When audio of a turn later than the one StopAudio cut began to be sent (inf if never)."""
    sent = [e for e in events if e["event"] == "stop_audio_sent" and e["t"] <= stop_at + EVENT_RACE_S]
    stopped_turn = sent[-1].get("turn_id") if sent else None
    since = sent[-1]["t"] if sent else stop_at
    for event in events:
        if event["event"] != "first_audio_sent" or event["t"] <= since:
            continue
        if stopped_turn is None or event.get("turn_id") != stopped_turn:
            return float(event["t"]) - EVENT_RACE_S
    return math.inf


def leaked_audio_ms(
    stops: Sequence[float],
    received: Sequence[tuple[float, int]],
    events: Sequence[dict[str, Any]],
    sample_rate: int,
) -> float:
    """Agent audio received after a StopAudio that still belonged to the turn it stopped.

    With server events, a leak lasts until the next turn's first_audio_sent; without them, audio
    within LEAK_WINDOW_S of the StopAudio counts. Each window also ends at the next StopAudio.
    """
    leaked = 0
    for k, stop_at in enumerate(stops):
        limit = _next_turn_audio(stop_at, events) if events else stop_at + LEAK_WINDOW_S
        if k + 1 < len(stops):
            limit = min(limit, stops[k + 1])
        leaked += sum(n for at, n in received if stop_at < at < limit)
    return _ms(leaked / sample_rate)


def voice_to_voice_ms(speech_end: float | None, received: Sequence[tuple[float, int]]) -> float | None:
    """Caller's speech end -> first agent audio received after it."""
    if speech_end is None:
        return None
    first = next((at for at, _ in received if at > speech_end), None)
    return None if first is None else _ms(first - speech_end)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallReport:
    """Everything measured in one call. Times named `*_t` are monotonic seconds; `*_ms` lists
    and timeline entries are milliseconds relative to call start (`t0`) unless named as deltas."""

    call_id: str
    correlation_id: str
    url: str
    sample_rate: int
    t0: float
    duration_ms: float
    frames_sent: int
    frames_received: int
    send_lateness_ms_max: float
    clip_started_t: float | None
    clip_ended_t: float | None
    speech_onset_t: float | None
    speech_end_t: float | None
    stop_audio_count: int
    stops: list[float]
    stop_flushed_ms: list[float]
    agent_audio_ms: float
    stretches: list[list[float]]
    onset_to_stop_ms: list[float]
    decision_to_stop_ms: list[float]
    leaked_audio_ms: float
    voice_to_voice_ms: float | None
    hung_up_by_server: bool
    close_code: int | None
    close_reason: str | None
    dtmf_sent: list[list[Any]]
    events: list[dict[str, Any]]
    events_error: str | None
    errors: list[str]
    timeline: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rel_ms(self, t: float | None) -> float | None:
        return None if t is None else _ms(t - self.t0)


class Timeline:
    """Collects (time, who, what) entries and renders them sorted, relative to call start."""

    def __init__(self, t0: float) -> None:
        self._t0 = t0
        self._items: list[tuple[float, str, str]] = []

    def add(self, t: float | None, who: str, what: str) -> None:
        if t is not None:
            self._items.append((t, who, what))

    def entries(self) -> list[dict[str, Any]]:
        ordered = sorted(self._items, key=lambda item: item[0])
        return [{"t_ms": _ms(t - self._t0), "who": who, "what": what} for t, who, what in ordered]


def _describe_event(event: dict[str, Any]) -> str:
    name = event["event"]
    turn = event.get("turn_id")
    match name:
        case "partial" | "final":
            return f"{name} {event.get('text', '')!r}"
        case "turn_started":
            return f"turn {turn} started ({event.get('kind', '?')})"
        case "agent_text":
            return f"says {event.get('text', '')!r}"
        case "agent_handoff":
            mode = "announced" if event.get("announced") else "silent"
            return f"handoff {event.get('source')} -> {event.get('target')} ({mode}, {event.get('history')} history)"
        case "tool_called":
            return f"tool {event.get('tool')} ({event.get('ms')} ms{'' if event.get('ok') else ', failed'})"
        case "transfer_requested":
            return f"transfer to {event.get('target')} requested"
        case "barge_in_paused":
            return f"barge-in: turn {turn} paused"
        case "barge_in_resumed":
            return f"turn {turn} resumed ({event.get('reason', '?')})"
        case "barge_in_decided":
            return f"barge-in decided, turn {turn} (trigger {event.get('trigger', '?')})"
        case "stop_audio_sent":
            return f"StopAudio sent, turn {turn}"
        case "turn_cancelled":
            return f"turn {turn} cancelled"
        case _:
            return str(name).replace("_", " ")


def _build_timeline(
    t0: float,
    script: Script,
    log: SendLog,
    state: CallState,
    events: Sequence[dict[str, Any]],
    end: float,
) -> list[dict[str, Any]]:
    timeline = Timeline(t0)
    timeline.add(script.clip_start, "caller", "starts sending the clip")
    timeline.add(log.onset, "caller", f"speech onset (> {ONSET_DBFS:.0f} dBFS)")
    timeline.add(log.speech_end, "caller", "speech end (last frame above threshold)")
    timeline.add(script.clip_end, "caller", "clip finished")
    for at, digits in log.dtmf:
        timeline.add(at, "caller", f"DTMF {digits!r}")
    for stretch in state.playout.stretches:
        timeline.add(stretch.start, "agent", "audio starts playing")
        how = "audio cut by StopAudio" if stretch.cut else "audio stops"
        timeline.add(stretch.end, "agent", how)
    for at, flushed in zip(state.stops, state.stop_flushed_s, strict=True):
        timeline.add(at, "server", f"StopAudio received ({_ms(flushed):.0f} ms queued audio flushed)")
    for event in events:
        if event["event"] in _SERVER_EVENTS_IN_TIMELINE:
            timeline.add(event["t"], "server", _describe_event(event))
    timeline.add(end, "server" if state.closed_at is not None else "caller", "hangs up")
    return timeline.entries()


# --------------------------------------------------------------------------------------------
# Running a call
# --------------------------------------------------------------------------------------------


def _trigger(options: CallOptions, t0: float) -> SpeakTrigger:
    if options.barge_in_at is not None:
        return BargeInTrigger(options.barge_in_at)
    return GreetingOverTrigger(t0, options.greeting_wait_s)


async def _converse(
    ws: ClientConnection, options: CallOptions, clip: ClipFrames, fmt: AudioFormat
) -> tuple[CallState, Script, SendLog, float]:
    """Run the live part of the call; returns the state, script, send log and end time."""
    t0 = time.monotonic()
    state = CallState(t0=t0, playout=PlayoutEmulator(t0, fmt.sample_rate))
    await ws.send(audio_metadata_message(fmt))
    give_up_at = t0 + options.greeting_wait_s + options.max_wait_s
    script = Script(len(clip), _trigger(options, t0), state.playout, options, give_up_at)
    receiver = asyncio.create_task(_receive(ws, state))
    with ClipProgress(len(clip), options.progress) as progress:
        mix = UplinkMix.for_options(options, state.playout, clip.frames.shape[1])
        sender = Sender(ws, state, clip, script, options.dtmf, progress, mix)
        server_closed_first = False
        try:
            await sender.run()
        except ConnectionClosed:
            # The server closed while we were sending; the receiver records when.
            server_closed_first = True
    end = time.monotonic()
    if not server_closed_first and not state.server_closed.is_set():
        state.closing = True  # from here on the close is ours, not a hang-up
    await ws.close()
    with contextlib.suppress(TimeoutError):
        # A receiver bug re-raises here rather than vanishing with the task.
        await asyncio.wait_for(receiver, CLOSE_TIMEOUT_S)
    if state.closed_at is not None:
        end = state.closed_at
    state.errors.extend(script.notes)
    return state, script, sender.log, end


async def run_call(options: CallOptions) -> CallReport:
    """Place one simulated ACS call and measure it. Connection failures raise; anything the
    server gets wrong during the call is recorded in the report's `errors` instead."""
    _check_options(options)
    fmt = AudioFormat.for_rate(options.sample_rate)
    clip = ClipFrames.from_pcm(_clip_samples(options), fmt.frame_bytes // 2)
    call_id = options.call_id or str(uuid.uuid4())
    correlation_id = options.correlation_id or str(uuid.uuid4())
    headers = {"x-ms-call-connection-id": call_id, "x-ms-call-correlation-id": correlation_id}
    # ACS sends plain text frames (no permessage-deflate); compressing would only cost CPU.
    async with websockets.connect(options.url, additional_headers=headers, max_size=2**20, compression=None) as ws:
        state, script, log, end = await _converse(ws, options, clip, fmt)
        close_code, close_reason = ws.close_code, ws.close_reason
    state.playout.finish(end)
    if options.out is not None:
        write_wav(options.out, state.playout.render(end), fmt.sample_rate)
    raw_events, events_error = await _events(options, call_id)
    events = _valid_events(raw_events, state.t0, state.errors)
    if events_error is not None:
        state.errors.append(f"events fetch failed: {events_error}")
    return CallReport(
        call_id=call_id,
        correlation_id=correlation_id,
        url=options.url,
        sample_rate=fmt.sample_rate,
        t0=state.t0,
        duration_ms=_ms(end - state.t0),
        frames_sent=log.frames_sent,
        frames_received=len(state.received),
        send_lateness_ms_max=_ms(log.lateness_max_s),
        clip_started_t=script.clip_start,
        clip_ended_t=script.clip_end,
        speech_onset_t=log.onset,
        speech_end_t=log.speech_end,
        stop_audio_count=len(state.stops),
        stops=[_ms(s - state.t0) for s in state.stops],
        stop_flushed_ms=[_ms(f) for f in state.stop_flushed_s],
        agent_audio_ms=_ms(state.playout.played_s),
        stretches=[[_ms(s.start - state.t0), _ms(s.end - state.t0)] for s in state.playout.stretches],
        onset_to_stop_ms=onset_to_stop_ms(log.onset, state.stops, script.clip_start),
        decision_to_stop_ms=decision_to_stop_ms(events),
        leaked_audio_ms=leaked_audio_ms(state.stops, state.received, events, fmt.sample_rate),
        voice_to_voice_ms=voice_to_voice_ms(log.speech_end, state.received),
        hung_up_by_server=state.closed_at is not None,
        close_code=close_code,
        close_reason=close_reason,
        dtmf_sent=[[_ms(at - state.t0), digits] for at, digits in log.dtmf],
        events=events,
        events_error=events_error,
        errors=state.errors,
        timeline=_build_timeline(state.t0, script, log, state, events, end),
    )


def _check_options(options: CallOptions) -> None:
    """Fail before dialling, not in the middle of a timed call."""
    if options.barge_in_at is not None and options.barge_in_at < 0:
        raise ValueError("barge_in_at must be >= 0 seconds")
    if options.echo_delay_ms < 0:
        raise ValueError("echo_delay_ms must be >= 0")
    if options.background is not None:
        background = np.asarray(options.background)
        if background.dtype != np.int16 or background.ndim != 1 or background.size == 0:
            raise ValueError("CallOptions.background must be a non-empty 1-D int16 array at the call's rate")
    for at, digits in options.dtmf:
        if at < 0:
            raise ValueError(f"DTMF time {at} is negative")
        dtmf_message(digits)  # raises on symbols that are not DTMF tones


async def _events(options: CallOptions, call_id: str) -> tuple[list[dict[str, Any]], str | None]:
    if not options.fetch_events:
        return [], None
    try:
        return await fetch_events(options.url, call_id), None
    except Exception as exc:  # any failure (refused, 404, bad JSON) must not lose the report
        return [], f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _fmt_list(values: Sequence[float], unit: str = "ms") -> str:
    return ", ".join(f"{v:.0f} {unit}" for v in values) if values else "none"


def _summary_lines(report: CallReport) -> list[str]:
    rel = report.rel_ms
    lines = [
        f"call {report.call_id} at {report.sample_rate} Hz, {report.duration_ms / 1000:.2f} s, "
        f"{report.frames_sent} frames sent, {report.frames_received} received, "
        f"max send lateness {report.send_lateness_ms_max:.1f} ms",
    ]
    if report.clip_started_t is not None:
        lines.append(
            f"caller spoke: clip {rel(report.clip_started_t)}-{rel(report.clip_ended_t)} ms, "
            f"speech {rel(report.speech_onset_t)}-{rel(report.speech_end_t)} ms"
        )
    else:
        lines.append("caller never spoke")
    spans = ", ".join(f"{a:.0f}-{b:.0f}" for a, b in report.stretches) or "none"
    lines.append(f"agent audio played: {report.agent_audio_ms:.0f} ms in stretches {spans} ms")
    stops = ", ".join(
        f"{s:.0f} ms (flushed {f:.0f} ms)" for s, f in zip(report.stops, report.stop_flushed_ms, strict=True)
    )
    lines.append(f"StopAudio received: {stops or 'none'}")
    lines.append(f"speech onset -> StopAudio: {_fmt_list(report.onset_to_stop_ms)}")
    lines.append(f"barge-in decision -> StopAudio sent: {_fmt_list(report.decision_to_stop_ms)}")
    lines.append(f"leaked audio after StopAudio: {report.leaked_audio_ms:.0f} ms")
    v2v = "none" if report.voice_to_voice_ms is None else f"{report.voice_to_voice_ms:.0f} ms"
    lines.append(f"voice-to-voice: {v2v}")
    ended = "the server hung up" if report.hung_up_by_server else "the caller hung up"
    lines.append(f"{ended} (close code {report.close_code})")
    return lines


def print_report(report: CallReport, console: Console | None = None, *, timeline: bool = True) -> None:
    """Print the call's timeline as a table (unless `timeline` is False), a summary and any errors."""
    console = console or Console()
    if timeline:
        _print_timeline(report, console)
    for line in _summary_lines(report):
        console.print(line, markup=False, highlight=False)
    for error in report.errors:
        console.print(f"error: {error}", style="red", markup=False)


def _print_timeline(report: CallReport, console: Console) -> None:
    table = Table(title=f"call {report.call_id}")
    table.add_column("t (ms)", justify="right")
    table.add_column("who")
    table.add_column("what")
    styles = {"caller": "cyan", "agent": "green", "server": "magenta"}
    for item in report.timeline:
        who = item["who"]
        # Text, not markup: recognised speech may contain [brackets].
        table.add_row(f"{item['t_ms']:.0f}", Text(who, style=styles.get(who, "")), Text(item["what"]))
    console.print(table)
