"""Validate the JWT that Azure Communication Services sends as `Authorization: Bearer <JWT>`.

ACS presents the same kind of token on the media-streaming WebSocket upgrade (24 h lifetime) and on
every Call Automation callback POST (5 min lifetime): RS256, issuer
`https://acscallautomation.communication.azure.com`, audience = the ACS resource id, signing keys
published as a JWKS at `https://acscallautomation.communication.azure.com/calling/keys`.

Without this check anyone who learns the public `wss://.../ws` URL can open a "call" (spending our
recognition and synthesis capacity) and anyone can forge Call Automation events.

Reasons for a rejection are typed (`AuthFailure`) so callers can log and count them; neither the token
nor anything copied verbatim from it ends up in an exception message or the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeAlias
from urllib.parse import urlsplit

import httpx
import jwt
from fastapi import HTTPException, Request, WebSocket
from pydantic import BaseModel, Field, model_validator

from parley.acs.config import is_loopback

log = logging.getLogger(__name__)

ACS_ISSUER = "https://acscallautomation.communication.azure.com"
ACS_JWKS_URL = "https://acscallautomation.communication.azure.com/calling/keys"

ALLOWED_ALGORITHM = "RS256"
MIN_RSA_KEY_BITS = 2048
# An RS256 token with a handful of claims is well under 2 KB; anything far larger is not worth parsing.
MAX_TOKEN_CHARS = 16_384
# A JWKS is a few KB; cap what we read so a hijacked or broken endpoint cannot make us buffer megabytes.
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
WEBSOCKET_POLICY_VIOLATION = 1008

Claims: TypeAlias = dict[str, Any]


class AuthFailure(StrEnum):
    """Why a token was refused. The values are stable: fine for logs, metrics and close reasons."""

    MISSING_HEADER = "missing_header"
    MALFORMED = "malformed"
    WRONG_ALG = "wrong_alg"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_ISSUER = "wrong_issuer"
    MISSING_CLAIM = "missing_claim"


class AuthError(Exception):
    """A refused token. `reason` is the typed cause; the message never contains the token."""

    def __init__(self, reason: AuthFailure, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class JwksError(Exception):
    """The signing keys could not be loaded (network, HTTP status, size, JSON or content)."""


class AcsAuthConfig(BaseModel):
    """How to check ACS tokens. Built by the server from `Settings`; all times are seconds."""

    enabled: bool = True
    audience: str = Field("", description="The ACS resource id (the immutable resource GUID).")
    issuer: str = ACS_ISSUER
    jwks_url: str = ACS_JWKS_URL
    jwks_file: Path | None = Field(
        None, description="A local JWKS file used instead of jwks_url (offline / air-gapped hosts)."
    )
    leeway_s: float = Field(60.0, ge=0, le=600, description="Clock skew tolerated on exp/nbf/iat.")
    refresh_min_interval_s: float = Field(
        60.0, ge=0, description="At most one key refresh this often, however many unknown kids arrive."
    )
    jwks_max_age_s: float = Field(
        3600.0, gt=0, description="Refetch keys this old, so a key ACS withdraws stops being trusted."
    )
    fetch_timeout_s: float = Field(5.0, gt=0, le=60, description="Timeout for one JWKS download.")

    @model_validator(mode="after")
    def _check(self) -> AcsAuthConfig:
        if not self.enabled:
            return self
        if not self.audience.strip():
            raise ValueError("audience (the ACS resource id) is required when ACS authentication is on")
        if not self.issuer.strip():
            raise ValueError("issuer must not be empty")
        if self.jwks_file is None:
            _check_jwks_url(self.jwks_url)
        return self


def _check_jwks_url(url: str) -> None:
    # Keys fetched over plain HTTP could be swapped in transit, which would let anyone mint tokens.
    # Plain HTTP is allowed only on loopback, for tests and local stand-ins.
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return
    raise ValueError(f"jwks_url must be https:// (or http:// on loopback), got {url!r}")


# --- where the keys come from --------------------------------------------------------------------


class KeySource(Protocol):
    """Anything that can produce the current JWKS document."""

    async def fetch(self) -> object: ...

    def describe(self) -> str: ...


class UrlKeySource:
    """The JWKS served over HTTPS (ACS's public key endpoint)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout_s = timeout_s

    def describe(self) -> str:
        return self._url

    async def fetch(self) -> object:
        # A client per fetch: fetches are rare (rate limited) and this keeps no connection pool tied
        # to whichever event loop happened to create the validator.
        try:
            async with (
                httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False) as client,
                client.stream("GET", self._url, headers={"Accept": "application/json"}) as resp,
            ):
                if resp.status_code != 200:
                    raise JwksError(f"HTTP {resp.status_code} from {self._url}")
                body = await _read_capped(resp, MAX_JWKS_BYTES)
        except httpx.HTTPError as exc:
            raise JwksError(f"cannot fetch {self._url}: {type(exc).__name__}") from exc
        return _parse_json(body, self._url)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise JwksError(f"JWKS larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class FileKeySource:
    """A JWKS kept in a local file, for hosts that cannot reach ACS's key endpoint."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def describe(self) -> str:
        return str(self._path)

    async def fetch(self) -> object:
        try:
            body = await asyncio.to_thread(self._path.read_bytes)
        except OSError as exc:
            raise JwksError(f"cannot read {self._path}: {exc.strerror}") from exc
        if len(body) > MAX_JWKS_BYTES:
            raise JwksError(f"{self._path} is larger than {MAX_JWKS_BYTES} bytes")
        return _parse_json(body, str(self._path))


def _parse_json(body: bytes, origin: str) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise JwksError(f"{origin} is not JSON") from exc


def parse_jwks(document: object) -> dict[str, jwt.PyJWK]:
    """The usable RS256 signing keys of a JWKS document, by kid. Other keys are skipped, not fatal."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"][:MAX_JWKS_KEYS]:
        key = _usable_signing_key(entry)
        if key is not None:
            keys[entry["kid"]] = key
    if not keys:
        raise JwksError("the JWKS holds no usable RS256 signing key")
    return keys


