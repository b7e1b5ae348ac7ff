"""The FastAPI app: endpoints only. Each media WebSocket gets its own MediaHandler."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import Depends, FastAPI, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse

from parley import __version__, logs
from parley.acs.config import is_loopback
from parley.admission import (
    AdmissionController,
    LoadReading,
    OverloadLimits,
    Refusal,
    effective_max_calls,
    executor_queues,
    worst_backlog,
)
from parley.engines import Engines, build_engines
from parley.media.events import CallRegistry
from parley.media.handler import MediaHandler
from parley.metrics import Metrics, metrics_router
from parley.records import build_store
from parley.records.api import records_router
from parley.records.live import live_calls_router
from parley.security import (
    AcsTokenValidator,
    JwksError,
    build_acs_validator,
    check_websocket,
)
from parley.security.access import api_access, browser_media_refusal, check_media_access, configured_token
from parley.security.twilio_auth import TwilioGuard
from parley.settings import Settings
from parley.tracing import tracer_from_env
from parley.transports.browser import SUBPROTOCOL as BROWSER_SUBPROTOCOL
from parley.transports.browser import BrowserWire
from parley.transports.twilio_wire import TwilioWire
from parley.transports.wire import AcsWire, MediaWire
from parley.twilio.calls import TwilioCalls
from parley.twilio.routes import twilio_router
from parley.twilio.stream import call_control_attacher, socket_authenticator
from parley.web import web_router
from parley.web.channel import forward_events

if TYPE_CHECKING:
    from parley.acs.service import CallAutomation
    from parley.cluster import Cluster
    from parley.records.store import CallStore
    from parley.stats import WorkerStatsBoard

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 10  # uvicorn's wait for open connections once it shuts down


@dataclass(frozen=True)
class MediaChannel:
    """A media WebSocket route: its wire (one per call, from the socket) and what it adds to a call.
    `access`: the channel's own access rule (a refusal's reason, or None), in place of ACS's token and
    call checks; `subprotocol`: accepted when the client offers it (a browser insists on one)."""

    name: str
    wire: Callable[[WebSocket], MediaWire]
    attach: Callable[[MediaHandler, WebSocket], None] | None = None
    # A channel with its own credentials (Twilio's signature): replaces the ACS token and call
    # checks; False once it has refused the upgrade.
    authenticate: Callable[[WebSocket], Awaitable[bool]] | None = None
    # A channel with its own access rule (the browser's, docs/web.md): replaces the ACS checks.
    access: Callable[[WebSocket, Settings], str | None] | None = None
    subprotocol: str | None = None


def create_app(
    settings: Settings,
    engines: Engines | None = None,
    *,
    acs_client_options: Mapping[str, Any] | None = None,
    worker_stats: WorkerStatsBoard | None = None,
) -> FastAPI:
    """The app. `acs_client_options` go to the ACS SDK client (azure-core transport options, e.g.
    `connection_verify` to trust a private CA); unused without ACS. `worker_stats`: a worker of
    `parley serve --workers N` (parley.workers) shares its /api/stats figures with the others."""
    store = build_store(settings)  # call records; sqlite: opened now (a bad data_dir stops startup)
    agent = "plumbing" if settings.engines == "plumbing" else settings.agent  # as the records name it
    registry = CallRegistry(settings.recent_calls_kept, store=store, agent=agent)
    # ACS first: a configuration problem there stops startup before any model is loaded.
    validator = _acs_validator(settings)
    if configured_token(settings) is None and not is_loopback(settings.host):
        log.warning(
            "PARLEY_API_TOKEN is not set while listening on %s: the calls, events and stats APIs answer"
            " 403 to everyone until it is (docs/operations.md, Access and privacy)",
            settings.host,
        )
    call_automation = _call_automation(settings, registry, acs_client_options or {})
    twilio_guard = TwilioGuard(settings)
    twilio_guard.warn_at_startup()
    engines = engines if engines is not None else build_engines(settings)
    if call_automation is not None and engines.call_control is None:
        engines.call_control = call_automation  # the agents' Hangup / Transfer reach the phone call
    # Metrics and traces observe the calls' event records (parley.metrics, parley.tracing).
    metrics = Metrics() if settings.metrics else None
    if metrics is not None:
        metrics.attach(registry)
    tracer = tracer_from_env(agent)
    if tracer is not None:
        registry.observers.append(tracer.observe)
    # Many instances on one Redis (docs/scaling.md); None without PARLEY_REDIS_URL.
    cluster = _cluster(settings, registry, call_automation, store)
    max_calls, max_calls_origin = effective_max_calls(settings)
    admission = AdmissionController(
        max_calls, OverloadLimits.from_settings(settings), on_refused=registry.stats.call_refused
    )

    def load_reading() -> LoadReading:
        backlog = worst_backlog(registry.live_sessions())
        if metrics is not None:
            metrics.backlog(backlog)
        return LoadReading(registry.stats.monitor.recent_p99(), backlog, executor_queues(engines.executors))

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        app_.state.loop = asyncio.get_running_loop()  # tests and benchmarks inspect the call tasks
        if validator is not None:
            await _prefetch_signing_keys(validator)
        await asyncio.to_thread(engines.warm)
        log.info(
            "parley %s: %s; %s; max calls %d (%s)",
            __version__,
            describe_agent(settings, engines),
            describe_engines(settings),
            max_calls,
            max_calls_origin,
        )
        monitor = asyncio.create_task(registry.stats.monitor.run(), name="loop-lag-monitor")
        watcher = asyncio.create_task(admission.watch(load_reading), name="overload-watch")
        if cluster is not None:
            await cluster.start()
        publisher = None
        if worker_stats is not None:
            publisher = asyncio.create_task(worker_stats.run(stats_snapshot), name="worker-stats")
        orphans = None
        if call_automation is not None and store.lost_calls:
            orphans = asyncio.create_task(_hang_up_orphans(call_automation, store.lost_calls), name="orphan-hangups")
        yield
        if orphans is not None:
            orphans.cancel()
        # Every call has ended here (drained, or closed by uvicorn's shutdown): what is queued is written.
        if cluster is not None:
            await cluster.stop()
        await _close_call_records(app_)
        watcher.cancel()
        monitor.cancel()
        if publisher is not None:
            publisher.cancel()
        if call_automation is not None:
            await call_automation.close()
        engines.close()
        if metrics is not None:
            metrics.close()
        if tracer is not None:
            await asyncio.to_thread(tracer.shutdown)

    app = FastAPI(title="parley", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engines = engines
    app.state.registry = registry
    app.state.call_automation = call_automation
    app.state.admission = admission
    app.state.call_records = store
    app.state.cluster = cluster

    async def drain() -> dict[str, float]:
        """Graceful drain (ParleyServer runs it on the first SIGTERM/SIGINT)."""
        return await admission.drain(registry.live_sessions, settings.drain_timeout_s)

    app.state.drain = drain

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness: 200 while the process serves HTTP (overloaded or draining included)."""
        return {"status": "ok", "version": __version__, "calls": registry.live_count}

    @app.get("/livez")
    async def livez() -> dict[str, object]:
        """Liveness, by the name orchestrators expect (same as /healthz)."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 503 with the reasons while new calls would be refused (draining, overloaded,
        at capacity), so a load balancer sends them elsewhere."""
        ready, body = admission.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    # The calls/events/stats APIs: a bearer token, or a loopback bind without one (parley.security.access).
    api_guard = [Depends(api_access(settings))]

    def stats_snapshot(reset: bool) -> dict[str, object]:
        snapshot = registry.stats.snapshot(registry.live_count, reset=reset)
        snapshot["log_records_dropped"] = logs.dropped()  # the log output was not keeping up
        snapshot.update(registry.record_stats())  # records_dropped: the store was not keeping up
        snapshot["pools"] = {pool.name: pool.figures() for pool in (engines.vads, engines.recognizers)}
        snapshot["admission"] = admission.describe()
        return snapshot

    @app.get("/api/stats", dependencies=api_guard)
    async def stats(reset: bool = False) -> dict[str, object]:
        """Loop lag (since the last reset), CPU seconds, RSS, threads, call counters. In a worker
        process: this worker's, and `workers`: every worker's latest (reset: every worker's)."""
        if worker_stats is not None and reset:
            worker_stats.request_reset()
        snapshot = stats_snapshot(reset)
        if worker_stats is not None:
            snapshot["workers"] = worker_stats.workers(snapshot)
            worker_stats.annotate(snapshot)
        return snapshot

    if metrics is not None:  # GET /metrics
        app.include_router(metrics_router(metrics, api_guard))

    # GET /api/calls/live: the calls console's live list, and whether the records below are served.
    app.include_router(live_calls_router(registry, events_api=settings.events_api, dependencies=api_guard))
    if settings.events_api:  # GET /api/calls, /api/calls/{call_id}/events, /api/calls/{call_id}/turns
        app.include_router(records_router(store, dependencies=api_guard))
    if cluster is not None:  # hang up / transfer a call wherever it runs; GET /api/cluster
        from parley.cluster.api import cluster_router

        app.include_router(cluster_router(cluster, dependencies=api_guard))
    # The pages (/, /static/...) and GET /api/agents (docs/web.md).
    app.include_router(web_router(settings, dependencies=api_guard))

    def media_endpoint(channel: MediaChannel) -> Callable[[WebSocket], Awaitable[None]]:
        """The WebSocket route of one channel: the same checks, admission and MediaHandler for all."""

        async def media_socket(websocket: WebSocket) -> None:
            await serve_media(websocket, channel)

        return media_socket

    async def serve_media(websocket: WebSocket, channel: MediaChannel) -> None:
        # Before accept(): who may connect first (a refused ACS token or Origin, a call that is not
        # ours: HTTP 403), so an unauthenticated peer learns nothing about live calls or capacity.
        if channel.authenticate is not None:  # its own credentials (Twilio's signature), then Origin
            if not await channel.authenticate(websocket):
                return
            if not await check_media_access(websocket, settings, None):
                return
        elif channel.access is not None:  # the channel's own rule (the browser's: docs/web.md)
            if not await check_media_access(websocket, settings, None, channel.access):
                return
        else:
            if not await check_websocket(websocket, validator):
                return
            if cluster is not None:  # the ACS call may have been answered by another instance
                await cluster.before_media(websocket)
            if not await check_media_access(websocket, settings, call_automation):  # Origin; a call of ours
                return
        agent_name = websocket.query_params.get("agent", "")
        if agent_name and not engines.has_agent(agent_name):
            log.warning("media socket refused: it asks for agent %r, which this server does not load", agent_name[:64])
            loaded = ", ".join(sorted(engines.agent_factories)) or settings.agent
            await _deny(websocket, 400, f"unknown_agent: this server loads {loaded} (PARLEY_AGENTS)\n")
            return
        # Then admission, with no await between it and accept() but the cluster's claim (made while
        # the slot is held): a refusal is an HTTP status (400, 409, 503); an admitted socket holds
        # its slot until its call has ended.
        client = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "-"
        admitted = admission.admit(
            websocket.headers.get("x-ms-call-connection-id") or websocket.query_params.get("callId") or None,
            also_check=[value for value in [websocket.query_params.get("callId")] if value],
            client=client,
        )
        if isinstance(admitted, Refusal):
            await _deny(websocket, admitted.status, f"{admitted.reason}: {admitted.message}\n")
            return
        call_id = admitted.call_id or f"local-{uuid.uuid4()}"
        # The cluster's checks (call id live elsewhere, cluster cap) after this server's: the slot is held.
        if cluster is not None and (refusal := await cluster.claim(call_id, websocket)) is not None:
            admission.withdraw(admitted, refusal, client)
            await _deny(websocket, refusal.status, f"{refusal.reason}: {refusal.message}\n")
            return
        try:
            await serve_call(websocket, call_id, channel, agent_name)
        finally:
            admission.release(admitted)
            if cluster is not None:
                cluster.release(call_id)

    async def serve_call(websocket: WebSocket, call_id: str, channel: MediaChannel, agent_name: str) -> None:
        correlation_id = websocket.headers.get("x-ms-call-correlation-id", "")
        # Who is calling is not part of ACS media streaming: whoever answered the call (Call
        # Automation, a test caller) may pass it in the URL for the agents' prompts.
        caller_id = websocket.query_params.get("callerId", "")[:64]
        offered = websocket.scope.get("subprotocols") or ()
        await websocket.accept(subprotocol=channel.subprotocol if channel.subprotocol in offered else None)
        log.info("call %s connected (correlation %s)", call_id, correlation_id or "-")
        handler = MediaHandler(
            call_id=call_id,
            correlation_id=correlation_id,
            caller_id=caller_id,
            settings=settings,
            engines=engines,
            registry=registry,
            wire=channel.wire(websocket),
            agent_name=agent_name,
        )
        if call_automation is not None:  # ties the stream to the call ACS answered or placed
            call_automation.media_connected(call_id, websocket.query_params.get("callId", ""), handler.events)
        if channel.attach is not None:  # e.g. the browser's live captions
            channel.attach(handler, websocket)
        await handler.run(websocket)
        log.info("call %s ended: %s", call_id, handler.end_reason)

    # /ws is the path Microsoft's samples give ACS; /ws/acs names the transport.
    acs_media = media_endpoint(MediaChannel("acs", lambda _websocket: AcsWire()))
    app.add_api_websocket_route("/ws/acs", acs_media)
    app.add_api_websocket_route("/ws", acs_media)
    # Twilio Media Streams (docs/twilio.md): the voice webhook's TwiML points calls at /ws/twilio.
    app.add_api_websocket_route("/ws/twilio", media_endpoint(twilio_channel(settings, twilio_guard)))
    app.include_router(twilio_router(settings, twilio_guard))
    # The talk page's calls (parley.transports.browser, docs/web.md).
    browser_media = media_endpoint(
        MediaChannel(
            "browser",
            lambda _websocket: BrowserWire(),
            attach=forward_events,
            access=browser_media_refusal,
            subprotocol=BROWSER_SUBPROTOCOL,
        )
    )
    app.add_api_websocket_route("/ws/browser", browser_media)
    if call_automation is not None:
        from parley.acs.routes import acs_router, redact_uvicorn_request_logs

        redact_uvicorn_request_logs()  # the webhook secret and callers' numbers travel in URLs
        app.include_router(acs_router(call_automation, settings, validator))
    # Last, so it matches only what no route above did.
    app.add_api_websocket_route("/{path:path}", _unknown_websocket_path)
    return app


