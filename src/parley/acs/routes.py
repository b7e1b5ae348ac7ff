"""HTTP endpoints of ACS Call Automation, mounted by the server when ACS is configured.

| route | who calls it | protected by |
|---|---|---|
| `OPTIONS/POST /api/acs/incoming` | Event Grid (SubscriptionValidation, IncomingCall) | optional shared secret `?code=` / `x-parley-code` (Event Grid sends no ACS JWT) |
| `POST /api/acs/callbacks/{call}` | Call Automation (CallConnected, ...) | ACS JWT (`Authorization: Bearer`) |
| `POST /api/calls` | an operator placing an outbound call | `Authorization: Bearer <acs_outbound_token>`; refused when none is set |
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_validator

from parley.acs import config as acs_config
from parley.acs.service import (
    CallAutomation,
    CallAutomationError,
    OutboundCallRefused,
    mask_party,
)
from parley.acs.webhooks import (
    IgnoredEvent,
    IncomingCall,
    MalformedEvents,
    SubscriptionValidation,
    parse_callbacks,
    parse_event_grid,
)
from parley.security import AcsTokenValidator, Claims, acs_auth_dependency
from parley.settings import Settings

log = logging.getLogger(__name__)

_Event = TypeVar("_Event")

MAX_BODY_BYTES = 1024 * 1024  # Event Grid's own limit for one delivery
SEEN_EVENTS_KEPT = 1024
# Query values that must not reach the logs: the webhook secret, and callers' phone numbers (in
# the media URL ACS dials).
_PRIVATE_QUERY_VALUE = re.compile(r"([?&](?:code|callerId)=)[^&\s\"]*")


class OutboundCallRequest(BaseModel):
    """Body of `POST /api/calls`."""

    model_config = ConfigDict(extra="forbid")

    target: str  # E.164 phone number (+15551234567) or ACS user id (8:acs:...)
    source_caller_id: str | None = None  # E.164; default: PARLEY_ACS_SOURCE_CALLER_ID

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return acs_config.parse_target(value).value  # AcsConfigError is a ValueError: a field error

    @field_validator("source_caller_id")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is not None and not acs_config.is_e164(value):
            raise ValueError(f"{value[:40]!r} is not an E.164 phone number (e.g. +15551234567)")
        return value


class SeenEvents:
    """Event ids already handled: Event Grid delivers at least once, a call must be answered once."""

    def __init__(self, capacity: int = SEEN_EVENTS_KEPT) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def first_time(self, event_id: str) -> bool:
        if not event_id:
            return True  # nothing to recognise it by
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


def acs_router(service: CallAutomation, settings: Settings, validator: AcsTokenValidator | None) -> APIRouter:
    router = APIRouter()
    seen = SeenEvents()

    @router.options("/api/acs/incoming")
    async def cloud_events_handshake(request: Request) -> Response:
        """CloudEvents-schema subscriptions ask first whether we accept their deliveries."""
        check_webhook_code(request, settings.acs_incoming_code)
        origin = request.headers.get("webhook-request-origin", "")
        if not origin:
            raise HTTPException(400, "missing WebHook-Request-Origin")
        return Response(headers={"WebHook-Allowed-Origin": origin[:256], "WebHook-Allowed-Rate": "*"})

    @router.post("/api/acs/incoming")
    async def incoming_events(request: Request) -> dict[str, Any]:
        check_webhook_code(request, settings.acs_incoming_code)
        events = _parsed(parse_event_grid, await read_json(request), request)
        validation = next((e for e in events if isinstance(e, SubscriptionValidation)), None)
        if validation is not None:
            log.info("Event Grid subscription validated (event %s)", validation.event_id or "-")
            return {"validationResponse": validation.validation_code}
        calls = [e for e in events if isinstance(e, IncomingCall) and seen.first_time(e.event_id)]
        answered, failed = await _answer_all(service, calls)
        ignored = [e.event_type for e in events if isinstance(e, IgnoredEvent)]
        if ignored:
            log.info("Event Grid: ignored %d event(s) of other types: %s", len(ignored), sorted(set(ignored)))
        # 200 even when an answer failed: a redelivery would come after the caller gave up, and the
        # SDK already retried what was worth retrying.
        return {"answered": answered, "failed": failed, "ignored": len(ignored)}

    @router.post("/api/acs/callbacks/{call_key}")
    async def call_events(
        # A default value, not Annotated[...]: see acs_auth_dependency.
        call_key: str,
        request: Request,
        claims: Claims = Depends(acs_auth_dependency(validator)),
    ) -> dict[str, Any]:
        received_t = time.monotonic()
        events = _parsed(parse_callbacks, await read_json(request), request)
        recorded = 0
        for event in events:  # one at a time: with many instances each may be sent to another one
            recorded += await service.deliver_callback(call_key, event, received_t)
        return {"received": len(events), "recorded": recorded}

    @router.post("/api/calls", status_code=201)
    async def place_call(request: Request) -> dict[str, Any]:
        check_outbound_token(request, settings.acs_outbound_token)
        order = _outbound_order(await read_json(request))
        try:
            call = await service.place_call(acs_config.parse_target(order.target), order.source_caller_id)
        except OutboundCallRefused as exc:
            raise HTTPException(400, str(exc)) from None
        except CallAutomationError as exc:
            log.error("outbound call to %s failed: %s", mask_party(order.target), exc)
            raise HTTPException(502, str(exc)) from None
        return {"call_id": call.key, "call_connection_id": call.connection_id, "target": order.target}

    return router


async def _answer_all(
    service: CallAutomation, calls: list[IncomingCall]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Answer every call of a batch at once (each answer is a round trip to ACS)."""
    results = await asyncio.gather(*(service.answer(call) for call in calls), return_exceptions=True)
    answered: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for incoming, result in zip(calls, results, strict=True):
        if isinstance(result, CallAutomationError):
            log.error("could not answer the call from %s: %s", mask_party(incoming.caller), result)
            failed.append({"event_id": incoming.event_id, "error": str(result)})
        elif isinstance(result, BaseException):
            raise result  # a bug of ours, not ACS's answer: let the server log it as one
        else:
            answered.append(
                {"event_id": incoming.event_id, "call_id": result.key, "call_connection_id": result.connection_id}
            )
    return answered, failed


