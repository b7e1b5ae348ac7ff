"""The `redis` call records store against a real redis-server: the behaviour the SQLite store has
(the same tests, run on Redis), rows identical to SQLite's, two instances sharing one Redis,
`mark_lost`, Redis going away mid-call and coming back, and a server recording calls in Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets
from fastapi import FastAPI
from fastapi.testclient import TestClient

from parley.records import CallRecord, CallStore, MemoryStore, RecordsUnavailable, build_store
from parley.records.api import records_router
from parley.records.redis_store import RedisStore, redact_url
from parley.records.sqlite import SqliteStore
from parley.settings import load_settings
from parley.testing.redis_server import redis_server
from parley.transports import acs
from tests import test_records as behaviour
from tests.conftest import make_server
from tests.test_records import T0, call_events, record_call


def open_store(url: str, instance_id: str = "a", prefix: str | None = None, **options: Any) -> RedisStore:
    return RedisStore(url, instance_id, prefix=prefix or f"test-{uuid.uuid4().hex[:8]}:", **options)


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own: tests share the session's Redis, never each other's keys."""
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[RedisStore]:
    made = open_store(redis_url, prefix=prefix)
    yield made
    made.close()


# ------------------------------------------------------------------ the Protocol's behaviour, as SQLite's


def test_a_redis_store_is_a_call_store(store: RedisStore) -> None:
    assert isinstance(store, CallStore) and store.kind == "redis" and store.lost_calls == []


def test_derives_the_call_and_its_turns_from_the_events(store: RedisStore) -> None:
    behaviour.test_a_store_derives_the_call_and_its_turns_from_the_events(store)


def test_pages_a_calls_events_by_seq(store: RedisStore) -> None:
    behaviour.test_a_store_pages_a_calls_events_by_seq(store)


def test_lists_calls_newest_first_and_since_a_time(store: RedisStore) -> None:
    behaviour.test_a_store_lists_calls_newest_first_and_since_a_time(store)


def test_a_reused_call_id_starts_a_new_record(store: RedisStore) -> None:
    behaviour.test_a_reused_call_id_starts_a_new_record(store)


def test_purge_deletes_ended_calls_started_before_a_time(store: RedisStore) -> None:
    behaviour.test_purge_deletes_ended_calls_started_before_a_time(store)


def test_the_rows_are_the_ones_sqlite_derives(store: RedisStore, tmp_path: Path) -> None:
    sqlite = SqliteStore(tmp_path)
    sqlite._derive.wall_offset = store._derive.wall_offset  # the same wall clock for event times, to the ns
    started = time.time()
    for each in (store, sqlite):
        record_call(each, "c", started_at=started)
        each.begin_call(CallRecord("live", "corr", "pizza", started_at=started + 1))
        for seq, event in enumerate(call_events("live")[:14], start=1):
            each.append("live", seq, event)
        assert each.sync()
    try:
        for call_id in ("c", "live"):
            from_redis, from_sqlite = store.call(call_id), sqlite.call(call_id)
            assert from_redis is not None and from_sqlite is not None
            assert from_redis.instance == "a" and from_sqlite.instance == ""
            from_redis.instance = ""
            assert from_redis == from_sqlite
            assert [asdict(t) for t in store.turns(call_id)] == [asdict(t) for t in sqlite.turns(call_id)]
            assert store.events(call_id) == sqlite.events(call_id)
        assert [c.call_id for c in store.calls()] == [c.call_id for c in sqlite.calls()] == ["live", "c"]
    finally:
        sqlite.close()


def test_purge_prunes_index_entries_whose_keys_expired(store: RedisStore, redis_url: str, prefix: str) -> None:
    record_call(store, "old", started_at=time.time() - 40 * 86400)
    redis.Redis.from_url(redis_url).delete(f"{prefix}call:old")  # as its TTL would
    assert store.purge(time.time() - 30 * 86400) == 0  # no row: nothing counted, the index entry goes
    assert redis.Redis.from_url(redis_url).zscore(f"{prefix}calls", "old") is None
    assert store.events("old") == []


