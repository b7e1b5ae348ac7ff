"""Call records: both stores through the CallStore Protocol, the SQLite writer's error paths, the
paginated events API over a real server, `parley calls`, and a server killed mid-call."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from typer.testing import CliRunner

from parley.cli import app
from parley.media.events import CallRegistry, EventLog
from parley.records import CallRecord, CallStore, MemoryStore
from parley.records.sqlite import SqliteReader, SqliteStore, _enable_wal, db_path
from parley.server import BackgroundServer
from parley.transports import acs
from tests.conftest import make_server

T0 = time.monotonic()


def call_events(call_id: str = "call-1") -> list[dict[str, Any]]:
    """A short call as a MediaHandler logs it: a greeting, a spoken question answered and cut by a
    barge-in, a key press answered in full."""
    return [
        {"event": "call_started", "t": T0, "call_id": call_id, "correlation_id": "corr-9"},
        {"event": "turn_started", "t": T0 + 0.01, "call_id": call_id, "turn_id": 1, "kind": "greeting", "input": "Hi"},
        {"event": "agent_text", "t": T0 + 0.02, "call_id": call_id, "turn_id": 1, "text": "Hi"},
        {"event": "first_audio_sent", "t": T0 + 0.11, "call_id": call_id, "turn_id": 1},
        {"event": "turn_completed", "t": T0 + 1.0, "call_id": call_id, "turn_id": 1, "audio_ms": 900, "text": "Hi"},
        {"event": "speech_started", "t": T0 + 1.5, "call_id": call_id, "utterance_id": 1, "onset_t": T0 + 1.4},
        {"event": "speech_ended", "t": T0 + 2.5, "call_id": call_id, "utterance_id": 1, "speech_end_t": T0 + 2.3},
        {"event": "final", "t": T0 + 2.6, "call_id": call_id, "utterance_id": 1, "text": "opening hours", "speech_end_t": T0 + 2.3},
        {"event": "turn_started", "t": T0 + 2.61, "call_id": call_id, "turn_id": 2, "kind": "speech", "input": "opening hours"},
        {"event": "agent_text", "t": T0 + 2.7, "call_id": call_id, "turn_id": 2, "text": "We open at nine."},
        {"event": "agent_text", "t": T0 + 2.8, "call_id": call_id, "turn_id": 2, "text": "We close at five."},
        {"event": "first_audio_sent", "t": T0 + 2.9, "call_id": call_id, "turn_id": 2},
        {"event": "barge_in_paused", "t": T0 + 3.5, "call_id": call_id, "turn_id": 2, "utterance_id": 2, "heard_ms": 600.0},
        {"event": "barge_in_decided", "t": T0 + 3.9, "call_id": call_id, "turn_id": 2, "trigger": "final"},
        {"event": "stop_audio_sent", "t": T0 + 3.9, "call_id": call_id, "turn_id": 2},
        {"event": "turn_cancelled", "t": T0 + 3.91, "call_id": call_id, "turn_id": 2, "heard_ms": 600.0, "heard_text": "We open", "audio_ms": 1000},
        {"event": "dtmf", "t": T0 + 4.0, "call_id": call_id, "digits": "*"},
        {"event": "dtmf_input", "t": T0 + 4.1, "call_id": call_id, "digits": "*"},
        {"event": "turn_started", "t": T0 + 4.2, "call_id": call_id, "turn_id": 3, "kind": "dtmf", "input": "*"},
        {"event": "tool_called", "t": T0 + 4.3, "call_id": call_id, "name": "lookup", "arguments": {"q": "x"}},
        {"event": "turn_started", "t": T0 + 5.0, "call_id": call_id, "turn_id": 4, "kind": "speech", "input": "bye"},
        {"event": "call_ended", "t": T0 + 6.0, "call_id": call_id, "reason": "caller_hangup"},
    ]  # fmt: skip


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CallStore]:
    made: CallStore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path)
    yield made
    made.close()


def record_call(store: CallStore, call_id: str = "call-1", started_at: float | None = None) -> None:
    store.begin_call(CallRecord(call_id, "corr-9", "pizza", started_at=started_at or time.time()))
    for seq, event in enumerate(call_events(call_id), start=1):
        store.append(call_id, seq, event)
    assert store.sync()


def test_a_store_derives_the_call_and_its_turns_from_the_events(store: CallStore) -> None:
    assert isinstance(store, CallStore)
    record_call(store)
    call = store.call("call-1")
    assert call is not None
    assert (call.correlation_id, call.agent, call.end_reason, call.live) == ("corr-9", "pizza", "caller_hangup", False)
    assert call.events == len(call_events())
    assert call.ended_at is not None and call.started_at is not None
    greeting, question, keys, unfinished = store.turns("call-1")
    assert (greeting.kind, greeting.outcome, greeting.said, greeting.heard) == ("greeting", "completed", "Hi", "Hi")
    assert greeting.first_audio_ms == pytest.approx(100, abs=1) and greeting.voice_to_voice_ms is None
    assert question.input == "opening hours" and question.outcome == "cancelled"
    assert question.said == "We open at nine. We close at five." and question.heard == "We open"
    assert question.voice_to_voice_ms == pytest.approx(600, abs=1)  # speech end (2.3 s) -> first audio (2.9 s)
    assert question.heard_ms == 600 and question.audio_ms == 1000
    assert [b["event"] for b in question.barge_ins] == ["barge_in_paused", "barge_in_decided"]
    assert question.barge_ins[1]["trigger"] == "final"
    assert keys.kind == "dtmf" and keys.input == "*" and keys.outcome == "unfinished"  # the call ended first
    assert unfinished.outcome == "unfinished"
    assert store.call("nope") is None and store.turns("nope") == [] and store.events("nope") == []


def test_a_store_pages_a_calls_events_by_seq(store: CallStore) -> None:
    record_call(store)
    everything = store.events("call-1")
    assert [e["seq"] for e in everything] == list(range(1, len(call_events()) + 1))
    assert [e["event"] for e in everything] == [e["event"] for e in call_events()]
    assert everything[19]["arguments"] == {"q": "x"}  # nested fields survive
    pages, after = [], 0
    while page := store.events("call-1", after=after, limit=5):
        pages.append(page)
        after = page[-1]["seq"]
    assert [len(p) for p in pages] == [5, 5, 5, 5, 2]
    assert [e for p in pages for e in p] == everything


def test_a_store_lists_calls_newest_first_and_since_a_time(store: CallStore) -> None:
    now = time.time()
    for i in range(3):
        record_call(store, f"call-{i}", started_at=now - 100 + i)
    store.begin_call(CallRecord("live-1", started_at=now))
    store.append("live-1", 1, {"event": "call_started", "t": time.monotonic(), "call_id": "live-1"})
    assert store.sync()
    assert [c.call_id for c in store.calls()] == ["live-1", "call-2", "call-1", "call-0"]
    assert [c.call_id for c in store.calls(limit=2)] == ["live-1", "call-2"]
    assert store.calls()[0].live and store.calls()[0].to_dict()["ended"] is None
    assert [c.call_id for c in store.calls(since=now - 99.5)] == ["call-1", "call-2", "live-1"]  # oldest first


def test_a_reused_call_id_starts_a_new_record(store: CallStore) -> None:
    record_call(store)
    store.begin_call(CallRecord("call-1", started_at=time.time()))
    store.append("call-1", 1, {"event": "call_started", "t": time.monotonic(), "call_id": "call-1"})
    assert store.sync()
    assert [e["event"] for e in store.events("call-1")] == ["call_started"]
    assert store.turns("call-1") == []
    assert store.call("call-1").live  # type: ignore[union-attr]


def test_purge_deletes_ended_calls_started_before_a_time(store: CallStore) -> None:
    old = time.time() - 40 * 86400
    record_call(store, "old", started_at=old)
    record_call(store, "new")
    store.begin_call(CallRecord("old-but-live", started_at=old))
    assert store.sync()
    assert store.purge(time.time() - 30 * 86400) == 1
    assert {c.call_id for c in store.calls()} == {"new", "old-but-live"}
    assert store.events("old") == [] and store.turns("old") == []


# ------------------------------------------------------------------ SQLite: durability and errors


def test_finals_and_turn_ends_are_committed_without_a_sync(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, batch_s=60.0)  # batched records would wait a minute
    reader = SqliteReader(db_path(tmp_path))  # another connection, as after a restart
    store.begin_call(CallRecord("c", started_at=time.time()))
    events = call_events("c")
    for seq, event in enumerate(events[:8], start=1):  # up to the final
        store.append("c", seq, event)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(reader.events("c")) < 8:
        time.sleep(0.01)
    assert [e["event"] for e in reader.events("c")] == [e["event"] for e in events[:8]]
    assert [t.outcome for t in reader.turns("c")] == ["completed"]
    store.append("c", 9, events[8])  # turn_started: batched
    time.sleep(0.3)
    assert len(reader.events("c")) == 8
    store.close()  # closing writes what is queued
    assert len(reader.events("c")) == 9


def test_a_new_store_marks_calls_of_a_gone_server_lost_and_applies_retention(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path)
    record_call(first, "old", started_at=time.time() - 40 * 86400)
    first.begin_call(CallRecord("mid-call", started_at=time.time()))
    for seq, event in enumerate(call_events("mid-call")[:12], start=1):  # turn 2 under way
        first.append("mid-call", seq, event)
    assert first.sync()
    second = SqliteStore(tmp_path)  # the first is open: its live call is not lost
    assert second.call("mid-call").live  # type: ignore[union-attr]
    second.close()
    first.close()  # as if its process had died: no call_ended
    third = SqliteStore(tmp_path, retention_days=30)
    lost = third.call("mid-call")
    assert lost is not None and lost.end_reason == "server_lost" and not lost.live
    assert lost.ended_at == pytest.approx(T0 + 2.9 + time.time() - time.monotonic(), abs=0.1)  # its last event
    assert [(t.turn_id, t.outcome) for t in third.turns("mid-call")] == [(1, "completed"), (2, "unfinished")]
    assert third.call("old") is None  # past retention
    third.close()


def _lock_for(db_file: Path, seconds: float) -> threading.Thread:
    """Another process's exclusive lock on a rollback-journal database, released after `seconds`."""
    holder = sqlite3.connect(db_file, check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")

    def release() -> None:
        time.sleep(seconds)
        holder.rollback()
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_switching_to_wal_waits_for_a_database_another_process_holds(tmp_path: Path) -> None:
    # sqlite can answer "locked" at once, without its busy timeout, when two workers open a new
    # database together (seen in CI); a zero busy timeout gives that answer on purpose here.
    db_file = tmp_path / "calls.db"
    release = _lock_for(db_file, 0.3)
    connection = sqlite3.connect(db_file, timeout=0)
    started = time.monotonic()
    _enable_wal(connection)
    assert time.monotonic() - started >= 0.25
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    connection.close()
    release.join()


def test_switching_to_wal_gives_up_when_the_lock_outlasts_the_wait(tmp_path: Path) -> None:
    db_file = tmp_path / "calls.db"
    release = _lock_for(db_file, 1.0)
    connection = sqlite3.connect(db_file, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(connection, within_s=0.2)
    connection.close()
    release.join()


def test_retention_runs_periodically(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, retention_days=30, purge_every_s=0.1)
    record_call(store, "old", started_at=time.time() - 40 * 86400)
    deadline = time.monotonic() + 3
    while store.call("old") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.call("old") is None
    store.close()


def test_a_stuck_disk_drops_records_without_blocking_the_caller(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, queue_size=10)
    blocker = sqlite3.connect(db_path(tmp_path), timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the writer waits on it
    try:
        store.begin_call(CallRecord("c", started_at=time.time()))
        started = time.perf_counter()
        for seq in range(1, 201):
            store.append("c", seq, {"event": "dtmf", "t": time.monotonic(), "call_id": "c", "digits": "1"})
        elapsed = time.perf_counter() - started
        assert elapsed < 0.1, f"200 appends took {elapsed:.3f} s"
        assert store.stats()["dropped"] >= 180
        assert not store.sync(timeout=0.05)  # the queue stays full while the disk is stuck
    finally:
        blocker.rollback()
        blocker.close()
    assert store.sync(timeout=10)
    kept = store.events("c")
    assert 0 < len(kept) <= 11 and store.stats()["dropped"] + len(kept) == 200
    store.close()


class FailingConnection:
    """A connection whose disk fails: every write and commit raises."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, *_args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def commit(self) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def executemany(self, *_args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def rollback(self) -> None:
        self.real.rollback()

    def close(self) -> None:
        self.real.close()


def test_a_failing_disk_drops_and_counts_records_and_the_writer_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path)
    store._db = FailingConnection(store._db)  # type: ignore[assignment]
    store.begin_call(CallRecord("c", started_at=time.time()))
    for seq, event in enumerate(call_events("c"), start=1):
        store.append("c", seq, event)
    assert store.sync()
    assert store.stats()["dropped"] == len(call_events()) + 1 and store.stats()["written"] == 0
    assert any("call records: writing failed (disk I/O error)" in r.getMessage() for r in caplog.records)
    store._db = store._db.real  # type: ignore[attr-defined]  # the disk is back
    store.begin_call(CallRecord("d", started_at=time.time()))
    assert store.sync() and store.call("d") is not None
    store.close()


def test_a_call_past_its_byte_cap_in_the_store_keeps_its_end(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, max_call_bytes=20_000)
    store.begin_call(CallRecord("c", started_at=time.time()))
    for seq in range(1, 1001):
        store.append("c", seq, {"event": "dtmf", "t": time.monotonic(), "call_id": "c", "digits": "1" * 100})
    store.append("c", 1001, {"event": "call_ended", "t": time.monotonic(), "call_id": "c", "reason": "x"})
    assert store.sync()
    kept = store.events("c")
    assert len(kept) < 200 and kept[-1]["event"] == "call_ended"
    assert store.stats()["dropped"] == 1001 - len(kept)
    assert store.call("c").end_reason == "x"  # type: ignore[union-attr]
    store.close()


def test_the_memory_store_is_bounded() -> None:
    store = MemoryStore(max_calls=3, max_call_bytes=10_000)
    for i in range(5):
        record_call(store, f"call-{i}")
    assert [c.call_id for c in store.calls()] == ["call-4", "call-3", "call-2"]
    store.begin_call(CallRecord("big", started_at=time.time()))
    for seq in range(1, 1001):
        store.append("big", seq, {"event": "dtmf", "t": time.monotonic(), "call_id": "big", "digits": "1" * 100})
    assert len(store.events("big")) < 100 and store.stats()["dropped"] > 900


# ------------------------------------------------------------------ the in-memory event log


def test_an_event_log_is_capped_by_bytes_and_counts_what_it_trims() -> None:
    events = EventLog("c", max_bytes=50_000, to_log=False)
    before = EventLog.trimmed_total
    for _ in range(2000):
        events.emit("dtmf", digits="1" * 400)
    assert events.nbytes <= 50_000
    assert 0 < len(events.snapshot()) < 200
    assert events.trimmed == 2000 - len(events.snapshot()) and EventLog.trimmed_total - before == events.trimmed
    assert events.snapshot()[-1]["digits"] == "1" * 400  # the newest stay


class FakeSession:
    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.correlation_id = "corr"
        self.events = EventLog(call_id, to_log=False)
        self.dropped_frames = 0
        self.input_errors = 0


def test_the_registry_records_calls_and_frees_ended_ones_from_memory() -> None:
    store = MemoryStore()
    registry = CallRegistry(10, store=store, agent="pizza")
    session = FakeSession("c")
    session.events.emit("acs_event", type="CallConnected")  # before the call starts, as ACS's callbacks may
    session.events.emit("call_started", correlation_id="corr")
    registry.started(session)  # type: ignore[arg-type]
    session.events.emit("final", utterance_id=1, text="hello")
    assert [e["seq"] for e in store.events("c")] == [1, 2, 3]
    assert store.call("c").agent == "pizza"  # type: ignore[union-attr]
    session.events.emit("call_ended", reason="caller_hangup")
    registry.ended(session)  # type: ignore[arg-type]
    assert session.events.nbytes == 0  # the store has them
    ended = registry.find("c")
    assert ended is session.events
    ended.emit("acs_event", type="CallDisconnected")  # a late callback still lands
    assert [e["event"] for e in ended.snapshot()] == ["acs_event", "call_started", "final", "call_ended", "acs_event"]
    assert ended.of("final")[0]["text"] == "hello"
    assert registry.record_stats()["records_written"] == 5


def test_appending_costs_the_loop_little(tmp_path: Path) -> None:
    """Figures for the report: CPU per enqueue on the caller's thread, and what the writer sustains."""
    store = SqliteStore(tmp_path, queue_size=200_000)
    store.begin_call(CallRecord("c", started_at=time.time()))
    record = {"event": "partial", "t": time.monotonic(), "call_id": "c", "utterance_id": 1, "text": "what are your"}
    n = 20_000
    cpu = time.thread_time()
    wall = time.perf_counter()
    for seq in range(1, n + 1):
        store.append("c", seq, record)
    enqueue_us = (time.thread_time() - cpu) / n * 1e6
    assert store.sync(timeout=60)
    rate = n / (time.perf_counter() - wall)
    print(f"enqueue: {enqueue_us:.1f} us CPU per event; writer: {rate:,.0f} events/s (batched)")
    assert enqueue_us < 50
    assert len(store.events("c")) == n and store.stats()["dropped"] == 0
    store.close()


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def plumbing_server() -> Iterator[BackgroundServer]:
    server = make_server(engines="plumbing", greeting="a short greeting for tests only okay")
    yield server
    server.stop()


async def test_the_events_api_pages_a_live_and_an_ended_call(plumbing_server: BackgroundServer) -> None:
    call_id = f"records-{uuid.uuid4()}"
    base = plumbing_server.http_url
    async with httpx.AsyncClient(base_url=base) as http:
        async with websockets.connect(
            plumbing_server.url, additional_headers={"x-ms-call-connection-id": call_id}
        ) as ws:
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            for _ in range(30):
                await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                await asyncio.sleep(0.02)
            live = (await http.get(f"/api/calls/{call_id}/events")).json()
            assert live["live"] and live["events"][0]["event"] == "call_started" and live["events"][0]["seq"] == 1
            listed = (await http.get("/api/calls", params={"limit": 5})).json()["calls"]
            assert any(c["call_id"] == call_id and c["live"] for c in listed)
            await ws.send(acs.dtmf_message("1"))
            await asyncio.sleep(0.3)
        deadline = time.monotonic() + 5
        while (body := (await http.get(f"/api/calls/{call_id}/events")).json())["live"]:
            assert time.monotonic() < deadline, "the call did not end"
            await asyncio.sleep(0.05)
        everything = body["events"]
        assert body["next_after"] is None and body["last_seq"] == everything[-1]["seq"]
        assert "call_ended" in [e["event"] for e in everything] and len(everything) > 4
        pages, after = [], 0
        while after is not None:
            page = (await http.get(f"/api/calls/{call_id}/events", params={"after": after, "limit": 3})).json()
            pages.append(page["events"])
            after = page["next_after"]
        assert [len(p) for p in pages[:-1]] == [3] * (len(pages) - 1)
        assert [e for p in pages for e in p] == everything
        assert (await http.get("/api/calls/nope/events")).status_code == 404
        assert (await http.get(f"/api/calls/{call_id}/events", params={"limit": 0})).status_code == 422
        stats = (await http.get("/api/stats")).json()
        assert stats["records_dropped"] == 0 and stats["records_written"] > 0
    # The registry's view of the ended call reads the store (nothing kept in memory).
    log = plumbing_server.registry.find(call_id)
    assert log is not None and log.nbytes == 0
    assert [e["event"] for e in log.snapshot()] == [e["event"] for e in everything]


def test_a_bad_data_dir_stops_startup_with_a_clear_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(RuntimeError, match=r"call records: cannot open the database in .*PARLEY_DATA_DIR"):
        make_server(engines="plumbing", data_dir=blocked / "sub")


# ------------------------------------------------------------------ parley calls


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_parley_calls_list_show_and_export(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    record_call(store, "call-a", started_at=time.time() - 3600)
    record_call(store, "call-b")
    store.close()
    listed = cli("calls", "list", "--data-dir", str(tmp_path))
    assert listed.exit_code == 0, listed.output
    assert listed.output.index("call-b") < listed.output.index("call-a") and "caller_hangup" in listed.output
    as_json = [
        json.loads(line) for line in cli("calls", "list", "--json", "--data-dir", str(tmp_path)).output.splitlines()
    ]
    assert [c["call_id"] for c in as_json] == ["call-b", "call-a"]
    shown = cli("calls", "show", "call-b", "--data-dir", str(tmp_path))
    assert shown.exit_code == 0, shown.output
    for text in ("turn 2 (speech, cancelled", "said:  We open at nine. We close at five.", "heard: We open",
                 "barge_in_paused", "final #1: opening hours", "dtmf_input", "tool_called", "voice-to-voice 600 ms"):  # fmt: skip
        assert text in shown.output, (text, shown.output)
    detail = json.loads(cli("calls", "show", "call-b", "--json", "--data-dir", str(tmp_path)).output)
    assert [t["outcome"] for t in detail["turns"]] == ["completed", "cancelled", "unfinished", "unfinished"]
    assert len(detail["events"]) == len(call_events()) and detail["end_reason"] == "caller_hangup"
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 600))
    exported = cli("calls", "export", "--since", since, "--data-dir", str(tmp_path))
    assert [json.loads(line)["call_id"] for line in exported.output.splitlines()] == ["call-b"]
    everything = cli("calls", "export", "--since", "2000-01-01", "--data-dir", str(tmp_path))
    assert [json.loads(line)["call_id"] for line in everything.output.splitlines()] == ["call-a", "call-b"]


def test_parley_calls_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = cli("calls", "list", "--data-dir", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "no call records database at" in missing.output
    SqliteStore(tmp_path).close()
    unknown = cli("calls", "show", "nope", "--data-dir", str(tmp_path))
    assert unknown.exit_code == 2 and "no call 'nope'" in unknown.output
    bad = cli("calls", "export", "--since", "yesterday", "--data-dir", str(tmp_path))
    assert bad.exit_code == 2 and "--since 'yesterday'" in bad.output


# ------------------------------------------------------------------ kill -9 mid-call (SLOW)


def parley(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "parley.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_port(process: subprocess.Popen[str], timeout: float = 60) -> int:
    """The port `parley serve --port 0` logged (its startup line with the media URL)."""
    assert process.stdout is not None
    found: list[int] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if not found and "media WebSocket: ws://" in line:
                found.append(int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))

    threading.Thread(target=read, daemon=True).start()  # also keeps the pipe drained
    deadline = time.monotonic() + timeout
    while not found:
        assert process.poll() is None and time.monotonic() < deadline, "parley serve did not start"
        time.sleep(0.05)
    return found[0]


async def test_a_killed_server_keeps_the_finished_turns_of_a_call(tmp_path: Path, hours_pcm: np.ndarray) -> None:
    env = os.environ | {
        "PARLEY_ENGINES": "plumbing",
        "PARLEY_DATA_DIR": str(tmp_path),
        "PARLEY_GREETING": "a short greeting",
        "PARLEY_LOG_FORMAT": "json",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    server = parley("serve", "--port", "0", env=env)
    try:
        port = wait_for_port(server)
        call_id = f"killed-{uuid.uuid4()}"
        speech = [hours_pcm[i : i + 320].tobytes().ljust(640, b"\0") for i in range(0, hours_pcm.size, 320)]
        frames = [bytes(640)] * 150 + speech + [bytes(640)] * 3000  # greeting, a question, then silence
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            websockets.connect(
                f"ws://127.0.0.1:{port}/ws/acs", additional_headers={"x-ms-call-connection-id": call_id}
            ) as ws,
        ):
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            start = time.monotonic()
            completed: list[dict[str, Any]] = []
            for i, frame in enumerate(frames):
                await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
                await ws.send(acs.inbound_audio_message(frame, silent=frame == bytes(640)))
                while True:  # drain what the agent sends
                    try:
                        await asyncio.wait_for(ws.recv(), 0.0001)
                    except TimeoutError:
                        break
                if i % 25 == 0:
                    events = (await http.get(f"/api/calls/{call_id}/events")).json()["events"]
                    completed = [e for e in events if e["event"] == "turn_completed"]
                    if len(completed) >= 2:  # the greeting and the answer to the question
                        break
            assert len(completed) >= 2, "the agent did not answer within the call"
            server.send_signal(signal.SIGKILL)  # mid-call: the socket is still open
            server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
    restarted = parley("serve", "--port", "0", env=env)  # marks the call lost
    try:
        wait_for_port(restarted)
    finally:
        restarted.send_signal(signal.SIGINT)
        restarted.wait(15)
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "parley.cli", "calls", "show", call_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    call = json.loads(shown.stdout)
    assert call["end_reason"] == "server_lost" and not call["live"]
    finished = [t for t in call["turns"] if t["outcome"] == "completed"]
    assert [t["kind"] for t in finished[:2]] == ["greeting", "speech"]
    assert finished[1]["said"] and finished[1]["heard"] == finished[1]["said"]
    assert finished[1]["voice_to_voice_ms"] is not None and finished[1]["first_audio_ms"] is not None
    assert any(e["event"] == "final" for e in call["events"])
    text = (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "parley.cli", "calls", "show", call_id],
            env=env,
            capture_output=True,
            text=True,
        )
    ).stdout
    assert "server_lost" in text and "turn 2 (speech, completed" in text
