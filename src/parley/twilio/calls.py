"""Hang-up and transfer of a Twilio call through Twilio's REST API (the agents' Hangup / Transfer).

Both are one documented request, "update a call": POST /2010-04-01/Accounts/{AccountSid}/Calls/
{CallSid}.json, form-encoded, HTTP Basic auth with the account SID and auth token; `Status=completed`
ends the call, `Twiml=<Response><Dial>NUMBER</Dial></Response>` replaces what the call is doing (our
media stream ends, and Twilio dials the number).
"""

from __future__ import annotations

import logging
from xml.sax.saxutils import escape

import httpx

from parley.settings import Settings

log = logging.getLogger(__name__)


class TwilioApiError(RuntimeError):
    """Twilio refused or did not answer a request; the message says which and why."""


class TwilioCalls:
    """A `parley.protocols.CallControl` for Twilio calls: `call_id` is the CallSid."""

    def __init__(self, account_sid: str, auth_token: str, *, api_base: str, timeout_s: float) -> None:
        self.account_sid = account_sid
        self._auth = (account_sid, auth_token)
        self._api_base = api_base.rstrip("/")
        self._timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioCalls | None:
        """None unless both the account SID and the auth token are set."""
        if not settings.twilio_calls_configured:
            return None
        assert settings.twilio_account_sid is not None and settings.twilio_auth_token is not None
        return cls(
            settings.twilio_account_sid.strip(),
            settings.twilio_auth_token.get_secret_value().strip(),
            api_base=settings.twilio_api_base,
            timeout_s=settings.twilio_api_timeout_s,
        )

    async def hang_up(self, call_id: str) -> None:
        await self._update(call_id, {"Status": "completed"}, "hang up")

    async def transfer(self, call_id: str, target: str) -> None:
        await self._update(call_id, {"Twiml": transfer_twiml(target)}, f"transfer to {target}")

    async def _update(self, call_sid: str, form: dict[str, str], what: str) -> None:
        if not call_sid.startswith("CA"):
            # The stream's start message names the call; before it (or on a test stream) there is none.
            raise TwilioApiError(f"cannot {what}: {call_sid!r} is not a Twilio CallSid")
        url = f"{self._api_base}/2010-04-01/Accounts/{self.account_sid}/Calls/{call_sid}.json"
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s) as client:
                response = await client.post(url, data=form, auth=self._auth)
        except httpx.HTTPError as exc:
            raise TwilioApiError(f"{what} ({call_sid}): Twilio did not answer: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 300:
            raise TwilioApiError(f"{what} ({call_sid}): Twilio answered {response.status_code}: {_reason(response)}")
        log.info("call %s: %s requested from Twilio", call_sid, what)


def transfer_twiml(target: str) -> str:
    """TwiML that dials `target` (a phone number, or a sip: URI)."""
    if target.lower().startswith("sip:"):
        return f"<Response><Dial><Sip>{escape(target)}</Sip></Dial></Response>"
    return f"<Response><Dial>{escape(target)}</Dial></Response>"


def _reason(response: httpx.Response) -> str:
    """Twilio's error JSON names the problem (`message`, `code`); else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "message" in body:
        return f"{body['message']} (code {body.get('code')})"
    return response.text[:200]
