"""`GET /api/calls/live`: the calls this server is serving now, with what each is doing.

The call records (`GET /api/calls`) say which calls are live; this says how each one is going, from
the live sessions themselves (the registry): the state of its turn (listening, thinking, speaking,
interrupted), how long it has lasted, its agent and (masked) caller. It holds no transcript, so it is
served with `PARLEY_EVENTS_API` off too, saying so (`events_api: false`): the calls console
(`/calls`) then shows the live calls and explains why it has no history or timelines.

It reads the sessions on the event loop (their state belongs to it): a few attribute reads per call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.params import Depends

from parley.acs.config import is_e164
from parley.media.events import CallRegistry
from parley.records.store import iso

MASK = "•"
_SHOWN_ID_CHARS = 12  # of a caller id that is not a phone number (an ACS user id)


def masked_caller(caller: str) -> str:
    """A caller's number as the console shows it: `+15551234567` -> `+15•••••••67` (the country
    code and the last two digits, the length kept, as the records mask keyed digits); another id
    (an ACS user) cut to its first characters; "" when the transport did not say."""
    if not caller:
        return ""
    if is_e164(caller) and len(caller) > 6:
        return caller[:3] + MASK * (len(caller) - 5) + caller[-2:]
    return caller[:_SHOWN_ID_CHARS] + ("…" if len(caller) > _SHOWN_ID_CHARS else "")


def call_state(session: Any) -> tuple[str, int | None]:
    """What a live call is doing, and the id of its turn under way (None: no turn).

    connecting: no audio yet; listening: no turn under way; thinking: a turn whose audio has not
    started; speaking: its audio is playing; interrupted: the caller talked over it and the server
    waits to know whether that was a barge-in (paused or held); stopping: barged in, being cut."""
    deadlines = getattr(session, "deadlines", None)
    if deadlines is not None and not deadlines.media_started:
        return "connecting", None
    route = getattr(session, "route", None)
    turn = getattr(route, "current", None)
    if turn is None:
        return "listening", None
    if turn.cancelled:
        return "stopping", turn.id
    if turn.interruption_pending:
        return "interrupted", turn.id
    player = getattr(session, "player", None)
    track = player.track_of(turn.id) if player is not None else None
    if track is not None and track.start_t is not None:
        return "speaking", turn.id
    return "thinking", turn.id


def live_call(session: Any, agent: str, now: float, wall_now: float) -> dict[str, Any]:
    """One live call as `GET /api/calls/live` lists it (`now`: time.monotonic(), `wall_now`: time.time())."""
    state, turn_id = call_state(session)
    deadlines = getattr(session, "deadlines", None)
    duration = max(0.0, now - deadlines.started_t) if deadlines is not None else None
    return {
        "call_id": session.call_id,
        "correlation_id": str(getattr(session, "correlation_id", "") or ""),
        "agent": str(getattr(session, "agent_name", "") or agent),
        "caller": masked_caller(str(getattr(session, "caller_id", "") or "")),
        "state": state,
        "turn_id": turn_id,
        "duration_s": None if duration is None else round(duration, 1),
        "started": None if duration is None else iso(wall_now - duration),
    }


def live_calls_router(registry: CallRegistry, *, events_api: bool, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """The route, behind `dependencies` (the API token check). `events_api`: PARLEY_EVENTS_API, which
    the console reads here to know whether the records routes are served."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/api/calls/live")
    async def live_calls() -> dict[str, Any]:
        """This server's calls in progress, the newest first."""
        now, wall_now = time.monotonic(), time.time()
        calls = [live_call(session, registry.agent, now, wall_now) for session in registry.live_sessions()]
        calls.sort(key=lambda call: call["duration_s"] or 0.0)
        return {"events_api": events_api, "calls": calls}

    return router
