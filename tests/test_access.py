"""Privacy and access: the calls/events/stats APIs need PARLEY_API_TOKEN (or a loopback bind without
one), media sockets refuse foreign Origins and, with ACS, calls parley did not answer or place; what
callers said or keyed reaches the log only at DEBUG, and DTMF digits are masked in the records."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from fastapi.testclient import TestClient
from websockets.asyncio.client import connect

from parley import logs
from parley.benchmarks.common import ServerUnderTest
from parley.caller import CallOptions, run_call
from parley.engines import Engines, recognizer_pool, vad_pool
from parley.media.events import EventLog, mask_digits
from parley.protocols import AgentOutput, CallContext, Say, UserInput
from parley.security.access import is_loopback_host_header, normalize_origin
from parley.server import BackgroundServer, create_app
from parley.settings import Settings, load_settings
from parley.speech.vad import SileroVad
from parley.testing.doubles import RecognizerDouble, SynthesizerDouble
from parley.transports import acs

TOKEN = "s3cret-api-token-for-tests"
ACCESS_KEY = base64.b64encode(b"parley-test-access-key-0123456789").decode()


def plumbing(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "event_log": False,
        "engines": "plumbing",
        "engine_pool_warm": 0,
        "greeting": "",
    }
    return load_settings(**(values | overrides))


# Each test configures logging its own way: conftest's fixture puts it back afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="module")
def open_server() -> Iterator[BackgroundServer]:
    """Loopback, no token: the APIs answer local clients only."""
    server = BackgroundServer(plumbing(allowed_origins=["https://App.Example.org/"])).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_server() -> Iterator[BackgroundServer]:
    server = BackgroundServer(plumbing(api_token=TOKEN)).start()
    yield server
    server.stop()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the HTTP APIs ---------------------------------------------------------------------------------


async def test_loopback_without_a_token_answers_local_clients_only(
    open_server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=open_server.http_url, timeout=10) as http:
        assert (await http.get("/api/stats")).status_code == 200
        assert (await http.get("/api/stats", params={"reset": "true"})).status_code == 200
        assert (await http.get("/api/calls/nope/events")).status_code == 404  # past the check: no such call
        # What parley.caller and the benchmarks send works on loopback (Host: 127.0.0.1:port).
        with caplog.at_level(logging.WARNING, logger="parley.security.access"):
            for headers, reason in [
                ({"X-Forwarded-For": "203.0.113.9"}, "forwarded by a proxy"),
                ({"Forwarded": "for=203.0.113.9"}, "forwarded by a proxy"),
                ({"X-Real-IP": "203.0.113.9"}, "forwarded by a proxy"),
                ({"Host": "rebound.attacker.example"}, "not a loopback name"),  # DNS rebinding
                ({"Origin": "https://evil.example"}, "a page of origin"),  # a browser page's request
            ]:
                for path in ("/api/stats", "/api/stats?reset=true", "/api/calls/nope/events"):
                    response = await http.get(path, headers=headers)
                    assert response.status_code == 403, (path, headers)
                    detail = response.json()["detail"]
                    assert reason in detail and "PARLEY_API_TOKEN" in detail
        refusals = [r.getMessage() for r in caplog.records if r.name == "parley.security.access"]
        assert len(refusals) == 15 and all("refused (403)" in line for line in refusals)
        # An origin the operator allowed, and a Host of localhost: fine.
        allowed = {"Origin": "https://app.example.org", "Host": f"localhost:{open_server.port}"}
        assert (await http.get("/api/stats", headers=allowed)).status_code == 200
        for path in ("/healthz",):  # health stays open to everyone
            assert (await http.get(path, headers={"X-Forwarded-For": "203.0.113.9"})).status_code == 200


async def test_with_a_token_the_apis_need_it(token_server: BackgroundServer, caplog: pytest.LogCaptureFixture) -> None:
    async with httpx.AsyncClient(base_url=token_server.http_url, timeout=10) as http:
        with caplog.at_level(logging.WARNING, logger="parley.security.access"):
            for path in ("/api/stats", "/api/stats?reset=true", "/api/calls/nope/events"):
                missing = await http.get(path)
                assert missing.status_code == 401
                assert "Authorization: Bearer" in missing.json()["detail"]
                assert missing.headers["www-authenticate"] == 'Bearer realm="parley"'
                for wrong in (bearer("nope"), bearer(TOKEN + "x"), {"Authorization": f"Basic {TOKEN}"}):
                    response = await http.get(path, headers=wrong)
                    assert response.status_code == 401, (path, wrong)
        lines = [r.getMessage() for r in caplog.records if r.name == "parley.security.access"]
        assert any("refused (401): missing token" in line for line in lines)
        assert any("refused (401): wrong token" in line for line in lines)
        assert not any(TOKEN in line for line in lines)  # a presented token never reaches the log
        ok = await http.get("/api/stats", headers=bearer())
        assert ok.status_code == 200 and "pools" in ok.json()
        assert (await http.get("/api/stats", params={"reset": "true"}, headers=bearer())).status_code == 200
        assert (await http.get("/api/calls/nope/events", headers=bearer())).status_code == 404
        # The token also lets a proxied request through: it is the credential, not the address.
        proxied = bearer() | {"X-Forwarded-For": "203.0.113.9", "Host": "parley.example.org"}
        assert (await http.get("/api/stats", headers=proxied)).status_code == 200
        assert (await http.get("/healthz")).status_code == 200


async def test_the_caller_and_the_benchmarks_send_the_token(
    token_server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARLEY_API_TOKEN", raising=False)
    silence = np.zeros(8000, dtype=np.int16)

    def options(**given: Any) -> CallOptions:
        return CallOptions(url=token_server.url, pcm=silence, greeting_wait_s=0.2, max_wait_s=0.3, **given)

    report = await run_call(options(api_token=TOKEN))
    assert report.errors == [] and any(e["event"] == "call_ended" for e in report.events)
    report = await run_call(options())  # no token: the call is fine, its events are refused
    assert [e for e in report.errors if "events fetch failed" in e and "401" in e], report.errors
    monkeypatch.setenv("PARLEY_API_TOKEN", TOKEN)  # the default comes from the environment, as the server's
    report = await run_call(options())
    assert report.errors == []
    assert "pools" in ServerUnderTest(token_server.url, None).stats()
    monkeypatch.delenv("PARLEY_API_TOKEN")
    with pytest.raises(httpx.HTTPStatusError):
        ServerUnderTest(token_server.url, None).stats()


def test_a_blank_token_is_no_token() -> None:
    with TestClient(create_app(plumbing(host="0.0.0.0", api_token="  "))) as client:
        assert client.get("/api/stats", headers=bearer("  ")).status_code == 403


def test_a_non_loopback_bind_needs_a_token(caplog: pytest.LogCaptureFixture) -> None:
    """Bound to every interface (here an ASGI client: no socket is opened on 0.0.0.0)."""
    with caplog.at_level(logging.WARNING, logger="parley.server"):
        app = create_app(plumbing(host="0.0.0.0"))
    assert "PARLEY_API_TOKEN is not set while listening on 0.0.0.0" in caplog.text  # said at startup
    with TestClient(app) as client:
        for path in ("/api/stats", "/api/stats?reset=true", "/api/calls/x/events"):
            response = client.get(path)
            assert response.status_code == 403
            assert "set PARLEY_API_TOKEN" in response.json()["detail"]
            assert "0.0.0.0" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200
    with TestClient(create_app(plumbing(host="0.0.0.0", api_token=TOKEN))) as client:
        assert client.get("/api/stats").status_code == 401
        assert client.get("/api/stats", headers=bearer("wrong")).status_code == 401
        assert client.get("/api/stats", headers=bearer()).status_code == 200
        assert client.get("/api/stats?reset=true", headers=bearer()).status_code == 200
        assert client.get("/api/calls/x/events", headers=bearer()).status_code == 404


def test_host_and_origin_helpers() -> None:
    assert is_loopback_host_header("127.0.0.1:8000") and is_loopback_host_header("localhost")
    assert is_loopback_host_header("[::1]:8000") and is_loopback_host_header("LOCALHOST.:80")
    assert is_loopback_host_header("127.0.0.2")
    for host in ("", "example.org", "127.0.0.1.nip.io", "[::1", "0.0.0.0:80", "10.0.0.1"):
        assert not is_loopback_host_header(host), host
    assert normalize_origin(" HTTPS://App.Example.org/ ") == "https://app.example.org"


# --- media sockets ---------------------------------------------------------------------------------


async def _short_call(url: str, **kwargs: Any) -> int | None:
    """Open a media socket, send the metadata and a few frames, hang up: the close code."""
    async with connect(url, compression=None, **kwargs) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        for _ in range(5):
            await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
        await ws.close()
        return ws.close_code


async def test_a_browser_origin_is_refused_before_accept_unless_allowed(
    open_server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"ws://127.0.0.1:{open_server.port}/ws/acs"
    started = open_server.registry.stats.calls_started
    with caplog.at_level(logging.WARNING, logger="parley.security.access"):
        for origin in ("https://evil.example", "null", "https://app.example.org.evil.example"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await _short_call(f"{url}?callId=browser-{len(origin)}", origin=origin)
            assert refused.value.response.status_code == 403
            assert b"is not allowed" in refused.value.response.body
    assert open_server.registry.stats.calls_started == started  # refused before accept: no call
    lines = [r.getMessage() for r in caplog.records if r.name == "parley.security.access"]
    assert len(lines) == 3 and all("media WebSocket from 127.0.0.1:" in line for line in lines)
    assert "Origin 'https://evil.example' is not allowed" in lines[0] and "browser-20" in lines[0]
    # ACS sends no Origin; an origin the operator allowed (case and a trailing slash aside) may connect.
    assert await _short_call(f"{url}?callId=acs-like") == 1000
    assert await _short_call(f"{url}?callId=allowed", origin="https://APP.example.org") == 1000
    for _ in range(100):
        if open_server.registry.stats.calls_started == started + 2:
            break
        await asyncio.sleep(0.05)
    assert open_server.registry.stats.calls_started == started + 2


def acs_parley(**overrides: Any) -> BackgroundServer:
    """ACS Call Automation configured (its endpoint is never dialled here), ACS tokens off."""
    settings = plumbing(
        acs_connection_string=f"endpoint=https://127.0.0.1:9/;accesskey={ACCESS_KEY}",
        acs_callback_url="https://parley.example.test",
        acs_auth_enabled=False,
        **overrides,
    )
    return BackgroundServer(settings).start()


async def test_with_acs_a_media_socket_must_belong_to_a_call_parley_answered_or_placed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = acs_parley()
    try:
        service = server.app.state.call_automation
        call = service.calls.new("inbound", "+15551234567")  # as answer() books a call before ACS dials
        assert call.key[::-1] != call.key  # (a palindrome of 32 random hex digits: never)
        base = f"ws://127.0.0.1:{server.port}/ws/acs"
        with caplog.at_level(logging.WARNING, logger="parley.security.access"):
            for url, reason in [
                (base, b"no callId"),
                (f"{base}?callId=local-guess", b"is not a call parley answered or placed"),
                (f"{base}?callId={call.key[::-1]}", b"is not a call parley answered or placed"),
            ]:
                with pytest.raises(websockets.InvalidStatus) as refused:
                    await _short_call(url, additional_headers={"x-ms-call-connection-id": "conn-x"})
                assert refused.value.response.status_code == 403 and reason in refused.value.response.body
        lines = [r.getMessage() for r in caplog.records if r.name == "parley.security.access"]
        assert len(lines) == 3 and "(call 'conn-x')" in lines[0]
        assert server.registry.stats.calls_started == 0
        # The media URL parley gave ACS for that call (callId=<key>): admitted.
        media_url = service.media_streaming(call).transport_url
        assert f"callId={call.key}" in media_url
        assert await _short_call(f"{base}?callId={call.key}&callerId=%2B15551234567") == 1000
        # Once ACS says the call is over, its key opens nothing more.
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            ended = await http.post(
                f"/api/acs/callbacks/{call.key}",
                json=[
                    {
                        "id": "e-1",
                        "source": "calling/callConnections/conn-1",
                        "type": "Microsoft.Communication.CallDisconnected",
                        "specversion": "1.0",
                        "datacontenttype": "application/json",
                        "time": "2026-01-01T10:00:01Z",
                        "data": {"callConnectionId": "conn-1", "serverCallId": "s-1", "correlationId": "c"},
                    }
                ],
            )
            assert ended.json()["recorded"] == 1
        with pytest.raises(websockets.InvalidStatus) as refused:
            await _short_call(f"{base}?callId={call.key}")
        assert refused.value.response.status_code == 403 and b"is over" in refused.value.response.body
    finally:
        server.stop()


async def test_without_acs_any_call_id_may_connect(open_server: BackgroundServer) -> None:
    assert await _short_call(f"ws://127.0.0.1:{open_server.port}/ws?callId=anything") == 1000


# --- what reaches the log and the records ------------------------------------------------------------


class RecordingAgent:
    """Answers every input; remembers what it was given (the real digits)."""

    voice = None
    greeting_interruptible = True

    def __init__(self, inputs: list[UserInput]) -> None:
        self.inputs = inputs

    def greeting(self) -> str | None:
        return None

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        self.inputs.append(user)
        yield Say("Thank you, your account ending in that number is verified. Anything else today?")


def recording_engines(inputs: list[UserInput]) -> Engines:
    synthesizer = SynthesizerDouble()

    def agent_factory(context: CallContext) -> RecordingAgent:
        return RecordingAgent(inputs)

    return Engines(
        vads=vad_pool(SileroVad, 2),
        recognizers=recognizer_pool(RecognizerDouble, 2),
        synthesizer_for=lambda voice: synthesizer,
        agent_factory=agent_factory,
        warm_count=0,
    )


async def _drain(ws: Any) -> None:
    async for _message in ws:
        pass


async def _keyed_call(server: BackgroundServer, call_id: str, keys: str) -> list[dict[str, Any]]:
    """Press `keys`, hear the start of the answer, hang up over it; the call's events from the API."""
    async with connect(f"{server.url}?callId={call_id}", compression=None) as ws:
        drain = asyncio.create_task(_drain(ws))  # the agent's audio, read as ACS would
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        await ws.send(acs.dtmf_message(keys))
        for _ in range(60):  # 1.2 s of silence, paced
            await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
            await asyncio.sleep(0.02)
        await ws.close()
        await drain
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        for _ in range(100):
            events = (await http.get(f"/api/calls/{call_id}/events")).json()["events"]
            if any(e["event"] == "call_ended" for e in events):
                return events
            await asyncio.sleep(0.05)
    raise AssertionError("the call did not end")


