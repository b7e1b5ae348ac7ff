"""The browser channel on a real server (`/ws/browser`): who is refused before accept (HTTP 403),
and a call: binary audio both ways, the call's events forwarded to the page, DTMF and stop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from parley.server import BackgroundServer
from parley.settings import load_settings

TOKEN = "browser-token-for-tests"
GREETING = "Hello, this is the browser test."


def plumbing(**overrides: Any) -> BackgroundServer:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "event_log": False,
        "engines": "plumbing",
        "engine_pool_warm": 0,
        "greeting": GREETING,
    }
    return BackgroundServer(load_settings(**(values | overrides))).start()


@pytest.fixture(scope="module")
def loopback() -> Iterator[BackgroundServer]:
    server = plumbing(allowed_origins=["https://app.example.org"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def public() -> Iterator[BackgroundServer]:
    """Bound to every interface (reached here on 127.0.0.1): the token and an allowed Origin are needed."""
    server = plumbing(host="0.0.0.0", api_token=TOKEN, allowed_origins=["https://talk.example.org"])
    yield server
    server.stop()


async def refused(url: str, **kwargs: Any) -> bytes:
    with pytest.raises(websockets.InvalidStatus) as raised:
        async with connect(url, **kwargs):
            pass
    assert raised.value.response.status_code == 403
    return raised.value.response.body


async def test_refusals_on_loopback_come_before_accept(
    loopback: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"ws://127.0.0.1:{loopback.port}/ws/browser"
    started = loopback.registry.stats.calls_started
    with caplog.at_level(logging.WARNING, logger="parley.security.access"):
        for origin in ("https://evil.example", f"http://127.0.0.1:{loopback.port + 1}", "null"):
            body = await refused(url, origin=origin, subprotocols=["parley.browser"])
            assert b"neither this server's page nor in PARLEY_ALLOWED_ORIGINS" in body
        # A page served under another name that resolves here (DNS rebinding) sends its own Host.
        body = await refused(url, origin="http://rebound.example", additional_headers={"Host": "rebound.example"})
        assert b"Origin" in body
    assert loopback.registry.stats.calls_started == started
    assert sum("media WebSocket from 127.0.0.1" in r.getMessage() for r in caplog.records) == 4


async def test_refusals_elsewhere_need_the_token_and_an_allowed_origin(public: BackgroundServer) -> None:
    url = f"ws://127.0.0.1:{public.port}/ws/browser"
    allowed = "https://talk.example.org"
    assert b"missing token" in await refused(url, origin=allowed, subprotocols=["parley.browser"])
    assert b"wrong token" in await refused(url, origin=allowed, subprotocols=["parley.browser", "bearer.nope"])
    own_page = f"http://127.0.0.1:{public.port}"  # same origin is not enough off loopback
    body = await refused(url, origin=own_page, subprotocols=["parley.browser", f"bearer.{TOKEN}"])
    assert b"not in PARLEY_ALLOWED_ORIGINS" in body
    # Token and origin: admitted, the channel's subprotocol chosen (a browser insists on one it offered).
    async with connect(url, origin=allowed, subprotocols=["parley.browser", f"bearer.{TOKEN}"]) as ws:
        assert ws.subprotocol == "parley.browser"
        await ws.send(json.dumps({"type": "start", "sampleRate": 16000}))
        await ws.send(json.dumps({"type": "stop"}))
        async for _ in ws:
            pass
    assert public.registry.stats.calls_started >= 1


async def test_without_a_token_a_public_bind_refuses_every_browser() -> None:
    server = plumbing(host="0.0.0.0", allowed_origins=["https://talk.example.org"])
    try:
        url = f"ws://127.0.0.1:{server.port}/ws/browser"
        body = await refused(url, origin="https://talk.example.org", subprotocols=["parley.browser", "bearer.x"])
        assert b"needs PARLEY_API_TOKEN" in body
    finally:
        server.stop()


async def test_a_call_gets_audio_as_binary_and_its_events_as_json(loopback: BackgroundServer) -> None:
    url = f"ws://127.0.0.1:{loopback.port}/ws/browser"
    texts: list[dict[str, Any]] = []
    frames: list[bytes] = []
    async with connect(url, origin=f"http://127.0.0.1:{loopback.port}", subprotocols=["parley.browser"]) as ws:
        await ws.send(json.dumps({"type": "start", "sampleRate": 16000}))
        await ws.send(json.dumps({"type": "dtmf", "digits": "12"}))

        async def speak() -> None:
            for _ in range(100):  # 2 s of silence, paced
                await ws.send(bytes(640))
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"type": "stop"}))

        speaking = asyncio.create_task(speak())
        async for message in ws:
            if isinstance(message, bytes):
                frames.append(message)
            else:
                texts.append(json.loads(message))
        await speaking
    assert frames and all(len(frame) == 640 for frame in frames)
    events = [m["event"] for m in texts if m["type"] == "event"]
    names = [e["name"] for e in events]
    assert names[0] == "call_started" and events[0]["t"] == 0.0
    assert {"turn_started", "agent_text", "first_audio_sent"} <= set(names)
    assert any(e["name"] == "agent_text" and e["text"] == GREETING for e in events)
    assert any(e["name"] == "dtmf_input" and set(e["digits"]) <= {"•"} for e in events)  # masked
    assert any(m["type"] == "figure" and m["name"] == "turn_first_audio" for m in texts)
    assert all("call_id" not in m.get("event", {}) for m in texts)
