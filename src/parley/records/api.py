"""The records routes: `GET /api/calls`, `GET /api/calls/{call_id}/events` (paginated) and
`GET /api/calls/{call_id}/turns` (the turn rows with their latency figures).

Both read the store on a worker thread (after a `sync`, so a live call's events so far are there)
and encode the JSON there too: a long call costs the event loop nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Query
from fastapi.params import Depends
from fastapi.responses import Response

from parley.figures import CallFigures
from parley.records.store import CallStore, RecordsUnavailable

DEFAULT_EVENTS_PAGE = 1000
MAX_EVENTS_PAGE = 10_000
T = TypeVar("T")

SYNC_TIMEOUT_S = 1.0  # wait at most this long for queued records before reading


def records_router(store: CallStore, *, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """The routes, each behind `dependencies` (e.g. the API token check)."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/api/calls")
    async def list_calls(limit: int = Query(50, ge=1, le=1000)) -> Response:
        """Recent calls, newest first (live ones too: `live` true, no `ended`)."""

        def read() -> bytes:
            store.sync(SYNC_TIMEOUT_S)
            return _json({"calls": [call.to_dict() for call in store.calls(limit)]})

        return _response(await _reading(read))

    @router.get("/api/calls/{call_id}/events")
    async def call_events(
        call_id: str,
        after: int = Query(0, ge=0, description="Only events with a larger seq."),
        limit: int = Query(DEFAULT_EVENTS_PAGE, ge=1, le=MAX_EVENTS_PAGE),
    ) -> Response:
        """A call's events in order, each with its `seq`. `next_after` is the `after` of the next
        page, null when this page holds the last events recorded so far (a live call records more:
        ask again with `after` = `last_seq`)."""

        def read() -> bytes | None:
            store.sync(SYNC_TIMEOUT_S)
            call = store.call(call_id)
            if call is None:
                return None
            events = store.events(call_id, after, limit + 1)
            more = len(events) > limit
            events = events[:limit]
            last = events[-1]["seq"] if events else after
            body = {
                "call_id": call_id,
                "live": call.live,
                "events": events,
                "last_seq": last,
                "next_after": last if more else None,
            }
            return _json(body)

        body = await _reading(read)
        if body is None:
            raise HTTPException(404, f"no call {call_id!r} in the call records")
        return _response(body)

    @router.get("/api/calls/{call_id}/turns")
    async def call_turns(call_id: str) -> Response:
        """The call's turn rows (as `parley calls show` prints them), each with `figures`: its
        latencies in ms (voice_to_voice, bargein_onset_to_stop, ...) as the metrics measure them."""

        def read() -> bytes | None:
            store.sync(SYNC_TIMEOUT_S)
            call = store.call(call_id)
            if call is None:
                return None
            figures = turn_figures(store.events(call_id))
            turns = [turn.to_dict() | {"figures": figures.get(turn.turn_id, {})} for turn in store.turns(call_id)]
            return _json({"call_id": call_id, "live": call.live, "turns": turns})

        body = await _reading(read)
        if body is None:
            raise HTTPException(404, f"no call {call_id!r} in the call records")
        return _response(body)

    return router


def turn_figures(events: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Turn id -> {figure name: ms} from a call's events, by the code the metrics and traces use
    (parley.figures), so the console shows the figures the histograms hold. A figure a turn has
    twice (two barge-ins) keeps the first."""
    figures = CallFigures()
    by_turn: dict[int, dict[str, float]] = {}
    for record in events:
        if not isinstance(record.get("t"), (int, float)) or not isinstance(record.get("event"), str):
            continue  # not an event the figures can place (a hand-made record in a test store)
        for figure in figures.feed(record):
            if figure.turn_id is not None:
                by_turn.setdefault(figure.turn_id, {}).setdefault(figure.name, round(figure.seconds * 1000, 1))
    return by_turn


async def _reading(read: Callable[[], T]) -> T:
    """`read` on a worker thread; a store that cannot be read now (Redis down) answers 503."""
    try:
        return await asyncio.to_thread(read)
    except RecordsUnavailable as exc:
        raise HTTPException(503, str(exc)) from exc


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, default=str, ensure_ascii=False).encode()


def _response(body: bytes) -> Response:
    return Response(content=body, media_type="application/json")
