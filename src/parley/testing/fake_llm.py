"""A fake OpenAI-compatible chat-completions server, for tests and benchmarks.

A real HTTP server (uvicorn on a background thread) streaming real SSE chunks, so the agent uses
the real openai SDK: what is exercised is what runs in production, minus the model. Each request
is answered by the next queued Plan (deltas with delays, tool-call deltas, error statuses, a raw
payload, a dropped connection, a stream that never ends) and recorded, including when the server
saw the client disconnect.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

import uvicorn

__all__ = ["Chunk", "FakeLlm", "Plan", "Recorded", "ServerThread", "deltas", "read_body", "tool_call"]


@dataclass
class Chunk:
    """One SSE event: a content delta (or a tool-call delta, or a raw payload) after a delay."""

    content: str | None = None
    delay: float = 0.0
    tool_call: dict[str, Any] | None = None
    raw: dict[str, Any] | None = None


@dataclass
class Plan:
    """How the server answers one request."""

    chunks: list[Chunk] = field(default_factory=list)
    status: int = 200
    header_delay: float = 0.0
    end: Literal["done", "disconnect", "hang"] = "done"
    """done: finish_reason + [DONE]; disconnect: drop the connection; hang: wait for the client."""

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if any(c.tool_call is not None for c in self.chunks) else "stop"


@dataclass
class Recorded:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]
    received_t: float
    finished_t: float | None = None  # when the last byte was written
    disconnected_t: float | None = None  # when the server saw the client go (mid-response)
    disconnected: threading.Event = field(default_factory=threading.Event)
    sent_t: list[float] = field(default_factory=list)  # when each planned chunk was written


def deltas(*texts: str, gap: float = 0.0, first_delay: float = 0.0) -> list[Chunk]:
    return [Chunk(text, first_delay if i == 0 else gap) for i, text in enumerate(texts)]


def tool_call(
    name: str,
    arguments: dict[str, Any] | str,
    *,
    index: int = 0,
    call_id: str | None = None,
    pieces: int = 2,
    delay: float = 0.0,
) -> list[Chunk]:
    """A tool call streamed as OpenAI does: id and name first, then the arguments in pieces."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    size = max(1, -(-len(text) // pieces))
    first = {
        "index": index,
        "id": call_id or f"call_{name}_{index}",
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    chunks = [Chunk(tool_call=first, delay=delay)]
    for start in range(0, len(text), size):
        chunks.append(Chunk(tool_call={"index": index, "function": {"arguments": text[start : start + size]}}))
    return chunks


class FakeLlm:
    """A raw ASGI app: POST .../chat/completions answered by queued plans, every request recorded.

    Raw ASGI rather than a framework so the test controls exactly when bytes go out and sees the
    client's disconnect (uvicorn reports it through `receive()`) the moment it happens.
    """

    def __init__(self) -> None:
        self.plans: deque[Plan] = deque()
        self.requests: list[Recorded] = []
        self.url = ""

    def reset(self) -> None:
        self.plans.clear()
        self.requests.clear()

    def queue(self, *plans: Plan) -> None:
        self.plans.extend(plans)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        record = Recorded(
            path=scope["path"],
            query=dict(parse_qsl(scope["query_string"].decode())),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=json.loads(body or b"{}"),
            received_t=time.monotonic(),
        )
        self.requests.append(record)
        if not scope["path"].endswith("/chat/completions"):
            await _send_json(send, 404, {"error": {"message": "not found", "type": "invalid_request"}})
            return
        plan = self.plans.popleft() if self.plans else Plan(deltas("Hello there."))
        watcher = asyncio.create_task(_watch_disconnect(receive, record))
        try:
            await self._answer(plan, record, send, watcher)
        finally:
            if plan.end != "hang":
                watcher.cancel()

    async def _answer(self, plan: Plan, record: Recorded, send: Any, watcher: asyncio.Task[None]) -> None:
        if not await _pause(plan.header_delay, watcher):
            return
        if plan.status != 200:
            error = {"message": f"fake status {plan.status}", "type": "server_error", "code": None}
            await _send_json(send, plan.status, {"error": error})
            record.finished_t = time.monotonic()
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        await _send_event(send, _chunk_json({"role": "assistant", "content": ""}))
        for chunk in plan.chunks:
            if not await _pause(chunk.delay, watcher):
                return
            await _send_event(send, chunk.raw if chunk.raw is not None else _chunk_json(_delta(chunk)))
            record.sent_t.append(time.monotonic())
        if plan.end == "hang":
            await watcher  # until the client goes away
        elif plan.end == "done":
            await _send_event(send, _chunk_json({}, finish_reason=plan.finish_reason))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            record.finished_t = time.monotonic()
        # "disconnect": return without finishing the response: uvicorn closes the connection.


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI HTTP request."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _watch_disconnect(receive: Any, record: Recorded) -> None:
    message = await receive()
    if message["type"] == "http.disconnect" and record.finished_t is None:
        record.disconnected_t = time.monotonic()
        record.disconnected.set()


async def _pause(delay: float, watcher: asyncio.Task[None]) -> bool:
    """Sleep unless the client disconnects first; False if it did."""
    if delay > 0:
        await asyncio.wait([watcher], timeout=delay)
    return not watcher.done()


def _delta(chunk: Chunk) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if chunk.content is not None:
        delta["content"] = chunk.content
    if chunk.tool_call is not None:
        delta["tool_calls"] = [chunk.tool_call]
    return delta


def _chunk_json(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


async def _send_event(send: Any, payload: dict[str, Any]) -> None:
    data = f"data: {json.dumps(payload)}\n\n".encode()
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ServerThread:
    """uvicorn on its own thread and loop, as parley.server.BackgroundServer runs parley."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_level="critical",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-llm", daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
