"""Many instances on one Redis: a real redis-server, real parley servers on loopback (two in this
process, one `parley serve` subprocess for the kill test), real media sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
import websockets

from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.testing.redis_server import redis_server
from parley.transports import acs

pytestmark = pytest.mark.usefixtures("redis_url")


def cluster_server(redis_url: str, name: str, **overrides: Any) -> BackgroundServer:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "event_log": False,
        "engines": "plumbing",
        "greeting": "hi",
        "closing_text": "Bye.",  # what a hang-up request says first: short, the tests wait for it
        "redis_url": redis_url,
        "instance_id": name,
    }
    return BackgroundServer(load_settings(**(values | overrides))).start()


@contextmanager
def servers(redis_url: str, *names: str, **overrides: Any) -> Iterator[list[BackgroundServer]]:
    started: list[BackgroundServer] = []
    try:
        for name in names:
            started.append(cluster_server(redis_url, name, **overrides))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def pair(redis_url: str) -> Iterator[list[BackgroundServer]]:
    with servers(redis_url, f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}") as started:
        yield started


@pytest.fixture
def db(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def headers(call_id: str) -> dict[str, str]:
    return {"x-ms-call-connection-id": call_id}


async def start_call(url: str, call_id: str) -> Any:
    """A media socket streaming as ACS does, once the server answered its first audio."""
    ws = await websockets.connect(url, additional_headers=headers(call_id))
    await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
    await asyncio.wait_for(ws.recv(), 5)
    return ws


async def refusal_of(url: str, call_id: str) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers(call_id))
    return refused.value


async def api(server: BackgroundServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        return await client.request(method, path, **kwargs)


async def until(check: Callable[[], Any], within_s: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + within_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.05)
    return result


async def _until_closed(ws: Any) -> None:
    async for _message in ws:  # what the server still sends (the closing line), then its close
        pass


def ended_reason(server: BackgroundServer, call_id: str) -> str | None:
    events = server.registry.find(call_id)
    if events is None:
        return None
    ended = events.of("call_ended")
    return str(ended[-1].get("reason")) if ended else None


# ------------------------------------------------------------------ ownership and admission


async def test_a_call_id_live_on_one_instance_is_refused_on_another(pair: list[BackgroundServer], db) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    call_id = f"dup-{uuid.uuid4()}"
    first = await start_call(a.url, call_id)
    try:
        assert db.get(f"parley:owner:{call_id}") == a.settings.instance_id
        refusal = await refusal_of(b.url, call_id)
        assert refusal.response.status_code == 409 and b"duplicate_call_id" in refusal.response.body
        stats = (await api(b, "GET", "/api/stats")).json()
        assert stats["calls_refused"]["duplicate_call_id"] == 1 and stats["admission"]["admitted"] == 0
        await first.send(acs.inbound_audio_message(bytes(640), silent=True))  # A's call is untouched
        await asyncio.wait_for(first.recv(), 5)
    finally:
        await first.close()
    await until(lambda: db.get(f"parley:owner:{call_id}") is None, what="the owner key is released")
    second = await start_call(b.url, call_id)  # the call ended: its id may come again, anywhere
    await second.close()


async def test_the_cluster_cap_counts_calls_on_every_instance(redis_url: str, db) -> None:  # type: ignore[no-untyped-def]
    await until(lambda: db.scard("parley:live") == 0, what="no live calls left by other tests")
    with servers(redis_url, "cap-a", "cap-b", cluster_max_calls=1) as (a, b):
        first = await start_call(a.url, f"cap-{uuid.uuid4()}")
        try:
            refusal = await refusal_of(b.url, f"cap-{uuid.uuid4()}")
            assert refusal.response.status_code == 503 and b"cluster_capacity" in refusal.response.body
            stats = (await api(b, "GET", "/api/stats")).json()
            assert stats["calls_refused"] == {"cluster_capacity": 1} and stats["admission"]["admitted"] == 0
        finally:
            await first.close()
        await until(lambda: db.scard("parley:live") == 0, what="the call is no longer counted")
        second = await start_call(b.url, f"cap-{uuid.uuid4()}")
        await second.close()


# ------------------------------------------------------------------ commands routed to the owner


async def test_a_hang_up_sent_to_another_instance_ends_the_call_where_it_runs(pair: list[BackgroundServer]) -> None:
    a, b = pair
    call_id = f"hang-{uuid.uuid4()}"
    ws = await start_call(a.url, call_id)
    try:
        response = await api(b, "POST", f"/api/calls/{call_id}/hangup")
        assert response.status_code == 200, response.text
        assert response.json()["instance"] == a.settings.instance_id
        await asyncio.wait_for(_until_closed(ws), 10)  # the closing line, then A closes the socket
        assert ended_reason(a, call_id) == "hangup_requested"
    finally:
        await ws.close()
    # Once over, nobody holds it: a defined error, not a hang.
    response = await api(b, "POST", f"/api/calls/{call_id}/hangup")
    assert response.status_code == 404 and "call_not_live" in response.json()["detail"]


async def test_a_transfer_without_call_automation_is_a_failed_command(pair: list[BackgroundServer]) -> None:
    a, b = pair
    call_id = f"transfer-{uuid.uuid4()}"
    ws = await start_call(a.url, call_id)
    try:
        response = await api(b, "POST", f"/api/calls/{call_id}/transfer", json={"target": "+15550199999"})
        assert response.status_code == 502 and "needs ACS Call Automation" in response.json()["detail"]
        response = await api(a, "POST", f"/api/calls/{call_id}/transfer", json={"target": "+15550199999"})
        assert response.status_code == 502  # the same, asked of the instance holding the call
        assert a.registry.session(call_id) is not None  # the call goes on
    finally:
        await ws.close()


async def test_garbage_on_a_command_channel_harms_nothing(pair: list[BackgroundServer], db, caplog) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    channel = f"parley:commands:{a.settings.instance_id}"
    for junk in ("not json", "[1, 2]", '{"op": "explode", "call_id": "x", "reply_to": "nobody"}', '{"op": "callback"}'):
        assert db.publish(channel, junk) == 1
    call_id = f"after-junk-{uuid.uuid4()}"
    ws = await start_call(a.url, call_id)  # still serving, still taking commands
    try:
        assert (await api(b, "POST", f"/api/calls/{call_id}/hangup")).status_code == 200
        await asyncio.wait_for(_until_closed(ws), 10)
    finally:
        await ws.close()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("a message that is not a command" in message for message in messages) == 2


async def test_cluster_figures(pair: list[BackgroundServer]) -> None:
    a, b = pair
    body = (await api(a, "GET", "/api/cluster")).json()
    assert body["instance"] == a.settings.instance_id
    assert {a.settings.instance_id, b.settings.instance_id} <= set(body["instances"])
    assert body["redis_down"] is False


async def test_a_command_for_an_instance_that_is_gone_or_silent_is_a_defined_error(
    pair: list[BackgroundServer], db
) -> None:  # type: ignore[no-untyped-def]
    a, _b = pair
    gone, silent = f"gone-{uuid.uuid4()}", f"silent-{uuid.uuid4()}"
    db.set(f"parley:owner:{gone}", "nobody-listens", px=10_000)  # an owner whose channel nobody reads
    response = await api(a, "POST", f"/api/calls/{gone}/hangup")
    assert response.status_code == 404 and "not listening" in response.json()["detail"]
    db.set(f"parley:owner:{silent}", "deaf-instance", px=10_000)
    listener = db.pubsub()
    listener.subscribe("parley:commands:deaf-instance")  # reads its commands, never answers
    try:
        started = time.monotonic()
        response = await api(a, "POST", f"/api/calls/{silent}/transfer", json={"target": "+15550199999"})
        assert response.status_code == 502 and "did not answer" in response.json()["detail"]
        assert 4.5 < time.monotonic() - started < 8
    finally:
        listener.close()


# ------------------------------------------------------------------ Redis unreachable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_without_a_reachable_redis_calls_go_on_locally(caplog) -> None:  # type: ignore[no-untyped-def]
    with redis_server() as url:
        server = cluster_server(url, "lonely")
        try:
            first = await start_call(server.url, f"before-{uuid.uuid4()}")
            # Redis goes away (the context ends: the server process stops) while a call is live.
        finally:
            pass
    try:
        started = time.monotonic()
        second = await start_call(server.url, f"without-{uuid.uuid4()}")
        assert time.monotonic() - started < 3  # each Redis request gave up after 0.5 s
        for ws in (first, second):
            await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
            await asyncio.wait_for(ws.recv(), 5)
        body = (await api(server, "GET", "/api/cluster")).json()
        assert body["redis_down"] is True and body["redis_failures"] > 0 and body["admitted_unchecked"] >= 1
        assert "error" in body
        response = await api(server, "POST", f"/api/calls/{uuid.uuid4()}/hangup")
        assert response.status_code == 503 and "redis_unavailable" in response.json()["detail"]
        await first.close()
        await second.close()
    finally:
        server.stop()
    unreachable = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # logged once, counted after


# ------------------------------------------------------------------ an instance killed


@contextmanager
def parley_process(redis_url: str, name: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_port()
    values = os.environ | {
        "PARLEY_HOST": "127.0.0.1",
        "PARLEY_PORT": str(port),
        "PARLEY_ENGINES": "plumbing",
        "PARLEY_REDIS_URL": redis_url,
        "PARLEY_INSTANCE_ID": name,
        "PARLEY_EVENT_LOG": "false",
        "PARLEY_WORKERS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "parley", "serve"],
        env=values | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"parley serve exited with {process.returncode}"
            assert time.monotonic() < deadline, "parley serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)


async def test_a_killed_instance_is_cleaned_up_by_a_survivor(pair: list[BackgroundServer], redis_url: str, db) -> None:  # type: ignore[no-untyped-def]
    a, _b = pair
    victim = f"victim-{uuid.uuid4().hex[:6]}"
    survivor_call, lost_call = f"survives-{uuid.uuid4()}", f"lost-{uuid.uuid4()}"
    with parley_process(redis_url, victim) as (process, port):
        kept = await start_call(a.url, survivor_call)
        lost = await start_call(f"ws://127.0.0.1:{port}/ws/acs", lost_call)
        assert db.get(f"parley:owner:{lost_call}") == victim and db.sismember("parley:live", lost_call)
        assert victim in db.smembers("parley:instances")
        # Across processes first: a hang-up asked of A ends a call that runs in the subprocess.
        hung_up = await start_call(f"ws://127.0.0.1:{port}/ws/acs", f"hung-up-{uuid.uuid4()}")
        response = await api(a, "POST", f"/api/calls/{hung_up.request.headers['x-ms-call-connection-id']}/hangup")
        assert response.status_code == 200 and response.json()["instance"] == victim
        await asyncio.wait_for(_until_closed(hung_up), 10)
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await until(lambda: victim not in db.smembers("parley:instances"), within_s=15, what="the victim reaped")
        cleaned_in = time.monotonic() - killed
    assert cleaned_in < 6 + 2 * 2 + 1  # its heartbeat's TTL, and a survivor's next look
    assert db.get(f"parley:owner:{lost_call}") is None and not db.sismember("parley:live", lost_call)
    assert not db.exists(f"parley:instance:{victim}:calls")
    # Nothing else was lost: the survivor's own call is still held and served.
    assert db.get(f"parley:owner:{survivor_call}") == a.settings.instance_id
    await kept.send(acs.inbound_audio_message(bytes(640), silent=True))
    await asyncio.wait_for(kept.recv(), 5)
    await kept.close()
    await lost.close()
    reapers = [server for server in pair if victim in (await api(server, "GET", "/api/cluster")).json()["reaped"]]
    assert len(reapers) == 1  # one survivor cleaned up (the lock), not both
    # The records (the Redis store every instance shares) say so: the victim's call ended as lost,
    # and any instance answers for it; the survivor's call is untouched.
    assert db.hget(f"parley:call:{lost_call}", "end_reason") == "server_lost"
    for server in pair:
        events = (await api(server, "GET", f"/api/calls/{lost_call}/events")).json()
        assert events["live"] is False and events["events"][0]["event"] == "call_started"
    assert (await api(a, "GET", f"/api/calls/{survivor_call}/events")).json()["live"] is False  # closed above
    assert db.hget(f"parley:call:{survivor_call}", "end_reason") != "server_lost"


async def test_after_redis_comes_back_the_instance_holds_its_calls_again() -> None:
    port = _free_port()
    with redis_server(port=port) as url:
        server = cluster_server(url, "phoenix")
        before = await start_call(server.url, f"before-{uuid.uuid4()}")
    try:
        during = await start_call(server.url, f"during-{uuid.uuid4()}")  # Redis is gone: admitted locally
        with redis_server(port=port):  # an empty Redis where the old one was
            db = redis.Redis.from_url(url, decode_responses=True)
            try:
                await until(lambda: db.scard("parley:live") == 2, within_s=10, what="the calls held again")
                assert {db.get(f"parley:owner:{call}") for call in db.smembers("parley:live")} == {"phoenix"}
                assert "phoenix" in db.smembers("parley:instances")
                await until(lambda: db.publish("parley:commands:phoenix", "{}") == 1, within_s=10, what="resubscribed")
                body = (await api(server, "GET", "/api/cluster")).json()
                assert body["redis_down"] is False and body["admitted_unchecked"] == 1
            finally:
                db.close()
            await before.close()
            await during.close()
    finally:
        server.stop()


async def test_a_restart_under_the_same_id_releases_what_the_previous_process_left(redis_url: str, db) -> None:  # type: ignore[no-untyped-def]
    name, call_id = f"fixed-{uuid.uuid4().hex[:6]}", f"left-{uuid.uuid4()}"
    with parley_process(redis_url, name) as (process, port):
        ws = await start_call(f"ws://127.0.0.1:{port}/ws/acs", call_id)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    await ws.close()
    assert db.sismember("parley:live", call_id)  # counted against the cap until someone cleans up
    with servers(redis_url, name) as (restarted,):  # at once: its heartbeat hides the death from others
        assert not db.sismember("parley:live", call_id) and db.get(f"parley:owner:{call_id}") is None
        await (await start_call(restarted.url, call_id)).close()  # the id may come again


async def test_an_instance_starts_and_serves_without_redis(caplog) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    # Nothing listens there. The records go to a local store: with PARLEY_STORE=redis (the default with a
    # Redis URL) an unreachable Redis at startup stops the server instead (tests/test_records_redis.py).
    server = cluster_server(f"redis://127.0.0.1:{_free_port()}/0", "no-redis-yet", store="memory")
    try:
        assert time.monotonic() - started < 10
        ws = await start_call(server.url, f"alone-{uuid.uuid4()}")
        await ws.close()
        assert (await api(server, "GET", "/readyz")).status_code == 200
    finally:
        server.stop()
    assert any("Redis unreachable" in record.getMessage() for record in caplog.records)
