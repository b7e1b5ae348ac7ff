"""The browser channel's part of a call (`/ws/browser`): the call's events, forwarded to the page.

The wire (parley.transports.browser) turns audio and control into messages; this forwards the
call's event records, as the page shows them, through the call's one writer (`send_info`): in
order with the audio, never blocking the loop or the call (the writer drops captions a slow page
has not taken, see parley.media.writer), and never after the socket is gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastapi import WebSocket

from parley.figures import CallFigures
from parley.media.handler import MediaHandler
from parley.transports.browser import figure_message, page_event

log = logging.getLogger(__name__)


class EventForwarder:
    """An EventLog observer sending one call's events (and its latency figures) to the page."""

    def __init__(self, handler: MediaHandler, loop: asyncio.AbstractEventLoop) -> None:
        self._handler = handler
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop (attach runs there)
        self._start_t: float | None = None
        self._figures = CallFigures()
        self.sent = 0

    def __call__(self, record: dict[str, Any]) -> None:
        # Observers run where the event is emitted: on the loop, bar a rare callback thread.
        if threading.get_ident() == self._loop_thread:
            self._forward(record)
        else:
            self._loop.call_soon_threadsafe(self._forward, record)

    def _forward(self, record: dict[str, Any]) -> None:
        try:
            writer = self._handler.writer
            if writer is None:
                return
            if self._start_t is None:
                self._start_t = float(record["t"])  # call_started: the page's times count from it
            message = page_event(record, self._start_t)
            if message is not None and writer.send_info(message):
                self.sent += 1
            for figure in self._figures.feed(record):
                if writer.send_info(figure_message(figure.name, figure.seconds, figure.turn_id)):
                    self.sent += 1
        except Exception:  # an observer must not raise into the call (EventLog.emit's caller)
            log.exception("call %s: an event was not forwarded to the page", self._handler.call_id)


def forward_events(handler: MediaHandler, _websocket: WebSocket) -> None:
    """The browser channel's `attach`: from now on, the call's events go to the page too."""
    handler.events.observe(EventForwarder(handler, asyncio.get_running_loop()))


__all__ = ["EventForwarder", "forward_events"]
