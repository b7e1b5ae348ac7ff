"""What a call record holds, the Protocol every store implements, and how calls and turns are
derived from a call's events.

A store keeps every event record of a call (numbered by a per-call `seq`), plus a call row and turn
rows derived from those events as they arrive. Writers (`begin_call`, `append`) never block and never
raise: a store that cannot keep up drops and counts. Readers (`calls`, `call`, `turns`, `events`)
may block (disk): call them off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

# Events committed as soon as they are recorded (a `kill -9` right after loses none of them); the
# others are written in batches (a fraction of a second).
COMMIT_NOW = frozenset(
    {
        "call_started",
        "final",
        "dtmf_input",
        "turn_completed",
        "turn_cancelled",
        "turn_failed",
        "tool_called",
        "agent_handoff",
        "transfer_requested",
        "call_ended",
    }
)

ENDED_REMEMBERED = 10_000  # calls whose late events are not taken for a new call
MAX_BARGE_INS_PER_TURN = 50  # a turn row lists at most this many barge-in events (all stay in the events)


class RecordsUnavailable(RuntimeError):
    """The store cannot be read now (its server is unreachable): the API answers 503."""


def iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


@dataclass
class CallRecord:
    """One call. Times are wall-clock seconds since the epoch; `ended_at` None: live (or lost)."""

    call_id: str
    correlation_id: str = ""
    agent: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    events: int = 0  # how many event records the store holds for it
    instance: str = ""  # the instance serving it (the redis store; "" with one server per store)

    @property
    def live(self) -> bool:
        return self.ended_at is None

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "started": iso(self.started_at),
            "ended": iso(self.ended_at),
            "live": self.live,
        }


@dataclass
class TurnRecord:
    """One turn of the agent: what it answered, what it said, what the caller heard, barge-ins."""

    call_id: str
    turn_id: int
    kind: str = ""  # greeting, speech, dtmf
    input: str = ""  # what the caller said or keyed (the greeting's text for a greeting)
    said: str = ""  # what the agent said (its text, as produced)
    heard: str | None = None  # what the caller heard (all of it, or up to a barge-in)
    outcome: str = "open"  # open, completed, cancelled, failed, unfinished (the call ended first)
    started_at: float | None = None
    ended_at: float | None = None
    first_audio_ms: float | None = None  # turn start -> first frame sent
    voice_to_voice_ms: float | None = None  # caller's speech end -> first frame sent
    audio_ms: float | None = None  # audio sent
    heard_ms: float | None = None  # audio the caller heard
    error: str | None = None
    barge_ins: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "started": iso(self.started_at), "ended": iso(self.ended_at)}


@runtime_checkable
class CallStore(Protocol):
    """Where call records go. `sqlite` (durable, one server), `redis` (shared by every instance) and
    `memory` implement it; another store (Postgres, ...) only has to implement these methods."""

    kind: str
    lost_calls: list[str]
    """Calls a dead server left live, found (and marked `server_lost`) when the store opened: with
    Call Automation the phone calls may still be up at ACS, so the server hangs them up."""

    # --- writing: any thread, never blocks, never raises ---------------------------------------
    def begin_call(self, call: CallRecord) -> None:
        """A call started (before its events are appended). A known call id starts afresh."""

    def append(self, call_id: str, seq: int, record: Mapping[str, Any]) -> None:
        """Event number `seq` (1, 2, ...) of a call. `record` is not changed afterwards."""

    # --- control ------------------------------------------------------------------------------
    def sync(self, timeout: float = 2.0) -> bool:
        """Block until everything appended so far is readable (False: not within `timeout`)."""

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""

    def purge(self, before: float) -> int:
        """Delete ended calls that started before wall time `before`; how many were deleted."""

    def stats(self) -> dict[str, int]:
        """Counters: records written, dropped (queue full, disk error), queued."""

    def mark_lost(self, instance_id: str) -> list[str]:
        """End every live call the (dead) instance `instance_id` served: `server_lost`, open turns
        `unfinished`; the ids of the calls it ended. Two instances doing it at once end each call
        once. Only a store shared by instances (redis) has calls of another instance: others return []."""

    # --- reading: may block ---------------------------------------------------------------------
    def calls(self, limit: int = 50, since: float | None = None) -> list[CallRecord]:
        """The most recent calls first (`since`: started at or after this wall time, oldest first)."""

    def call(self, call_id: str) -> CallRecord | None: ...

    def turns(self, call_id: str) -> list[TurnRecord]: ...

    def events(self, call_id: str, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """The call's events with `seq` > `after`, in order, each with its `seq`."""


class _LiveCall:
    __slots__ = ("call", "speech_end_t", "turn_t0", "turns")

    def __init__(self, call: CallRecord) -> None:
        self.call = call
        self.turns: dict[int, TurnRecord] = {}
        self.turn_t0: dict[int, float] = {}
        self.speech_end_t: float | None = None  # of the latest final


