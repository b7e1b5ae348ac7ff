"""Checks and small value types for the ACS settings, free of SDK imports.

`parley.settings` validates with these at startup, so this module must stay light: no Azure SDK,
no FastAPI. The service (`parley.acs.service`) uses the same functions at run time.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode, urlsplit

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


def media_url(base_url: str, call_key: str, caller_id: str) -> str:
    """wss://<host>/ws/acs?callId=<key>&callerId=<who>: the URL ACS dials for the media stream."""
    scheme, rest = base_url.split("://", 1)
    ws_scheme = "wss" if scheme == "https" else "ws"
    query = urlencode({"callId": call_key, "callerId": caller_id} if caller_id else {"callId": call_key})
    return f"{ws_scheme}://{rest}{MEDIA_PATH}?{query}"
