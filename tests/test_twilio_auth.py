"""Twilio's request signatures, the TwiML answer and the REST client (against a local fake Twilio)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qsl
from xml.etree import ElementTree

import pytest

from parley.security import twilio_auth
from parley.security.twilio_auth import TwilioGuard
from parley.settings import Settings
from parley.twilio.calls import TwilioApiError, TwilioCalls, transfer_twiml
from parley.twilio.routes import twiml_connect

TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+12349013030"),
    ("Digits", "1234"),
    ("From", "+12349013030"),
    ("To", "+18005551212"),
]


def _expected() -> str:
    """Twilio's documented algorithm, spelt out: the URL, then each name and value in name order."""
    data = (
        "https://mycompany.com/myapp.php?foo=1&bar=2"
        "CallSidCA1234567890ABCDECaller+12349013030Digits1234From+12349013030To+18005551212"
    )
    return base64.b64encode(hmac.new(b"12345", data.encode(), hashlib.sha1).digest()).decode()


def test_the_signature_follows_the_documented_algorithm() -> None:
    assert twilio_auth.signature(TOKEN, URL, reversed(PARAMS)) == _expected()  # order of arrival is irrelevant
    assert twilio_auth.is_valid(TOKEN, URL, PARAMS, _expected())


@pytest.mark.parametrize(
    ("token", "url", "params", "presented"),
    [
        ("wrong", URL, PARAMS, _expected()),  # another account's token
        (TOKEN, URL, PARAMS, None),  # no header
        (TOKEN, URL, PARAMS, ""),
        (TOKEN, URL, [*PARAMS[:-1], ("To", "+19999999999")], _expected()),  # a tampered parameter
        (TOKEN, URL, [*PARAMS, ("Extra", "1")], _expected()),  # an added one
        (TOKEN, URL.replace("foo=1", "foo=2"), PARAMS, _expected()),  # another URL
        (TOKEN, URL, PARAMS, _expected()[:-2] + "x="),
    ],
)
def test_anything_else_does_not_validate(token: str, url: str, params: list, presented: str | None) -> None:
    assert not twilio_auth.is_valid(token, url, params, presented)


def test_a_url_signed_with_or_without_its_default_port_validates() -> None:
    signed_with_port = twilio_auth.signature(TOKEN, "wss://abc.ngrok.app:443/ws/twilio")
    assert twilio_auth.is_valid(TOKEN, "wss://abc.ngrok.app/ws/twilio", [], signed_with_port)
    signed_without = twilio_auth.signature(TOKEN, "https://abc.ngrok.app/api/twilio/voice")
    assert twilio_auth.is_valid(TOKEN, "https://abc.ngrok.app:443/api/twilio/voice", [], signed_without)
    assert not twilio_auth.is_valid(TOKEN, "https://abc.ngrok.app:8443/api/twilio/voice", [], signed_without)


def _settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def test_the_public_url_is_the_one_twilio_used() -> None:
    tunnel = _settings(twilio_public_url="https://abc.ngrok.app/")
    assert twilio_auth.public_url(tunnel, "/api/twilio/voice", "", "http", "127.0.0.1:8000") == (
        "https://abc.ngrok.app/api/twilio/voice"
    )
    assert twilio_auth.public_url(tunnel, "/ws/twilio", "a=1", "ws", "127.0.0.1:8000") == (
        "wss://abc.ngrok.app/ws/twilio?a=1"
    )
    assert twilio_auth.stream_url(tunnel, "http", "127.0.0.1:8000") == "wss://abc.ngrok.app/ws/twilio"
    # Without it: the request's own scheme and Host (right only if the proxy passes them through).
    plain = _settings()
    assert twilio_auth.public_url(plain, "/api/twilio/voice", "", "https", "x.example") == (
        "https://x.example/api/twilio/voice"
    )
    assert twilio_auth.stream_url(plain, "http", "127.0.0.1:8000") == "ws://127.0.0.1:8000/ws/twilio"


def test_a_public_url_with_a_query_or_another_scheme_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="twilio_public_url"):
        _settings(twilio_public_url="wss://abc.ngrok.app")
    with pytest.raises(ValueError, match="twilio_public_url"):
        _settings(twilio_public_url="https://abc.ngrok.app/?x=1")


def test_without_a_token_only_a_loopback_bind_or_an_explicit_choice_is_unsigned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    headers: dict[str, str] = {}
    assert TwilioGuard(_settings(host="127.0.0.1")).refusal(URL, [], headers) is None
    public = TwilioGuard(_settings(host="0.0.0.0"))
    assert "non-loopback" in (public.refusal(URL, [], headers) or "")
    allowed = TwilioGuard(_settings(host="0.0.0.0", twilio_allow_unsigned=True))
    assert allowed.refusal(URL, [], headers) is None
    caplog.clear()  # (the loopback guard's request above was warned about: tested below)
    with caplog.at_level("INFO", logger="parley.security.twilio_auth"):
        public.warn_at_startup()
        TwilioGuard(_settings(host="127.0.0.1")).warn_at_startup()
        TwilioGuard(_settings(twilio_auth_token=TOKEN)).warn_at_startup()
        allowed.warn_at_startup()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == ["INFO", "INFO", "WARNING"]  # a server that never sees Twilio stays quiet
    assert "refuse every request" in said[0][1]
    assert "loopback bind" in said[1][1]
    assert "NOT authenticated" in said[2][1]


