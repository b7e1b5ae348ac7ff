"""Who may read parley's HTTP APIs and open its media sockets (next to ACS's own token check).

HTTP APIs that serve call data or control the server (`GET /api/calls/{id}/events`, `GET /api/calls`,
`/api/stats`) go through `api_access(settings)`, a FastAPI dependency:

- with `PARLEY_API_TOKEN` set, a request must carry `Authorization: Bearer <token>` (compared in
  constant time); 401 otherwise;
- without it, the APIs answer only on a loopback bind, and only to a local client talking to the
  server directly: not through a proxy (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`), not under another
  host name (`Host` must be a loopback name or address: no DNS rebinding), not from a browser page of
  another origin (an `Origin` header not in `PARLEY_ALLOWED_ORIGINS`); 403 otherwise. On any other bind
  they answer 403 "set PARLEY_API_TOKEN".

Media sockets (`check_media_access`, before `accept()`): a request with an `Origin` header is a
browser's and is refused (HTTP 403) unless that origin is in `PARLEY_ALLOWED_ORIGINS` (ACS sends
none); with ACS Call Automation configured, the socket must belong to a call parley answered or placed
(the `callId` parley put in the media URL). `Host` is not checked on media sockets: ACS reaches parley
under its public name (a tunnel, a load balancer), and a browser page that would use DNS rebinding
sends its own Origin, which is refused.

The browser channel (`/ws/browser`, the talk page: `browser_media_refusal`) has rules of its own,
for a socket a browser opens:

- on a loopback bind, the page's own origin is allowed (its Origin's host:port is the request's
  `Host`, and that is a loopback name: a DNS-rebinding page has its own name, and is refused), as
  is an origin in `PARLEY_ALLOWED_ORIGINS` and a client sending no Origin (not a browser);
- on any other bind, `PARLEY_API_TOKEN` is required, AND a browser's Origin must be in
  `PARLEY_ALLOWED_ORIGINS`. A browser cannot set headers on a WebSocket, so the token travels as a
  subprotocol entry `bearer.<token>` (`Sec-WebSocket-Protocol`), never in the URL, which access
  logs, proxies and the browser's history keep. A token presented must be the right one.

No ACS token and no ACS call are asked of it: a browser call is not an ACS call.

This module imports no settings at run time (parley.settings imports parley.security).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, WebSocket
from fastapi.responses import PlainTextResponse

from parley.acs.config import is_loopback

if TYPE_CHECKING:
    from parley.settings import Settings

log = logging.getLogger(__name__)

# Headers a reverse proxy or tunnel adds: such a request comes from elsewhere, whatever its socket says.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
MAX_SHOWN_CHARS = 80  # of a peer's header value in a log line or an error message


class CallMembership(Protocol):
    """What the media-socket check needs of ACS Call Automation (parley.acs.service.CallAutomation)."""

    def media_refusal(self, key: str) -> str | None:
        """None if `key` (a media URL's callId) is a live call parley answered or placed; else why not."""
        ...


def configured_token(settings: Settings) -> str | None:
    """PARLEY_API_TOKEN, or None when unset or blank (an empty token would let nobody in: it means unset)."""
    token = settings.api_token.get_secret_value().strip() if settings.api_token is not None else ""
    return token or None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None when there is no such header."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def same_secret(presented: str, expected: str) -> bool:
    """Constant time, so the secret cannot be guessed from response times."""
    return hmac.compare_digest(presented.encode(), expected.encode())


def normalize_origin(origin: str) -> str:
    """`HTTPS://App.Example.org/` and `https://app.example.org` are the same origin."""
    return origin.strip().rstrip("/").lower()


def origin_allowed(origin: str, allowed: list[str]) -> bool:
    wanted = normalize_origin(origin)
    return any(normalize_origin(item) == wanted for item in allowed)


def is_loopback_host_header(host: str) -> bool:
    """A `Host` header naming this machine: localhost, 127.x.x.x or [::1], with or without a port."""
    if not host:
        return False
    try:
        hostname = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if hostname is None:
        return False
    return hostname.rstrip(".") == "localhost" or is_loopback(hostname)


def shown(value: str) -> str:
    """A peer's value, quoted and cut, for a log line or an error message."""
    return repr(value[:MAX_SHOWN_CHARS] + ("…" if len(value) > MAX_SHOWN_CHARS else ""))


def peer(client: Any) -> str:
    return f"{client.host}:{client.port}" if client else "unknown peer"


# --------------------------------------------------------------------------- the HTTP APIs


def check_api_access(request: Request, settings: Settings) -> None:
    """Raise HTTPException (401/403, logged) unless this request may use the calls/events/stats APIs."""
    expected = configured_token(settings)
    if expected is not None:
        presented = bearer_token(request.headers)
        if presented is None:
            _refuse(
                request,
                401,
                "missing token",
                "this API needs a token: send Authorization: Bearer <PARLEY_API_TOKEN>",
                'Bearer realm="parley"',
            )
        elif not same_secret(presented, expected):
            _refuse(request, 401, "wrong token", "wrong API token", 'Bearer realm="parley", error="invalid_token"')
        return
    if not is_loopback(settings.host):
        _refuse(
            request,
            403,
            f"no PARLEY_API_TOKEN on a non-loopback bind ({settings.host})",
            f"this API is off: the server listens on {settings.host} and PARLEY_API_TOKEN is not set; set"
            " PARLEY_API_TOKEN and send it as Authorization: Bearer <token> (or bind to 127.0.0.1)",
        )
    reason = _not_local(request, settings)
    if reason is not None:
        _refuse(
            request,
            403,
            reason,
            f"without PARLEY_API_TOKEN this API answers only local clients ({reason}); set PARLEY_API_TOKEN"
            " and send it as Authorization: Bearer <token>",
        )


def _not_local(request: Request, settings: Settings) -> str | None:
    """Why a request to a loopback-bound server does not come straight from this machine (None: it does)."""
    # First the headers: uvicorn already put a local proxy's X-Forwarded-For in the client address.
    forwarded = next((name for name in FORWARDING_HEADERS if name in request.headers), None)
    if forwarded is not None:
        return f"forwarded by a proxy ({forwarded} header)"
    client = request.client
    if client is None or not is_loopback(client.host):
        return f"the client is {client.host if client else 'unknown'}"
    host = request.headers.get("host", "")
    if not is_loopback_host_header(host):
        return f"Host {shown(host)} is not a loopback name"
    origin = request.headers.get("origin")
    if origin is not None and not origin_allowed(origin, settings.allowed_origins):
        return f"a page of origin {shown(origin)}"
    return None


def _refuse(request: Request, status: int, reason: str, detail: str, challenge: str | None = None) -> NoReturn:
    log.warning(
        "%s %s from %s refused (%d): %s", request.method, request.url.path, peer(request.client), status, reason
    )
    headers = {"WWW-Authenticate": challenge} if challenge else None
    raise HTTPException(status, detail, headers=headers)


def api_access(settings: Settings) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency guarding an API route: `@app.get(..., dependencies=[Depends(api_access(settings))])`
    (or `APIRouter(dependencies=[...])`). See the module's docstring for the rules."""

    async def require_api_access(request: Request) -> None:
        check_api_access(request, settings)

    return require_api_access


# --------------------------------------------------------------------------- media sockets


def media_refusal(websocket: WebSocket, settings: Settings, calls: CallMembership | None) -> str | None:
    """Why this media-socket upgrade is refused (None: admitted): a foreign Origin, or, with ACS
    Call Automation (`calls`), a callId that is not a call parley answered or placed."""
    origin = websocket.headers.get("origin")
    if origin is not None and not origin_allowed(origin, settings.allowed_origins):
        return f"Origin {shown(origin)} is not allowed (ACS sends none; see PARLEY_ALLOWED_ORIGINS)"
    if calls is not None:
        return calls.media_refusal(websocket.query_params.get("callId", ""))
    return None


BEARER_PROTOCOL_PREFIX = "bearer."  # a subprotocol entry `bearer.<token>`: the browser channel's token


def subprotocol_token(websocket: WebSocket) -> str | None:
    """The token a browser offered as a subprotocol `bearer.<token>` (None: it offered none)."""
    for protocol in websocket.scope.get("subprotocols") or ():
        if isinstance(protocol, str) and protocol.startswith(BEARER_PROTOCOL_PREFIX):
            return protocol[len(BEARER_PROTOCOL_PREFIX) :]
    return None


def same_origin(origin: str, host: str) -> bool:
    """The page that opened the socket was served by this server, under the name it was asked for."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.strip().lower()


def browser_media_refusal(websocket: WebSocket, settings: Settings) -> str | None:
    """Why a browser-channel socket is refused (None: admitted); the rules are in the module docstring."""
    expected = configured_token(settings)
    presented = subprotocol_token(websocket)
    if expected is not None and presented is not None and not same_secret(presented, expected):
        return "wrong token"
    origin = websocket.headers.get("origin")
    if is_loopback(settings.host):
        if origin is None or origin_allowed(origin, settings.allowed_origins):
            return None
        host = websocket.headers.get("host", "")
        if same_origin(origin, host) and is_loopback_host_header(host):
            return None
        return f"Origin {shown(origin)} is neither this server's page nor in PARLEY_ALLOWED_ORIGINS"
    if expected is None:
        return f"the browser channel on {settings.host} needs PARLEY_API_TOKEN (or bind to 127.0.0.1)"
    if presented is None:
        return "missing token: offer the subprotocol bearer.<PARLEY_API_TOKEN>"
    if origin is not None and not origin_allowed(origin, settings.allowed_origins):
        return f"Origin {shown(origin)} is not in PARLEY_ALLOWED_ORIGINS"
    return None


async def check_media_access(
    websocket: WebSocket,
    settings: Settings,
    calls: CallMembership | None,
    rule: Callable[[WebSocket, Settings], str | None] | None = None,
) -> bool:
    """Call before `accept()`: False (after refusing the upgrade with HTTP 403, logged) when the
    socket may not open a call. `rule`: a channel's own (e.g. `browser_media_refusal`), in place
    of `media_refusal`."""
    reason = media_refusal(websocket, settings, calls) if rule is None else rule(websocket, settings)
    if reason is None:
        return True
    log.warning(
        "media WebSocket from %s refused: %s (call %s)",
        peer(websocket.client),
        reason,
        shown(websocket.headers.get("x-ms-call-connection-id") or websocket.query_params.get("callId", "-")),
    )
    await refuse_websocket(websocket, 403, f"refused: {reason}\n")
    return False


async def refuse_websocket(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse an upgrade before accept() with an HTTP status and a plain-text body when the server
    supports it (uvicorn does), else by closing the handshake (HTTP 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(message, status_code=status))
    else:
        await websocket.close(code=1008)


__all__ = [
    "BEARER_PROTOCOL_PREFIX",
    "FORWARDING_HEADERS",
    "CallMembership",
    "api_access",
    "bearer_token",
    "browser_media_refusal",
    "check_api_access",
    "check_media_access",
    "configured_token",
    "is_loopback_host_header",
    "media_refusal",
    "normalize_origin",
    "origin_allowed",
    "refuse_websocket",
    "same_origin",
    "same_secret",
    "subprotocol_token",
]
