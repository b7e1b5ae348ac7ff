"""What ACS posts to us, parsed and checked; no I/O.

- Event Grid webhook (`/api/acs/incoming`): a JSON array of Event Grid events (or CloudEvents, if
  the subscription uses that schema): `SubscriptionValidationEvent` first, then `IncomingCall`.
- Call Automation callbacks (`/api/acs/callbacks/...`): a JSON array of CloudEvents about one call
  (`Microsoft.Communication.CallConnected`, `MediaStreamingStarted`, ...).

A batch is checked whole before anything acts on it: one malformed element makes the whole body a
`MalformedEvents` (HTTP 400), so a half-understood batch is never half answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
INCOMING_CALL_EVENT = "Microsoft.Communication.IncomingCall"
ACS_EVENT_PREFIX = "Microsoft.Communication."

MAX_EVENTS = 500  # Event Grid batches are bounded by size (1 MB) too; this bounds the work per POST
_MAX_TEXT = 256  # longest free text (ids, display names, messages) kept from an event


class MalformedEvents(ValueError):
    """The body is not what Event Grid / Call Automation sends; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class SubscriptionValidation:
    event_id: str
    validation_code: str


@dataclass(frozen=True, slots=True)
class IncomingCall:
    event_id: str
    incoming_call_context: str
    caller: str  # phone number (E.164) or raw id of who is calling; "" if ACS did not say
    callee: str  # the number (or user) that was called
    correlation_id: str = ""
    server_call_id: str = ""


@dataclass(frozen=True, slots=True)
class IgnoredEvent:
    """Another event type on the subscription (say, SMS received): acknowledged, not acted on."""

    event_id: str
    event_type: str


GridEvent = SubscriptionValidation | IncomingCall | IgnoredEvent


@dataclass(frozen=True, slots=True)
class CallbackEvent:
    """One Call Automation callback, reduced to what is worth logging and recording."""

    type: str  # without the `Microsoft.Communication.` prefix: CallConnected, PlayCompleted, ...
    call_connection_id: str
    server_call_id: str = ""
    correlation_id: str = ""
    operation_context: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The fields of the call's `acs_event` event."""
        fields: dict[str, Any] = {"type": self.type, "call_connection_id": self.call_connection_id}
        if self.operation_context:
            fields["operation_context"] = self.operation_context
        return fields | self.details


# --- Event Grid ---------------------------------------------------------------------------------


def parse_event_grid(body: object) -> list[GridEvent]:
    """The events of an Event Grid webhook POST (array or single object), or MalformedEvents."""
    return [_grid_event(item, index) for index, item in enumerate(_as_batch(body))]


def _as_batch(body: object) -> list[object]:
    items = body if isinstance(body, list) else [body] if isinstance(body, dict) else None
    if items is None:
        raise MalformedEvents(f"expected a JSON array of events, got {_json_type(body)}")
    if not items:
        raise MalformedEvents("empty event array")
    if len(items) > MAX_EVENTS:
        raise MalformedEvents(f"{len(items)} events in one batch (at most {MAX_EVENTS})")
    return items


def _event_object(item: object, where: str, type_keys: tuple[str, str]) -> tuple[dict[str, Any], str]:
    """An event as a JSON object and its type, read from the first of `type_keys` present (the
    Event Grid schema says `eventType`, the CloudEvents schema `type`)."""
    if not isinstance(item, dict):
        raise MalformedEvents(f"{where}: expected an object, got {_json_type(item)}")
    event_type = item.get(type_keys[0], item.get(type_keys[1]))
    if not isinstance(event_type, str) or not event_type:
        raise MalformedEvents(f"{where}: no {type_keys[0]}")
    return item, event_type


def _grid_event(item: object, index: int) -> GridEvent:
    where = f"event {index}"
    item, event_type = _event_object(item, where, ("eventType", "type"))
    event_id = _text(item.get("id"))
    if event_type == VALIDATION_EVENT:
        data = _data(item, where)
        return SubscriptionValidation(event_id, _required_text(data, "validationCode", where))
    if event_type == INCOMING_CALL_EVENT:
        return _incoming_call(event_id, _data(item, where), where)
    return IgnoredEvent(event_id, event_type[:_MAX_TEXT])


