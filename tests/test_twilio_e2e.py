"""Twilio Media Streams end to end: a real parley server on loopback, a Twilio-like peer on a real
WebSocket (signed upgrade, start, mu-law media at real time, marks echoed), the voice webhook over
HTTP, and a hang-up that reaches a fake Twilio REST API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from conftest import HOURS_PHRASE
from parley.engines import plumbing_engines
from parley.protocols import AgentOutput, CallContext, Hangup, Say, UserInput
from parley.server import BackgroundServer
from parley.settings import Settings, load_settings
from parley.transports import twilio as tw
from parley.transports.twilio_resample import Downsampler
from parley.voice.espeak import EspeakSynthesizer

TOKEN = "test-auth-token"
PUBLIC = "https://parley.example"
ACCOUNT = "AC00000000000000000000000000000001"
CALL_SID = "CA00000000000000000000000000000001"
STREAM_SID = "MZ00000000000000000000000000000001"
SILENCE = bytes([0xFF] * tw.FRAME_BYTES)


def _sign(url: str, params: list[tuple[str, str]] | None = None) -> str:
    """Twilio's documented algorithm, written out here independently of parley's."""
    data = url + "".join(k + v for k, v in sorted(params or []))
    return base64.b64encode(hmac.new(TOKEN.encode(), data.encode(), hashlib.sha1).digest()).decode()


def _settings(**overrides: Any) -> Settings:
    return load_settings(
        host="127.0.0.1",
        port=0,
        event_log=False,
        engines="plumbing",
        twilio_auth_token=TOKEN,
        twilio_public_url=PUBLIC,
        **overrides,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    default_agent = Settings(_env_file=None).agent  # type: ignore[call-arg]
    srv = BackgroundServer(_settings(agents_by_number={"+1 555 0100": default_agent})).start()
    yield srv
    srv.stop()


def _ws_url(server: BackgroundServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws/twilio"


async def _open(server: BackgroundServer, signature: str | None = None) -> ClientConnection:
    signed = _sign("wss://parley.example/ws/twilio") if signature is None else signature
    return await connect(_ws_url(server), additional_headers={"X-Twilio-Signature": signed}, max_size=2**20)


def _speech_mulaw(voice: EspeakSynthesizer) -> bytes:
    pcm16 = np.frombuffer(voice.synthesize_blocking(HOURS_PHRASE, 16000), dtype=np.int16)
    return tw.mulaw_encode(Downsampler().process(pcm16))


class Peer:
    """What Twilio does on the stream: sends the caller's audio in 20 ms chunks at real time,
    records what parley sends, and echoes each mark (this peer "plays" on arrival)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[tuple[float, tw.OutboundEvent]] = []
        self.audio: asyncio.Queue[bytes] = asyncio.Queue()  # caller audio to send (else silence)
        self._chunk = 0

    async def start(self) -> None:
        await self.ws.send(tw.connected_message())
        params = {"agent": "", "to": "+15550100", "from": "+15550199"}
        await self.ws.send(tw.start_message(STREAM_SID, CALL_SID, account_sid=ACCOUNT, custom_parameters=params))

    async def send_audio(self) -> None:
        next_t = time.monotonic()
        pending = b""
        while True:
            if not pending and not self.audio.empty():
                pending = self.audio.get_nowait()
            chunk, pending = (pending[:160], pending[160:]) if pending else (SILENCE, b"")
            chunk = chunk.ljust(160, b"\xff")
            self._chunk += 1
            await self.ws.send(tw.inbound_media_message(STREAM_SID, chunk, self._chunk, self._chunk * 20))
            next_t += 0.02
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    async def read(self) -> None:
        async for message in self.ws:
            event = tw.parse_outbound(message)
            self.received.append((time.monotonic(), event))
            if isinstance(event, tw.OutboundMark):
                await self.ws.send(tw.mark_echo_message(STREAM_SID, event.name))

    def of(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.received if isinstance(e, kind)]

    async def until(self, condition: Any, timeout: float) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                kinds = [type(e).__name__ for _, e in self.received][-20:]
                raise AssertionError(f"condition not met within {timeout} s; last received: {kinds}")
            await asyncio.sleep(0.01)


@pytest.fixture
async def peer(server: BackgroundServer) -> AsyncIterator[Peer]:
    ws = await _open(server)
    peer = Peer(ws)
    await peer.start()
    tasks = [asyncio.create_task(peer.send_audio()), asyncio.create_task(peer.read())]
    yield peer
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ws.close()


