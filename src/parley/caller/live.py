"""The live call: the state sender and receiver share, the 20 ms sender, the receiver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from rich.console import Console
from rich.progress import Progress
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from parley.caller.options import ClipFrames
from parley.caller.playout import PlayoutEmulator
from parley.caller.script import SILENCE, Script
from parley.caller.uplink import UplinkMix
from parley.caller.wire import AgentAudio, AgentMark, AgentStop, CallerWire, Ignored

FRAME_S: Final = 0.020
"""ACS sends one frame every 20 ms."""


@dataclass(slots=True)
class CallState:
    """What the sender and receiver tasks share (both run on one event loop: no locking)."""

    t0: float
    playout: PlayoutEmulator
    wire: CallerWire
    received: list[tuple[float, int]] = field(default_factory=list)  # (receive time, samples), per message
    # Marks the server sent, (when the audio queued before it will have played, name), in arrival order.
    marks: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: int = 0
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
            parsed = self.wire.parse(message)
        except ValueError as exc:  # AcsProtocolError, TwilioWireError
            self.error(at, f"malformed server message: {exc}")
            return
        if isinstance(parsed, AgentAudio):
            self.playout.receive(at, parsed.pcm)
            self.received.append((at, len(parsed.pcm) // 2))
        elif isinstance(parsed, AgentStop):
            self.stop_flushed_s.append(self.playout.stop(at))
            self.stops.append(at)
            # Twilio echoes every pending mark when the buffer is cleared: nothing is left to play.
            self.marks = [(min(due, at), name) for due, name in self.marks]
        elif isinstance(parsed, AgentMark):
            end = self.playout.playout_end
            self.marks.append((at if end is None else max(at, end), parsed.name))
        elif isinstance(parsed, Ignored):
            self.error(at, f"ignored server message of unknown kind {parsed.kind!r}")

    def due_marks(self, now: float) -> list[str]:
        """Names of the marks whose audio has played by `now`, in the order they came; forgets them."""
        due = [name for at, name in self.marks if at <= now]
        if due:
            self.marks = [(at, name) for at, name in self.marks if at > now]
        return due


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


@dataclass(slots=True)
class SendLog:
    """What the sender did, for the report."""

    frames_sent: int = 0
    lateness_max_s: float = 0.0
    onset: float | None = None
    speech_end: float | None = None
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    clip_sent: list[float] = field(default_factory=list)  # send time of each clip frame, in order
    # With recording on: every frame sent, (schedule index, PCM16 at the call's rate), for the `out` WAV.
    uplink: list[tuple[int, bytes]] = field(default_factory=list)


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
        record: bool = False,
    ) -> None:
        self.log = SendLog()
        self._mix = mix
        self._record = record
        self._wire = state.wire
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
            await self._echo_played_marks(now)
            frame = self._script.tick(now)
            if frame is None:
                return
            await self._send_frame(frame, index)
            index += 1

    async def _send_due_dtmf(self, now: float) -> None:
        while self._dtmf and self._state.t0 + self._dtmf[0][0] <= now:
            _, digits = self._dtmf.pop(0)
            for message in self._wire.dtmf(digits):
                await self._ws.send(message)
            self.log.dtmf.append((now, digits))

    async def _echo_played_marks(self, now: float) -> None:
        """What Twilio does: a mark comes back once the audio sent before it has played (on this
        20 ms tick, as Twilio's own playout is frame by frame)."""
        for name in self._state.due_marks(now):
            message = self._wire.mark_played(name)
            if message is not None:
                await self._ws.send(message)
                self._state.marks_echoed += 1

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
        message = self._wire.frame(pcm, silent)
        sent_at = time.monotonic()
        await self._ws.send(message)
        self.log.frames_sent += 1
        if self._record:
            self.log.uplink.append((index, pcm))
        if frame != SILENCE:
            self._note_clip_frame(frame, sent_at)

    def _note_clip_frame(self, frame: int, sent_at: float) -> None:
        self.log.clip_sent.append(sent_at)
        if self._clip.loud[frame]:
            if self.log.onset is None:
                self.log.onset = sent_at
            self.log.speech_end = sent_at
        self._progress.advance()
