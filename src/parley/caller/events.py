"""The server's event log for a call, fetched over HTTP after the call."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from parley.caller.metrics import _ms

EVENTS_TIMEOUT_S: Final = 5.0
"""Timeout for fetching the server's event log."""


def events_url(ws_url: str, call_id: str) -> str:
    """http(s)://host:port/api/calls/{call_id}/events for a ws(s):// media-streaming URL."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme in ("wss", "https") else "http"
    path = f"/api/calls/{quote(call_id, safe='')}/events"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


async def fetch_events(
    ws_url: str, call_id: str, settle_s: float = 2.0, api_token: str | None = None
) -> list[dict[str, Any]]:
    """The server's event log for the call; raises on any failure (the caller records it).
    `api_token`: the server's PARLEY_API_TOKEN, sent as a bearer token (needed off loopback).

    The server finishes a call (and logs `call_ended`) just after the socket closes, so poll
    briefly until that last event is there: a report should hold the whole call.
    """
    url = events_url(ws_url, call_id)
    # Plain http needs no TLS context; building one loads the CA bundle (~50 ms of CPU per call).
    verify = url.startswith("https:")
    deadline = time.monotonic() + settle_s
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else None
    async with httpx.AsyncClient(timeout=EVENTS_TIMEOUT_S, verify=verify, headers=headers) as client:
        while True:
            events = await _all_pages(client, url)
            ended = any(isinstance(e, dict) and e.get("event") == "call_ended" for e in events)
            if ended or time.monotonic() >= deadline:
                return [e for e in events if isinstance(e, dict)]
            await asyncio.sleep(0.05)


async def _all_pages(client: httpx.AsyncClient, url: str) -> list[Any]:
    """Every event of the call: the API gives them a page at a time (`next_after`: there are more)."""
    events: list[Any] = []
    params: dict[str, int] = {}
    while True:
        response = await client.get(url, params=params)
        response.raise_for_status()
        body = response.json()
        page = body.get("events") if isinstance(body, dict) else None
        if not isinstance(page, list):
            raise ValueError("events response has no 'events' list")
        events.extend(page)
        next_after = body.get("next_after")
        if not isinstance(next_after, int) or not page:
            return events
        params = {"after": next_after}


def _valid_events(raw: list[dict[str, Any]], t0: float, errors: list[str]) -> list[dict[str, Any]]:
    """Events with a numeric `t` and a name, sorted by time, with `t_ms` relative to call start."""
    events = []
    for event in raw:
        t = event.get("t")
        if not isinstance(event.get("event"), str) or not isinstance(t, (int, float)):
            errors.append(f"server event without name or time ignored: {event!r}"[:200])
            continue
        events.append({**event, "t_ms": _ms(t - t0)})
    return sorted(events, key=lambda e: e["t"])
