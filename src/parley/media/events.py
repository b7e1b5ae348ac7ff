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
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from parley.logs import EVENT_ATTR
from parley.records.store import CallRecord, CallStore, record_size
from parley.stats import ServerStats

log = logging.getLogger("parley.events")

EVENT_NAMES = frozenset(
    {
        "call_started",
        "agent_selected",  # the channel's handshake named the call's agent (Twilio's `start` parameters)
        "speech_onset",  # a first sign of caller speech over a turn (it may pause the agent)
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
        "stream_started",  # a channel's handshake (Twilio's start): its own call id, parameter names
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


# --- privacy: what callers said and keyed ----------------------------------------------------------
# Fields that carry what the caller or the agent said, or what a tool got or gave back, per event. The
# record keeps them (the events API, for authorised readers); a log line at INFO carries only their
# length (`[23 chars]`), a DEBUG line the text. DTMF fields are shown masked at INFO (see mask_digits).
PRIVATE_FIELDS: dict[str, frozenset[str]] = {
    "partial": frozenset({"text"}),
    "final": frozenset({"text"}),
    "turn_started": frozenset({"input"}),
    "turn_completed": frozenset({"text"}),
    "turn_cancelled": frozenset({"heard_text"}),
    "agent_text": frozenset({"text"}),
    "tool_called": frozenset({"arguments", "result", "results"}),
    "transfer_requested": frozenset({"reason"}),
}
DTMF_FIELDS: dict[str, frozenset[str]] = {"dtmf": frozenset({"digits"}), "dtmf_input": frozenset({"digits"})}
MASK = "•"
_KEPT_KEYS = frozenset("*#")  # not secrets (a menu's star, the terminator): they stay readable
_REMEMBERED_DIGITS = 4  # inputs this long are masked again where they reappear (a PIN in a tool's arguments)
_REMEMBERED_INPUTS = 16  # how many such inputs of a call are remembered (the latest)


def mask_digits(digits: str) -> str:
    """`4321#` -> `••••#`: every key but * and # masked, the length kept (how many keys, not which)."""
    return "".join(key if key in _KEPT_KEYS else MASK for key in digits)


def redacted(value: Any) -> Any:
    """What a log line at INFO shows of a private field: its length, never its text."""
    if isinstance(value, str):
        return f"[{len(value)} chars]"
    if value is None or isinstance(value, bool | int | float):
        return value
    return f"[{type(value).__name__}]"


def _is_dtmf_field(event: str, key: str, record: dict[str, Any]) -> bool:
    return key in DTMF_FIELDS.get(event, ()) or (
        event == "turn_started" and key == "input" and record.get("kind") == "dtmf"
    )


class _AsJson:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def __str__(self) -> str:
        return json.dumps(self.record, default=str)


MAX_LOG_BYTES = 4 * 2**20  # a call's events kept in memory (estimated size); the store keeps them all

EventSink = Callable[[str, int, dict[str, Any]], None]  # (call id, seq, record): a CallStore's append
EventObserver = Callable[[dict[str, Any]], None]  # sees every record once (metrics, traces); must not raise


class EventLog:
    """Append-only list of one call's events, bounded by count and by (estimated) bytes: the oldest
    go first, counted in `trimmed`. Safe to append from any thread. Each event gets a per-call `seq`
    (1, 2, ...) and goes to the sink (the call records store) once one is attached."""

    trimmed_total = 0  # events trimmed from all logs (for /api/stats)

    def __init__(
        self,
        call_id: str,
        *,
        max_events: int = 20000,
        max_bytes: int = MAX_LOG_BYTES,
        to_log: bool = True,
        mask_dtmf: bool = False,
    ) -> None:
        """`mask_dtmf`: DTMF digits are masked in the records themselves (the server sets it unless
        PARLEY_LOG_DTMF=true); the agent still gets the real keys."""
        self.call_id = call_id
        self._events: deque[dict[str, Any]] = deque()
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._seq = 0
        self.trimmed = 0
        self._sink: EventSink | None = None
        self._reader: Callable[[], list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()
        self._to_log = to_log
        self.mask_dtmf = mask_dtmf
        self._keyed: dict[str, None] = {}  # the last long DTMF inputs, masked where they reappear
        self._observers: tuple[EventObserver, ...] = ()

    def emit(self, event: str, t: float | None = None, **fields: Any) -> dict[str, Any]:
        assert event in EVENT_NAMES, f"unknown event name {event!r}"
        record = {"event": event, "t": time.monotonic() if t is None else t, "call_id": self.call_id}
        if self.mask_dtmf:  # before the size cap, which would be masked too
            with self._lock:  # (the remembered inputs)
                fields = self._masked(event, fields)
        record.update((key, cap_field(value)) for key, value in fields.items())
        with self._lock:
            self._keep(record)
        if self._to_log and log.isEnabledFor(logging.INFO):
            # The message is the record's JSON, made only if a handler asks for it: parley.logs'
            # formatters use the dict itself. What callers said or keyed goes only to DEBUG.
            if not _has_private(event, record):
                log.info("%s", _AsJson(record), extra={EVENT_ATTR: record})
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%s", _AsJson(record), extra={EVENT_ATTR: record})
            else:
                shown = _redacted_copy(event, record)
                log.info("%s", _AsJson(shown), extra={EVENT_ATTR: shown})
        return record

    def _masked(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """The fields with DTMF digits masked (and a long keyed input where a tool call repeats it)."""
        masked = dict(fields)
        for key, value in fields.items():
            if isinstance(value, str) and _is_dtmf_field(event, key, fields):
                if event == "dtmf_input" and _REMEMBERED_DIGITS <= len(value) <= MAX_FIELD_CHARS:
                    self._keyed[value] = None
                    while len(self._keyed) > _REMEMBERED_INPUTS:
                        del self._keyed[next(iter(self._keyed))]
                masked[key] = mask_digits(value)
            elif event == "tool_called" and key in PRIVATE_FIELDS[event] and self._keyed:
                masked[key] = _masked_inside(value, self._keyed)
        return masked

    def _keep(self, record: dict[str, Any]) -> None:
        """Keep `record` (the lock held: the store gets the events in seq order)."""
        self._seq += 1
        if self._reader is None:  # once released, the store holds the call's events
            size = record_size(record)
            self._events.append(record)
            self._sizes.append(size)
            self._bytes += size
            while len(self._events) > self._max_events or (self._bytes > self._max_bytes and len(self._events) > 1):
                self._events.popleft()
                self._bytes -= self._sizes.popleft()
                self.trimmed += 1
                EventLog.trimmed_total += 1
        if self._sink is not None:
            self._sink(self.call_id, self._seq, record)
        for observer in self._observers:
            observer(record)

    def attach(self, sink: EventSink) -> None:
        """Send every event from now on to `sink`, and those kept so far at once."""
        with self._lock:
            first = self._seq - len(self._events) + 1
            for seq, record in enumerate(self._events, start=first):
                sink(self.call_id, seq, record)
            self._sink = sink

    def observe(self, observer: EventObserver) -> None:
        """Show `observer` every event from now on, and those kept so far at once (in order)."""
        with self._lock:
            for record in self._events:
                observer(record)
            self._observers = (*self._observers, observer)

    def release(self, reader: Callable[[], list[dict[str, Any]]]) -> None:
        """Free the events kept in memory: the store has them; `reader` reads them back from there
        (it may block on disk: not on the event loop). Later events still go to the sink."""
        with self._lock:
            self._events.clear()
            self._sizes.clear()
            self._bytes = 0
            self._reader = reader

    @property
    def nbytes(self) -> int:
        """Estimated size of the events kept in memory."""
        return self._bytes

    def snapshot(self) -> list[dict[str, Any]]:
        reader = self._reader
        if reader is not None:
            return reader()
        with self._lock:
            return list(self._events)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [record for record in self.snapshot() if record["event"] == event]


def _has_private(event: str, record: dict[str, Any]) -> bool:
    private = PRIVATE_FIELDS.get(event, frozenset()) | DTMF_FIELDS.get(event, frozenset())
    return any(key in record for key in private)


def _redacted_copy(event: str, record: dict[str, Any]) -> dict[str, Any]:
    """The record as a log line at INFO shows it: private text as its length, DTMF masked."""
    shown = dict(record)
    for key, value in record.items():
        if _is_dtmf_field(event, key, record) and isinstance(value, str):
            shown[key] = mask_digits(value)
        elif key in PRIVATE_FIELDS.get(event, ()):
            shown[key] = redacted(value)
    return shown


def _masked_inside(value: Any, keyed: dict[str, None]) -> Any:
    """`value` with every occurrence of a keyed input masked (in strings, lists and dicts)."""
    if isinstance(value, str):
        for digits in sorted(keyed, key=len, reverse=True):
            value = value.replace(digits, mask_digits(digits))
        return value
    if isinstance(value, dict):
        return {key: _masked_inside(item, keyed) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked_inside(item, keyed) for item in value]
    return value


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
    """Live calls (their sessions, by call id) plus the event logs of recently ended calls (bounded).
    With a `store`, every call's events go to it, and ended calls keep no events in memory: their
    logs read them back from the store."""

    def __init__(
        self,
        keep_ended: int = 100,
        stats: ServerStats | None = None,
        *,
        store: CallStore | None = None,
        agent: str = "",
    ) -> None:
        self.stats = stats if stats is not None else ServerStats()
        self.store = store
        self.agent = agent
        self._live: dict[str, Any] = {}
        # Each sees every event of every call from its start (parley.metrics, parley.tracing).
        self.observers: list[EventObserver] = []
        self._ended: OrderedDict[str, EventLog] = OrderedDict()
        self._keep_ended = keep_ended

    def started(self, session: LiveCall) -> None:
        self._ended.pop(session.call_id, None)
        self._live[session.call_id] = session
        self.stats.calls_started += 1
        if self.store is not None:
            correlation_id = str(getattr(session, "correlation_id", "") or "")
            agent = str(getattr(session, "agent_name", "") or self.agent)  # chosen by the call, else the default
            self.store.begin_call(CallRecord(session.call_id, correlation_id, agent, started_at=time.time()))
            session.events.attach(self.store.append)
        for observer in self.observers:
            session.events.observe(observer)

    def ended(self, session: LiveCall) -> None:
        if self._live.get(session.call_id) is session:
            del self._live[session.call_id]
        self.stats.call_ended(session.dropped_frames, session.input_errors)
        if self.store is not None:
            session.events.release(partial(_stored_events, self.store, session.call_id))
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

    def record_stats(self) -> dict[str, int]:
        """For /api/stats: call records written, dropped (queue full, disk error), queued; events
        trimmed from in-memory logs (their byte or count cap)."""
        counters = self.store.stats() if self.store is not None else {}
        return {f"records_{name}": value for name, value in counters.items()} | {
            "event_log_trimmed": EventLog.trimmed_total
        }


def _stored_events(store: CallStore, call_id: str) -> list[dict[str, Any]]:
    store.sync()
    return store.events(call_id)