def test_the_first_unsigned_request_served_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = TwilioGuard(_settings(host="127.0.0.1"))
    with caplog.at_level("WARNING", logger="parley.security.twilio_auth"):
        assert guard.refusal(URL, [], {}) is None
        assert guard.refusal(URL, [], {}) is None
    assert [r.getMessage() for r in caplog.records if "unsigned Twilio request" in r.getMessage()] == [
        caplog.records[0].getMessage()
    ]
    assert len(caplog.records) == 1


def test_with_a_token_every_request_must_be_signed() -> None:
    guard = TwilioGuard(_settings(twilio_auth_token=TOKEN, host="127.0.0.1"))
    assert guard.refusal(URL, PARAMS, {"x-twilio-signature": _expected()}) is None
    assert guard.refusal(URL, PARAMS, {}) == "no X-Twilio-Signature header"
    assert "does not match" in (guard.refusal(URL, PARAMS, {"x-twilio-signature": "AAAA"}) or "")


def test_the_twiml_connects_a_stream_with_its_parameters() -> None:
    twiml = twiml_connect("wss://abc.ngrok.app/ws/twilio", {"agent": "sales", "to": "+1 <5>", "from": ""})
    root = ElementTree.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert root.tag == "Response" and stream is not None
    assert stream.get("url") == "wss://abc.ngrok.app/ws/twilio"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"agent": "sales", "to": "+1 <5>"}  # escaped, and empty values left out


# --------------------------------------------------------------------------------------------
# The REST client against a fake Twilio on a real socket
# --------------------------------------------------------------------------------------------

ACCOUNT = "AC0123456789abcdef0123456789abcdef"
AUTH = "s3cret-token"


class FakeTwilio(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
        expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{AUTH}".encode()).decode()
        if self.headers.get("authorization") != expected:
            self._answer(401, {"code": 20003, "message": "Authenticate", "status": 401})
            return
        prefix = f"/2010-04-01/Accounts/{ACCOUNT}/Calls/"
        if not self.path.startswith(prefix) or not self.path.endswith(".json"):
            self._answer(404, {"code": 20404, "message": "The requested resource was not found", "status": 404})
            return
        call_sid = self.path[len(prefix) : -len(".json")]
        form = dict(parse_qsl(body))
        FakeTwilio.requests.append({"call": call_sid, "form": form, "type": self.headers.get("content-type")})
        if call_sid == "CAgone":
            self._answer(404, {"code": 20404, "message": "The requested resource was not found", "status": 404})
            return
        self._answer(200, {"sid": call_sid, "status": form.get("Status", "in-progress")})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_twilio() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTwilio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def _calls(base: str, token: str = AUTH) -> TwilioCalls:
    return TwilioCalls(ACCOUNT, token, api_base=base, timeout_s=5)


async def test_hang_up_completes_the_call(fake_twilio: str) -> None:
    FakeTwilio.requests.clear()
    await _calls(fake_twilio).hang_up("CA111")
    assert FakeTwilio.requests == [
        {"call": "CA111", "form": {"Status": "completed"}, "type": "application/x-www-form-urlencoded"}
    ]


async def test_transfer_replaces_the_calls_twiml_with_a_dial(fake_twilio: str) -> None:
    FakeTwilio.requests.clear()
    await _calls(fake_twilio).transfer("CA222", "+15550100")
    assert FakeTwilio.requests[0]["form"] == {"Twiml": "<Response><Dial>+15550100</Dial></Response>"}
    assert transfer_twiml("sip:desk@example.com") == "<Response><Dial><Sip>sip:desk@example.com</Sip></Dial></Response>"
    assert transfer_twiml("<x>") == "<Response><Dial>&lt;x&gt;</Dial></Response>"


async def test_twilios_refusals_are_errors_that_say_why(fake_twilio: str) -> None:
    with pytest.raises(TwilioApiError, match="401: Authenticate"):
        await _calls(fake_twilio, token="wrong").hang_up("CA333")
    with pytest.raises(TwilioApiError, match="404: The requested resource was not found"):
        await _calls(fake_twilio).hang_up("CAgone")
    with pytest.raises(TwilioApiError, match="not a Twilio CallSid"):
        await _calls(fake_twilio).hang_up("local-123")


async def test_an_unreachable_twilio_is_an_error() -> None:
    # A port nothing listens on: bind one, close it.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TwilioApiError, match="did not answer"):
        await _calls(f"http://127.0.0.1:{port}").hang_up("CA444")


def test_rest_control_needs_the_account_and_the_token() -> None:
    assert TwilioCalls.from_settings(_settings(twilio_auth_token=AUTH)) is None
    assert TwilioCalls.from_settings(_settings(twilio_account_sid=ACCOUNT)) is None
    calls = TwilioCalls.from_settings(_settings(twilio_account_sid=ACCOUNT, twilio_auth_token=AUTH))
    assert calls is not None and calls.account_sid == ACCOUNT