def twilio_channel(settings: Settings, guard: TwilioGuard) -> MediaChannel:
    """/ws/twilio: Twilio's wire, its signature instead of the ACS checks, its REST API for call control."""
    return MediaChannel(
        "twilio",
        lambda _websocket: TwilioWire(),
        attach=call_control_attacher(TwilioCalls.from_settings(settings)),
        authenticate=socket_authenticator(settings, guard),
    )


def _cluster(
    settings: Settings, registry: CallRegistry, call_automation: CallAutomation | None, store: CallStore
) -> Cluster | None:
    """The cluster, or None without PARLEY_REDIS_URL. Imported only then: redis-py loads the
    OpenTelemetry SDK when it is installed, which a server without Redis or traces must not pay for."""
    if settings.redis_url is None:
        return None
    from parley.cluster import build_cluster

    return build_cluster(settings, registry, call_automation=call_automation, store=store)


async def _unknown_websocket_path(websocket: WebSocket) -> None:
    """A WebSocket to a path parley does not serve gets HTTP 404. (Starlette's fallback closes the
    handshake, which reaches the client as 403, the status of a refused ACS token.)"""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        message = f"no WebSocket endpoint at {websocket.url.path}; the media stream is at /ws/acs (or /ws)\n"
        await websocket.send_denial_response(PlainTextResponse(message, status_code=404))
    else:  # a server without the denial-response extension can only refuse
        await websocket.close()


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse a WebSocket upgrade with an HTTP status (a plain close, seen as 403, without the extension)."""
    try:
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(PlainTextResponse(message, status_code=status))
        else:
            await websocket.close()
    except Exception as exc:  # noqa: BLE001 - any transport's error: the peer left before its refusal
        log.debug("refusal not delivered (HTTP %d): %s", status, exc)


async def _hang_up_orphans(control: CallAutomation, call_ids: Sequence[str]) -> None:
    """Hang up the phone calls a dead server (killed, crashed) left live: ACS keeps a call up after
    its media stream is gone, so its caller would wait on a silent line. The call records name them;
    a media call id is ACS's call connection id (ids parley made up, `local-...`, are no ACS calls)."""
    for call_id in call_ids:
        if call_id.startswith("local-"):
            continue
        try:
            await control.hang_up(call_id)
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the others
            log.warning("call %s: could not hang up the call a previous server left live: %s", call_id, exc)
        else:
            log.info("call %s: hung up; a previous server left it live (records: server_lost)", call_id)


