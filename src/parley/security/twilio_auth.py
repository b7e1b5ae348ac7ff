"""Twilio's request signatures (`X-Twilio-Signature`), checked on the voice webhook and the media
WebSocket's upgrade.

Twilio's documented algorithm: take the full URL Twilio requested (scheme, host, path, query), append
each POST parameter's name and value, sorted by name, with no separators; HMAC-SHA1 that with the
account's auth token as key; base64 the digest. A WebSocket upgrade is a GET: the URL alone (wss://).

Which URL? The one Twilio used, which behind a tunnel or proxy is not the one this server sees
(`http://127.0.0.1:8000/...`), hence `PARLEY_TWILIO_PUBLIC_URL`. Without it the request's own scheme
and Host header are used, which is right only when the proxy passes them through (see docs/twilio.md).

Without a token nothing can be checked: on a loopback bind that is allowed for local development,
with a warning when the first unsigned request is served (mind that a tunnel such as ngrok on the same host makes a loopback-bound
server reachable by anyone who knows its URL); on any other bind the Twilio endpoints refuse every
request unless `PARLEY_TWILIO_ALLOW_UNSIGNED=true`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from parley.acs.config import is_loopback
from parley.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-twilio-signature"
_DEFAULT_PORTS = {"https": "443", "wss": "443", "http": "80", "ws": "80"}


def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """The signature Twilio puts in X-Twilio-Signature for a request to `url` with POST `params`."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _port_variants(url: str) -> list[str]:
    """The URL as given, and with or without its scheme's default port: Twilio's own validators
    accept both, as what Twilio signed depends on how the URL was written in the console."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    variants = [url]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if default is None or not host:
        return variants
    if parts.port is None:
        variants.append(urlunsplit(parts._replace(netloc=f"{_userinfo(parts.netloc)}{host}:{default}")))
    elif str(parts.port) == default:
        variants.append(urlunsplit(parts._replace(netloc=f"{_userinfo(parts.netloc)}{host}")))
    return variants


def _userinfo(netloc: str) -> str:
    user, at, _ = netloc.rpartition("@")
    return f"{user}{at}"


def is_valid(auth_token: str, url: str, params: Iterable[tuple[str, str]], presented: str | None) -> bool:
    """True if `presented` is Twilio's signature of this request (compared in constant time)."""
    if not presented:
        return False
    items = list(params)
    matches = [
        hmac.compare_digest(signature(auth_token, candidate, items).encode(), presented.encode())
        for candidate in _port_variants(url)
    ]
    return any(matches)


def public_url(settings: Settings, path: str, query: str, scheme: str, host: str) -> str:
    """The URL Twilio requested: PARLEY_TWILIO_PUBLIC_URL's origin (and path prefix) with this
    request's path and query, or else the request's own scheme and Host header. `scheme` is http(s)
    or ws(s); the public URL's http(s) becomes ws(s) for a WebSocket."""
    websocket = scheme in ("ws", "wss")
    if settings.twilio_public_url:
        base = urlsplit(settings.twilio_public_url.strip())
        base_scheme = base.scheme
        if websocket:
            base_scheme = "wss" if base_scheme == "https" else "ws"
        return urlunsplit((base_scheme, base.netloc, base.path.rstrip("/") + path, query, ""))
    return urlunsplit((scheme, host, path, query, ""))


def stream_url(settings: Settings, scheme: str, host: str) -> str:
    """The wss:// URL of /ws/twilio for the TwiML `<Stream>`."""
    ws_scheme = "wss" if scheme in ("https", "wss") else "ws"
    return public_url(settings, "/ws/twilio", "", ws_scheme, host)


class TwilioGuard:
    """Who may use the Twilio endpoints: requests signed with the auth token, or, without one, any
    request on a loopback bind (or anywhere with `twilio_allow_unsigned`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        token = settings.twilio_auth_token.get_secret_value().strip() if settings.twilio_auth_token else ""
        self.token = token or None
        self.unsigned_allowed = is_loopback(settings.host) or settings.twilio_allow_unsigned
        self._served_unsigned = False  # warned once, at the first unsigned request served

    def warn_at_startup(self) -> None:
        """Most servers never see a Twilio request: without a token this is said at INFO here (a
        WARNING only when unsigned requests were allowed on purpose off loopback), and at WARNING
        when the first unsigned Twilio request is actually served (see `refusal`)."""
        if self.token is not None:
            return
        if self.settings.twilio_allow_unsigned and not is_loopback(self.settings.host):
            log.warning(
                "PARLEY_TWILIO_ALLOW_UNSIGNED: Twilio requests (/api/twilio/voice, /ws/twilio) on %s are NOT"
                " authenticated; set PARLEY_TWILIO_AUTH_TOKEN (docs/twilio.md)",
                self.settings.host,
            )
        elif self.unsigned_allowed:
            log.info(
                "Twilio: PARLEY_TWILIO_AUTH_TOKEN is not set; unsigned Twilio requests are served on this"
                " loopback bind (a tunnel makes it public: set the token then; docs/twilio.md)"
            )
        else:
            log.info(
                "Twilio: PARLEY_TWILIO_AUTH_TOKEN is not set while listening on %s: /api/twilio/voice and"
                " /ws/twilio refuse every request until it is (docs/twilio.md)",
                self.settings.host,
            )

    def refusal(self, url: str, params: Iterable[tuple[str, str]], headers: Mapping[str, str]) -> str | None:
        """None if the request may proceed, else why not (for the log; the peer gets a plain 403)."""
        if self.token is None:
            if self.unsigned_allowed:
                if not self._served_unsigned:
                    self._served_unsigned = True
                    log.warning(
                        "serving an unsigned Twilio request: PARLEY_TWILIO_AUTH_TOKEN is not set, so anyone"
                        " who reaches this server can open Twilio calls (docs/twilio.md)"
                    )
                return None
            return "PARLEY_TWILIO_AUTH_TOKEN is not set on a non-loopback bind"
        presented = headers.get(SIGNATURE_HEADER)
        if presented is None:
            return "no X-Twilio-Signature header"
        if not is_valid(self.token, url, params, presented):
            return f"X-Twilio-Signature does not match {url} (is PARLEY_TWILIO_PUBLIC_URL the URL Twilio uses?)"
        return None