class Derivation:
    """Folds events into call and turn records as they come (the state of live calls only)."""

    def __init__(self) -> None:
        self.live: dict[str, _LiveCall] = {}
        # Calls ended lately: a late event (an ACS callback after the hang-up) must not start them
        # again as live, which would keep their state here for good.
        self.ended: dict[str, None] = {}
        self.wall_offset = time.time() - time.monotonic()  # event times are time.monotonic()

    def wall(self, record: Mapping[str, Any]) -> float:
        t = record.get("t")
        return t + self.wall_offset if isinstance(t, (int, float)) else time.time()

    def begin(self, call: CallRecord) -> None:
        self.ended.pop(call.call_id, None)
        self.live[call.call_id] = _LiveCall(call)

    def apply(self, call_id: str, record: Mapping[str, Any]) -> tuple[CallRecord | None, list[TurnRecord]]:
        """The call record (None: unchanged) and the turn records this event changed."""
        name = record.get("event")
        state = self.live.get(call_id)
        if state is None:
            if name == "call_ended" or call_id in self.ended:
                return None, []
            state = self.live[call_id] = _LiveCall(CallRecord(call_id, started_at=self.wall(record)))
        raw_t = record.get("t")
        t: float = raw_t if isinstance(raw_t, (int, float)) else time.monotonic()
        if name == "call_started":
            state.call.correlation_id = str(record.get("correlation_id") or state.call.correlation_id)
            return state.call, []
        if name == "final":
            end = record.get("speech_end_t")
            state.speech_end_t = end if isinstance(end, (int, float)) else t
            return None, []
        if name == "call_ended":
            del self.live[call_id]
            self.ended[call_id] = None
            if len(self.ended) > ENDED_REMEMBERED:
                del self.ended[next(iter(self.ended))]
            state.call.ended_at = self.wall(record)
            state.call.end_reason = str(record.get("reason", ""))
            unfinished = list(state.turns.values())
            for turn in unfinished:
                turn.outcome = "unfinished"
                turn.ended_at = state.call.ended_at
            return state.call, unfinished
        turn_id = record.get("turn_id")
        if not isinstance(turn_id, int):
            return None, []
        if name == "turn_started":
            turn = TurnRecord(
                call_id,
                turn_id,
                kind=str(record.get("kind", "")),
                input=str(record.get("input") or ""),
                started_at=self.wall(record),
            )
            state.turns[turn_id] = turn
            state.turn_t0[turn_id] = t
            if turn.kind != "speech":
                state.speech_end_t = None  # voice-to-voice is for spoken inputs only
            return None, [turn]
        turn_or_none = state.turns.get(turn_id)
        if turn_or_none is None:
            return None, []
        turn = turn_or_none
        t0 = state.turn_t0.get(turn_id, t)
        if name == "agent_text":
            text = str(record.get("text", ""))
            turn.said = f"{turn.said} {text}" if turn.said else text
        elif name == "first_audio_sent":
            if turn.first_audio_ms is None:
                turn.first_audio_ms = round((t - t0) * 1000, 1)
                if turn.kind == "speech" and state.speech_end_t is not None:
                    turn.voice_to_voice_ms = round((t - state.speech_end_t) * 1000, 1)
        elif name is not None and name.startswith("barge_in_"):
            if len(turn.barge_ins) < MAX_BARGE_INS_PER_TURN:
                entry: dict[str, Any] = {"event": name, "at_ms": round((t - t0) * 1000, 1)}
                for key in ("trigger", "reason", "heard_ms", "from_ms"):
                    if record.get(key) is not None:
                        entry[key] = record[key]
                turn.barge_ins.append(entry)
        elif name == "turn_failed":
            turn.error = f"{record.get('stage', '')}: {record.get('error', '')}"
        elif name in ("turn_completed", "turn_cancelled"):
            self._close_turn(state, turn, record)
        else:
            return None, []
        return None, [turn]

    def _close_turn(self, state: _LiveCall, turn: TurnRecord, record: Mapping[str, Any]) -> None:
        turn.ended_at = self.wall(record)
        turn.audio_ms = _number(record.get("audio_ms"))
        if record["event"] == "turn_completed":
            turn.outcome = "failed" if turn.error else "completed"
            turn.heard = str(record.get("text", ""))
            turn.heard_ms = turn.audio_ms
        else:
            turn.outcome = "failed" if record.get("error") or turn.error else "cancelled"
            turn.heard = str(record.get("heard_text") or "")
            turn.heard_ms = _number(record.get("heard_ms"))
            if record.get("error"):
                turn.error = str(record["error"])
        state.turns.pop(turn.turn_id, None)
        state.turn_t0.pop(turn.turn_id, None)

    def open_turns(self, call_id: str) -> list[TurnRecord]:
        state = self.live.get(call_id)
        return list(state.turns.values()) if state is not None else []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def record_size(record: Mapping[str, Any]) -> int:
    """A cheap estimate of an event record's size in bytes: string values by length, nested values
    walked, anything else 16 (it runs on the event loop for every event)."""
    size = 64
    for value in record.values():
        if value.__class__ is str:
            size += len(value)
        elif isinstance(value, (dict, list, tuple)):
            size += _nested_size(value)
        else:
            size += 16
    return size


def _nested_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value) + 8
    if isinstance(value, dict):
        return 16 + sum(len(str(key)) + _nested_size(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return 16 + sum(_nested_size(item) for item in value)
    return 16