async def _close_call_records(app: FastAPI) -> None:
    """Flush and close the call-records store, in the lifespan shutdown: after the drain (every call
    has ended) and before the process exits."""
    store = getattr(app.state, "call_records", None)
    if store is not None:
        await asyncio.to_thread(store.close)


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
    more = settings.agent_names[1:]
    also = f"; a call may ask for {', '.join(more)} (?agent=NAME)" if more else ""
    if getattr(scenario, "uses_llm", False):
        return f"agent {settings.agent} (LLM: {settings.llm_provider} {settings.llm_model}){also}"
    return f"agent {settings.agent}{also}"


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
    """uvicorn's server, logging the media URL once it listens (the port may be chosen then), and
    draining on the first SIGTERM or SIGINT (a second one ends at once)."""

    announce = True  # log the media URL (the supervisor of worker processes logs it once for all)

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.should_exit or not self.servers or not self.servers[0].sockets or not self.announce:
            return
        port = self.servers[0].sockets[0].getsockname()[1]
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        log.info("media WebSocket: ws://%s:%d/ws/acs (ACS streams calls here; also /ws)", host, port)
        log.info("talk page: http://%s:%d/ (browser calls on /ws/browser; docs/web.md)", host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """uvicorn's own sets `should_exit`, after which its shutdown closes every media socket with
        1012 at once, and it raises the signal again once served (the process dies of it even after a
        clean shutdown). Here the first signal starts the drain and the process exits 0 when it is
        done; a second signal (or one before the server has started) is uvicorn's: exit now.
        (A signal handler: it logs nothing itself, a logging lock may be held where it interrupted.)"""
        name = signal.Signals(sig).name
        if not self._drain_requested and self.request_drain(why=name):
            return
        if self._drain_requested and self._loop is not None:
            self.force_exit = True
            self._loop.call_soon_threadsafe(log.warning, "%s again: ending now, without waiting for the calls", name)
        super().handle_exit(sig, frame)

    def request_drain(self, why: str = "drain requested") -> bool:
        """Start the graceful drain (safe from a signal handler or another thread); False when there
        is none to start (the server has not started, is stopping, or its app has no drain)."""
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        loop = self._loop
        if drain is None or loop is None or not self.started or self.should_exit or self._drain_requested:
            return False
        self._drain_requested = True
        loop.call_soon_threadsafe(self._start_drain, drain, why)
        return True

    def _start_drain(self, drain: Callable[[], Awaitable[object]], why: str) -> None:
        log.warning("%s: draining (new calls refused, live calls go on); send it again to end at once", why)
        self._drain_task = asyncio.create_task(self._drain_then_exit(drain), name="drain")

    async def _drain_then_exit(self, drain: Callable[[], Awaitable[object]]) -> None:
        try:
            await drain()
        except Exception:  # a failed drain still ends in uvicorn's shutdown
            log.exception("the drain failed; shutting down")
        finally:
            self.should_exit = True  # uvicorn's main loop sees it within 0.1 s, then its shutdown runs


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
        # After a drain no call is left; this bounds the wait for any socket that is (1012 closes it).
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
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

    def begin_drain(self) -> bool:
        """What the first SIGTERM does to `parley serve` (the server stops once drained)."""
        assert isinstance(self._server, ParleyServer)
        return self._server.request_drain()

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


async def serve_forever(settings: Settings) -> None:
    server = uvicorn_server(create_app(settings), settings)
    await server.serve()


def run(settings: Settings) -> None:
    asyncio.run(serve_forever(settings))