def test_an_ended_calls_keys_expire_after_retention_and_live_ones_never(redis_url: str, prefix: str) -> None:
    store = open_store(redis_url, prefix=prefix, retention_days=1)
    record_call(store, "ended")
    store.begin_call(CallRecord("live", started_at=time.time()))
    store.append("live", 1, call_events("live")[0])
    assert store.sync()
    client = redis.Redis.from_url(redis_url)
    for kind in ("call", "events", "turns"):
        assert 86400 - 60 < client.ttl(f"{prefix}{kind}:ended") <= 86400
    assert client.ttl(f"{prefix}call:live") == -1 and client.ttl(f"{prefix}events:live") == -1
    store.close()


def test_finals_and_turn_ends_are_sent_without_a_sync(redis_url: str, prefix: str) -> None:
    store = open_store(redis_url, prefix=prefix, batch_s=60.0)  # batched records would wait a minute
    reader = open_store(redis_url, "reader", prefix=prefix)  # another instance reads them
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
    assert len(reader.events("c")) == 9 and len(store.events("c")) == 9  # a closed store still reads
    reader.close()


def test_retention_runs_periodically(redis_url: str, prefix: str) -> None:
    store = open_store(redis_url, prefix=prefix, purge_every_s=0.1)
    record_call(store, "old", started_at=time.time() - 40 * 86400)
    deadline = time.monotonic() + 3
    while store.call("old") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.call("old") is None
    store.close()


def test_a_call_past_its_byte_cap_keeps_its_end(redis_url: str, prefix: str) -> None:
    store = open_store(redis_url, prefix=prefix, max_call_bytes=20_000)
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


@pytest.mark.parametrize("kind", ["redis", "sqlite", "memory"])
def test_a_late_event_after_the_end_keeps_no_state(kind: str, redis_url: str, prefix: str, tmp_path: Path) -> None:
    made: RedisStore | SqliteStore | MemoryStore = (
        open_store(redis_url, prefix=prefix)
        if kind == "redis"
        else SqliteStore(tmp_path)
        if kind == "sqlite"
        else MemoryStore()
    )
    record_call(made)
    made.append("call-1", 23, {"event": "acs_event", "t": time.monotonic(), "type": "CallDisconnected"})
    assert made.sync()
    assert made._derive.live == {} and made.call("call-1").end_reason == "caller_hangup"  # type: ignore[union-attr]
    assert made.events("call-1")[-1]["event"] == "acs_event"
    if not isinstance(made, MemoryStore):
        assert made._call_bytes == {}
    if isinstance(made, RedisStore):
        assert made._last_seq == {} and made._last_at == {}
    made.close()


def test_a_record_json_cannot_hold_is_dropped_and_counted(store: RedisStore) -> None:
    store.begin_call(CallRecord("c", started_at=time.time()))
    store.append("c", 1, {"event": "dtmf", "t": time.monotonic(), "n": 2**70})  # past 64 bits
    store.append("c", 2, {"event": "dtmf", "t": time.monotonic(), "digits": "1"})
    assert store.sync()
    assert [e["seq"] for e in store.events("c")] == [2]
    assert store.stats() == {"written": 2, "dropped": 1, "queued": 0}


def test_an_event_out_of_order_is_dropped_and_counted(store: RedisStore) -> None:
    store.begin_call(CallRecord("c", started_at=time.time()))
    for seq in (1, 3, 2, 3, 4):  # the event log numbers them in order: this is a caller's bug
        store.append("c", seq, {"event": "dtmf", "t": time.monotonic(), "digits": str(seq)})
    assert store.sync()
    assert [e["seq"] for e in store.events("c")] == [1, 3, 4]
    assert store.stats() == {"written": 4, "dropped": 2, "queued": 0}


