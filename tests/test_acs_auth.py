"""ACS JWT validation: real RSA keys, a real JWKS server on loopback, a real uvicorn WebSocket."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx
import jwt
import pytest
import uvicorn
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, WebSocket
from pydantic import ValidationError
from websockets.asyncio.client import connect

from parley.security import (
    ACS_ISSUER,
    AcsAuthConfig,
    AcsTokenValidator,
    AuthError,
    AuthFailure,
    Claims,
    JwksError,
    acs_auth_dependency,
    build_acs_validator,
    check_websocket,
)
from parley.security.acs_auth import parse_jwks

AUDIENCE = "6b1f0c1e-3c2a-4a8e-9f1e-2d6c5a7b8c9d"  # shaped like an ACS immutable resource id


# --- keys and tokens ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    """'current' is published first, 'rotated' replaces it later, 'stranger' is never published."""
    return {
        name: rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for name in ("current", "rotated", "stranger")
    }


def public_jwk(private_key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ACS_ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "sub": "acs-call-automation",
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def token(private_key: rsa.RSAPrivateKey, kid: str | None, alg: str = "RS256", **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**overrides), private_key, algorithm=alg, headers=headers)


def bearer(value: str) -> str:
    return f"Bearer {value}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims()).encode())}.{b64url(signature)}"


def hs256_with_public_key(public_pem: bytes, kid: str) -> str:
    """The classic confusion attack: HMAC-sign with the RSA public key as the shared secret."""
    signing_input = (
        f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': kid}).encode())}."
        f"{b64url(json.dumps(claims()).encode())}"
    )
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


class FakeClock:
    """Monotonic time the tests move by hand, so rate limits need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- a JWKS endpoint on loopback ---------------------------------------------------------------


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a JWKS document that tests can swap, counting GETs."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval: shutdown() waits up to one interval, and every test stops a server.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="jwks", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/calling/keys"

    def publish(self, *jwks: dict[str, Any]) -> None:
        self.document = {"keys": list(jwks)}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits += 1
                body = json.dumps(server.document).encode()
                self.send_response(server.status if self.path == "/calling/keys" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def jwks_server(keys: dict[str, rsa.RSAPrivateKey]) -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.publish(public_jwk(keys["current"], "kid-current"))
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def url_validator(server: JwksServer, clock: FakeClock, **config: Any) -> AcsTokenValidator:
    settings = {"audience": AUDIENCE, "jwks_url": server.url, "refresh_min_interval_s": 30.0, **config}
    return AcsTokenValidator(AcsAuthConfig(**settings), clock=clock)


def jwks_file(tmp_path: Path, *jwks: dict[str, Any]) -> Path:
    path = tmp_path / "acs-keys.json"
    path.write_text(json.dumps({"keys": list(jwks)}))
    return path


async def reason_for(validator: AcsTokenValidator, header: str | None) -> AuthFailure:
    with pytest.raises(AuthError) as caught:
        await validator.validate(header)
    return caught.value.reason


# --- accepted tokens ---------------------------------------------------------------------------


async def test_valid_token_is_accepted_with_keys_from_the_url(keys, jwks_server, clock) -> None:
    validator = url_validator(jwks_server, clock)
    verified = await validator.validate(bearer(token(keys["current"], "kid-current")))
    assert verified["aud"] == AUDIENCE and verified["iss"] == ACS_ISSUER
    assert verified["sub"] == "acs-call-automation"
    assert jwks_server.hits == 1
    await validator.validate(bearer(token(keys["current"], "kid-current")))
    assert jwks_server.hits == 1, "known keys are served from the cache"


async def test_valid_token_is_accepted_with_keys_from_a_file(keys, tmp_path) -> None:
    path = jwks_file(tmp_path, public_jwk(keys["current"], "kid-current"))
    validator = AcsTokenValidator(AcsAuthConfig(audience=AUDIENCE, jwks_file=path))
    assert await validator.prefetch() == 1
    verified = await validator.validate(bearer(token(keys["current"], "kid-current")))
    assert verified["aud"] == AUDIENCE


async def test_scheme_is_case_insensitive_and_whitespace_tolerated(keys, tmp_path) -> None:
    path = jwks_file(tmp_path, public_jwk(keys["current"], "kid-current"))
    validator = AcsTokenValidator(AcsAuthConfig(audience=AUDIENCE, jwks_file=path))
    await validator.validate(f"  bearer   {token(keys['current'], 'kid-current')}  ")


# --- refused tokens ----------------------------------------------------------------------------


@pytest.fixture
async def file_validator(keys, tmp_path) -> AcsTokenValidator:
    path = jwks_file(tmp_path, public_jwk(keys["current"], "kid-current"))
    return AcsTokenValidator(AcsAuthConfig(audience=AUDIENCE, jwks_file=path, leeway_s=60))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"exp": int(time.time()) - 120}, AuthFailure.EXPIRED, id="expired"),
        pytest.param({"nbf": int(time.time()) + 300}, AuthFailure.NOT_YET_VALID, id="not-yet-valid"),
        pytest.param({"iat": int(time.time()) + 300}, AuthFailure.NOT_YET_VALID, id="issued-in-future"),
        pytest.param({"aud": "another-acs-resource"}, AuthFailure.WRONG_AUDIENCE, id="wrong-audience"),
        pytest.param({"iss": "https://evil.example"}, AuthFailure.WRONG_ISSUER, id="wrong-issuer"),
        pytest.param({"exp": None}, AuthFailure.MISSING_CLAIM, id="no-exp"),
        pytest.param({"aud": None}, AuthFailure.MISSING_CLAIM, id="no-aud"),
    ],
)
async def test_claims_are_checked(keys, file_validator, overrides, expected) -> None:
    header = bearer(token(keys["current"], "kid-current", **overrides))
    assert await reason_for(file_validator, header) is expected