def _usable_signing_key(entry: object) -> jwt.PyJWK | None:
    if not isinstance(entry, dict) or entry.get("kty") != "RSA":
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        return None  # tokens are matched to keys by kid; a key without one can never be chosen
    if entry.get("use", "sig") != "sig" or entry.get("alg", ALLOWED_ALGORITHM) != ALLOWED_ALGORITHM:
        return None
    try:
        key = jwt.PyJWK(entry, algorithm=ALLOWED_ALGORITHM)
    except jwt.PyJWTError:
        log.warning("JWKS key %.40r is not a valid RSA key; skipped", kid)
        return None
    if key.key.key_size < MIN_RSA_KEY_BITS:
        log.warning("JWKS key %.40r is only %d bits; skipped", kid, key.key.key_size)
        return None
    return key


# --- the key cache -------------------------------------------------------------------------------


class SigningKeyCache:
    """Keys by kid, refreshed when a token names an unknown kid or the keys grow old.

    Refreshes are rate limited: at most one attempt (successful or not) per `min_interval_s`, so a
    flood of tokens with random kids costs one fetch, not one per token. Concurrent refreshes
    coalesce: callers queue on a lock, and whoever gets it after a fetch finds the fresh keys (or the
    rate limit) instead of fetching again. A failed fetch keeps the keys we already had.
    """

    def __init__(
        self,
        source: KeySource,
        *,
        min_interval_s: float,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._min_interval_s = min_interval_s
        self._max_age_s = max_age_s
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def get(self, kid: str) -> jwt.PyJWK | None:
        known = self._keys.get(kid)
        # While another caller refreshes old keys, a known kid keeps working instead of queueing
        # behind a download that may take up to the fetch timeout.
        if known is not None and (not self._is_stale() or self._lock.locked()):
            return known
        await self._refresh_unless_recent(kid)
        return self._keys.get(kid)

    async def load(self) -> int:
        """Fetch now, ignoring the rate limit (startup). Raises JwksError; returns the key count."""
        async with self._lock:
            await self._fetch()
        return len(self._keys)

    def _is_stale(self) -> bool:
        return self._loaded_at is None or self._clock() - self._loaded_at >= self._max_age_s

    def _attempted_recently(self) -> bool:
        return self._attempted_at is not None and self._clock() - self._attempted_at < self._min_interval_s

    async def _refresh_unless_recent(self, kid: str) -> None:
        async with self._lock:
            # Someone may have refreshed while we waited for the lock: that is the coalescing.
            if kid in self._keys and not self._is_stale():
                return
            if self._attempted_recently():
                return
            try:
                await self._fetch()
            except JwksError as exc:
                log.warning("ACS signing keys not refreshed from %s: %s", self._source.describe(), exc)

    async def _fetch(self) -> None:
        self.fetch_count += 1
        try:
            keys = parse_jwks(await self._source.fetch())
        except JwksError:
            self._attempted_at = self._clock()
            raise
        # A cancelled fetch (CancelledError) records no attempt, so the next caller may try at once.
        self._attempted_at = self._loaded_at = self._clock()
        self._keys = keys
        log.info("loaded %d ACS signing key(s) from %s", len(keys), self._source.describe())


# --- the validator -------------------------------------------------------------------------------

# Most specific first: InvalidSignatureError is a DecodeError, and every one is an InvalidTokenError.
_FAILURE_BY_EXCEPTION: tuple[tuple[type[jwt.PyJWTError], AuthFailure], ...] = (
    (jwt.InvalidSignatureError, AuthFailure.BAD_SIGNATURE),
    (jwt.ExpiredSignatureError, AuthFailure.EXPIRED),
    (jwt.ImmatureSignatureError, AuthFailure.NOT_YET_VALID),
    (jwt.InvalidAudienceError, AuthFailure.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, AuthFailure.WRONG_ISSUER),
    (jwt.MissingRequiredClaimError, AuthFailure.MISSING_CLAIM),
    (jwt.InvalidAlgorithmError, AuthFailure.WRONG_ALG),
)


class AcsTokenValidator:
    """Checks `Authorization` headers against ACS's issuer, our resource id and ACS's signing keys."""

    def __init__(
        self,
        config: AcsAuthConfig,
        *,
        key_source: KeySource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.keys = SigningKeyCache(
            key_source or key_source_for(config),
            min_interval_s=config.refresh_min_interval_s,
            max_age_s=config.jwks_max_age_s,
            clock=clock,
        )

    async def prefetch(self) -> int:
        """Load the keys before the first call arrives. Raises JwksError; returns the key count."""
        return await self.keys.load()

    async def validate(self, authorization_header: str | None) -> Claims:
        """The verified claims of a `Bearer` token, or AuthError saying why it was refused."""
        token = bearer_token(authorization_header)
        kid = _checked_kid(token)
        key = await self.keys.get(kid)
        if key is None:
            raise AuthError(AuthFailure.UNKNOWN_KEY, "no signing key with the token's kid")
        return self._verified_claims(token, key)

    def _verified_claims(self, token: str, key: jwt.PyJWK) -> Claims:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[ALLOWED_ALGORITHM],  # fixed here, never taken from the token
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_failure_for(exc), type(exc).__name__) from None


def key_source_for(config: AcsAuthConfig) -> KeySource:
    if config.jwks_file is not None:
        return FileKeySource(config.jwks_file)
    return UrlKeySource(config.jwks_url, config.fetch_timeout_s)


def build_acs_validator(config: AcsAuthConfig) -> AcsTokenValidator | None:
    """The validator, or None when authentication is explicitly switched off (local development)."""
    if not config.enabled:
        log.warning("ACS token validation is OFF: anyone reaching this server can open media sessions")
        return None
    return AcsTokenValidator(config)


def bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value."""
    if authorization_header is None or not authorization_header.strip():
        raise AuthError(AuthFailure.MISSING_HEADER)
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(AuthFailure.MALFORMED, "not a Bearer credential")
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise AuthError(AuthFailure.MALFORMED, "not a compact JWS")
    return token


def _checked_kid(token: str) -> str:
    """The token's kid, once its (unverified) header says RS256."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError(AuthFailure.MALFORMED, "unreadable JWT header") from None
    alg = header.get("alg")
    if alg != ALLOWED_ALGORITHM:
        # Rejecting `none` and HS* here also rules out the HS256-with-the-public-key confusion attack.
        raise AuthError(AuthFailure.WRONG_ALG, f"alg {str(alg)[:16]!r} is not {ALLOWED_ALGORITHM}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError(AuthFailure.UNKNOWN_KEY, "the token names no kid")
    return kid


def _failure_for(exc: jwt.PyJWTError) -> AuthFailure:
    for exception_type, failure in _FAILURE_BY_EXCEPTION:
        if isinstance(exc, exception_type):
            return failure
    return AuthFailure.MALFORMED


# --- web framework glue --------------------------------------------------------------------------


def _peer(client: Any) -> str:
    return f"{client.host}:{client.port}" if client else "unknown peer"


async def check_websocket(websocket: WebSocket, validator: AcsTokenValidator | None) -> bool:
    """Validate the upgrade's token; on failure close (before accept) and return False.

    Closing before `accept()` makes uvicorn refuse the handshake with HTTP 403, so the peer sees a
    failed upgrade rather than a 1008 close frame; the code and reason only reach the wire if the
    socket was already accepted. Call this first thing in the route, before `websocket.accept()`.
    `validator=None` means authentication is switched off.
    """
    if validator is None:
        return True
    try:
        await validator.validate(websocket.headers.get("authorization"))
    except AuthError as exc:
        log.warning(
            "media WebSocket from %s refused: %s (call %.64r)",
            _peer(websocket.client),
            exc,
            websocket.headers.get("x-ms-call-connection-id", "-"),
        )
        await websocket.close(code=WEBSOCKET_POLICY_VIOLATION, reason=f"unauthorized: {exc.reason.value}")
        return False
    return True


def www_authenticate(error: AuthError) -> str:
    """An RFC 6750 challenge: no error code when no credential was sent, `invalid_token` otherwise."""
    if error.reason is AuthFailure.MISSING_HEADER:
        return 'Bearer realm="parley"'
    return f'Bearer realm="parley", error="invalid_token", error_description="{error.reason.value}"'


async def authenticate_request(request: Request, validator: AcsTokenValidator | None) -> Claims:
    """Verified claims of an HTTP request (e.g. a Call Automation callback) or HTTPException(401)."""
    if validator is None:
        return {}
    try:
        return await validator.validate(request.headers.get("authorization"))
    except AuthError as exc:
        log.warning("%s %s from %s refused: %s", request.method, request.url.path, _peer(request.client), exc)
        raise HTTPException(
            status_code=401, detail="unauthorized", headers={"WWW-Authenticate": www_authenticate(exc)}
        ) from None


def acs_auth_dependency(validator: AcsTokenValidator | None) -> Callable[[Request], Awaitable[Claims]]:
    """A FastAPI dependency for routes: `claims: Claims = Depends(acs_auth_dependency(validator))`.

    Use it as a default value, not inside `Annotated[...]`: with `from __future__ import annotations`
    (server.py has it) FastAPI cannot evaluate an annotation naming a local `validator`, and the
    parameter silently becomes a request field (422 instead of 401).
    """

    async def require_acs_token(request: Request) -> Claims:
        return await authenticate_request(request, validator)

    return require_acs_token


__all__ = [
    "ACS_ISSUER",
    "ACS_JWKS_URL",
    "AcsAuthConfig",
    "AcsTokenValidator",
    "AuthError",
    "AuthFailure",
    "Claims",
    "FileKeySource",
    "JwksError",
    "KeySource",
    "SigningKeyCache",
    "UrlKeySource",
    "acs_auth_dependency",
    "authenticate_request",
    "bearer_token",
    "build_acs_validator",
    "check_websocket",
    "key_source_for",
    "parse_jwks",
    "www_authenticate",
]
