"""A bounded in-memory store (tests, benchmarks): the same Protocol as SQLite, nothing durable."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from parley.records.store import CallRecord, Derivation, TurnRecord, record_size


class _Kept:
    __slots__ = ("call", "events", "nbytes", "turns")

    def __init__(self, call: CallRecord) -> None:
        self.call = call
        self.events: list[tuple[int, Mapping[str, Any]]] = []
        self.turns: dict[int, TurnRecord] = {}
        self.nbytes = 0


class MemoryStore:
    """At most `max_calls` calls and `max_bytes` of events in all: the oldest calls go first, and a
    call alone over `max_call_bytes` keeps its first events (the rest are counted as dropped)."""

    kind = "memory"

    def __init__(self, max_calls: int = 200, max_bytes: int = 64 * 2**20, max_call_bytes: int = 8 * 2**20) -> None:
        self.lost_calls: list[str] = []  # nothing outlives the process that kept it
        self.max_calls = max(1, max_calls)
        self.max_bytes = max_bytes
        self.max_call_bytes = max_call_bytes
        self._calls: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()
        self._derive = Derivation()
        self._bytes = 0
        self._written = 0
        self._dropped = 0

    def begin_call(self, call: CallRecord) -> None:
        with self._lock:
            old = self._calls.pop(call.call_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._calls[call.call_id] = _Kept(call)
            self._derive.begin(call)
            self._trim()

    def append(self, call_id: str, seq: int, record: Mapping[str, Any]) -> None:
        size = record_size(record)
        with self._lock:
            kept = self._calls.get(call_id)
            if kept is None:
                kept = self._calls[call_id] = _Kept(CallRecord(call_id, started_at=self._derive.wall(record)))
            if kept.nbytes + size > self.max_call_bytes:
                self._dropped += 1
                return
            kept.events.append((seq, record))
            kept.nbytes += size
            self._bytes += size
            self._written += 1
            call, turns = self._derive.apply(call_id, record)
            if call is not None:
                kept.call = call
            for turn in turns:
                kept.turns[turn.turn_id] = turn
            self._trim()

    def _trim(self) -> None:
        while len(self._calls) > self.max_calls or (self._bytes > self.max_bytes and len(self._calls) > 1):
            _, oldest = self._calls.popitem(last=False)
            self._bytes -= oldest.nbytes
            self._derive.live.pop(oldest.call.call_id, None)

    def sync(self, timeout: float = 2.0) -> bool:
        return True

    def close(self, timeout: float = 5.0) -> None:
        pass

    def mark_lost(self, instance_id: str) -> list[str]:
        """Nothing to do: no other instance's calls are here, and none outlives its process."""
        return []

    def purge(self, before: float) -> int:
        with self._lock:
            old = [
                call_id
                for call_id, kept in self._calls.items()
                if kept.call.ended_at is not None and (kept.call.started_at or 0) < before
            ]
            for call_id in old:
                self._bytes -= self._calls.pop(call_id).nbytes
            return len(old)

    def stats(self) -> dict[str, int]:
        return {"written": self._written, "dropped": self._dropped, "queued": 0}

    def calls(self, limit: int = 50, since: float | None = None) -> list[CallRecord]:
        with self._lock:
            kept = [replace(k.call, events=len(k.events)) for k in self._calls.values()]
        kept.sort(key=lambda call: call.started_at or 0)
        if since is not None:
            return [call for call in kept if (call.started_at or 0) >= since][:limit]
        return kept[::-1][:limit]

    def call(self, call_id: str) -> CallRecord | None:
        with self._lock:
            kept = self._calls.get(call_id)
            return None if kept is None else replace(kept.call, events=len(kept.events))

    def turns(self, call_id: str) -> list[TurnRecord]:
        with self._lock:
            kept = self._calls.get(call_id)
            return [] if kept is None else [replace(kept.turns[key]) for key in sorted(kept.turns)]

    def events(self, call_id: str, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            kept = self._calls.get(call_id)
            rows = [] if kept is None else [(seq, record) for seq, record in kept.events if seq > after]
        if limit is not None:
            rows = rows[:limit]
        return [{**record, "seq": seq} for seq, record in rows]