def _incoming_call(event_id: str, data: dict[str, Any], where: str) -> IncomingCall:
    # The context is an opaque token (a JWT today) of a few KB; it is passed back to ACS untouched.
    context = data.get("incomingCallContext")
    if not isinstance(context, str) or not context.strip():
        raise MalformedEvents(f"{where}: IncomingCall without incomingCallContext")
    if len(context) > 64 * 1024:
        raise MalformedEvents(f"{where}: incomingCallContext is {len(context)} characters")
    return IncomingCall(
        event_id=event_id,
        incoming_call_context=context,
        caller=identifier_text(data.get("from")),
        callee=identifier_text(data.get("to")),
        correlation_id=_text(data.get("correlationId")),
        server_call_id=_text(data.get("serverCallId"), limit=4096),
    )


def identifier_text(identifier: object) -> str:
    """A communication identifier as one string: the E.164 number for phones, the raw id otherwise.

    `{"kind": "phoneNumber", "rawId": "4:+15551234567", "phoneNumber": {"value": "+15551234567"}}`
    gives "+15551234567"; `{"kind": "communicationUser", "rawId": "8:acs:...", ...}` gives "8:acs:...".
    """
    if not isinstance(identifier, dict):
        return ""
    phone = identifier.get("phoneNumber")
    if isinstance(phone, dict) and isinstance(phone.get("value"), str):
        return _text(phone["value"])
    user = identifier.get("communicationUser")
    if isinstance(user, dict) and isinstance(user.get("id"), str):
        return _text(user["id"])
    return _text(identifier.get("rawId"))


# --- Call Automation callbacks ------------------------------------------------------------------


def parse_callbacks(body: object) -> list[CallbackEvent]:
    """The events of a callback POST (CloudEvents array or single object), or MalformedEvents."""
    return [_callback_event(item, index) for index, item in enumerate(_as_batch(body))]


def _callback_event(item: object, index: int) -> CallbackEvent:
    where = f"event {index}"
    item, event_type = _event_object(item, where, ("type", "eventType"))
    data = _data(item, where)
    return CallbackEvent(
        type=event_type.removeprefix(ACS_EVENT_PREFIX)[:_MAX_TEXT],
        call_connection_id=_text(data.get("callConnectionId")),
        server_call_id=_text(data.get("serverCallId"), limit=4096),
        correlation_id=_text(data.get("correlationId")),
        operation_context=_text(data.get("operationContext")),
        details=_details(data),
    )


def _details(data: dict[str, Any]) -> dict[str, Any]:
    """The parts of a callback that explain what happened: a result code and message, a media
    streaming status, how many participants there are. Not the participants' identities."""
    details: dict[str, Any] = {}
    result = data.get("resultInformation")
    if isinstance(result, dict):
        details["result"] = {
            name: value if isinstance(value, int) else _text(value)
            for name, value in result.items()
            if name in ("code", "subCode", "message")
        }
    streaming = data.get("mediaStreamingUpdate")
    if isinstance(streaming, dict):
        details["media_streaming"] = {
            name: _text(value)
            for name, value in streaming.items()
            if name in ("contentType", "mediaStreamingStatus", "mediaStreamingStatusDetails")
        }
    participants = data.get("participants")
    if isinstance(participants, list):
        details["participants"] = len(participants)
    return details


# --- helpers ------------------------------------------------------------------------------------


def _data(item: dict[str, Any], where: str) -> dict[str, Any]:
    data = item.get("data")
    if not isinstance(data, dict):
        raise MalformedEvents(f"{where}: `data` must be an object, got {_json_type(data)}")
    return data


def _required_text(data: dict[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedEvents(f"{where}: no {name}")
    return value[:_MAX_TEXT]


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