def _parsed(parse: Callable[[object], list[_Event]], body: object, request: Request) -> list[_Event]:
    try:
        return parse(body)
    except MalformedEvents as exc:
        log.error("%s %s from %s: malformed events: %s", request.method, request.url.path, _peer(request), exc)
        raise HTTPException(400, f"malformed events: {exc}") from None


def _outbound_order(body: object) -> OutboundCallRequest:
    try:
        return OutboundCallRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise HTTPException(400, f"bad call request: {problems}") from None


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> object:
    """The request's JSON body, read at most `limit` bytes far; HTTP 400 / 413 otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        log.error(
            "%s %s from %s: the body is not JSON (%d bytes)", request.method, request.url.path, _peer(request), size
        )
        raise HTTPException(400, "the body is not JSON") from None


def check_webhook_code(request: Request, expected: SecretStr | None) -> None:
    """The shared secret of the Event Grid subscription (`?code=` or `x-parley-code`), if one is set."""
    if expected is None:
        return
    presented = request.query_params.get("code") or request.headers.get("x-parley-code") or ""
    if not _same_secret(presented, expected):
        log.warning("%s %s from %s refused: missing or wrong code", request.method, request.url.path, _peer(request))
        raise HTTPException(401, "unauthorized")


def check_outbound_token(request: Request, expected: SecretStr | None) -> None:
    """Placing calls costs money: only with the configured bearer token, never without one."""
    if expected is None:
        raise HTTPException(
            403, "outbound calls are off: set PARLEY_ACS_OUTBOUND_TOKEN and send it as Authorization: Bearer <token>"
        )
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not _same_secret(token.strip(), expected):
        log.warning("POST /api/calls from %s refused: missing or wrong token", _peer(request))
        raise HTTPException(401, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="parley"'})


class RedactPrivateQueryValues(logging.Filter):
    """Masks `code=` and `callerId=` values in uvicorn's request lines ("POST /path?query" in the
    access log, "WebSocket /path?query" in the error log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, str) and "=" in arg for arg in record.args):
            record.args = tuple(
                _PRIVATE_QUERY_VALUE.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def redact_uvicorn_request_logs() -> None:
    """Install the filter on uvicorn's loggers, once per process (it survives uvicorn's dictConfig)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactPrivateQueryValues) for existing in logger.filters):
            logger.addFilter(RedactPrivateQueryValues())


def _same_secret(presented: str, expected: SecretStr) -> bool:
    # Constant time, so the secret cannot be guessed from response times.
    return hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown peer"


__all__ = [
    "OutboundCallRequest",
    "RedactPrivateQueryValues",
    "SeenEvents",
    "acs_router",
    "read_json",
    "redact_uvicorn_request_logs",
]