async def test_leeway_tolerates_small_clock_skew(keys, file_validator) -> None:
    now = int(time.time())
    await file_validator.validate(bearer(token(keys["current"], "kid-current", exp=now - 30)))
    await file_validator.validate(bearer(token(keys["current"], "kid-current", nbf=now + 30, iat=now + 30)))


async def test_token_signed_by_another_key_is_refused(keys, file_validator) -> None:
    forged = token(keys["stranger"], "kid-current")  # right kid, wrong private key
    assert await reason_for(file_validator, bearer(forged)) is AuthFailure.BAD_SIGNATURE


async def test_tampered_payload_is_refused(keys, file_validator) -> None:
    header, _payload, signature = token(keys["current"], "kid-current").split(".")
    widened = b64url(json.dumps(claims(sub="someone-else")).encode())
    assert await reason_for(file_validator, bearer(f"{header}.{widened}.{signature}")) is AuthFailure.BAD_SIGNATURE


async def test_alg_none_and_hs256_and_other_rsa_algs_are_refused(keys, file_validator) -> None:
    public_pem = (
        keys["current"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    attempts = {
        "none": unsigned_token({"alg": "none", "typ": "JWT", "kid": "kid-current"}),
        "None": unsigned_token({"alg": "None", "kid": "kid-current"}),
        "HS256": hs256_with_public_key(public_pem, "kid-current"),
        "RS512": token(keys["current"], "kid-current", alg="RS512"),
        "PS256": token(keys["current"], "kid-current", alg="PS256"),
    }
    for name, attempt in attempts.items():
        assert await reason_for(file_validator, bearer(attempt)) is AuthFailure.WRONG_ALG, name


async def test_token_without_kid_is_refused(keys, file_validator) -> None:
    assert await reason_for(file_validator, bearer(token(keys["current"], None))) is AuthFailure.UNKNOWN_KEY


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, AuthFailure.MISSING_HEADER),
        ("", AuthFailure.MISSING_HEADER),
        ("   ", AuthFailure.MISSING_HEADER),
        ("Bearer", AuthFailure.MALFORMED),
        ("Bearer    ", AuthFailure.MALFORMED),
        ("Basic dXNlcjpwYXNz", AuthFailure.MALFORMED),
        ("Bearer not-a-jwt", AuthFailure.MALFORMED),
        ("Bearer a.b.c", AuthFailure.MALFORMED),
        ("Bearer !!!.???.***", AuthFailure.MALFORMED),
        ("Bearer " + "a" * 20000 + ".b.c", AuthFailure.MALFORMED),
    ],
)
async def test_missing_or_garbage_header_is_refused(file_validator, header, expected) -> None:
    assert await reason_for(file_validator, header) is expected


async def test_errors_never_carry_the_token(keys, file_validator) -> None:
    expired = token(keys["current"], "kid-current", exp=int(time.time()) - 3600)
    with pytest.raises(AuthError) as caught:
        await file_validator.validate(bearer(expired))
    assert expired not in str(caught.value) and expired.split(".")[1] not in str(caught.value)


# --- key refresh -------------------------------------------------------------------------------