def test_an_error_from_redis_drops_the_batch_and_the_writer_carries_on(
    store: RedisStore, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis.Redis.from_url(redis_url).set(f"{prefix}events:c", "a string, not a sorted set")
    store.begin_call(CallRecord("b", started_at=time.time()))
    assert store.sync()
    written = store.stats()["written"]
    store.append("c", 1, {"event": "final", "t": time.monotonic(), "text": "x"})
    assert store.sync()
    assert store.stats()["dropped"] == 1 and store.stats()["written"] == written
    assert any("writing to Redis failed (WRONGTYPE" in r.getMessage() for r in caplog.records)
    store.append("b", 1, {"event": "final", "t": time.monotonic(), "text": "y"})
    assert store.sync() and [e["text"] for e in store.events("b")] == ["y"]


def test_a_stalled_redis_drops_records_without_blocking_the_caller(redis_url: str, prefix: str) -> None:
    store = open_store(redis_url, prefix=prefix, queue_size=10)
    store.begin_call(CallRecord("c", started_at=time.time()))
    assert store.sync()
    redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", "1000", "WRITE")  # the writer waits
    store.append("c", 1, {"event": "final", "t": time.monotonic(), "text": "x"})
    time.sleep(0.1)  # the writer is now stuck sending that one
    started = time.perf_counter()
    for seq in range(2, 202):
        store.append("c", seq, {"event": "dtmf", "t": time.monotonic(), "call_id": "c", "digits": "1"})
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, f"200 appends took {elapsed:.3f} s"
    assert store.stats()["dropped"] >= 180
    assert store.sync(timeout=10)
    kept = store.events("c")
    assert 0 < len(kept) <= 12 and store.stats()["dropped"] + len(kept) == 201
    store.close()


# ------------------------------------------------------------------ instances sharing one Redis


def test_two_instances_read_each_others_calls(redis_url: str, prefix: str) -> None:
    a, b = open_store(redis_url, "a", prefix), open_store(redis_url, "b", prefix)
    try:
        record_call(a, "from-a", started_at=time.time() - 1)
        b.begin_call(CallRecord("from-b", "corr-b", "bank", started_at=time.time()))
        b.append("from-b", 1, call_events("from-b")[0])
        assert b.sync()
        for reader in (a, b):
            assert [(c.call_id, c.instance, c.live) for c in reader.calls()] == [
                ("from-b", "b", True),
                ("from-a", "a", False),
            ]
            assert [e["event"] for e in reader.events("from-a")] == [e["event"] for e in call_events()]
            assert [t.outcome for t in reader.turns("from-a")] == ["completed", "cancelled", "unfinished", "unfinished"]
            assert reader.call("from-b").agent == "bank"  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


def record_mid_call(store: RedisStore, call_id: str) -> None:
    """A call with its greeting done and turn 2 under way (its agent speaking)."""
    store.begin_call(CallRecord(call_id, started_at=time.time()))
    for seq, event in enumerate(call_events(call_id)[:12], start=1):
        store.append(call_id, seq, event)
    assert store.sync()


def test_mark_lost_ends_only_the_dead_instances_live_calls_once(redis_url: str, prefix: str) -> None:
    dead, b, c = (open_store(redis_url, name, prefix) for name in ("dead", "b", "c"))
    try:
        record_mid_call(dead, "lost-1")
        record_mid_call(dead, "lost-2")
        record_call(dead, "ended-before")
        record_mid_call(b, "b-live")
        dead.close()  # as if it had died: no call_ended
        found: list[list[str]] = []
        both = [threading.Thread(target=lambda s=s: found.append(s.mark_lost("dead"))) for s in (b, c)]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join()
        assert sorted(found[0] + found[1]) == ["lost-1", "lost-2"]  # each ended once, by one of them
        lost = c.call("lost-1")
        assert lost is not None and lost.end_reason == "server_lost" and not lost.live
        assert lost.ended_at == pytest.approx(T0 + 2.9 + time.time() - time.monotonic(), abs=0.1)  # its last event
        assert [(t.turn_id, t.outcome) for t in c.turns("lost-1")] == [(1, "completed"), (2, "unfinished")]
        assert b.call("b-live").live  # type: ignore[union-attr]  # another instance's call
        assert b.call("ended-before").end_reason == "caller_hangup"  # type: ignore[union-attr]
        assert c.mark_lost("dead") == [] and c.mark_lost("nobody") == []
    finally:
        b.close()
        c.close()


def test_a_restart_with_the_same_instance_id_finds_its_lost_calls(redis_url: str, prefix: str) -> None:
    first = open_store(redis_url, "web-1", prefix)
    record_mid_call(first, "mid-call")
    first.close()
    other = open_store(redis_url, "web-2", prefix)  # another instance: not its call
    assert other.lost_calls == [] and other.call("mid-call").live  # type: ignore[union-attr]
    other.close()
    again = open_store(redis_url, "web-1", prefix)
    assert again.lost_calls == ["mid-call"]
    assert again.call("mid-call").end_reason == "server_lost"  # type: ignore[union-attr]
    again.close()


# ------------------------------------------------------------------ Redis going away


def test_redis_stopped_mid_call_drops_and_counts_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "parley.records")
    events = call_events("c")
    with redis_server() as url:
        store = open_store(url, connect_timeout_s=0.5, io_timeout_s=1.0)
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        client = redis.Redis.from_url(url)
        client.shutdown(nosave=True)  # Redis goes away mid-call
        store.begin_call(CallRecord("c", "corr-9", "pizza", started_at=time.time()))
        started = time.perf_counter()
        for seq, event in enumerate(events[:15], start=1):
            store.append("c", seq, event)
        assert store.sync(timeout=5)
        assert time.perf_counter() - started < 5
        assert store.stats()["dropped"] == 16 and store.stats()["written"] == 0
        assert any("Redis at redis://127.0.0.1" in r.getMessage() for r in caplog.records)
        with pytest.raises(RecordsUnavailable, match="call records: Redis failed"):
            store.calls()
        app = FastAPI()
        app.include_router(records_router(store))
        with TestClient(app) as http:
            assert http.get("/api/calls").status_code == 503
            assert http.get("/api/calls/c/events").status_code == 503
        try:
            with redis_server(port=port) as back:  # Redis is back, empty, on the same port
                assert back == url
                deadline = time.monotonic() + 20
                seq = 15
                while store.stats()["written"] == 0:  # the writer retries after its back-off
                    assert time.monotonic() < deadline, "the store did not reconnect"
                    seq += 1
                    store.append("c", seq, {"event": "dtmf_input", "t": time.monotonic(), "digits": "1"})
                    store.sync()
                    time.sleep(0.2)
                store.append("c", seq + 1, events[-1])  # call_ended: rewrites the whole call row
                assert store.sync()
                call = store.call("c")
                assert call is not None and (call.agent, call.end_reason, call.instance) == (
                    "pizza",
                    "caller_hangup",
                    "a",
                )
                assert [e["seq"] for e in store.events("c")][-1] == seq + 1
                assert store.stats()["written"] == len(store.events("c")) == 2  # the last key and the end
                assert store.stats()["dropped"] == seq  # the call's start, 15 events, the keys before Redis was back
                assert any("answers again" in r.getMessage() for r in caplog.records)
        finally:
            store.close()


