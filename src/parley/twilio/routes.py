"""POST /api/twilio/voice: Twilio's incoming-call webhook, answered with TwiML that connects the
call's audio to /ws/twilio (`<Connect><Stream>`), passing the agent and the numbers along as
`<Parameter>`s (they come back in the stream's `start` message)."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl
from xml.sax.saxutils import quoteattr

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from parley.security.twilio_auth import TwilioGuard, public_url, stream_url
from parley.settings import Settings

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 64 * 1024  # Twilio's voice webhook is a few hundred bytes of form fields


def twiml_connect(url: str, parameters: dict[str, str]) -> str:
    """The TwiML answer: stream the call to `url` with `parameters` (empty values are left out)."""
    params = "".join(
        f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>" for name, value in parameters.items() if value
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect><Stream url={quoteattr(url)}>{params}</Stream></Connect></Response>"
    )


def twilio_router(settings: Settings, guard: TwilioGuard) -> APIRouter:
    router = APIRouter()

    @router.post("/api/twilio/voice")
    async def voice(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            return PlainTextResponse("request too large\n", status_code=413)
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
        except (UnicodeDecodeError, ValueError):
            return PlainTextResponse("not a form-encoded body\n", status_code=400)
        host = request.headers.get("host", "")
        signed_url = public_url(settings, request.url.path, request.url.query, request.url.scheme, host)
        refusal = guard.refusal(signed_url, form, request.headers)
        if refusal is not None:
            client = request.client.host if request.client else "-"
            log.warning("Twilio voice webhook from %s refused: %s", client, refusal)
            return PlainTextResponse("forbidden\n", status_code=403)
        fields = dict(form)
        called = fields.get("To", "")
        agent = settings.agent_for_number(called) if called else None
        parameters = {"agent": agent or "", "to": called, "from": fields.get("From", "")}
        log.info(
            "Twilio call %s: answered with a media stream (agent %s)", fields.get("CallSid", "-"), agent or "default"
        )
        twiml = twiml_connect(stream_url(settings, request.url.scheme, host), parameters)
        return Response(twiml, media_type="text/xml")

    return router