async def test_a_call_gets_mulaw_audio_and_a_barge_in_clears_it(
    server: BackgroundServer, peer: Peer, voice: EspeakSynthesizer
) -> None:
    # The greeting arrives as 20 ms mu-law media for our stream, with marks along it.
    await peer.until(lambda: len(peer.of(tw.OutboundMedia)) >= 50, timeout=15)
    handler = server.registry.live_sessions()[0]
    media = [e for _, e in peer.of(tw.OutboundMedia)]
    assert all(e.stream_sid == STREAM_SID and len(e.payload) == 160 for e in media)
    levels = tw.mulaw_decode(b"".join(e.payload for e in media[10:50])).astype(np.float64)
    assert np.sqrt(np.mean(levels**2)) > 1000  # the greeting's tone, not silence
    assert peer.of(tw.OutboundMark)
    started = handler.events.of("stream_started")[0]
    assert started["channel"] == "twilio" and started["channel_call_id"] == CALL_SID
    assert started["parameters"] == ["agent", "from", "to"]  # named; the numbers are not logged

    # The caller talks over it: a clear, and nothing of the greeting after it.
    await peer.audio.put(_speech_mulaw(voice))
    await peer.until(lambda: bool(peer.of(tw.OutboundClear)), timeout=10)
    clear_t = peer.of(tw.OutboundClear)[0][0]
    assert peer.of(tw.OutboundClear)[0][1].stream_sid == STREAM_SID
    await peer.until(lambda: bool(handler.events.of("turn_cancelled")), timeout=10)
    cancelled = handler.events.of("turn_cancelled")[0]
    greeting_turn = cancelled["turn_id"]
    assert cancelled["heard_ms"] > 0  # what the caller heard (the marks confirmed it)
    # The answer to what the caller said comes next: any media after the clear is its turn's.
    await peer.until(lambda: any(t > clear_t for t, _ in peer.of(tw.OutboundMedia)), timeout=15)
    next_turn = next(e for e in handler.events.of("turn_started") if e["turn_id"] != greeting_turn)
    assert all(t > next_turn["t"] for t, _ in peer.of(tw.OutboundMedia) if t > clear_t)
    marks_after = [e.name for t, e in peer.of(tw.OutboundMark) if t > clear_t]
    assert all(int(name.split(":")[0]) != greeting_turn for name in marks_after)

    # Twilio's stop ends the call.
    await peer.ws.send(tw.stop_message(STREAM_SID, CALL_SID))
    await peer.until(lambda: bool(handler.events.of("call_ended")), timeout=10)
    assert handler.events.of("call_ended")[0]["reason"].startswith("caller_hangup (stop")


async def test_an_unsigned_or_forged_upgrade_is_refused_before_accept(server: BackgroundServer) -> None:
    for signature in ("", _sign("wss://elsewhere.example/ws/twilio")):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await _open(server, signature)
        assert refused.value.response.status_code == 403
    assert server.registry.live_count == 0


async def test_the_voice_webhook_answers_signed_requests_with_twiml(server: BackgroundServer) -> None:
    form = [("CallSid", CALL_SID), ("AccountSid", ACCOUNT), ("From", "+15550199"), ("To", "+15550100")]
    url = f"http://127.0.0.1:{server.port}/api/twilio/voice"
    headers = {"content-type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient() as client:
        signed = {**headers, "X-Twilio-Signature": _sign(f"{PUBLIC}/api/twilio/voice", form)}
        answer = await client.post(url, content=urlencode(form), headers=signed)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/xml")
        stream = ElementTree.fromstring(answer.text).find("./Connect/Stream")
        assert stream is not None and stream.get("url") == "wss://parley.example/ws/twilio"
        params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        assert params == {"agent": server.settings.agent, "to": "+15550100", "from": "+15550199"}

        tampered = urlencode([*form[:-1], ("To", "+15550999")])
        for body, extra in ((tampered, signed), (urlencode(form), headers)):
            refused = await client.post(url, content=body, headers=extra)
            assert refused.status_code == 403


# --------------------------------------------------------------------------------------------
# The agent hangs up: the request reaches (a fake) Twilio with the stream's CallSid
# --------------------------------------------------------------------------------------------


class FakeTwilio(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
        expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
        status = 200 if self.headers.get("authorization") == expected else 401
        FakeTwilio.requests.append({"path": self.path, "form": dict(parse_qsl(body)), "status": status})
        data = json.dumps({"sid": CALL_SID} if status == 200 else {"message": "Authenticate", "code": 20003}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class ByeAgent:
    voice = None
    greeting_interruptible = True

    def greeting(self) -> str | None:
        return "Hello."

    async def respond(self, user: UserInput) -> AsyncIterator[AgentOutput]:
        yield Say("Goodbye.")
        yield Hangup("agent_hangup")


async def test_the_agents_hang_up_reaches_the_twilio_call(voice: EspeakSynthesizer) -> None:
    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeTwilio)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    settings = _settings(twilio_account_sid=ACCOUNT, twilio_api_base=f"http://127.0.0.1:{fake.server_address[1]}")
    engines = plumbing_engines(settings)

    def agent_factory(context: CallContext) -> ByeAgent:
        return ByeAgent()

    engines.agent_factory = agent_factory
    srv = BackgroundServer(settings, engines).start()
    try:
        ws = await _open(srv)
        peer = Peer(ws)
        await peer.start()
        tasks = [asyncio.create_task(peer.send_audio()), asyncio.create_task(peer.read())]
        await peer.until(lambda: bool(peer.of(tw.OutboundMedia)), timeout=15)
        await asyncio.sleep(1.0)  # past the greeting
        await peer.audio.put(_speech_mulaw(voice))
        await asyncio.wait_for(tasks[1], 20)  # parley closes the stream after the goodbye
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        srv.stop()
        fake.shutdown()
        thread.join(5)
    assert FakeTwilio.requests == [
        {
            "path": f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{CALL_SID}.json",
            "form": {"Status": "completed"},
            "status": 200,
        }
    ]