PIN = "73915824"  # 8 digits: cannot hide in a port number; timestamps are numbers, not strings


def _strings(value: Any) -> list[str]:
    """Every string in a JSON-like value (keys too): where a keyed number would show."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (key, *_strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def _server_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """The server's log lines (the test's own websockets client logs its frames at DEBUG)."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if not line["logger"].startswith(("websockets.client", "httpx", "httpcore"))]


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_digits_are_masked_in_the_records_and_speech_is_logged_only_at_debug(level: str) -> None:
    stream = io.StringIO()
    logs.configure(level, log_format="json", stream=stream)
    inputs: list[UserInput] = []
    server = BackgroundServer(plumbing(event_log=True), recording_engines(inputs)).start()
    try:
        events = await _keyed_call(server, f"pin-{level}", f"{PIN}#")
    finally:
        server.stop()
    logs.shutdown()
    # The agent got the real keys; the records (the API, any store) only their count.
    assert [u.digits for u in inputs] == [PIN]
    by_name = {e["event"]: e for e in events}
    assert by_name["dtmf"]["digits"] == "••••••••#"
    assert by_name["dtmf_input"]["digits"] == "••••••••"
    assert by_name["turn_started"]["kind"] == "dtmf" and by_name["turn_started"]["input"] == "••••••••"
    assert "verified" in by_name["agent_text"]["text"]  # transcripts stay in the record
    assert not [text for text in _strings(events) if PIN in text]

    lines = _server_lines(stream)
    logged = {line["event"]: line for line in lines if line.get("logger") == "parley.events"}
    assert {"dtmf", "dtmf_input", "turn_started", "agent_text", "turn_cancelled", "call_ended"} <= logged.keys()
    assert not [text for text in _strings(lines) if PIN in text]  # at no level, with PARLEY_LOG_DTMF off
    assert logged["dtmf"]["digits"] == "••••••••#"
    if level == "info":
        text = by_name["agent_text"]["text"]
        assert logged["agent_text"]["text"] == f"[{len(text)} chars]" and logged["agent_text"]["level"] == "INFO"
        assert "verified" not in json.dumps(lines)
        assert logged["turn_started"]["input"] == "••••••••"
        assert logged["turn_cancelled"]["heard_text"].endswith(" chars]")
    else:
        assert "verified" in logged["agent_text"]["text"] and logged["agent_text"]["level"] == "DEBUG"
    assert logged["call_ended"]["level"] == "INFO"  # nothing private: at INFO as before


