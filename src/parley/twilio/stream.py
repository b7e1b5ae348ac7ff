"""What /ws/twilio adds to the shared media path: Twilio's signature on the upgrade, and call
control through Twilio's REST API for the call the stream carries."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import WebSocket

from parley.media.handler import MediaHandler
from parley.security.access import refuse_websocket
from parley.security.twilio_auth import TwilioGuard, public_url
from parley.settings import Settings
from parley.twilio.calls import TwilioCalls

log = logging.getLogger(__name__)


def socket_authenticator(settings: Settings, guard: TwilioGuard) -> Callable[[WebSocket], Awaitable[bool]]:
    """Before accept(): Twilio signs the upgrade (a GET: the wss:// URL alone). A bad or missing
    signature is refused with HTTP 403, so an unauthenticated peer never gets a call."""

    async def authenticate(websocket: WebSocket) -> bool:
        url = public_url(
            settings, websocket.url.path, websocket.url.query, websocket.url.scheme, websocket.headers.get("host", "")
        )
        refusal = guard.refusal(url, (), websocket.headers)
        if refusal is None:
            return True
        client = websocket.client.host if websocket.client else "-"
        log.warning("Twilio media WebSocket from %s refused: %s", client, refusal)
        await refuse_websocket(websocket, 403, "forbidden\n")
        return False

    return authenticate


def call_control_attacher(calls: TwilioCalls | None) -> Callable[[MediaHandler, WebSocket], None]:
    """A Twilio call's hang-up and transfer go to Twilio (never to ACS Call Automation, which may
    serve other calls on this server). Without REST credentials there is none: a hang-up closes the
    stream, which ends a `<Connect><Stream>` call; a transfer ends the call, saying why."""

    def attach(handler: MediaHandler, _websocket: WebSocket) -> None:
        handler.call_control = calls

    return attach
