"""The per-call event log: the single source of truth for timings.

Events are dicts `{"event": name, "t": time.monotonic(), "call_id": ..., ...}`. `time.monotonic()` is
system-wide on Linux, so a simulated caller on the same machine can compare its own timestamps with ours.
Tests, benchmarks and the events API all read the same records.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Protocol

from parley.logs import EVENT_ATTR
from parley.stats import ServerStats

log = logging.getLogger("parley.events")

EVENT_NAMES = frozenset(
    {
        "call_started",
        "speech_started",
        "speech_ended",
        "partial",
        "final",
        "dtmf",
        "dtmf_input",  # keys collected into one input (see parley.media.dtmf)
        "turn_started",
        "first_audio_sent",
        "barge_in_decided",
        "barge_in_ignored",
        "barge_in_paused",
        "barge_in_pending",
        "barge_in_resumed",
        "barge_in_confirmed",
        "stop_audio_sent",
        "turn_cancelled",
        "turn_completed",
        "turn_failed",  # the agent or the voice failed or stalled: logged, the apology spoken
        "input_error",
        "agent_text",
        "first_audio_ready",
        "agent_stream_closed",
        "agent_handoff",
        "tool_called",
        "transfer_requested",
        "control_deferred",  # a goodbye's hang-up (or a transfer) waits: the caller talked over it
        "acs_event",  # a Call Automation callback about this call (CallConnected, ...)
        "call_ended",
    }
)


MAX_FIELD_CHARS = 500  # a longer string in an event (text, digits, error...) is cut to this


def cap_field(value: Any, limit: int = MAX_FIELD_CHARS) -> Any:
    """`value` with every string longer than `limit` (also inside lists and dicts) cut, ending with a
    marker that says how much was cut: event records, logged and kept, stay small whatever a peer sends."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}…[+{len(value) - limit} chars]"
    if isinstance(value, dict):
        return {key: cap_field(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [cap_field(item, limit) for item in value]
    if isinstance(value, tuple):
        return tuple(cap_field(item, limit) for item in value)
    return value


class _AsJson:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def __str__(self) -> str:
        return json.dumps(self.record, default=str)


class EventLog:
    """Append-only, bounded list of one call's events. Safe to append from any thread."""

    def __init__(self, call_id: str, *, max_events: int = 20000, to_log: bool = True) -> None:
        self.call_id = call_id
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self._to_log = to_log

    def emit(self, event: str, t: float | None = None, **fields: Any) -> dict[str, Any]:
        assert event in EVENT_NAMES, f"unknown event name {event!r}"
        record = {"event": event, "t": time.monotonic() if t is None else t, "call_id": self.call_id}
        record.update((key, cap_field(value)) for key, value in fields.items())
        with self._lock:
            self._events.append(record)
        if self._to_log and log.isEnabledFor(logging.INFO):
            # The message is the record's JSON, made only if a handler asks for it: parley.logs'
            # formatters use the dict itself.
            log.info("%s", _AsJson(record), extra={EVENT_ATTR: record})
        return record

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.snapshot() if record["event"] == event]


class LiveCall(Protocol):
    """What the registry reads of a call in progress (the media handler)."""

    @property
    def call_id(self) -> str: ...

    @property
    def events(self) -> EventLog: ...

    @property
    def dropped_frames(self) -> int: ...

    @property
    def input_errors(self) -> int: ...


class CallRegistry:
    """Live calls (their sessions, by call id) plus the event logs of recently ended calls (bounded)."""

    def __init__(self, keep_ended: int = 100, stats: ServerStats | None = None) -> None:
        self.stats = stats if stats is not None else ServerStats()
        self._live: dict[str, Any] = {}
        self._ended: OrderedDict[str, EventLog] = OrderedDict()
        self._keep_ended = keep_ended

    def started(self, session: LiveCall) -> None:
        self._ended.pop(session.call_id, None)
        self._live[session.call_id] = session
        self.stats.calls_started += 1

    def ended(self, session: LiveCall) -> None:
        if self._live.get(session.call_id) is session:
            del self._live[session.call_id]
        self.stats.call_ended(session.dropped_frames, session.input_errors)
        if self._keep_ended:
            self._ended[session.call_id] = session.events
            while len(self._ended) > self._keep_ended:
                self._ended.popitem(last=False)

    def session(self, call_id: str) -> Any | None:
        return self._live.get(call_id)

    def find(self, call_id: str) -> EventLog | None:
        live = self._live.get(call_id)
        return live.events if live is not None else self._ended.get(call_id)

    @property
    def live_count(self) -> int:
        return len(self._live)

    def live_sessions(self) -> list[Any]:
        """The calls in progress (their media handlers)."""
        return list(self._live.values())