def test_an_unreachable_redis_stops_startup_with_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    with redis_server() as url:
        dead_url = url.replace("redis://", "redis://:hunter2-secret@")
    settings = load_settings(redis_url=dead_url)  # the store follows PARLEY_REDIS_URL
    assert settings.store == "redis"
    with pytest.raises(RuntimeError, match=r"call records: cannot use Redis at redis://:\*\*\*@127.0.0.1:\d+/0 "
                       r"\(PARLEY_REDIS_URL\)") as raised:  # fmt: skip
        build_store(settings)
    assert "hunter2" not in str(raised.value) and raised.value.__cause__ is None
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    assert (
        redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0" and redact_url("redis://h/0") == "redis://h/0"
    )


def test_a_wrong_password_stops_startup_without_showing_it() -> None:
    with redis_server(password="the-right-one") as url:
        with pytest.raises(RuntimeError, match=r"\(PARLEY_REDIS_URL\): .*(password|WRONGPASS)") as raised:
            build_store(load_settings(redis_url=url.replace("redis://", "redis://:hunter2-secret@")))
        assert "hunter2" not in str(raised.value)
        store = build_store(load_settings(redis_url=url.replace("redis://", "redis://:the-right-one@")))
        assert isinstance(store, RedisStore) and "the-right-one" not in redact_url(store._url)
        store.close()


def test_build_store_opens_redis_with_the_settings_instance_id(redis_url: str) -> None:
    store = build_store(load_settings(redis_url=redis_url, instance_id="web-7", retention_days=2))
    try:
        assert isinstance(store, RedisStore) and store.instance_id == "web-7" and store.retention_s == 2 * 86400
    finally:
        store.close()
    default = build_store(load_settings(redis_url=redis_url))
    try:
        assert isinstance(default, RedisStore) and default.instance_id.endswith(f"-{os.getpid()}")
    finally:
        default.close()


