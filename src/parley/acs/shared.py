"""The ACS call book shared by many instances (parley.cluster implements it on Redis).

One instance answers a call (its Event Grid webhook), another gets its media socket, a third its
Call Automation callbacks: each keeps its own `CallBook`, and this is where they meet. Without a
shared book (one process) nothing here is used.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal, Protocol

from parley.acs.webhooks import CallbackEvent

Delivery = Literal["local", "forwarded", "held"]


class SharedCalls(Protocol):
    """What CallAutomation needs of the shared book. Every method is bounded in time and never
    raises for an unreachable store: a lookup then finds nothing, a write is skipped (logged)."""

    async def save(self, fields: dict[str, str]) -> None:
        """Write a call's fields (`call_fields`), under its key and its call connection id."""

    async def load(self, call_id: str) -> dict[str, str] | None:
        """The fields of the call whose key or call connection id this is (None: unknown)."""

    async def drop(self, key: str, connection_id: str | None) -> None:
        """Forget a call (its answer failed)."""

    async def deliver(self, key: str, event: CallbackEvent) -> Delivery:
        """Send a callback to the instance holding the call's media socket: `local` (this one:
        apply it here), `forwarded` (another one got it), `held` (no media socket yet: the instance
        that gets it takes the event with the socket)."""


def call_fields(call: Any) -> dict[str, str]:
    """An AcsCall as flat strings (a Redis hash)."""
    return {
        "key": call.key,
        "direction": call.direction,
        "party": call.party,
        "correlation_id": call.correlation_id,
        "connection_id": call.connection_id or "",
        "disconnected": "1" if call.disconnected else "",
    }


def event_fields(event: CallbackEvent) -> dict[str, Any]:
    return asdict(event)


def event_from_fields(fields: dict[str, Any]) -> CallbackEvent:
    """A callback event sent by another instance (ValueError if it is not one)."""
    try:
        return CallbackEvent(
            type=str(fields["type"]),
            call_connection_id=str(fields.get("call_connection_id", "")),
            server_call_id=str(fields.get("server_call_id", "")),
            correlation_id=str(fields.get("correlation_id", "")),
            operation_context=str(fields.get("operation_context", "")),
            details=dict(fields.get("details") or {}),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a callback event: {exc}") from exc


__all__ = ["Delivery", "SharedCalls", "call_fields", "event_fields", "event_from_fields"]
