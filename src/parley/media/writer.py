"""The one writer to a call's socket.

Every outbound message goes through here, tagged with the turn it belongs to. Cancelling a turn
(`stop_audio`) marks it dead *before* StopAudio is queued, and a dead turn's frames are dropped at
the moment of writing, so no AudioData of a cancelled turn can ever follow its StopAudio.

A channel may also send messages that are not audio (the browser's live captions, `send_info`):
they belong to no turn, are written in order with the rest and are bounded, so a slow peer costs
dropped captions, never memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from parley.media.events import EventLog
from parley.transports.acs import stop_audio_message
from parley.transports.wire import Outbound

log = logging.getLogger(__name__)

Send = Callable[[Outbound], Awaitable[None]]

INFO_TURN = -1  # the "turn" of a message that is no audio (turn ids start at 1): never cancelled
MAX_INFO_PENDING = 256  # info messages queued and not yet written, beyond which new ones are dropped


class OutboundWriter:
    def __init__(self, send: Send, events: EventLog, stop_message: Outbound | None = None) -> None:
        self._send = send
        self._events = events
        self._stop_message = stop_audio_message() if stop_message is None else stop_message  # the wire's
        self._pending: deque[tuple[int, Outbound, bool]] = deque()  # (turn_id, message, is_stop)
        self._wakeup = asyncio.Event()
        self._cancelled: set[int] = set()
        self._audio_started: set[int] = set()
        self.closed = False
        self.frames_sent = 0
        self.frames_dropped = 0
        self._info_pending = 0
        self.info_sent = 0
        self.info_dropped = 0

    def send_audio(self, turn_id: int, message: Outbound) -> None:
        if turn_id in self._cancelled or self.closed:
            self.frames_dropped += 1
            return
        self._pending.append((turn_id, message, False))
        self._wakeup.set()

    def send_info(self, message: Outbound) -> bool:
        """Queue a message that is not audio, after everything queued so far; False (dropped) when
        the socket is closed or `MAX_INFO_PENDING` such messages are still waiting to be written."""
        if self.closed or self._info_pending >= MAX_INFO_PENDING:
            self.info_dropped += 1
            return False
        self._info_pending += 1
        self._pending.append((INFO_TURN, message, False))
        self._wakeup.set()
        return True

    def stop_audio(self, turn_id: int, *, send_stop: bool = True) -> None:
        """Cancel `turn_id`'s audio and send StopAudio ahead of anything still queued.

        `send_stop=False` when the turn was paused: its StopAudio has been sent already.
        """
        self._cancelled.add(turn_id)
        if send_stop:
            self._pending.appendleft((turn_id, self._stop_message, True))
        self._wakeup.set()

    def pause_audio(self, turn_id: int) -> None:
        """Send StopAudio ahead of everything and drop `turn_id`'s frames not yet written, but keep
        accepting its audio: a paused reply may resume (the player re-sends from where it was)."""
        kept = deque(item for item in self._pending if item[0] != turn_id or item[2])
        self.frames_dropped += len(self._pending) - len(kept)
        self._pending = kept
        self._pending.appendleft((turn_id, self._stop_message, True))
        self._wakeup.set()

    def is_cancelled(self, turn_id: int) -> bool:
        return turn_id in self._cancelled

    async def run(self) -> None:
        """The writer task: sends queued messages in order until the socket fails or it is cancelled."""
        while not self.closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self.closed:
                turn_id, message, is_stop = self._pending.popleft()
                if turn_id == INFO_TURN:
                    self._info_pending -= 1
                    await self._write_info(message)
                    continue
                if not is_stop and turn_id in self._cancelled:
                    self.frames_dropped += 1
                    continue
                await self._write(turn_id, message, is_stop)

    async def _write_info(self, message: Outbound) -> None:
        try:
            await self._send(message)
        except Exception as exc:  # noqa: BLE001 - as in _write: the receive side ends the call
            log.info("outbound socket closed: %s", exc)
            self.closed = True
            return
        self.info_sent += 1

    async def _write(self, turn_id: int, message: Outbound, is_stop: bool) -> None:
        try:
            await self._send(message)
        except Exception as exc:  # noqa: BLE001 - socket gone (any transport's error): the receive side ends the call
            log.info("outbound socket closed: %s", exc)
            self.closed = True
            return
        now = time.monotonic()
        if is_stop:
            self._events.emit("stop_audio_sent", t=now, turn_id=turn_id)
            return
        self.frames_sent += 1
        if turn_id not in self._audio_started:
            self._audio_started.add(turn_id)
            self._events.emit("first_audio_sent", t=now, turn_id=turn_id)