# ------------------------------------------------------------------ servers recording in Redis (SLOW)


async def test_a_call_served_by_one_instance_is_read_from_another(redis_url: str) -> None:
    serving = make_server(engines="plumbing", redis_url=redis_url, instance_id="serving", greeting="a short greeting")
    other = make_server(engines="plumbing", redis_url=redis_url, instance_id="other")
    try:
        call_id = f"redis-{uuid.uuid4()}"
        async with websockets.connect(  # the server takes 10 s to answer the close (as with SQLite): not waited for
            serving.url, additional_headers={"x-ms-call-connection-id": call_id}, close_timeout=0.5
        ) as ws:
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            for _ in range(30):
                await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                await asyncio.sleep(0.02)
            await ws.send(acs.dtmf_message("1"))
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(base_url=other.http_url) as http:
                live = (await http.get(f"/api/calls/{call_id}/events")).json()  # served elsewhere, live
                assert live["live"] and live["events"][0]["event"] == "call_started"
                listed = (await http.get("/api/calls")).json()["calls"]
                assert [(c["instance"], c["live"]) for c in listed if c["call_id"] == call_id] == [("serving", True)]
        async with httpx.AsyncClient(base_url=other.http_url) as http:
            deadline = time.monotonic() + 5
            while (body := (await http.get(f"/api/calls/{call_id}/events")).json())["live"]:
                assert time.monotonic() < deadline, "the call did not end"
                await asyncio.sleep(0.05)
            assert {"call_started", "dtmf", "turn_cancelled", "call_ended"} <= {e["event"] for e in body["events"]}
            assert body["next_after"] is None and body["last_seq"] == len(body["events"])
        async with httpx.AsyncClient(base_url=serving.http_url) as http:
            assert (await http.get(f"/api/calls/{call_id}/events")).json()["events"] == body["events"]
            stats = (await http.get("/api/stats")).json()
            assert stats["records_dropped"] == 0 and stats["records_written"] >= len(body["events"])
        assert redis.Redis.from_url(redis_url).hget(f"parley:call:{call_id}", "instance") == b"serving"
    finally:
        serving.stop()
        other.stop()


def test_appending_costs_the_loop_little(redis_url: str, prefix: str) -> None:
    """Figures for docs/records.md: CPU per enqueue on the caller's thread, what the writer sustains
    batched and with every event a commit-now one, and one final's trip to another instance."""
    store = open_store(redis_url, prefix=prefix, queue_size=200_000)
    reader = open_store(redis_url, "reader", prefix=prefix)
    n = 20_000
    figures = []
    for name, event in (("partial", "batched"), ("final", "commit-now")):
        call_id = f"c-{name}"
        store.begin_call(CallRecord(call_id, started_at=time.time()))
        record = {"event": name, "t": time.monotonic(), "call_id": call_id, "utterance_id": 1, "text": "what are your"}
        cpu, process_cpu, wall = time.thread_time(), time.process_time(), time.perf_counter()
        for seq in range(1, n + 1):
            store.append(call_id, seq, record)
        enqueue_us = (time.thread_time() - cpu) / n * 1e6
        assert store.sync(timeout=60)
        rate = n / (time.perf_counter() - wall)
        writer_us = (time.process_time() - process_cpu) / n * 1e6 - enqueue_us  # the rest is the writer's
        figures.append(
            f"{event}: enqueue {enqueue_us:.1f} us CPU per event, writer {writer_us:.0f} us CPU per event,"
            f" {rate:,.0f} events/s"
        )
        assert enqueue_us < 50 and len(reader.events(call_id)) == n
    trips = []
    for seq in range(1, 101):
        started = time.perf_counter()
        store.append("c-final", n + seq, {"event": "final", "t": time.monotonic(), "text": "x"})
        while len(reader.events("c-final", after=n + seq - 1)) < 1:
            pass
        trips.append((time.perf_counter() - started) * 1000)
    trips.sort()
    figures.append(f"one final to another instance: median {trips[50]:.2f} ms, p95 {trips[95]:.2f} ms")
    print("; ".join(figures))
    assert store.stats()["dropped"] == 0
    store.close()
    reader.close()
