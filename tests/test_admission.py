"""Admission control and overload protection: the pure logic, then each refusal over real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import websockets

from parley.admission import (
    EMBEDDED,
    LIGHT,
    MAX_CALL_ID_CHARS,
    AdmissionController,
    LoadReading,
    OverloadGate,
    OverloadLimits,
    QueueReading,
    Refusal,
    Slot,
    call_cost,
    call_id_problem,
    derive_max_calls,
    effective_max_calls,
    executor_queues,
    figures_over,
    worst_backlog,
)
from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.stats import LoopLagMonitor
from parley.transports import acs
from tests.conftest import make_server

LIMITS = OverloadLimits(loop_lag_ms=100, backlog_frames=100, queued_jobs_per_worker=8, clear_ratio=0.5, settle_s=3)


# ------------------------------------------------------------------ the default max_calls


def test_embedded_calls_are_bounded_by_cores_and_memory() -> None:
    assert derive_max_calls(EMBEDDED, cores=2, memory_mb=24 * 1024) == 12  # 6 per core
    assert derive_max_calls(EMBEDDED, cores=16, memory_mb=64 * 1024) == 96
    # ~120 MB a call over a ~1 GB base: 4 GB holds (0.8 * 4096 - 1000) / 120 = 18 calls, not 96.
    assert derive_max_calls(EMBEDDED, cores=16, memory_mb=4096) == 18
    assert derive_max_calls(EMBEDDED, cores=1, memory_mb=512) == 1  # never 0
    assert derive_max_calls(EMBEDDED, cores=0.5, memory_mb=None) == 3  # a cgroup quota of half a core


def test_light_calls_are_bounded_by_the_one_event_loop() -> None:
    assert derive_max_calls(LIGHT, cores=1, memory_mb=None) == 25
    assert derive_max_calls(LIGHT, cores=2, memory_mb=24 * 1024) == 50
    assert derive_max_calls(LIGHT, cores=64, memory_mb=256 * 1024) == 50  # more cores, same loop


def test_the_profile_follows_the_engines() -> None:
    assert call_cost(load_settings()) is EMBEDDED
    assert call_cost(load_settings(stt="pocketsphinx")) is EMBEDDED
    assert call_cost(load_settings(engines="plumbing")) is LIGHT
    azure = load_settings(stt="azure", azure_speech_key="k", azure_speech_region="westeurope")
    assert call_cost(azure) is LIGHT


def test_an_explicit_max_calls_wins_and_the_origin_is_said() -> None:
    assert effective_max_calls(load_settings(max_calls=3)) == (3, "PARLEY_MAX_CALLS")
    value, origin = effective_max_calls(load_settings(engines="plumbing"))
    assert value >= 1 and origin.startswith("derived: ") and "cores" in origin and "plumbing" in origin


# ------------------------------------------------------------------ call ids


@pytest.mark.parametrize(
    "value",
    [
        str(uuid.uuid4()),
        "local-" + str(uuid.uuid4()),
        "aHR0cHM6Ly9hcGk=",
        "8:acs:resource_user",
        "a" * MAX_CALL_ID_CHARS,
    ],
)
def test_call_ids_parley_and_acs_use_are_fine(value: str) -> None:
    assert call_id_problem(value) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("a" * (MAX_CALL_ID_CHARS + 1), "longer than 128"),
        ("has space", "characters outside"),
        ("../../etc/passwd", "characters outside"),
        ("line\nbreak", "characters outside"),
        ("caf\u00e9", "characters outside"),
        ("", "characters outside"),
    ],
)
def test_call_ids_too_long_or_with_odd_characters_are_refused(value: str, problem: str) -> None:
    assert problem in (call_id_problem(value) or "")


# ------------------------------------------------------------------ overload, with hysteresis


def test_each_figure_over_its_limit_is_named() -> None:
    reading = LoadReading(153.2, 140, (QueueReading("synth", 17, 2), QueueReading("stt-final", 3, 1)))
    assert figures_over(reading, LIMITS) == [
        "loop lag p99 153 ms > 100 ms",
        "recognition backlog 140 frames > 100",
        "synth queue 17 jobs > 16",
    ]
    assert figures_over(LoadReading(None), LIMITS) == []  # nothing measured yet: not overloaded


def test_overload_starts_at_once_and_ends_only_after_a_calm_spell() -> None:
    gate = OverloadGate(LIMITS)
    assert not gate.update(LoadReading(20.0), now=0.0)
    assert gate.update(LoadReading(150.0), now=1.0)  # one reading over the limit is enough
    assert gate.reasons == ["loop lag p99 150 ms > 100 ms"]
    # Below the limit but above half of it: still overloaded (no flapping around the limit).
    assert gate.update(LoadReading(80.0), now=2.0)
    assert gate.reasons == ["cooling down: loop lag p99 80 ms > 50 ms"]
    assert gate.update(LoadReading(30.0), now=3.0)  # calm from now...
    assert gate.update(LoadReading(30.0), now=5.9)  # ...but not for settle_s yet
    assert gate.update(LoadReading(60.0), now=6.0)  # not calm any more: the spell starts over
    assert gate.update(LoadReading(30.0), now=7.0)
    assert gate.update(LoadReading(30.0), now=9.9)
    assert not gate.update(LoadReading(30.0), now=10.0)
    assert gate.reasons == []


def test_backlog_and_executor_queues_overload_too() -> None:
    gate = OverloadGate(LIMITS)
    assert gate.update(LoadReading(1.0, backlog_frames=101), now=0)
    gate = OverloadGate(LIMITS)
    assert not gate.update(LoadReading(1.0, queues=(QueueReading("stt-final", 8, 1),)), now=0)
    assert gate.update(LoadReading(1.0, queues=(QueueReading("stt-final", 9, 1),)), now=0)


def test_executor_queues_read_real_thread_pools() -> None:
    release = threading.Event()
    executor = ThreadPoolExecutor(1, thread_name_prefix="synth")
    try:
        futures = [executor.submit(release.wait, 5) for _ in range(4)]  # one runs, three wait
        deadline = time.monotonic() + 5
        while executor_queues([executor])[0].queued != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert executor_queues([executor]) == (QueueReading("synth", 3, 1),)
    finally:
        release.set()
        for future in futures:
            future.result(5)
        executor.shutdown()


def test_worst_backlog_is_the_largest_among_live_calls() -> None:
    calls = [
        SimpleNamespace(recognition=SimpleNamespace(backlog=3)),
        SimpleNamespace(recognition=None),  # before its AudioMetadata
        SimpleNamespace(recognition=SimpleNamespace(backlog=41)),
    ]
    assert worst_backlog(calls) == 41
    assert worst_backlog([]) == 0


def test_the_recent_loop_lag_covers_only_the_last_seconds() -> None:
    monitor = LoopLagMonitor()
    now = time.monotonic()
    for i in range(100):
        monitor.record(500.0, t=now - 20 + i * 0.01)  # a bad spell 20 s ago
    assert monitor.recent_p99(now=now) is None  # nothing measured in the last 5 s
    for i in range(200):
        monitor.record(2.0 if i % 50 else 300.0, t=now - 2 + i * 0.01)  # 4 late wake-ups in 200
    assert monitor.recent_p99(now=now) == pytest.approx(300.0, rel=0.1)
    assert monitor.snapshot(reset=True)["max"] == 500.0  # the all-time figures are another matter
    assert monitor.recent_p99(now=now) is not None  # a stats reset leaves the recent window alone


# ------------------------------------------------------------------ the controller


def refused(result: Slot | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def test_slots_are_reserved_until_released() -> None:
    reasons: list[str] = []
    controller = AdmissionController(2, LIMITS, on_refused=reasons.append)
    first = controller.admit("a")
    second = controller.admit(None)  # no id: the server names the call
    assert isinstance(first, Slot) and isinstance(second, Slot)
    assert (refused(controller.admit("c")).status, reasons) == (503, ["capacity"])
    assert controller.readiness()[1]["reasons"] == ["at_capacity"]
    controller.release(first)
    controller.release(first)  # idempotent
    assert isinstance(controller.admit("c"), Slot)
    assert controller.in_use == 2


def test_a_live_call_id_is_refused_and_free_again_once_released() -> None:
    controller = AdmissionController(10, LIMITS)
    slot = controller.admit("call-1")
    assert isinstance(slot, Slot)
    assert (refused(controller.admit("call-1")).status, refused(controller.admit("call-1")).reason) == (
        409,
        "duplicate_call_id",
    )
    controller.release(slot)
    assert isinstance(controller.admit("call-1"), Slot)


def test_bad_ids_are_400_whichever_place_they_come_from() -> None:
    controller = AdmissionController(10, LIMITS)
    assert refused(controller.admit("x" * 500)).status == 400
    assert refused(controller.admit("fine", also_check=["not fine"])).reason == "bad_call_id"
    assert controller.in_use == 0


def test_overloaded_and_draining_refuse_with_503() -> None:
    controller = AdmissionController(10, LIMITS)
    controller.update(LoadReading(400.0), now=0.0)
    refusal = refused(controller.admit("a"))
    assert (refusal.status, refusal.reason) == (503, "overloaded")
    assert "loop lag p99 400 ms" in refusal.message
    ready, body = controller.readiness()
    assert not ready and body["reasons"] == ["overloaded"] and body["overload"] == ["loop lag p99 400 ms > 100 ms"]
    controller.update(LoadReading(1.0), now=1.0)
    controller.update(LoadReading(1.0), now=4.0)
    assert controller.readiness()[0]
    controller.draining = True
    assert refused(controller.admit("a")).reason == "draining"
    assert controller.readiness()[1]["reasons"] == ["draining"]


def test_a_flood_of_refusals_is_counted_exactly_but_logged_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    reasons: list[str] = []
    controller = AdmissionController(1, LIMITS, on_refused=reasons.append)
    controller.admit("a")
    with caplog.at_level(logging.WARNING, logger="parley.admission"):
        for i in range(50):
            controller.admit(f"b{i}", client="10.0.0.9:5000")
    assert reasons == ["capacity"] * 50
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "media socket refused (HTTP 503, capacity): call b0 from 10.0.0.9:5000: the server is at its limit of 1 calls"
    ]


def test_a_refused_call_id_is_logged_cut_and_quoted(caplog: pytest.LogCaptureFixture) -> None:
    controller = AdmissionController(1, LIMITS)
    with caplog.at_level(logging.WARNING, logger="parley.admission"):
        controller.admit("evil\n" + "x" * 5000)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and len(line) < 300 and "+4941 chars" in line


class FakeCall:
    def __init__(self, controller: AdmissionController, slot: Slot, ends_after_s: float | None) -> None:
        self.call_id = slot.call_id
        self.told: list[tuple[float, str]] = []
        self._controller, self._slot = controller, slot
        if ends_after_s is not None:
            asyncio.get_running_loop().call_later(ends_after_s, controller.release, slot)

    def finish_politely(self, reason: str) -> None:
        self.told.append((time.monotonic(), reason))
        asyncio.get_running_loop().call_later(0.2, self._controller.release, self._slot)  # the closing line


async def test_drain_waits_for_calls_that_end_on_their_own() -> None:
    controller = AdmissionController(10, LIMITS)
    slot = controller.admit("a")
    assert isinstance(slot, Slot)
    call = FakeCall(controller, slot, ends_after_s=0.3)
    started = time.monotonic()
    timeline = await controller.drain(lambda: [call], timeout_s=5)
    assert 0.25 < time.monotonic() - started < 1.0
    assert call.told == [] and set(timeline) == {"draining", "calls_ended"}
    assert refused(controller.admit("b")).reason == "draining"


async def test_drain_closes_calls_politely_at_its_timeout() -> None:
    controller = AdmissionController(10, LIMITS)
    calls = []
    for name in ("a", "b"):
        slot = controller.admit(name)
        assert isinstance(slot, Slot)
        calls.append(FakeCall(controller, slot, ends_after_s=None))
    started = time.monotonic()
    timeline = await controller.drain(lambda: calls, timeout_s=0.5, grace_s=5)
    assert [reason for call in calls for _, reason in call.told] == ["server_drain", "server_drain"]
    assert 0.45 < calls[0].told[0][0] - started < 0.8
    assert timeline["closing"] == pytest.approx(0.5, abs=0.2)
    assert timeline["calls_ended"] == pytest.approx(0.7, abs=0.25)
    assert controller.in_use == 0


async def test_drain_gives_up_after_its_grace(caplog: pytest.LogCaptureFixture) -> None:
    controller = AdmissionController(10, LIMITS)
    slot = controller.admit("stuck")
    assert isinstance(slot, Slot)

    class Deaf:
        call_id = "stuck"

        def finish_politely(self, reason: str) -> None:
            raise RuntimeError("cannot")  # logged; the drain goes on

    timeline = await controller.drain(lambda: [Deaf()], timeout_s=0.1, grace_s=0.3)
    assert "gave_up" in timeline and controller.in_use == 1
    assert any("could not be finished politely" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ over real sockets


@pytest.fixture(scope="module")
def small_server() -> Iterator[BackgroundServer]:
    server = make_server(engines="plumbing", max_calls=2, greeting="hi")
    yield server
    server.stop()


def headers(call_id: str) -> dict[str, str]:
    return {"x-ms-call-connection-id": call_id}


async def refusal_of(url: str, **kwargs: Any) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, **kwargs)
    return refused.value


async def stats(server: BackgroundServer) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{server.http_url}/api/stats")).json()


async def wait_for_admitted(server: BackgroundServer, count: int) -> None:
    deadline = time.monotonic() + 5
    while (await stats(server))["admission"]["admitted"] != count:
        assert time.monotonic() < deadline, await stats(server)
        await asyncio.sleep(0.02)


async def test_beyond_max_calls_the_upgrade_is_refused_with_503(small_server: BackgroundServer) -> None:
    before = (await stats(small_server))["calls_refused"].get("capacity", 0)
    # Sockets that have sent nothing yet hold their slot: that is what costs a recognizer later.
    async with websockets.connect(small_server.url), websockets.connect(small_server.url):
        refusal = await refusal_of(small_server.url)
        assert refusal.response.status_code == 503
        assert b"capacity" in refusal.response.body
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"{small_server.http_url}/readyz")
            assert ready.status_code == 503 and ready.json()["reasons"] == ["at_capacity"]
            for path in ("/healthz", "/livez"):  # liveness is not readiness
                assert (await client.get(f"{small_server.http_url}{path}")).status_code == 200
        assert (await stats(small_server))["calls_refused"]["capacity"] == before + 1
    await wait_for_admitted(small_server, 0)  # both slots are free once the calls have ended
    async with websockets.connect(small_server.url) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        assert isinstance(acs.parse_outbound(await asyncio.wait_for(ws.recv(), 5)), acs.OutboundAudio)


async def test_a_second_socket_for_a_live_call_id_is_refused_with_409(small_server: BackgroundServer) -> None:
    call_id = f"dup-{uuid.uuid4()}"
    async with websockets.connect(small_server.url, additional_headers=headers(call_id)) as first:
        await first.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        await asyncio.wait_for(first.recv(), 5)
        refusal = await refusal_of(small_server.url, additional_headers=headers(call_id))
        assert refusal.response.status_code == 409
        # By the query too (?callId= is the id when there is no header).
        refusal = await refusal_of(small_server.url.replace("/ws/acs", f"/ws?callId={call_id}"))
        assert refusal.response.status_code == 409
        # The first call is untouched: it is still the one the registry knows, and still served.
        assert small_server.registry.session(call_id) is not None
        await first.send(acs.inbound_audio_message(bytes(640), silent=True))
        await asyncio.wait_for(first.recv(), 5)
    await wait_for_admitted(small_server, 0)
    async with websockets.connect(small_server.url, additional_headers=headers(call_id)):
        pass  # the call has ended: its id may come again
    assert (await stats(small_server))["calls_refused"]["duplicate_call_id"] == 2


@pytest.mark.parametrize(
    "where",
    ["header-long", "header-chars", "query-chars", "query-next-to-a-header"],
)
async def test_a_bad_call_id_is_refused_with_400(small_server: BackgroundServer, where: str) -> None:
    url, extra = small_server.url, {}
    if where == "header-long":
        extra = headers("x" * 129)
    elif where == "header-chars":
        extra = headers("a/b")
    elif where == "query-chars":
        url = small_server.url + "?callId=%3Cscript%3E"
    else:
        url, extra = small_server.url + "?callId=a%20b", headers("fine-id")
    refusal = await refusal_of(url, additional_headers=extra)
    assert refusal.response.status_code == 400
    assert b"bad_call_id" in refusal.response.body


async def test_an_overloaded_loop_refuses_new_calls_and_readyz_says_why() -> None:
    server = make_server(engines="plumbing", greeting="hi")
    try:
        loop = server.app.state.loop
        # Stall the server's event loop again and again, as a flood or a blocking call would:
        # 30 stalls of 150 ms are far more than 1 % of the last 5 s of loop-lag samples.
        for _ in range(30):
            loop.call_soon_threadsafe(time.sleep, 0.15)
            await asyncio.sleep(0.03)
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = time.monotonic() + 10
            while (ready := await client.get(f"{server.http_url}/readyz")).status_code == 200:
                assert time.monotonic() < deadline, "never overloaded"
                await asyncio.sleep(0.05)
            body = ready.json()
            assert body["reasons"] == ["overloaded"] and "loop lag p99" in body["overload"][0], body
            assert (await client.get(f"{server.http_url}/livez")).status_code == 200
            assert (await client.get(f"{server.http_url}/healthz")).json()["status"] == "ok"
            refusal = await refusal_of(server.url)
            assert refusal.response.status_code == 503 and b"overloaded" in refusal.response.body
            assert (await stats(server))["calls_refused"] == {"overloaded": 1}
            # Once the loop has been calm for a while (the 5 s window, then the settling time),
            # calls are admitted again.
            deadline = time.monotonic() + 20
            while (await client.get(f"{server.http_url}/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "still refusing long after the stalls"
                await asyncio.sleep(0.2)
        async with websockets.connect(server.url) as ws:
            assert ws.response is not None and ws.response.status_code == 101
    finally:
        server.stop()


async def test_a_draining_server_refuses_new_calls_and_serves_its_live_one() -> None:
    server = make_server(engines="plumbing", greeting="hi", drain_timeout_s=30)
    try:
        async with websockets.connect(server.url, additional_headers=headers("live-1")) as ws:
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            await asyncio.wait_for(ws.recv(), 5)
            assert server.begin_drain()
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 5
                while (ready := await client.get(f"{server.http_url}/readyz")).status_code == 200:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert ready.status_code == 503 and ready.json()["reasons"] == ["draining"]
            refusal = await refusal_of(server.url)
            assert refusal.response.status_code == 503 and b"draining" in refusal.response.body
            for _ in range(10):  # the live call goes on
                await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                await asyncio.sleep(0.02)
            assert not server.stopped
        deadline = time.monotonic() + 10  # its caller hung up: the server stops
        while not server.stopped:
            assert time.monotonic() < deadline, "the drained server did not stop"
            await asyncio.sleep(0.05)
    finally:
        server.stop()


async def test_peers_gone_before_their_refusal_harm_nothing(small_server: BackgroundServer) -> None:
    """Upgrade requests to a full server whose peers reset the connection at once: each is refused
    (counted), none is left holding anything, and the server goes on answering."""
    before = (await stats(small_server))["calls_refused"].get("capacity", 0)
    request = (
        f"GET /ws/acs HTTP/1.1\r\nHost: 127.0.0.1:{small_server.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    async with websockets.connect(small_server.url), websockets.connect(small_server.url):
        for _ in range(20):
            _reader, writer = await asyncio.open_connection("127.0.0.1", small_server.port)
            writer.write(request)
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            writer.close()
        deadline = time.monotonic() + 5
        while (await stats(small_server))["calls_refused"].get("capacity", 0) < before + 20:
            assert time.monotonic() < deadline, await stats(small_server)
            await asyncio.sleep(0.05)
        assert (await stats(small_server))["admission"]["admitted"] == 2
    await wait_for_admitted(small_server, 0)
    async with websockets.connect(small_server.url) as ws:
        assert ws.response is not None and ws.response.status_code == 101