async def test_unknown_kid_triggers_one_refresh_then_succeeds_after_rotation(keys, jwks_server, clock) -> None:
    validator = url_validator(jwks_server, clock)
    await validator.validate(bearer(token(keys["current"], "kid-current")))
    assert jwks_server.hits == 1

    clock.advance(31)  # past the minimum refresh interval
    jwks_server.publish(public_jwk(keys["rotated"], "kid-rotated"))
    rotated = bearer(token(keys["rotated"], "kid-rotated"))
    # Many calls arriving at once with the new kid coalesce into a single fetch.
    results = await asyncio.gather(*(validator.validate(rotated) for _ in range(20)))
    assert all(result["aud"] == AUDIENCE for result in results)
    assert jwks_server.hits == 2, "exactly one refresh for the rotation"
    assert validator.keys.kids == {"kid-rotated"}

    await validator.validate(rotated)
    assert jwks_server.hits == 2


async def test_refresh_is_rate_limited_against_random_kids(keys, jwks_server, clock) -> None:
    validator = url_validator(jwks_server, clock, refresh_min_interval_s=30.0)
    assert await validator.prefetch() == 1
    clock.advance(31)

    async def spray() -> None:
        forged = bearer(token(keys["stranger"], f"kid-{uuid.uuid4()}"))
        assert await reason_for(validator, forged) is AuthFailure.UNKNOWN_KEY

    await asyncio.gather(*(spray() for _ in range(25)))
    for _ in range(25):
        await spray()
    assert jwks_server.hits == 2, "50 unknown kids cost one refresh"

    # A genuine rotation inside the window waits for the window to end, then succeeds.
    jwks_server.publish(public_jwk(keys["current"], "kid-current"), public_jwk(keys["rotated"], "kid-rotated"))
    rotated = bearer(token(keys["rotated"], "kid-rotated"))
    clock.advance(29)
    assert await reason_for(validator, rotated) is AuthFailure.UNKNOWN_KEY
    assert jwks_server.hits == 2
    clock.advance(2)
    await validator.validate(rotated)
    assert jwks_server.hits == 3


async def test_failed_fetch_keeps_old_keys_and_is_rate_limited(keys, jwks_server, clock) -> None:
    validator = url_validator(jwks_server, clock, jwks_max_age_s=60.0)
    good = bearer(token(keys["current"], "kid-current"))
    await validator.validate(good)

    jwks_server.status = 500
    clock.advance(61)  # keys are now stale: the next token triggers a refetch, which fails
    await validator.validate(good)
    await validator.validate(good)
    assert jwks_server.hits == 2, "the failed attempt counts against the rate limit"

    jwks_server.status = 200
    clock.advance(31)
    await validator.validate(good)
    assert jwks_server.hits == 3


async def test_withdrawn_key_stops_working_once_the_keys_age_out(keys, jwks_server, clock) -> None:
    validator = url_validator(jwks_server, clock, jwks_max_age_s=600.0)
    old = bearer(token(keys["current"], "kid-current"))
    await validator.validate(old)
    jwks_server.publish(public_jwk(keys["rotated"], "kid-rotated"))
    clock.advance(601)
    assert await reason_for(validator, old) is AuthFailure.UNKNOWN_KEY


async def test_prefetch_reports_an_unreachable_or_bad_source(jwks_server, clock, tmp_path) -> None:
    jwks_server.status = 503
    with pytest.raises(JwksError, match="HTTP 503"):
        await url_validator(jwks_server, clock).prefetch()
    missing = AcsTokenValidator(AcsAuthConfig(audience=AUDIENCE, jwks_file=tmp_path / "absent.json"))
    with pytest.raises(JwksError, match="cannot read"):
        await missing.prefetch()


