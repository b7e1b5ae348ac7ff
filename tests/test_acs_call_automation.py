"""ACS Call Automation, offline: Microsoft's real SDK against a fake ACS on loopback.

- The fake ACS is a raw ASGI app on uvicorn, over TLS: the SDK turns any connection string endpoint
  into https:// (it drops the scheme and puts https back), so it cannot be pointed at plain http.
  A throwaway CA signs a certificate for 127.0.0.1 and the SDK trusts that CA through azure-core's
  `connection_verify` transport option (`create_app(..., acs_client_options=...)`).
- The fake checks every request's HMAC signature with the access key the way ACS does, records it,
  and answers as the REST API documents (answer 200, create 201, terminate 204, transfer 202).
- parley runs for real (uvicorn on loopback) with ACS token checks on: an RSA key made here, its
  public key in a local JWKS file, tokens signed with it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import jwt
import pytest
import uvicorn
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.client import connect

from parley.acs.config import parse_target
from parley.acs.routes import RedactPrivateQueryValues
from parley.acs.service import CallAutomation, CallAutomationError, CallBook
from parley.acs.webhooks import (
    CallbackEvent,
    IncomingCall,
    MalformedEvents,
    parse_callbacks,
    parse_event_grid,
)
from parley.engines import Engines, recognizer_pool, vad_pool
from parley.security import ACS_ISSUER
from parley.server import BackgroundServer, create_app
from parley.settings import Settings, SettingsError, load_settings
from parley.transports import acs

AUDIENCE = "6b1f0c1e-3c2a-4a8e-9f1e-2d6c5a7b8c9d"  # shaped like an ACS immutable resource id
ACCESS_KEY = base64.b64encode(b"parley-test-access-key-0123456789").decode()
PUBLIC_BASE = "https://parley.example.test"  # what ACS would reach us at (never dialled here)
INCOMING_CODE = "incoming-code-0123456789"
OUTBOUND_TOKEN = "outbound-token-0123456789"
SOURCE_NUMBER = "+15550100000"
CALLER_NUMBER = "+15551234567"
API_VERSION = "2026-03-12"  # the SDK 1.6.0 default


# --- TLS: a throwaway CA and a server certificate for 127.0.0.1 ----------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: x509.Name, public_key: Any, issuer: x509.Name, signer: Any, *, ca: bool
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    if ca:
        return builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.add_extension(
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
    ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    root = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("parley test CA")
    ca_cert = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True).sign(ca_key, hashes.SHA256())
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate(_name("127.0.0.1"), server_key.public_key(), ca_name, ca_key, ca=False).sign(
        ca_key, hashes.SHA256()
    )
    files = TlsFiles(root / "ca.pem", root / "server.pem", root / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


# --- the fake ACS ------------------------------------------------------------------------------


@dataclass
class AcsRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    signature_ok: bool

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class FakeAcs:
    """The Call Automation REST endpoints parley uses, checking HMAC signatures like ACS does."""

    def __init__(self, access_key: str) -> None:
        self._secret = base64.b64decode(access_key)
        self.host = ""  # 127.0.0.1:<port>, set once listening: part of what the SDK signs
        self.requests: list[AcsRequest] = []
        self.failures: dict[str, tuple[int, dict[str, Any]]] = {}  # path suffix -> (status, body)
        self._changed = threading.Condition()
        self._connections = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = self._record(scope, body)
        status, payload = self._respond(request)
        content = json.dumps(payload).encode() if payload is not None else b""
        headers = [(b"content-type", b"application/json")] if payload is not None else []
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(content)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": content})

    def _record(self, scope: dict[str, Any], body: bytes) -> AcsRequest:
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        query_string = scope["query_string"].decode()
        path_and_query = scope["raw_path"].decode() + (f"?{query_string}" if query_string else "")
        request = AcsRequest(
            method=scope["method"],
            path=scope["path"],
            query=dict(parse_qsl(query_string)),
            headers=headers,
            body=body,
            signature_ok=self._signed(scope["method"], path_and_query, headers, body),
        )
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
        return request

    def _signed(self, method: str, path_and_query: str, headers: dict[str, str], body: bytes) -> bool:
        """ACS's HMAC-SHA256 scheme: the verb, path and query, date, host and body hash, signed."""
        content_hash = base64.b64encode(hashlib.sha256(body).digest()).decode()
        if headers.get("x-ms-content-sha256") != content_hash:
            return False
        to_sign = f"{method}\n{path_and_query}\n{headers.get('x-ms-date', '')};{self.host};{content_hash}"
        signature = base64.b64encode(hmac.new(self._secret, to_sign.encode(), hashlib.sha256).digest()).decode()
        expected = f"HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature={signature}"
        return hmac.compare_digest(headers.get("authorization", ""), expected)

    def _respond(self, request: AcsRequest) -> tuple[int, dict[str, Any] | None]:
        for suffix, failure in self.failures.items():
            if request.path.endswith(suffix):
                return failure
        if not request.signature_ok:
            return 401, {"error": {"code": "Denied", "message": "Denied by the resource provider."}}
        if request.method != "POST":
            return 405, None
        if request.path == "/calling/callConnections:answer":
            return 200, self._connection(request.json)
        if request.path == "/calling/callConnections":
            return 201, self._connection(request.json)
        if request.path.endswith(":terminate"):
            return 204, None
        if request.path.endswith(":transferToParticipant"):
            return 202, {"operationContext": request.json.get("operationContext")}
        return 404, {"error": {"code": "NotFound", "message": "no such call"}}

    def _connection(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._changed:
            self._connections += 1
            number = self._connections
        return {
            "callConnectionId": f"conn-{number}",
            "serverCallId": f"server-call-{number}",
            "callbackUri": body["callbackUri"],
            "callConnectionState": "connecting",
            "targets": body.get("targets", []),
        }

    def wait_for(self, path_suffix: str, count: int = 1, timeout: float = 10.0) -> list[AcsRequest]:
        """The requests whose path ends with `path_suffix`, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(found := self.named(path_suffix)) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"no {path_suffix} request reached the fake ACS: {self.paths()}"
                self._changed.wait(left)
        return found

    def named(self, path_suffix: str) -> list[AcsRequest]:
        return [request for request in self.requests if request.path.endswith(path_suffix)]

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def clear(self) -> None:
        with self._changed:
            self.requests.clear()
            self.failures.clear()


class TlsServer:
    """uvicorn with TLS on 127.0.0.1, on its own thread and loop."""

    def __init__(self, app: Any, tls: TlsFiles) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_level="critical",
            access_log=False,
            ssl_certfile=str(tls.cert),
            ssl_keyfile=str(tls.key),
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-acs", daemon=True)
        self.port = 0

    def start(self) -> TlsServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "fake ACS did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def fake_acs(tls: TlsFiles) -> Iterator[FakeAcs]:
    fake = FakeAcs(ACCESS_KEY)
    server = TlsServer(fake, tls).start()
    fake.host = f"127.0.0.1:{server.port}"
    yield fake
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> None:
    if "fake_acs" in request.fixturenames:
        request.getfixturevalue("fake_acs").clear()


# --- ACS tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory, signing_key: rsa.RSAPrivateKey) -> Path:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    path = tmp_path_factory.mktemp("jwks") / "acs-keys.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "acs-key-1", "use": "sig", "alg": "RS256"}]}))
    return path


def acs_token(key: rsa.RSAPrivateKey, *, lifetime_s: int = 300, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ACS_ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + lifetime_s} | claims
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "acs-key-1"})


def bearer(key: rsa.RSAPrivateKey, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {acs_token(key, **claims)}"}


# --- parley, configured for ACS ------------------------------------------------------------------


def acs_settings(fake: FakeAcs, jwks: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "event_log": False,
        "engines": "plumbing",
        "engine_pool_warm": 0,
        "acs_connection_string": f"endpoint=https://{fake.host}/;accesskey={ACCESS_KEY}",
        "acs_callback_url": PUBLIC_BASE,
        "acs_resource_id": AUDIENCE,
        "acs_auth_jwks_file": jwks,
        "acs_source_caller_id": SOURCE_NUMBER,
        "acs_incoming_code": INCOMING_CODE,
        "acs_outbound_token": OUTBOUND_TOKEN,
    }
    return load_settings(**(values | overrides))


def start_parley(settings: Settings, tls: TlsFiles, engines: Engines | None = None) -> BackgroundServer:
    return BackgroundServer(settings, engines, acs_client_options={"connection_verify": str(tls.ca)}).start()


@pytest.fixture(scope="module")
def parley(fake_acs: FakeAcs, jwks_file: Path, tls: TlsFiles) -> Iterator[BackgroundServer]:
    server = start_parley(acs_settings(fake_acs, jwks_file), tls)
    yield server
    server.stop()


@pytest.fixture
def http(parley: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=parley.http_url, timeout=30) as client:
        yield client


def incoming_url(code: str | None = INCOMING_CODE) -> str:
    return "/api/acs/incoming" + (f"?code={code}" if code is not None else "")


def incoming_call_event(
    context: str = "ctx-1", caller: str = CALLER_NUMBER, event_id: str | None = None
) -> dict[str, Any]:
    """An IncomingCall event as Event Grid delivers it (Event Grid schema)."""
    return {
        "id": event_id or str(uuid.uuid4()),
        "topic": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Communication/communicationServices/acs",
        "subject": f"/caller/4:{caller}/recipient/4:{SOURCE_NUMBER}",
        "eventType": "Microsoft.Communication.IncomingCall",
        "eventTime": "2026-01-01T10:00:00Z",
        "dataVersion": "1.0",
        "metadataVersion": "1",
        "data": {
            "to": {"rawId": f"4:{SOURCE_NUMBER}", "phoneNumber": {"value": SOURCE_NUMBER}},
            "from": {"rawId": f"4:{caller}", "phoneNumber": {"value": caller}},
            "serverCallId": "server-call-abc",
            "callerDisplayName": "",
            "incomingCallContext": context,
            "correlationId": "corr-1",
        },
    }


def callback_event(kind: str, connection_id: str, **data: Any) -> dict[str, Any]:
    """A Call Automation callback as ACS posts it (CloudEvents)."""
    return {
        "id": str(uuid.uuid4()),
        "source": f"calling/callConnections/{connection_id}",
        "type": f"Microsoft.Communication.{kind}",
        "specversion": "1.0",
        "datacontenttype": "application/json",
        "time": "2026-01-01T10:00:01Z",
        "data": {
            "callConnectionId": connection_id,
            "serverCallId": "server-call-abc",
            "correlationId": "corr-1",
            **data,
        },
    }


def expected_media_options(call_id: str, caller: str, audio_format: str = "pcm16KMono") -> dict[str, Any]:
    return {
        "transportType": "websocket",
        "transportUrl": f"wss://parley.example.test/ws/acs?callId={call_id}&callerId=%2B{caller[1:]}",
        "contentType": "audio",
        "audioChannelType": "mixed",
        "startMediaStreaming": True,
        "enableBidirectional": True,
        "audioFormat": audio_format,
        "enableDtmfTones": True,
    }


def assert_signed_json_request(request: AcsRequest) -> None:
    """What every request to ACS carries: api-version, HMAC auth, dates, repeatability, JSON."""
    assert request.query == {"api-version": API_VERSION}
    assert request.signature_ok, request.headers.get("authorization")
    assert request.headers["authorization"].startswith(
        "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature="
    )
    assert request.headers["x-ms-date"].endswith(" GMT")
    assert request.headers["x-ms-content-sha256"] == base64.b64encode(hashlib.sha256(request.body).digest()).decode()
    assert uuid.UUID(request.headers["repeatability-request-id"])  # lets ACS drop a retried duplicate
    assert request.headers["repeatability-first-sent"].endswith(" GMT")
    assert "azsdk-python-communication-callautomation/1.6.0" in request.headers["user-agent"]


# --- Event Grid: validation and incoming calls ---------------------------------------------------


def test_subscription_validation_handshake(http: httpx.Client, fake_acs: FakeAcs) -> None:
    event = {
        "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic": "/subscriptions/0000",
        "subject": "",
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2026-01-01T10:00:00Z",
        "data": {
            "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
            "validationUrl": "https://rp-eastus2.eventgrid.azure.net/...",
        },
        "dataVersion": "2",
        "metadataVersion": "1",
    }
    response = http.post(incoming_url(), json=[event], headers={"aeg-event-type": "SubscriptionValidation"})
    assert response.status_code == 200
    assert response.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert fake_acs.requests == []


def test_cloud_events_handshake(http: httpx.Client) -> None:
    response = http.options(incoming_url(), headers={"WebHook-Request-Origin": "eventgrid.azure.net"})
    assert response.status_code == 200
    assert response.headers["webhook-allowed-origin"] == "eventgrid.azure.net"


def test_incoming_call_is_answered_with_media_streaming_to_us(http: httpx.Client, fake_acs: FakeAcs) -> None:
    response = http.post(incoming_url(), json=[incoming_call_event("context-token-1")])
    assert response.status_code == 200, response.text
    answered = response.json()["answered"]
    assert len(answered) == 1
    (request,) = fake_acs.wait_for("/calling/callConnections:answer")
    assert request.method == "POST"
    assert_signed_json_request(request)
    assert request.headers["content-type"] == "application/json"
    call_id = answered[0]["call_id"]
    assert request.json == {
        "incomingCallContext": "context-token-1",
        "callbackUri": f"{PUBLIC_BASE}/api/acs/callbacks/{call_id}",
        "mediaStreamingOptions": expected_media_options(call_id, CALLER_NUMBER),
    }
    assert answered[0]["call_connection_id"].startswith("conn-")
    assert response.json()["failed"] == []


def test_incoming_call_routed_to_the_agent_of_the_called_number(
    fake_acs: FakeAcs, jwks_file: Path, tls: TlsFiles
) -> None:
    """PARLEY_AGENTS_BY_NUMBER: the media URL ACS dials names the agent; the socket then uses it."""
    settings = acs_settings(fake_acs, jwks_file, agents=["bank"], agents_by_number={SOURCE_NUMBER: "bank"})
    server = start_parley(settings, tls)
    try:
        with httpx.Client(base_url=server.http_url, timeout=30) as client:
            response = client.post(incoming_url(), json=[incoming_call_event("context-by-number")])
        assert response.status_code == 200, response.text
        call_id = response.json()["answered"][0]["call_id"]
        (request,) = fake_acs.wait_for("/calling/callConnections:answer")
        transport_url = request.json["mediaStreamingOptions"]["transportUrl"]
        assert transport_url == expected_media_options(call_id, CALLER_NUMBER)["transportUrl"] + "&agent=bank"
    finally:
        server.stop()


def test_batched_events_each_answered_once(http: httpx.Client, fake_acs: FakeAcs) -> None:
    first, second = incoming_call_event("ctx-a"), incoming_call_event("ctx-b", caller="+15557654321")
    other = {"id": "x", "eventType": "Microsoft.Communication.SMSReceived", "data": {}}
    response = http.post(incoming_url(), json=[first, other, second])
    assert response.status_code == 200
    assert len(response.json()["answered"]) == 2 and response.json()["ignored"] == 1
    contexts = sorted(r.json["incomingCallContext"] for r in fake_acs.wait_for(":answer", count=2))
    assert contexts == ["ctx-a", "ctx-b"]
    # Event Grid delivers at least once: the same event again answers nothing.
    again = http.post(incoming_url(), json=[first])
    assert again.status_code == 200 and again.json()["answered"] == []
    assert len(fake_acs.named(":answer")) == 2


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"42",
        b"[]",
        b'[{"data": {}}]',
        b'[{"eventType": "Microsoft.Communication.IncomingCall", "data": {"from": {}}}]',
        b'[{"eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "data": "x"}]',
        b'["an event"]',
    ],
    ids=["not-json", "number", "empty", "no-type", "no-context", "data-not-object", "string-event"],
)
def test_malformed_event_grid_body_is_refused(http: httpx.Client, fake_acs: FakeAcs, body: bytes, caplog) -> None:  # type: ignore[no-untyped-def]
    # A valid call in the same batch is not answered either: a batch is checked whole first.
    if body.startswith(b"[{"):
        body = b"[" + json.dumps(incoming_call_event()).encode() + b"," + body[1:]
    response = http.post(incoming_url(), content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert fake_acs.requests == []
    assert any(record.levelname == "ERROR" for record in caplog.records if record.name.startswith("parley.acs"))
    assert http.get("/healthz").status_code == 200


def test_incoming_needs_the_shared_code(http: httpx.Client, fake_acs: FakeAcs) -> None:
    event = [incoming_call_event()]
    assert http.post(incoming_url(None), json=event).status_code == 401
    assert http.post(incoming_url("wrong-code-0123456789"), json=event).status_code == 401
    assert http.post(incoming_url(None), json=event, headers={"x-parley-code": INCOMING_CODE}).status_code == 200
    assert len(fake_acs.named(":answer")) == 1


def test_secret_and_caller_numbers_stay_out_of_request_logs(http: httpx.Client, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO):
        assert http.post(incoming_url(), json=[incoming_call_event()]).status_code == 200
    server_side = ("uvicorn", "parley")  # not the test's own HTTP client
    lines = [record.getMessage() for record in caplog.records if record.name.startswith(server_side)]
    assert any("/api/acs/incoming?code=*** HTTP/1.1" in line for line in lines), lines
    assert not any(INCOMING_CODE in line or CALLER_NUMBER in line for line in lines)
    # The media stream's request line, as uvicorn logs it.
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/ws/acs?callId=abc&callerId=%2B15551234567"),
        None,
    )
    RedactPrivateQueryValues().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "WebSocket /ws/acs?callId=abc&callerId=***" [accepted]'


def test_failed_answer_is_reported_and_forgotten(
    http: httpx.Client, fake_acs: FakeAcs, parley: BackgroundServer
) -> None:
    fake_acs.failures[":answer"] = (403, {"error": {"code": "Forbidden", "message": "Call already answered"}})
    calls_before = len(parley.app.state.call_automation.calls)
    response = http.post(incoming_url(), json=[incoming_call_event()])
    assert response.status_code == 200
    (failed,) = response.json()["failed"]
    assert "HTTP 403" in failed["error"] and "already answered" in failed["error"]
    assert len(fake_acs.named(":answer")) == 1  # 403 is final: not retried
    assert len(parley.app.state.call_automation.calls) == calls_before


# --- callbacks ---------------------------------------------------------------------------------


def test_callbacks_need_a_valid_acs_token(http: httpx.Client, signing_key: rsa.RSAPrivateKey) -> None:
    call_id = http.post(incoming_url(), json=[incoming_call_event()]).json()["answered"][0]["call_id"]
    body = [callback_event("CallConnected", "conn-x")]
    url = f"/api/acs/callbacks/{call_id}"
    missing = http.post(url, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="parley"'
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for headers in (
        bearer(stranger),  # signed by a key ACS never published
        bearer(signing_key, aud="another-resource"),
        bearer(signing_key, lifetime_s=-3600),  # expired
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ):
        assert http.post(url, json=body, headers=headers).status_code == 401
    accepted = http.post(url, json=body, headers=bearer(signing_key))
    assert accepted.status_code == 200 and accepted.json() == {"received": 1, "recorded": 1}


def test_malformed_callback_is_refused(http: httpx.Client, signing_key: rsa.RSAPrivateKey) -> None:
    headers = bearer(signing_key) | {"content-type": "application/json"}
    assert http.post("/api/acs/callbacks/abc", content=b"{nope", headers=headers).status_code == 400
    assert http.post("/api/acs/callbacks/abc", content=b'[{"type": 1}]', headers=headers).status_code == 400
    unknown = http.post("/api/acs/callbacks/abc", json=[callback_event("CallConnected", "c")], headers=headers)
    assert unknown.status_code == 200 and unknown.json() == {"received": 1, "recorded": 0}


# --- outbound calls ----------------------------------------------------------------------------


def test_outbound_call_creates_a_call_streaming_to_us(http: httpx.Client, fake_acs: FakeAcs) -> None:
    response = http.post(
        "/api/calls", json={"target": CALLER_NUMBER}, headers={"Authorization": f"Bearer {OUTBOUND_TOKEN}"}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    (request,) = fake_acs.wait_for("/calling/callConnections")
    assert_signed_json_request(request)
    assert request.json == {
        "targets": [{"rawId": f"4:{CALLER_NUMBER}", "phoneNumber": {"value": CALLER_NUMBER}}],
        "sourceCallerIdNumber": {"value": SOURCE_NUMBER},
        "callbackUri": f"{PUBLIC_BASE}/api/acs/callbacks/{created['call_id']}",
        "mediaStreamingOptions": expected_media_options(created["call_id"], CALLER_NUMBER),
    }
    assert created["call_connection_id"].startswith("conn-") and created["target"] == CALLER_NUMBER


def test_outbound_call_to_an_acs_user(http: httpx.Client, fake_acs: FakeAcs) -> None:
    user = "8:acs:6b1f0c1e-3c2a-4a8e-9f1e-2d6c5a7b8c9d_00000020-1234-5678-9abc-def012345678"
    response = http.post("/api/calls", json={"target": user}, headers={"Authorization": f"Bearer {OUTBOUND_TOKEN}"})
    assert response.status_code == 201, response.text
    (request,) = fake_acs.wait_for("/calling/callConnections")
    assert request.json["targets"] == [{"rawId": user, "communicationUser": {"id": user}}]
    assert "sourceCallerIdNumber" not in request.json


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"target": "555-1234"}, 400, "E.164"),
        ({"target": "+1 555 123 4567"}, 400, "E.164"),
        ({"target": "+05551234567"}, 400, "E.164"),
        ({"target": CALLER_NUMBER, "source_caller_id": "12345"}, 400, "source_caller_id"),
        ({"target": CALLER_NUMBER, "ring": True}, 400, "ring"),
        ({}, 400, "target"),
        ([CALLER_NUMBER], 400, "bad call request"),
    ],
)
def test_outbound_call_with_a_bad_body_is_refused(
    http: httpx.Client, fake_acs: FakeAcs, body: Any, status: int, says: str
) -> None:
    response = http.post("/api/calls", json=body, headers={"Authorization": f"Bearer {OUTBOUND_TOKEN}"})
    assert response.status_code == status and says in response.json()["detail"]
    assert fake_acs.requests == []


def test_outbound_call_needs_the_token(http: httpx.Client, fake_acs: FakeAcs) -> None:
    body = {"target": CALLER_NUMBER}
    assert http.post("/api/calls", json=body).status_code == 401
    assert (
        http.post("/api/calls", json=body, headers={"Authorization": "Bearer wrong-token-0123456"}).status_code == 401
    )
    assert fake_acs.requests == []


def test_outbound_call_failure_at_acs_is_a_502(http: httpx.Client, fake_acs: FakeAcs) -> None:
    fake_acs.failures["/calling/callConnections"] = (
        400,
        {"error": {"code": "BadRequest", "message": "Invalid source"}},
    )
    response = http.post(
        "/api/calls", json={"target": CALLER_NUMBER}, headers={"Authorization": f"Bearer {OUTBOUND_TOKEN}"}
    )
    assert response.status_code == 502 and "Invalid source" in response.json()["detail"]


# --- CallControl: hang up and transfer, the SDK on this test's own loop ------------------------------


@pytest.fixture
async def service(fake_acs: FakeAcs, jwks_file: Path, tls: TlsFiles):  # type: ignore[no-untyped-def]
    automation = CallAutomation.from_settings(acs_settings(fake_acs, jwks_file), connection_verify=str(tls.ca))
    assert automation is not None
    yield automation
    await automation.close()


async def test_hang_up_terminates_the_call_for_everyone(service: CallAutomation, fake_acs: FakeAcs) -> None:
    call = await service.place_call(parse_target(CALLER_NUMBER))
    await service.hang_up(call.key)  # a media stream without the connection header has our key
    await service.hang_up("conn-direct")  # one with the header has ACS's id
    paths = [request.path for request in fake_acs.named(":terminate")]
    assert paths == [
        f"/calling/callConnections/{call.connection_id}:terminate",
        "/calling/callConnections/conn-direct:terminate",
    ]
    for request in fake_acs.named(":terminate"):
        assert request.query == {"api-version": API_VERSION} and request.signature_ok and request.body == b""


async def test_hang_up_of_a_call_acs_no_longer_knows_is_quiet(service: CallAutomation, fake_acs: FakeAcs) -> None:
    fake_acs.failures[":terminate"] = (404, {"error": {"code": "8522", "message": "Call not found"}})
    await service.hang_up("conn-gone")  # no exception: the call is over either way
    fake_acs.failures[":terminate"] = (400, {"error": {"code": "BadRequest", "message": "boom"}})
    with pytest.raises(CallAutomationError, match="hang up: ACS answered HTTP 400"):
        await service.hang_up("conn-broken")


@pytest.mark.parametrize(
    ("target", "identifier"),
    [
        ("+15550199999", {"rawId": "4:+15550199999", "phoneNumber": {"value": "+15550199999"}}),
        ("8:acs:resource_user", {"rawId": "8:acs:resource_user", "communicationUser": {"id": "8:acs:resource_user"}}),
    ],
)
async def test_transfer_asks_acs_to_transfer(
    service: CallAutomation, fake_acs: FakeAcs, target: str, identifier: dict
) -> None:
    await service.transfer("conn-7", target)
    (request,) = fake_acs.named(":transferToParticipant")
    assert request.path == "/calling/callConnections/conn-7:transferToParticipant"
    assert_signed_json_request(request)
    assert request.json == {"targetParticipant": identifier}


async def test_transfer_to_a_bad_target_asks_nothing(service: CallAutomation, fake_acs: FakeAcs) -> None:
    with pytest.raises(ValueError, match=r"E\.164"):
        await service.transfer("conn-7", "front desk")
    assert fake_acs.requests == []


async def test_unreachable_acs_is_a_call_automation_error(jwks_file: Path, tls: TlsFiles) -> None:
    fake = FakeAcs(ACCESS_KEY)
    fake.host = "127.0.0.1:9"  # discard port: nothing listens
    automation = CallAutomation.from_settings(
        acs_settings(fake, jwks_file), connection_verify=str(tls.ca), retry_total=0
    )
    assert automation is not None
    try:
        with pytest.raises(CallAutomationError, match="hang up: ServiceRequestError"):
            await automation.hang_up("conn-1")
    finally:
        await automation.close()


# --- end to end: IncomingCall -> answer -> media stream with a token -> agent hangs up ------------------


def bank_engines() -> Engines:
    """The scripted bank agent (DTMF 9 ends the call) with cost-free recognizer and voice doubles."""
    from parley.agents.scenario import scenario_agent_factory
    from parley.speech.vad import SileroVad
    from parley.testing.doubles import RecognizerDouble, SynthesizerDouble

    synthesizer = SynthesizerDouble()
    return Engines(
        vads=vad_pool(SileroVad, 2),
        recognizers=recognizer_pool(RecognizerDouble, 2),
        synthesizer_for=lambda voice: synthesizer,
        agent_factory=scenario_agent_factory("bank"),
        warm_count=0,
    )


@pytest.fixture(scope="module")
def bank_parley(fake_acs: FakeAcs, jwks_file: Path, tls: TlsFiles) -> Iterator[BackgroundServer]:
    settings = acs_settings(
        fake_acs, jwks_file, greeting="Welcome.", acs_outbound_token=None, acs_incoming_code=None, log_dtmf=True
    )
    server = start_parley(settings, tls, bank_engines())
    yield server
    server.stop()


async def act_as_acs_media_stream(
    url: str, headers: dict[str, str], dtmf_at_s: float, timeout_s: float = 20
) -> tuple[int | None, int]:
    """Stream silence as ACS does, press a key at `dtmf_at_s`, until the server ends the call."""
    async with connect(url, additional_headers=headers, compression=None) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        received = 0

        async def drain() -> None:
            nonlocal received
            async for _message in ws:
                received += 1

        drainer = asyncio.create_task(drain())
        start, frames, pressed = time.monotonic(), 0, False
        try:
            while not drainer.done() and time.monotonic() - start < timeout_s:
                if not pressed and time.monotonic() - start >= dtmf_at_s:
                    await ws.send(acs.dtmf_message("9"))
                    pressed = True
                await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                frames += 1
                await asyncio.sleep(max(0.0, start + frames * 0.02 - time.monotonic()))
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(drainer, 5)
        return ws.close_code, received


async def test_incoming_call_end_to_end(
    bank_parley: BackgroundServer, fake_acs: FakeAcs, signing_key: rsa.RSAPrivateKey
) -> None:
    async with httpx.AsyncClient(base_url=bank_parley.http_url, timeout=30) as http:
        # 1. Event Grid brings the call; parley answers it through the SDK.
        response = await http.post("/api/acs/incoming", json=[incoming_call_event("ctx-e2e")])
        (answered,) = response.json()["answered"]
        call_id, connection_id = answered["call_id"], answered["call_connection_id"]
        (answer,) = fake_acs.named(":answer")
        transport_url = answer.json["mediaStreamingOptions"]["transportUrl"]
        # 2. ACS reports the call connected before the media stream opens: held for the call.
        callbacks = f"/api/acs/callbacks/{call_id}"
        connected = await http.post(
            callbacks, json=[callback_event("CallConnected", connection_id)], headers=bearer(signing_key)
        )
        assert connected.json() == {"received": 1, "recorded": 1}

        # 3. ACS dials the transport URL it was given (here on loopback, plain ws).
        parts = urlsplit(transport_url)
        media_url = f"ws://127.0.0.1:{bank_parley.port}{parts.path}?{parts.query}"
        stream_headers = {"x-ms-call-connection-id": connection_id, "x-ms-call-correlation-id": "corr-1"}
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(media_url, additional_headers=stream_headers):
                pass
        assert refused.value.response.status_code == 403  # closed before accept: no call started
        assert bank_parley.registry.find(connection_id) is None

        # 4. With ACS's token the call runs; the caller presses 9 and the bank agent says goodbye
        #    and hangs up: for everyone, through Call Automation.
        close_code, frames_received = await act_as_acs_media_stream(
            media_url, stream_headers | bearer(signing_key, lifetime_s=86400), dtmf_at_s=1.0
        )
        assert close_code == 1000 and frames_received > 0
        (terminate,) = await asyncio.to_thread(fake_acs.wait_for, ":terminate")
        assert terminate.path == f"/calling/callConnections/{connection_id}:terminate"
        assert terminate.signature_ok

        # 5. ACS confirms; the call's event log tells the whole story.
        await http.post(
            callbacks, json=[callback_event("CallDisconnected", connection_id)], headers=bearer(signing_key)
        )
        events = (await http.get(f"/api/calls/{connection_id}/events")).json()["events"]
    names = [event["event"] for event in events]
    acs_events = [event["type"] for event in events if event["event"] == "acs_event"]
    assert acs_events == ["CallConnected", "CallDisconnected"]
    assert names.index("acs_event") < names.index("call_started") < names.index("dtmf") < names.index("call_ended")
    assert next(e for e in events if e["event"] == "dtmf")["digits"] == "9"
    assert any("Goodbye" in e.get("text", "") for e in events if e["event"] == "turn_completed")
    assert [e.get("error") for e in events if e["event"] == "input_error"] == []


async def test_outbound_calls_are_off_without_a_token(bank_parley: BackgroundServer, fake_acs: FakeAcs) -> None:
    async with httpx.AsyncClient(base_url=bank_parley.http_url) as http:
        response = await http.post("/api/calls", json={"target": CALLER_NUMBER})
    assert response.status_code == 403 and "PARLEY_ACS_OUTBOUND_TOKEN" in response.json()["detail"]
    assert fake_acs.requests == []


# --- startup: key loading, settings --------------------------------------------------------------


async def test_broken_local_jwks_file_stops_startup(fake_acs: FakeAcs, tmp_path: Path) -> None:
    broken = tmp_path / "keys.json"
    broken.write_text("{not json")
    app = create_app(acs_settings(fake_acs, broken))
    with pytest.raises(RuntimeError, match=r"ACS signing keys: .*keys.json is not JSON \(PARLEY_ACS_AUTH_JWKS_FILE\)"):
        async with app.router.lifespan_context(app):
            pass


def test_unreachable_jwks_url_only_warns(fake_acs: FakeAcs, tls: TlsFiles, caplog) -> None:  # type: ignore[no-untyped-def]
    settings = acs_settings(fake_acs, None, acs_auth_jwks_url="http://127.0.0.1:9/calling/keys")  # type: ignore[arg-type]
    server = start_parley(settings, tls)
    try:
        assert httpx.get(f"{server.http_url}/healthz").status_code == 200
    finally:
        server.stop()
    assert any("signing keys not loaded at startup" in record.getMessage() for record in caplog.records)


def test_without_acs_nothing_changes() -> None:
    settings = load_settings(host="127.0.0.1", port=0, event_log=False, engines="plumbing")
    assert not settings.acs_configured and not settings.acs_auth_active
    server = BackgroundServer(settings).start()
    try:
        assert httpx.post(f"{server.http_url}/api/acs/incoming", json=[]).status_code == 404
        assert httpx.post(f"{server.http_url}/api/calls", json={}).status_code in (404, 405)
        assert server.app.state.engines.call_control is None
    finally:
        server.stop()


CONNECTION = f"endpoint=https://acs-test.communication.azure.com/;accesskey={ACCESS_KEY}"


@pytest.mark.parametrize(
    ("values", "loud"),
    [
        (
            {
                "host": "0.0.0.0",
                "acs_connection_string": CONNECTION,
                "acs_callback_url": PUBLIC_BASE,
                "acs_auth_enabled": False,
            },
            True,
        ),
        ({"host": "0.0.0.0"}, True),  # nothing ACS configured, yet reachable from outside
        (
            {
                "host": "127.0.0.1",
                "acs_connection_string": CONNECTION,
                "acs_callback_url": PUBLIC_BASE,
                "acs_auth_enabled": False,
            },
            False,
        ),
        ({"host": "0.0.0.0", "acs_resource_id": AUDIENCE}, False),
    ],
)
def test_token_checks_off_beyond_loopback_is_loud(values: dict[str, Any], loud: bool, caplog) -> None:  # type: ignore[no-untyped-def]
    from parley.server import _acs_validator

    with caplog.at_level(logging.WARNING, logger="parley.server"):
        validator = _acs_validator(load_settings(**values))
    assert (validator is None) == (values.get("acs_resource_id") is None)
    assert any("ACS token checks are OFF" in r.getMessage() for r in caplog.records) == loud


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"acs_connection_string": CONNECTION, "acs_callback_url": PUBLIC_BASE},
            "ACS is configured but acs_resource_id (PARLEY_ACS_RESOURCE_ID) is empty",
        ),
        ({"acs_connection_string": CONNECTION, "acs_resource_id": AUDIENCE}, "PARLEY_ACS_CALLBACK_URL) is required"),
        ({"acs_auth_enabled": True}, "acs_auth_enabled is true but acs_resource_id"),
        (
            {
                "acs_connection_string": "endpoint=http://127.0.0.1:1/;accesskey=" + ACCESS_KEY,
                "acs_callback_url": PUBLIC_BASE,
                "acs_resource_id": AUDIENCE,
            },
            "must start with https://",
        ),
        (
            {"acs_connection_string": "accesskey=only", "acs_callback_url": PUBLIC_BASE, "acs_resource_id": AUDIENCE},
            "missing endpoint or accesskey",
        ),
        (
            {
                "acs_endpoint": "https://acs-test.communication.azure.com",
                "acs_callback_url": "http://example.com",
                "acs_resource_id": AUDIENCE,
            },
            "must be https://",
        ),
        ({"acs_sample_rate": 8000}, "must be 16000 or 24000"),
        ({"acs_source_caller_id": "5550100"}, "must be an E.164 number"),
        (
            {"acs_resource_id": AUDIENCE, "acs_auth_jwks_url": "http://keys.example.com/keys"},
            "jwks_url must be https://",
        ),
    ],
)
def test_bad_acs_settings_are_explained(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(**values)
    assert message in str(caught.value)
    assert ACCESS_KEY not in str(caught.value)  # the access key is never echoed


def test_acs_settings_that_are_fine() -> None:
    dev = load_settings(acs_connection_string=CONNECTION, acs_callback_url=PUBLIC_BASE + "/", acs_auth_enabled=False)
    assert dev.acs_configured and not dev.acs_auth_active
    resource_only = load_settings(acs_resource_id=AUDIENCE)
    assert resource_only.acs_auth_active and not resource_only.acs_configured
    full = load_settings(
        acs_connection_string=CONNECTION,
        acs_callback_url=PUBLIC_BASE,
        acs_resource_id=AUDIENCE,
        acs_sample_rate=24000,
        acs_audio_channel="unmixed",
    )
    assert full.acs_auth_config().audience == AUDIENCE and full.acs_auth_config().enabled


def test_entra_id_without_azure_identity_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    settings = load_settings(
        acs_endpoint="https://acs-test.communication.azure.com", acs_callback_url=PUBLIC_BASE, acs_resource_id=AUDIENCE
    )
    with pytest.raises(RuntimeError, match=r"needs the azure-identity package"):
        CallAutomation.from_settings(settings)


def test_media_options_follow_the_settings(jwks_file: Path) -> None:
    fake = FakeAcs(ACCESS_KEY)
    fake.host = "127.0.0.1:9"
    automation = CallAutomation.from_settings(
        acs_settings(fake, jwks_file, acs_sample_rate=24000, acs_audio_channel="unmixed")
    )
    assert automation is not None
    call = automation.calls.new("inbound", "8:acs:resource_user")
    options = automation.media_streaming(call)._to_generated().as_dict()
    assert options["audio_format"] == "pcm24KMono" and options["audio_channel_type"] == "unmixed"
    assert (
        options["transport_url"]
        == f"wss://parley.example.test/ws/acs?callId={call.key}&callerId=8%3Aacs%3Aresource_user"
    )


# --- pure parsing and bookkeeping ----------------------------------------------------------------


def test_event_grid_parsing() -> None:
    cloud_event = {
        "id": "1",
        "type": "Microsoft.Communication.IncomingCall",
        "data": incoming_call_event()["data"]
        | {"from": {"rawId": "8:acs:r_u", "communicationUser": {"id": "8:acs:r_u"}}},
    }
    (call,) = parse_event_grid(cloud_event)  # CloudEvents schema, single object
    assert isinstance(call, IncomingCall) and call.caller == "8:acs:r_u" and call.callee == SOURCE_NUMBER
    with pytest.raises(MalformedEvents, match="at most"):
        parse_event_grid([incoming_call_event()] * 501)


def test_callback_parsing_keeps_what_explains_the_event() -> None:
    (event,) = parse_callbacks(
        [
            callback_event(
                "MediaStreamingFailed",
                "conn-1",
                operationContext="ctx",
                resultInformation={"code": 500, "subCode": 8581, "message": "Media streaming failed"},
                mediaStreamingUpdate={
                    "contentType": "Audio",
                    "mediaStreamingStatus": "mediaStreamingFailed",
                    "mediaStreamingStatusDetails": "streamConnectionUnsuccessful",
                },
                participants=[{"identifier": {"rawId": "4:+1555"}}],
            )
        ]
    )
    assert event == CallbackEvent(
        type="MediaStreamingFailed",
        call_connection_id="conn-1",
        server_call_id="server-call-abc",
        correlation_id="corr-1",
        operation_context="ctx",
        details={
            "result": {"code": 500, "subCode": 8581, "message": "Media streaming failed"},
            "media_streaming": {
                "contentType": "Audio",
                "mediaStreamingStatus": "mediaStreamingFailed",
                "mediaStreamingStatusDetails": "streamConnectionUnsuccessful",
            },
            "participants": 1,
        },
    )


def test_call_book_is_bounded_and_maps_both_ids() -> None:
    book = CallBook(capacity=2)
    first = book.new("inbound", CALLER_NUMBER)
    book.connected(first, "conn-1")
    assert book.find("conn-1") is first and book.find(first.key) is first
    book.new("inbound", CALLER_NUMBER)
    book.new("outbound", CALLER_NUMBER)
    assert len(book) == 2 and book.find("conn-1") is None and book.find(first.key) is None


def test_calls_a_killed_server_left_live_are_hung_up_at_startup(
    fake_acs: FakeAcs, jwks_file: Path, tls: TlsFiles, tmp_path: Path
) -> None:
    """A crash leaves phone calls up at ACS with nobody on the media: the next server hangs them up."""
    from parley.records.sqlite import SqliteStore
    from parley.records.store import CallRecord

    previous = SqliteStore(tmp_path)  # the records of a server that died mid-call
    for call_id in ("conn-orphan", "local-made-up"):
        previous.begin_call(CallRecord(call_id, started_at=time.time()))
    assert previous.sync()
    previous.close()
    fake_acs.failures[":terminate"] = (404, {"error": {"code": "8522", "message": "Call not found"}})
    server = start_parley(acs_settings(fake_acs, jwks_file, data_dir=tmp_path), tls)
    try:
        (request,) = fake_acs.wait_for(":terminate")
        assert request.path == "/calling/callConnections/conn-orphan:terminate"  # not the local- one
        with httpx.Client(base_url=server.http_url, timeout=30) as http:
            calls = {call["call_id"]: call for call in http.get("/api/calls").json()["calls"]}
        assert calls["conn-orphan"]["end_reason"] == "server_lost"
    finally:
        server.stop()
    assert len(fake_acs.named(":terminate")) == 1
