"""The FastAPI app: endpoints only. Each media WebSocket gets its own MediaHandler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException, WebSocket

from parley import __version__
from parley.engines import Engines, build_engines
from parley.media.events import CallRegistry
from parley.media.handler import MediaHandler
from parley.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, engines: Engines | None = None) -> FastAPI:
    engines = engines if engines is not None else build_engines(settings)
    registry = CallRegistry(settings.recent_calls_kept)

    @asynccontextmanager
    async def lifespan(app_: FastAPI):  # type: ignore[no-untyped-def]
        app_.state.loop = asyncio.get_running_loop()  # tests and benchmarks inspect the call tasks
        await asyncio.to_thread(engines.warm)
        monitor = asyncio.create_task(registry.stats.monitor.run(), name="loop-lag-monitor")
        yield
        monitor.cancel()
        engines.close()

    app = FastAPI(title="parley", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engines = engines
    app.state.registry = registry

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "version": __version__, "calls": registry.live_count}

    @app.get("/api/stats")
    async def stats(reset: bool = False) -> dict[str, object]:
        """Loop lag (since the last reset), CPU seconds, RSS, threads, call counters."""
        snapshot = registry.stats.snapshot(registry.live_count, reset=reset)
        snapshot["pools"] = {
            pool.name: {"created": pool.created, "idle": pool.idle, "in_use": pool.in_use}
            for pool in (engines.vads, engines.recognizers)
        }
        return snapshot

    if settings.events_api:

        @app.get("/api/calls/{call_id}/events")
        async def call_events(call_id: str) -> dict[str, object]:
            events = registry.find(call_id)
            if events is None:
                raise HTTPException(404, f"no call {call_id!r} (live or among the last ended)")
            return {"call_id": call_id, "events": events.snapshot()}

    async def media_socket(websocket: WebSocket) -> None:
        call_id = (
            websocket.headers.get("x-ms-call-connection-id")
            or websocket.query_params.get("callId")
            or f"local-{uuid.uuid4()}"
        )
        correlation_id = websocket.headers.get("x-ms-call-correlation-id", "")
        # Who is calling is not part of ACS media streaming: whoever answered the call (Call
        # Automation, a test caller) may pass it in the URL for the agents' prompts.
        caller_id = websocket.query_params.get("callerId", "")[:64]
        await websocket.accept()
        log.info("call %s connected (correlation %s)", call_id, correlation_id or "-")
        handler = MediaHandler(
            call_id=call_id, correlation_id=correlation_id, caller_id=caller_id, settings=settings,
            engines=engines, registry=registry,
        )
        await handler.run(websocket)
        log.info("call %s ended: %s", call_id, handler.end_reason)

    # /ws is the path Microsoft's samples give ACS; /ws/acs names the transport.
    app.add_api_websocket_route("/ws/acs", media_socket)
    app.add_api_websocket_route("/ws", media_socket)
    return app


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.max_message_bytes,
        ws=settings.websocket_impl,
        lifespan="on",
    )


class BackgroundServer:
    """A real uvicorn server on its own thread and loop (for `parley call`, tests and benchmarks)."""

    def __init__(self, settings: Settings, engines: Engines | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, engines)
        config = uvicorn_config(self.app, settings)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.run, name="parley-server", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.port}/ws/acs"

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def registry(self) -> CallRegistry:
        return self.app.state.registry

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the parley server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


async def serve_forever(settings: Settings) -> None:
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    await server.serve()


def run(settings: Settings) -> None:
    asyncio.run(serve_forever(settings))