async def test_log_dtmf_keeps_the_digits_in_the_records_and_debug_lines_only() -> None:
    stream = io.StringIO()
    logs.configure("info", log_format="json", stream=stream)
    inputs: list[UserInput] = []
    server = BackgroundServer(plumbing(event_log=True, log_dtmf=True), recording_engines(inputs)).start()
    try:
        events = await _keyed_call(server, "pin-kept", f"{PIN}#")
    finally:
        server.stop()
    logs.shutdown()
    assert next(e for e in events if e["event"] == "dtmf_input")["digits"] == PIN
    lines = _server_lines(stream)
    assert not [text for text in _strings(lines) if PIN in text]  # INFO lines show the count only
    logged = [line for line in lines if line.get("event") == "dtmf_input"]
    assert logged and logged[0]["digits"] == "••••••••"


def test_a_keyed_pin_is_masked_where_a_tool_call_repeats_it() -> None:
    events = EventLog("bank", to_log=False, mask_dtmf=True)
    events.emit("dtmf_input", digits="12345678")
    events.emit("dtmf_input", digits="1")  # a menu key: too short to hunt for elsewhere
    record = events.emit(
        "tool_called",
        agent="auth",
        tool="verify_customer",
        arguments={"account_number": "12345678", "pin": "4321", "notes": ["acct 12345678"]},
        ok=True,
    )
    assert record["arguments"] == {"account_number": "••••••••", "pin": "4321", "notes": ["acct ••••••••"]}
    assert record["tool"] == "verify_customer" and record["agent"] == "auth"
    assert mask_digits("*12#AB") == "*••#••"


