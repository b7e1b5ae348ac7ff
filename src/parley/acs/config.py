"""Checks and small value types for the ACS settings, free of SDK imports.

`parley.settings` validates with these at startup (`settings_problems`), so this module must stay
light: no Azure SDK, no FastAPI. The service (`parley.acs.service`) uses the same functions at run
time.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlencode, urlsplit

from pydantic import SecretStr, ValidationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from parley.settings import Settings

# E.164: a plus, a non-zero country code digit, at most 15 digits in all. Nothing else (no spaces,
# dashes or brackets): ACS rejects anything else, and rejecting it here gives a clearer message.
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
# Raw ids of ACS users in the public, GCC High and DoD clouds: `8:acs:<resource>_<user>`.
_ACS_USER = re.compile(r"8:(acs|gcch-acs|dod-acs):[A-Za-z0-9_\-]{1,200}")

SAMPLE_RATES = (16000, 24000)
MEDIA_PATH = "/ws/acs"
CALLBACK_PATH = "/api/acs/callbacks"


class AcsConfigError(ValueError):
    """A bad ACS value; the message says what is expected, never echoing a secret."""


def is_e164(value: str) -> bool:
    return _E164.fullmatch(value) is not None


def is_acs_user_id(value: str) -> bool:
    return _ACS_USER.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class CallTarget:
    """Whom to call or transfer to: a phone number (E.164) or an ACS user (raw id)."""

    kind: Literal["phone", "acs_user"]
    value: str


def parse_target(value: str) -> CallTarget:
    """A phone number (+15551234567) or an ACS user id (8:acs:...); AcsConfigError otherwise."""
    value = value.strip()
    if is_e164(value):
        return CallTarget("phone", value)
    if is_acs_user_id(value):
        return CallTarget("acs_user", value)
    raise AcsConfigError(
        f"{value[:40]!r} is neither an E.164 phone number (+ then up to 15 digits, e.g. +15551234567)"
        " nor an ACS user id (8:acs:...)"
    )


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_connection_string(value: str) -> None:
    """`endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>`, as the portal
    shows it. The message never repeats the value: it holds the access key."""
    parts: dict[str, str] = {}
    for element in value.strip().split(";"):
        name, _, item = element.partition("=")
        if name.strip():
            parts[name.strip().lower()] = item.strip()
    endpoint, key = parts.get("endpoint", ""), parts.get("accesskey", "")
    expected = "expected endpoint=https://<resource>.communication.azure.com/;accesskey=<key>"
    if not endpoint or not key:
        raise AcsConfigError(f"missing endpoint or accesskey ({expected})")
    if not endpoint.lower().startswith("https://"):
        # The SDK would silently turn any other scheme into https anyway.
        raise AcsConfigError(f"the endpoint must start with https:// ({expected})")
    try:
        base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise AcsConfigError("the accesskey is not base64 (copy it from the resource's Keys page)") from None


def check_endpoint(value: str) -> None:
    parts = urlsplit(value.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise AcsConfigError(f"must be https://<resource>.communication.azure.com, got {value[:80]!r}")


def public_base_url(value: str) -> str:
    """The callback base URL, normalised (no trailing slash). https://, or http:// on loopback (a
    local stand-in for ACS: the real service only reaches public https URLs)."""
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    if not parts.hostname or parts.scheme not in ("https", "http"):
        raise AcsConfigError(f"must be a URL like https://my-host.example, got {value[:80]!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise AcsConfigError(f"must be https:// (ACS calls back only over TLS), got {value[:80]!r}")
    if parts.query or parts.fragment:
        raise AcsConfigError(f"must be a base URL without ?query or #fragment, got {value[:80]!r}")
    return text


def callback_url(base_url: str, call_key: str) -> str:
    return f"{base_url}{CALLBACK_PATH}/{call_key}"


def media_url(base_url: str, call_key: str, caller_id: str, agent: str = "") -> str:
    """wss://<host>/ws/acs?callId=<key>&callerId=<who>[&agent=<name>]: the URL ACS dials for the
    media stream (the agent: chosen by the called number)."""
    scheme, rest = base_url.split("://", 1)
    ws_scheme = "wss" if scheme == "https" else "ws"
    fields = {"callId": call_key} | ({"callerId": caller_id} if caller_id else {}) | ({"agent": agent} if agent else {})
    query = urlencode(fields)
    return f"{ws_scheme}://{rest}{MEDIA_PATH}?{query}"


# --------------------------------------------------------------------------------------------
# The ACS settings as a whole (called by Settings' validator)


def env_name(name: str) -> str:
    """A setting as the user sets it: `acs_callback_url (PARLEY_ACS_CALLBACK_URL)`."""
    return f"{name} (PARLEY_{name.upper()})"


def settings_problems(settings: Settings) -> list[str]:
    """Every problem with the ACS settings, each naming its setting (empty: all fine)."""
    return _value_problems(settings) + _auth_problems(settings)


def _value_problems(settings: Settings) -> list[str]:
    problems: list[str] = []

    def check(name: str, value: str | None, checker: Callable[[str], object]) -> None:
        if value is None:
            return
        try:
            checker(value)
        except AcsConfigError as exc:
            problems.append(f"{env_name(name)}: {exc}")

    secret = settings.acs_connection_string
    if secret is not None and settings.acs_endpoint:
        problems.append(f"set {env_name('acs_connection_string')} or {env_name('acs_endpoint')}, not both")
    check("acs_connection_string", secret.get_secret_value() if secret else None, check_connection_string)
    check("acs_endpoint", settings.acs_endpoint or None, check_endpoint)
    check("acs_callback_url", settings.acs_callback_url, public_base_url)
    if settings.acs_configured and not settings.acs_callback_url:
        problems.append(
            f"{env_name('acs_callback_url')} is required with ACS: the public https base"
            " URL ACS reaches this server at (e.g. a dev tunnel)"
        )
    if settings.acs_sample_rate not in SAMPLE_RATES:
        problems.append(f"{env_name('acs_sample_rate')} must be 16000 or 24000, got {settings.acs_sample_rate}")
    if settings.acs_source_caller_id is not None and not is_e164(settings.acs_source_caller_id):
        problems.append(
            f"{env_name('acs_source_caller_id')} must be an E.164 number like"
            f" +15551234567, got {settings.acs_source_caller_id[:40]!r}"
        )
    for name in ("acs_incoming_code", "acs_outbound_token"):
        value: SecretStr | None = getattr(settings, name)
        if value is not None and len(value.get_secret_value()) < 16:
            problems.append(f"{env_name(name)} must be at least 16 characters (a random secret)")
    return problems


def _auth_problems(settings: Settings) -> list[str]:
    resource_id = env_name("acs_resource_id")
    if settings.acs_auth_enabled is True and not settings.acs_resource_id.strip():
        return [f"acs_auth_enabled is true but {resource_id} is empty: ACS tokens are checked against it"]
    if settings.acs_configured and settings.acs_auth_enabled is None and not settings.acs_resource_id.strip():
        return [
            f"ACS is configured but {resource_id} is empty: set it to the ACS resource's immutable id"
            " (the audience of the tokens ACS sends with media streams and callbacks), or set"
            " PARLEY_ACS_AUTH_ENABLED=false for local development only"
        ]
    if not settings.acs_auth_active:
        return []
    try:
        settings.acs_auth_config()
    except ValidationError as exc:
        return [
            f"ACS authentication (PARLEY_ACS_AUTH_*): {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        ]
    return []