def test_parse_jwks_keeps_only_usable_rs256_signing_keys(keys) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    document = {
        "keys": [
            public_jwk(keys["current"], "good"),
            {**public_jwk(keys["rotated"], "for-encryption"), "use": "enc"},
            {**public_jwk(keys["rotated"], "rs512"), "alg": "RS512"},
            {k: v for k, v in public_jwk(keys["rotated"], "x").items() if k != "kid"},
            public_jwk(small, "too-small"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "not a key",
        ]
    }
    assert set(parse_jwks(document)) == {"good"}
    for bad in ({}, {"keys": "x"}, [], {"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}]}):
        with pytest.raises(JwksError):
            parse_jwks(bad)


# --- configuration -----------------------------------------------------------------------------


def test_config_defaults_are_acs_and_require_an_audience() -> None:
    config = AcsAuthConfig(audience=AUDIENCE)
    assert config.issuer == "https://acscallautomation.communication.azure.com"
    assert config.jwks_url == "https://acscallautomation.communication.azure.com/calling/keys"
    assert config.enabled and config.leeway_s == 60
    with pytest.raises(ValidationError, match="audience"):
        AcsAuthConfig()
    with pytest.raises(ValidationError, match="https"):
        AcsAuthConfig(audience=AUDIENCE, jwks_url="http://keys.example/calling/keys")
    AcsAuthConfig(audience=AUDIENCE, jwks_url="http://[::1]:9/keys")  # loopback stand-in is fine


def test_disabled_config_builds_no_validator() -> None:
    assert build_acs_validator(AcsAuthConfig(enabled=False)) is None
    assert isinstance(build_acs_validator(AcsAuthConfig(audience=AUDIENCE)), AcsTokenValidator)


# --- a real uvicorn server ---------------------------------------------------------------------


def protected_app(validator: AcsTokenValidator) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws")
    async def media(websocket: WebSocket) -> None:
        if not await check_websocket(websocket, validator):
            return
        await websocket.accept()
        await websocket.send_text("welcome")
        await websocket.close()

    @app.post("/api/callbacks")
    # A default value, not Annotated[...]: this module has `from __future__ import annotations`.
    async def callbacks(verified: Claims = Depends(acs_auth_dependency(validator))) -> dict[str, str]:
        return {"sub": verified["sub"]}

    return app


class ThreadedUvicorn:
    def __init__(self, app: FastAPI, ws: str) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, ws=ws, lifespan="off", log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def __exit__(self, *_exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)


async def rejection_seen_by_client(url: str, headers: dict[str, str]) -> str:
    """What a client sees on the wire when the server refuses: an HTTP status or a close code."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=5) as socket:
            await socket.recv()
    except websockets.InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}"
    except websockets.ConnectionClosed as exc:
        return f"close {exc.rcvd.code if exc.rcvd else None}"
    return "accepted"


@pytest.mark.parametrize("ws_impl", ["websockets", "websockets-sansio"])
async def test_websocket_and_callback_on_a_real_server(keys, tmp_path, ws_impl) -> None:
    path = jwks_file(tmp_path, public_jwk(keys["current"], "kid-current"))
    validator = AcsTokenValidator(AcsAuthConfig(audience=AUDIENCE, jwks_file=path))
    good = {"Authorization": bearer(token(keys["current"], "kid-current"))}
    forged = {"Authorization": bearer(token(keys["stranger"], "kid-current"))}

    with ThreadedUvicorn(protected_app(validator), ws_impl) as host:
        url = f"ws://{host}/ws"
        # Closing before accept() is turned by uvicorn into a refused handshake (HTTP 403): no 1008
        # close frame reaches the wire, and neither does the close reason.
        assert await rejection_seen_by_client(url, {}) == "HTTP 403"
        assert await rejection_seen_by_client(url, forged) == "HTTP 403"
        async with connect(url, additional_headers=good, open_timeout=5) as socket:
            assert await socket.recv() == "welcome"

        async with httpx.AsyncClient(base_url=f"http://{host}") as client:
            missing = await client.post("/api/callbacks", json=[])
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == 'Bearer realm="parley"'
            refused = await client.post("/api/callbacks", json=[], headers=forged)
            assert refused.status_code == 401
            assert 'error="invalid_token"' in refused.headers["www-authenticate"]
            assert 'error_description="bad_signature"' in refused.headers["www-authenticate"]
            accepted = await client.post("/api/callbacks", json=[], headers=good)
            assert accepted.status_code == 200 and accepted.json() == {"sub": "acs-call-automation"}


class GatedSource:
    """An in-process key source whose fetch waits until the test opens the gate."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.gate = asyncio.Event()
        self.gate.set()
        self.fetches = 0

    def describe(self) -> str:
        return "gated test source"

    async def fetch(self) -> object:
        self.fetches += 1
        await self.gate.wait()
        return self.document


async def test_known_kid_keeps_working_while_old_keys_are_refreshed(keys, clock) -> None:
    source = GatedSource({"keys": [public_jwk(keys["current"], "kid-current")]})
    config = AcsAuthConfig(audience=AUDIENCE, jwks_max_age_s=60.0)
    validator = AcsTokenValidator(config, key_source=source, clock=clock)
    good = bearer(token(keys["current"], "kid-current"))
    await validator.validate(good)

    clock.advance(61)
    source.gate.clear()  # the refresh of the stale keys hangs
    first = asyncio.create_task(validator.validate(good))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert source.fetches == 2 and not first.done()
    # A second call does not queue behind the hanging download.
    await asyncio.wait_for(validator.validate(good), timeout=1)
    source.gate.set()
    assert (await first)["aud"] == AUDIENCE