def test_a_long_key_flood_is_masked_then_cut_and_remembered_within_bounds() -> None:
    events = EventLog("flood", to_log=False, mask_dtmf=True)
    record = events.emit("dtmf", digits="1" * 65000)
    assert record["digits"] == "•" * 500 + "…[+64500 chars]"  # the cut marker stays readable
    for n in range(100):
        events.emit("dtmf_input", digits=f"{n:04d}")
    assert len(events._keyed) == 16 and "0099" in events._keyed and "0000" not in events._keyed
    record = events.emit("tool_called", tool="t", arguments="0099 0000")
    assert record["arguments"] == "•••• 0000"


def test_info_lines_carry_lengths_not_words(caplog: pytest.LogCaptureFixture) -> None:
    events = EventLog("call-9")
    with caplog.at_level(logging.INFO, logger="parley.events"):
        events.emit("partial", utterance_id=1, text="my card number is")
        events.emit("final", utterance_id=1, text="my card number is four four")
        events.emit("turn_started", turn_id=1, kind="speech", input="my card number is four four")
        events.emit("turn_completed", turn_id=1, text="Thanks.", audio_ms=900.0)
        events.emit("turn_cancelled", turn_id=2, heard_text="Your balance", heard_ms=800.0)
        events.emit("tool_called", agent="a", tool="t", arguments=f'{{"pin": "{PIN}"}}', result="ok")
        events.emit("barge_in_decided", turn_id=2, trigger="speech")
    shown = [json.loads(r.getMessage()) for r in caplog.records if r.name == "parley.events"]
    text = " ".join(_strings(shown))
    for private in ("card", "balance", "Thanks", PIN):
        assert private not in text, private
    assert shown[1]["text"] == "[27 chars]" and shown[1]["utterance_id"] == 1
    assert shown[5]["arguments"] == "[19 chars]" and shown[5]["tool"] == "t"
    assert shown[6] == {**shown[6], "trigger": "speech"}
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "parley.events")
    assert events.of("final")[0]["text"] == "my card number is four four"  # the record keeps it


async def test_a_tools_bad_arguments_are_logged_by_length_unless_debug(caplog: pytest.LogCaptureFixture) -> None:
    from parley.agents.tools import Toolbox, ToolContext, end_call_tool

    toolbox = Toolbox([end_call_tool()])
    context = ToolContext(CallContext("bank-1"), "auth")
    with caplog.at_level(logging.INFO, logger="parley.agents.tools"):
        result = await toolbox.call("end_call", '{"pin": "4321"', context)
    assert "not valid JSON" in result.content
    [warning] = [r.getMessage() for r in caplog.records if r.name == "parley.agents.tools"]
    assert "not JSON (14 chars)" in warning and "4321" not in warning
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="parley.agents.tools"):
        await toolbox.call("end_call", '{"pin": "4321"', context)
    assert any("4321" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
