"""The FastAPI app: endpoints only. Each media WebSocket gets its own MediaHandler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import PlainTextResponse

from parley import __version__, logs
from parley.acs.config import is_loopback
from parley.engines import Engines, build_engines
from parley.media.events import CallRegistry
from parley.media.handler import MediaHandler
from parley.security import (
    AcsTokenValidator,
    JwksError,
    build_acs_validator,
    check_websocket,
)
from parley.settings import Settings

if TYPE_CHECKING:
    from parley.acs.service import CallAutomation

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, engines: Engines | None = None, *, acs_client_options: Mapping[str, Any] | None = None
) -> FastAPI:
    """The app. `acs_client_options` go to the ACS SDK client (azure-core transport options, e.g.
    `connection_verify` to trust a private CA); unused without ACS."""
    registry = CallRegistry(settings.recent_calls_kept)
    # ACS first: a configuration problem there stops startup before any model is loaded.
    validator = _acs_validator(settings)
    call_automation = _call_automation(settings, registry, acs_client_options or {})
    engines = engines if engines is not None else build_engines(settings)
    if call_automation is not None and engines.call_control is None:
        engines.call_control = call_automation  # the agents' Hangup / Transfer reach the phone call

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        app_.state.loop = asyncio.get_running_loop()  # tests and benchmarks inspect the call tasks
        if validator is not None:
            await _prefetch_signing_keys(validator)
        await asyncio.to_thread(engines.warm)
        log.info("parley %s: %s; %s", __version__, describe_agent(settings, engines), describe_engines(settings))
        monitor = asyncio.create_task(registry.stats.monitor.run(), name="loop-lag-monitor")
        yield
        monitor.cancel()
        if call_automation is not None:
            await call_automation.close()
        engines.close()

    app = FastAPI(title="parley", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engines = engines
    app.state.registry = registry
    app.state.call_automation = call_automation

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "version": __version__, "calls": registry.live_count}

    @app.get("/api/stats")
    async def stats(reset: bool = False) -> dict[str, object]:
        """Loop lag (since the last reset), CPU seconds, RSS, threads, call counters."""
        snapshot = registry.stats.snapshot(registry.live_count, reset=reset)
        snapshot["log_records_dropped"] = logs.dropped()  # the log output was not keeping up
        snapshot["pools"] = {pool.name: pool.figures() for pool in (engines.vads, engines.recognizers)}
        return snapshot

    if settings.events_api:

        @app.get("/api/calls/{call_id}/events")
        async def call_events(call_id: str) -> dict[str, object]:
            events = registry.find(call_id)
            if events is None:
                raise HTTPException(404, f"no call {call_id!r} (live or among the last ended)")
            return {"call_id": call_id, "events": events.snapshot()}

    async def media_socket(websocket: WebSocket) -> None:
        # Before accept(): a refused token closes the handshake (HTTP 403), no call is started.
        if not await check_websocket(websocket, validator):
            return
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
            call_id=call_id,
            correlation_id=correlation_id,
            caller_id=caller_id,
            settings=settings,
            engines=engines,
            registry=registry,
        )
        if call_automation is not None:  # ties the stream to the call ACS answered or placed
            call_automation.media_connected(call_id, websocket.query_params.get("callId", ""), handler.events)
        await handler.run(websocket)
        log.info("call %s ended: %s", call_id, handler.end_reason)

    # /ws is the path Microsoft's samples give ACS; /ws/acs names the transport.
    app.add_api_websocket_route("/ws/acs", media_socket)
    app.add_api_websocket_route("/ws", media_socket)
    if call_automation is not None:
        from parley.acs.routes import acs_router, redact_uvicorn_request_logs

        redact_uvicorn_request_logs()  # the webhook secret and callers' numbers travel in URLs
        app.include_router(acs_router(call_automation, settings, validator))
    # Last, so it matches only what no route above did.
    app.add_api_websocket_route("/{path:path}", _unknown_websocket_path)
    return app


async def _unknown_websocket_path(websocket: WebSocket) -> None:
    """A WebSocket to a path parley does not serve gets HTTP 404. (Starlette's fallback closes the
    handshake, which reaches the client as 403, the status of a refused ACS token.)"""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        message = f"no WebSocket endpoint at {websocket.url.path}; the media stream is at /ws/acs (or /ws)\n"
        await websocket.send_denial_response(PlainTextResponse(message, status_code=404))
    else:  # a server without the denial-response extension can only refuse
        await websocket.close()


def _acs_validator(settings: Settings) -> AcsTokenValidator | None:
    """The ACS JWT check for the media socket and Call Automation callbacks (None: off)."""
    config = settings.acs_auth_config()
    # Only an explicit `acs_auth_enabled=false` goes through build_acs_validator's warning; with
    # nothing ACS configured, checks are simply off (local development, tests, benchmarks).
    validator = build_acs_validator(config) if config.enabled or settings.acs_auth_enabled is False else None
    if validator is None and not is_loopback(settings.host):
        log.warning(
            "!!! ACS token checks are OFF while listening on %s: anyone who reaches this server can open"
            " media sessions%s. Set PARLEY_ACS_RESOURCE_ID (and keep PARLEY_ACS_AUTH_ENABLED unset)"
            " on any host reachable from outside. !!!",
            settings.host,
            " and post call events" if settings.acs_configured else "",
        )
    return validator


def _call_automation(
    settings: Settings, registry: CallRegistry, client_options: Mapping[str, Any]
) -> CallAutomation | None:
    if not settings.acs_configured:
        return None
    # Imported here: the Azure SDK loads only when ACS is on.
    from parley.acs.service import CallAutomation

    service = CallAutomation.from_settings(settings, registry, **client_options)
    if settings.acs_incoming_code is None:
        log.warning(
            "PARLEY_ACS_INCOMING_CODE is not set: anyone may post IncomingCall events to"
            " /api/acs/incoming (each costs an answer request to ACS); see docs/azure.md"
        )
    return service


async def _prefetch_signing_keys(validator: AcsTokenValidator) -> None:
    """Load ACS's signing keys before the first call. An unreachable URL is not fatal (the keys are
    fetched again when the first token arrives); a broken local file is a configuration error."""
    try:
        await validator.prefetch()
    except JwksError as exc:
        if validator.config.jwks_file is not None:
            raise RuntimeError(f"ACS signing keys: {exc} (PARLEY_ACS_AUTH_JWKS_FILE)") from exc
        log.warning("ACS signing keys not loaded at startup (%s); retrying when the first token comes", exc)


def describe_agent(settings: Settings, engines: Engines) -> str:
    if settings.engines == "plumbing":
        return "agent: a test double"
    scenario = getattr(engines.agent_factory, "__self__", None)  # a Scenario's bound `agent`
    if getattr(scenario, "uses_llm", False):
        return f"agent {settings.agent} (LLM: {settings.llm_provider} {settings.llm_model})"
    return f"agent {settings.agent}"


def describe_engines(settings: Settings) -> str:
    """The engines a call uses, for the startup log: vad silero, stt two-pass (...), tts piper (...)."""
    if settings.engines == "plumbing":
        return "engines: PLUMBING test doubles for stt, agent and tts (vad silero), never for real calls"
    whisper = f"Whisper {settings.stt_model or 'tiny.en'}"
    stt = {
        "two-pass": f"two-pass (pocketsphinx partials, {whisper} finals)",
        "pocketsphinx": "pocketsphinx",
        "whisper": f"whisper ({whisper}, no partials)",
        "azure": f"azure ({settings.azure_speech_endpoint or settings.azure_speech_region}, {settings.azure_speech_language})",
    }[settings.stt]
    voice = (
        settings.tts_voice
        or {"piper": "en_US-joe-medium", "espeak": "en-us", "azure": settings.azure_tts_voice}[settings.tts]
    )
    return f"engines: vad silero, stt {stt}, tts {settings.tts} ({voice})"


class ParleyServer(uvicorn.Server):
    """uvicorn's server, logging the media URL once it listens (the port may be chosen then)."""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit or not self.servers or not self.servers[0].sockets:
            return
        port = self.servers[0].sockets[0].getsockname()[1]
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        log.info("media WebSocket: ws://%s:%d/ws/acs (ACS streams calls here; also /ws)", host, port)


def uvicorn_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
    return ParleyServer(uvicorn_config(app, settings))


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.max_message_bytes,
        ws=settings.websocket_impl,
        lifespan="on",
        # With parley.logs set up, uvicorn's loggers go through its queue, not straight to stdout.
        log_config=None if logs.active() else uvicorn.config.LOGGING_CONFIG,
    )


class BackgroundServer:
    """A real uvicorn server on its own thread and loop (for `parley call`, tests and benchmarks)."""

    def __init__(
        self,
        settings: Settings,
        engines: Engines | None = None,
        *,
        acs_client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, engines, acs_client_options=acs_client_options)
        self._server = uvicorn_server(self.app, settings)
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
    server = uvicorn_server(create_app(settings), settings)
    await server.serve()


def run(settings: Settings) -> None:
    asyncio.run(serve_forever(settings))
