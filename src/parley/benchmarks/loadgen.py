"""Load generator: many simulated ACS callers against one parley server, from one asyncio loop.

`parley.caller` models one call in detail (playout emulation, per-frame JSON, timelines); at a few
hundred concurrent calls that per-frame work would make the benchmark client the bottleneck, and
the latencies measured would be the client's, not the server's. Here each frame costs O(1) work
and almost no allocation:

* every message is encoded once up front (AudioMetadata, the silence frame, each clip frame) and
  shared by all callers, down to the masked WebSocket frame bytes;
* one `Metronome` timer drives every caller's 20 ms send schedule, instead of one timer, one
  future and one task switch per caller per frame;
* received frames are handed to the caller as websockets parses them and classified by their
  byte prefix (parley writes the documented PascalCase form), with no JSON or base64 decoding,
  no message queue and no task switch; only a message matching neither prefix goes through the
  full codec, and anything it cannot parse is an error;
* the barge-in logic is a small pure state machine (`CallerState`) fed `(time, kind)` events, so
  it is tested with a fake clock and the socket code around it stays thin.

Measured on a 2-vCPU VM against a cheap stand-in server, 300 calls cost the client about 0.55 of
a core this way, against 0.86 with websockets' `send()`/`recv()` and a sleep per caller per
frame. What remains is mostly the kernel's loopback TCP (a third) and websockets' frame parser.

All times are `time.monotonic()` seconds.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import State

from parley.audio import SPEECH_ONSET_DBFS as ONSET_DBFS
from parley.audio import loud_frames, to_frames
from parley.transports.acs import (
    AcsProtocolError,
    AudioFormat,
    OutboundAudio,
    OutboundStop,
    audio_metadata_message,
    inbound_audio_message,
    parse_outbound,
)

__all__ = [
    "CallStats",
    "CallerState",
    "EncodedAudio",
    "LoadPlan",
    "LoadResult",
    "Metronome",
    "encode_audio",
    "run_load",
]

FRAME_S: Final = 0.020
"""ACS sends (and parley plays) one 20 ms frame per 20 ms."""

_FRAME_MS: Final = 20

STRETCH_GAP_S: Final = 0.100
"""Agent audio after at least this long without any starts a new stretch. Longer than parley's
pacing gaps and shorter than any pause between two turns."""

STILL_TALKING_S: Final = 0.100
"""The agent counts as still talking while its last frame arrived at most this long ago."""

STOP_WINDOW_S: Final = 2.0
"""A barge-in whose StopAudio has not arrived this long after the speech onset is missed."""

JITTER_SKIP_FRAMES: Final = 8
"""parley sends up to 100 ms ahead of playout, so a stretch's first ~5 frames arrive in a burst;
skipping the first 8 keeps that intended burst out of the pacing-jitter samples."""

MAX_ERRORS_PER_CALL: Final = 20
"""Errors kept verbatim per call; a server that sends garbage every frame would otherwise make
the result grow by 50 strings a second per call. The rest are counted in one summary line."""

BACKLOG_S: Final = 1.0
"""Audio queued unsent on our side for longer than this means the server has stopped reading."""

CLOSE_TIMEOUT_S: Final = 2.0
"""How long to wait for the closing handshake."""

OPEN_TIMEOUT_S: Final = 20.0
"""Handshake timeout: generous, since a loaded server accepts slowly and that is worth seeing in
the latencies rather than as a wave of connect failures."""

SILENCE: Final = -1
"""`CallerState.tick` result: send the silence frame."""

_BACKLOG_CHECK_FRAMES: Final = 50
_AUDIO_PREFIX: Final = b'{"Kind":"AudioData"'
_STOP_PREFIX: Final = b'{"Kind":"StopAudio"'


# --------------------------------------------------------------------------------------------
# The plan and the results
# --------------------------------------------------------------------------------------------


@dataclass
class LoadPlan:
    """How many callers, for how long, saying what, and when."""

    calls: int
    seconds: float  # how long each call lasts (after its own connect)
    clip: np.ndarray  # int16 mono speech at sample_rate: the caller's barge-in utterance
    sample_rate: int = 16000
    ramp_s: float = 5.0  # the N connects are spread evenly over this time (no thundering herd)
    barge_in_after_s: float = 1.0  # speak once the agent has been talking this long ...
    barge_in_jitter_s: float = 0.5  # ... plus uniform(0, jitter) (seeded), so calls do not align
    seed: int = 1
    headers_prefix: str = "load"  # call ids f"{prefix}-{run id}-{index}"


@dataclass
class CallStats:
    """What one simulated call measured."""

    call_id: str
    onset_to_stop_ms: list[float] = field(default_factory=list)
    missed: int = 0
    jitter_ms: list[float] = field(default_factory=list)
    frames_sent: int = 0
    frames_received: int = 0
    send_lateness_ms_max: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    plan: LoadPlan
    calls: list[CallStats]
    started_t: float
    ended_t: float

    def onset_to_stop_ms(self) -> list[float]:
        """Every barge-in measured in every call: speech onset sent -> StopAudio received."""
        return [value for call in self.calls for value in call.onset_to_stop_ms]

    def jitter_ms(self) -> list[float]:
        return [value for call in self.calls for value in call.jitter_ms]

    def errors(self) -> list[str]:
        """All errors, each prefixed with its call id so they can be traced in the server log."""
        return [f"{call.call_id}: {error}" for call in self.calls for error in call.errors]

    def missed(self) -> int:
        return sum(call.missed for call in self.calls)


# --------------------------------------------------------------------------------------------
# Pre-encoded audio, shared by every caller
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedAudio:
    """Every message a caller sends, encoded once as UTF-8 JSON."""

    metadata: bytes
    silence: bytes
    clip: tuple[bytes, ...]
    onset_index: int  # first clip frame above ONSET_DBFS


def encode_audio(clip: np.ndarray, sample_rate: int) -> EncodedAudio:
    """Cut `clip` into 20 ms frames and encode every message a caller will send."""
    fmt = AudioFormat.for_rate(sample_rate)  # raises UnsupportedFormat for rates ACS lacks
    frames = to_frames(_checked_clip(clip), fmt.frame_samples)
    onset = _onset_index(frames)
    if onset is None:
        raise ValueError(f"the clip has no frame above {ONSET_DBFS:.0f} dBFS: it is not speech")
    return EncodedAudio(
        metadata=audio_metadata_message(fmt).encode(),
        # No timestamp: it would differ per frame and defeat pre-encoding; parley ignores it.
        silence=inbound_audio_message(bytes(fmt.frame_bytes), silent=True).encode(),
        clip=tuple(_frame_message(frame) for frame in frames),
        onset_index=onset,
    )


def _checked_clip(clip: np.ndarray) -> np.ndarray:
    pcm = np.asarray(clip)
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError("LoadPlan.clip must be a 1-D int16 array at the plan's sample rate")
    if pcm.size == 0:
        raise ValueError("LoadPlan.clip is empty")
    return pcm


def _onset_index(frames: np.ndarray) -> int | None:
    loud = np.flatnonzero(loud_frames(frames))
    return int(loud[0]) if loud.size else None


def _frame_message(frame: np.ndarray) -> bytes:
    # All-zero frames go out flagged silent, as ACS flags digital silence.
    silent = not frame.any()
    return inbound_audio_message(frame.astype("<i2").tobytes(), silent=silent).encode()


@dataclass(frozen=True, slots=True)
class _WireAudio:
    """The audio messages as complete masked WebSocket text frames, ready for the socket."""

    silence: bytes
    clip: tuple[bytes, ...]

    @classmethod
    def from_encoded(cls, audio: EncodedAudio) -> _WireAudio:
        return cls(_wire_frame(audio.silence), tuple(_wire_frame(m) for m in audio.clip))


def _wire_frame(message: bytes) -> bytes:
    # Clients must mask; websockets draws a random key per serialize(), so each message gets its
    # own key, reused for the whole run. The key only guards against intermediaries misreading
    # attacker-chosen bytes; for fixed benchmark audio, a per-frame key is pure cost.
    return Frame(Opcode.TEXT, message).serialize(mask=True)


# --------------------------------------------------------------------------------------------
# One caller's logic, without sockets
# --------------------------------------------------------------------------------------------


class CallerState:
    """When to barge in and what each barge-in measured, driven by timed events.

    The socket code calls `on_audio`/`on_stop` for every AudioData/StopAudio received and `tick`
    once per 20 ms frame it is about to send; all three are O(1). Everything runs on one event
    loop, so no locking is needed.
    """

    __slots__ = (
        "_after_s",
        "_clip_len",
        "_clip_next",
        "_errors_dropped",
        "_jitter_s",
        "_last_audio",
        "_onset",
        "_onset_index",
        "_rng",
        "_spoke_in_stretch",
        "_stretch_frames",
        "_stretch_start",
        "_t0",
        "_target_s",
        "errors",
        "frames_received",
        "jitter_ms",
        "missed",
        "onset_to_stop_ms",
    )

    def __init__(
        self,
        *,
        t0: float,
        clip_frames: int,
        onset_index: int,
        barge_in_after_s: float,
        barge_in_jitter_s: float,
        rng: random.Random,
    ) -> None:
        self._t0 = t0
        self._clip_len = clip_frames
        self._onset_index = onset_index
        self._after_s = barge_in_after_s
        self._jitter_s = barge_in_jitter_s
        self._rng = rng
        self._target_s = self._draw_target()
        self._last_audio = -math.inf
        self._stretch_start: float | None = None  # None: no stretch (none yet, or cut by a stop)
        self._stretch_frames = 0
        self._spoke_in_stretch = False
        self._clip_next = SILENCE  # next clip frame to send, SILENCE when not speaking
        self._onset: float | None = None  # onset of the barge-in awaiting its StopAudio
        self._errors_dropped = 0
        self.onset_to_stop_ms: list[float] = []
        self.jitter_ms: list[float] = []
        self.missed = 0
        self.frames_received = 0
        self.errors: list[str] = []

    def _draw_target(self) -> float:
        # A fresh draw per barge-in, so calls that happen to align once do not stay aligned.
        return self._after_s + self._rng.uniform(0.0, self._jitter_s)

    @property
    def speaking(self) -> bool:
        return self._clip_next != SILENCE

    # -- events ----------------------------------------------------------------------------

    def on_audio(self, now: float) -> None:
        """An AudioData frame from the agent arrived at `now`."""
        self.frames_received += 1
        gap = now - self._last_audio
        self._last_audio = now
        if gap >= STRETCH_GAP_S:
            self._stretch_start, self._stretch_frames, self._spoke_in_stretch = now, 1, False
            return
        if self._stretch_start is None:
            return  # frames still in flight when StopAudio cut the stretch: not a new one
        self._stretch_frames += 1
        if self._stretch_frames > JITTER_SKIP_FRAMES:
            self.jitter_ms.append(abs(gap - FRAME_S) * 1000.0)

    def on_stop(self, now: float) -> None:
        """A StopAudio arrived at `now`: it answers the pending barge-in, or it is a false stop."""
        self._expire(now)
        self._stretch_start = None
        if self._onset is None:
            self.error(now, "unexpected StopAudio (no barge-in pending)")
            return
        self.onset_to_stop_ms.append((now - self._onset) * 1000.0)
        self._onset = None

    def tick(self, now: float) -> int:
        """The frame to send at `now`: a clip frame index, or SILENCE."""
        self._expire(now)
        if self._clip_next == SILENCE:
            if not self._agent_talked_enough(now):
                return SILENCE
            self._clip_next, self._spoke_in_stretch = 0, True
            self._target_s = self._draw_target()
        index = self._clip_next
        if index == self._onset_index:
            self._note_onset(now)
        self._clip_next = index + 1 if index + 1 < self._clip_len else SILENCE
        return index

    def finish(self, now: float) -> None:
        """The call is over; a barge-in still inside its window is neither measured nor missed."""
        self._expire(now)
        if self._errors_dropped:
            self.errors.append(f"... and {self._errors_dropped} more errors")
            self._errors_dropped = 0

    def error(self, now: float, text: str) -> None:
        if len(self.errors) < MAX_ERRORS_PER_CALL:
            self.errors.append(f"+{(now - self._t0) * 1000.0:.0f} ms: {text}")
        else:
            self._errors_dropped += 1

    # -- helpers ---------------------------------------------------------------------------

    def _agent_talked_enough(self, now: float) -> bool:
        start = self._stretch_start
        return (
            start is not None
            and not self._spoke_in_stretch  # one barge-in per stretch: then await the reply
            and now - start >= self._target_s
            and now - self._last_audio <= STILL_TALKING_S
        )

    def _note_onset(self, now: float) -> None:
        if self._onset is not None:
            # The previous barge-in is still unanswered; a new onset must not hide it.
            self.missed += 1
        self._onset = now

    def _expire(self, now: float) -> None:
        if self._onset is not None and now - self._onset > STOP_WINDOW_S:
            self.missed += 1
            self._onset = None


# --------------------------------------------------------------------------------------------
# The connection: websockets, minus its per-message queue on the receive side
# --------------------------------------------------------------------------------------------

FrameListener = Callable[[Frame, float], None]


class _MediaConnection(ClientConnection):
    """A websockets ClientConnection that hands data frames to a listener as they are parsed.

    websockets normally queues each message for `recv()`, resolves a future and switches tasks:
    at 300 calls that is 15,000 task switches a second (about 0.1 of a core, measured).
    `process_event` is the hook websockets itself overrides (in ClientConnection, for the
    handshake response); data frames stop here, while control frames (close, ping, pong) keep
    websockets' own handling, so the closing handshake and close codes work as usual. Sending
    writes pre-framed bytes to the transport, skipping websockets' per-message framing.
    """

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self._listener: FrameListener | None = None
        # Frames that arrive between the handshake and attach() (the greeting may start at once).
        self._early: list[tuple[Frame, float]] = []

    def attach(self, listener: FrameListener) -> None:
        """Deliver data frames to `listener` from now on, starting with any that came early."""
        for frame, at in self._early:
            listener(frame, at)
        self._early.clear()
        self._listener = listener

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.opcode in DATA_OPCODES:
            listener = self._listener
            if listener is None:
                self._early.append((event, time.monotonic()))
            else:
                listener(event, time.monotonic())
            return
        super().process_event(event)

    def write_wire(self, data: bytes) -> None:
        """Write pre-framed bytes: a plain transport write, no per-frame framing or masking."""
        self.transport.write(data)

    def backlog(self) -> int:
        """Bytes written but not yet handed to the kernel (grows when the server stops reading)."""
        return self.transport.get_write_buffer_size()


def _frame_listener(state: CallerState) -> FrameListener:
    """Classify each server frame by its prefix; the full codec only for anything else."""
    on_audio, on_stop = state.on_audio, state.on_stop

    def on_frame(frame: Frame, now: float) -> None:
        data = frame.data
        if not isinstance(data, bytes):  # websockets parses into bytes; its type allows views
            data = bytes(data)
        if not frame.fin or frame.opcode is Opcode.CONT:
            state.error(now, "fragmented server message (ACS media messages are never split)")
        elif data.startswith(_AUDIO_PREFIX):
            on_audio(now)
        elif data.startswith(_STOP_PREFIX):
            on_stop(now)
        else:
            _classify_slowly(data, state, now)

    def guarded(frame: Frame, now: float) -> None:
        # This runs inside websockets' data_received: an exception there would abort the
        # connection and pass for a server hang-up, so a bug is recorded as what it is.
        try:
            on_frame(frame, now)
        except Exception as exc:  # noqa: BLE001 - a receiver bug is recorded, not taken for a hang-up
            state.error(now, f"receiver failed: {_describe(exc)}")

    return guarded


def _classify_slowly(message: bytes, state: CallerState, now: float) -> None:
    """A message in some other spelling (e.g. camelCase): full parse, errors recorded."""
    try:
        parsed = parse_outbound(message)
    except AcsProtocolError as exc:
        state.error(now, f"unparseable server message: {exc}")
        return
    if isinstance(parsed, OutboundAudio):
        state.on_audio(now)
    elif isinstance(parsed, OutboundStop):
        state.on_stop(now)
    else:
        state.error(now, f"server message of unknown kind {parsed.kind!r}")


# --------------------------------------------------------------------------------------------
# Sending: one timer for all callers
# --------------------------------------------------------------------------------------------


class _Sender:
    """One call's frame schedule: frame i is due at `start_ms + 20 * i` (whole ms, monotonic).

    Deadlines come from the start, never from the previous send, so lateness never accumulates;
    after a stall the missed frames go out back to back, as ACS would send them.
    """

    __slots__ = (
        "_backlog_limit",
        "_backlog_noted",
        "_clip",
        "_end",
        "_index",
        "_silence",
        "_state",
        "_ws",
        "done",
        "lateness_max_s",
        "server_closed",
        "start_ms",
    )

    def __init__(self, ws: _MediaConnection, state: CallerState, wire: _WireAudio, end: float) -> None:
        self._ws = ws
        self._state = state
        self._silence, self._clip = wire.silence, wire.clip
        self._end = end
        self._index = 0
        self._backlog_limit = round(BACKLOG_S / FRAME_S) * len(wire.silence)
        self._backlog_noted = False
        self.start_ms = 0  # set by Metronome.start
        self.lateness_max_s = 0.0
        self.server_closed = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def frames_sent(self) -> int:
        return self._index

    def tick(self, now: float, now_ms: int) -> bool:
        """Send every frame due by `now_ms` (= floor(now in ms)); False once the call is over.

        Due times are compared as whole milliseconds: as floats, a frame due at exactly the
        timer's millisecond could compare as a hair in the future and wait a whole period.
        """
        if self._ws.state is not State.OPEN:
            self.server_closed = True  # we only close after finishing, so this is the server
            return self._finish()
        due_ms = self.start_ms + _FRAME_MS * self._index
        while due_ms <= now_ms:
            due = due_ms / 1000.0
            if due >= self._end:
                return self._finish()
            self.lateness_max_s = max(self.lateness_max_s, now - due)
            frame = self._state.tick(now)
            self._ws.write_wire(self._silence if frame == SILENCE else self._clip[frame])
            self._index += 1
            due_ms += _FRAME_MS
        if self._index % _BACKLOG_CHECK_FRAMES == 0:  # a once-a-second look is plenty
            self._check_backlog(now)
        return True

    def fail(self, exc: Exception) -> None:
        """A bug in this call's tick: record it and end this call only."""
        self._state.error(time.monotonic(), f"sender failed: {_describe(exc)}")
        self._finish()

    def _finish(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return False

    def _check_backlog(self, now: float) -> None:
        if not self._backlog_noted and self._ws.backlog() > self._backlog_limit:
            self._backlog_noted = True  # once per call: it says the same thing every frame
            self._state.error(now, f"server stopped reading: over {BACKLOG_S:.0f} s of audio unsent")


class Metronome:
    """Runs every caller's 20 ms send schedule from one timer.

    Schedules start on whole milliseconds, so at most 20 distinct send times recur every 20 ms,
    however many calls there are: one timer wakes each due millisecond and serves all callers
    due then. A sleep per caller per frame would cost a timer, a future and a task switch each,
    15,000 times a second at 300 calls. Callers whose time has come while the loop was busy are
    served on the next wake and catch up by sending their missed frames back to back.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots: list[list[_Sender]] = [[] for _ in range(_FRAME_MS)]
        self._timer: asyncio.TimerHandle | None = None
        self._next_ms = 0  # first millisecond not served yet

    def start(self, sender: _Sender) -> None:
        """Start `sender`'s schedule on the next whole millisecond and serve it from then on."""
        sender.start_ms = math.floor(time.monotonic() * 1000.0) + 1
        self._slots[sender.start_ms % _FRAME_MS].append(sender)
        if self._timer is None or sender.start_ms < self._next_ms:
            # Idle, or armed for later than this caller's first frame: re-arm earlier. Every
            # millisecond served so far is before start_ms, so none is served twice.
            if self._timer is not None:
                self._timer.cancel()
            self._next_ms = sender.start_ms
            self._arm()

    def _arm(self) -> None:
        """Set the timer for the next millisecond that has callers, if any."""
        for ms in range(self._next_ms, self._next_ms + _FRAME_MS):
            if self._slots[ms % _FRAME_MS]:
                self._next_ms = ms
                self._timer = self._loop.call_later(ms / 1000.0 - time.monotonic(), self._wake)
                return
        self._timer = None

    def _wake(self) -> None:
        now = time.monotonic()
        now_ms = math.floor(now * 1000.0)
        if now_ms >= self._next_ms:  # else the timer fired a hair early: just re-arm
            # Every slot from the first unserved millisecond to now, each once: after a stall of
            # 20 ms or more that is all of them, and each caller catches up in its own tick.
            for ms in range(self._next_ms, min(now_ms + 1, self._next_ms + _FRAME_MS)):
                slot = self._slots[ms % _FRAME_MS]
                if slot:
                    self._slots[ms % _FRAME_MS] = [s for s in slot if _tick_isolated(s, now, now_ms)]
            self._next_ms = now_ms + 1
        self._arm()


def _tick_isolated(sender: _Sender, now: float, now_ms: int) -> bool:
    try:
        return sender.tick(now, now_ms)
    except Exception as exc:  # noqa: BLE001 - one call's bug must not stop the shared timer
        sender.fail(exc)
        return False


# --------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------


async def _converse(
    ws: _MediaConnection,
    plan: LoadPlan,
    audio: EncodedAudio,
    wire: _WireAudio,
    metronome: Metronome,
    rng: random.Random,
) -> tuple[CallerState, _Sender]:
    """The live part of one call, from AudioMetadata to the close."""
    t0 = time.monotonic()
    state = CallerState(
        t0=t0,
        clip_frames=len(audio.clip),
        onset_index=audio.onset_index,
        barge_in_after_s=plan.barge_in_after_s,
        barge_in_jitter_s=plan.barge_in_jitter_s,
        rng=rng,
    )
    ws.attach(_frame_listener(state))
    sender = _Sender(ws, state, wire, t0 + plan.seconds)
    try:
        await ws.send(audio.metadata, text=True)
        metronome.start(sender)
        await sender.done
    except ConnectionClosed:
        sender.server_closed = True  # closed before the first frame
    finally:
        await _close(ws, sender, state)
    state.finish(time.monotonic())
    return state, sender


async def _close(ws: _MediaConnection, sender: _Sender, state: CallerState) -> None:
    """Close normally (1000); if the server hung up first, record why unless it said 1000."""
    if not sender.server_closed:
        await ws.close(code=1000)  # waits for the closing handshake, up to close_timeout
        return
    try:
        await asyncio.wait_for(ws.wait_closed(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        state.error(time.monotonic(), "server closing handshake did not finish")
        ws.transport.abort()
        return
    code, reason = ws.close_code, ws.close_reason
    if code != 1000:
        detail = f" ({reason})" if reason else ""
        state.error(time.monotonic(), f"server closed the call with code {code}{detail}")


async def _run_call(
    url: str,
    plan: LoadPlan,
    audio: EncodedAudio,
    wire: _WireAudio,
    metronome: Metronome,
    call_id: str,
    rng: random.Random,
) -> CallStats:
    headers = {"x-ms-call-connection-id": call_id, "x-ms-call-correlation-id": str(uuid.uuid4())}
    try:
        # ACS sends plain text frames: no compression, which would only cost CPU on both ends.
        # No keepalive pings: the 50 frames/s media stream already proves the peer is alive.
        ws = await websockets.connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=2**20,
            open_timeout=OPEN_TIMEOUT_S,
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT_S,
            create_connection=_MediaConnection,
        )
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        return CallStats(call_id, errors=[f"connect failed: {_describe(exc)}"])
    assert isinstance(ws, _MediaConnection)
    state, sender = await _converse(ws, plan, audio, wire, metronome, rng)
    return CallStats(
        call_id=call_id,
        onset_to_stop_ms=state.onset_to_stop_ms,
        missed=state.missed,
        jitter_ms=state.jitter_ms,
        frames_sent=sender.frames_sent,
        frames_received=state.frames_received,
        send_lateness_ms_max=sender.lateness_max_s * 1000.0,
        errors=state.errors,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _isolated_call(
    url: str,
    plan: LoadPlan,
    audio: EncodedAudio,
    wire: _WireAudio,
    metronome: Metronome,
    call_id: str,
    rng: random.Random,
    start_at: float,
) -> CallStats:
    """One call, dialled at `start_at`; any failure becomes an error entry of this call only."""
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        return await _run_call(url, plan, audio, wire, metronome, call_id, rng)
    except Exception as exc:  # noqa: BLE001 - one broken call must not end the others
        return CallStats(call_id, errors=[f"call failed: {_describe(exc)}"])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_plan(plan: LoadPlan) -> None:
    """Fail before dialling anything, not halfway through a timed run."""
    if plan.calls < 1:
        raise ValueError("LoadPlan.calls must be at least 1")
    if plan.seconds <= 0:
        raise ValueError("LoadPlan.seconds must be positive")
    if plan.ramp_s < 0 or plan.barge_in_after_s < 0 or plan.barge_in_jitter_s < 0:
        raise ValueError("LoadPlan.ramp_s, barge_in_after_s and barge_in_jitter_s must be >= 0")


async def run_load(url: str, plan: LoadPlan) -> LoadResult:
    """Run `plan.calls` simulated ACS calls against the media WebSocket at `url`.

    Connects are spread evenly over `plan.ramp_s`; each call lasts `plan.seconds` after its own
    connect. Every call's failures are recorded in its CallStats; this only raises on a bad plan.
    """
    _check_plan(plan)
    audio = encode_audio(plan.clip, plan.sample_rate)
    wire = _WireAudio.from_encoded(audio)
    metronome = Metronome()
    run_id = uuid.uuid4().hex[:8]
    spacing = plan.ramp_s / plan.calls
    started = time.monotonic()
    tasks = [
        asyncio.create_task(
            _isolated_call(
                url,
                plan,
                audio,
                wire,
                metronome,
                f"{plan.headers_prefix}-{run_id}-{index}",
                # Seeded per call, so a rerun with the same seed barges in at the same moments.
                random.Random(plan.seed * 1_000_003 + index),
                started + index * spacing,
            ),
            name=f"loadgen-call-{index}",
        )
        for index in range(plan.calls)
    ]
    calls = await asyncio.gather(*tasks)
    return LoadResult(plan=plan, calls=list(calls), started_t=started, ended_t=time.monotonic())
