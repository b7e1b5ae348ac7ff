"""This instance in the cluster: it announces itself, holds its calls, takes commands and callbacks
for them, and cleans up after instances that died. Built by the server only with PARLEY_REDIS_URL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket

from parley.acs.shared import call_fields, event_from_fields
from parley.admission import Refusal
from parley.cluster import keys, scripts
from parley.cluster.acs_book import RedisCallBook
from parley.cluster.commands import CallNotOwned, CommandBus, CommandFailed
from parley.cluster.identity import instance_id
from parley.cluster.link import ClusterUnavailable, RedisLink
from parley.media.events import CallRegistry
from parley.settings import Settings

if TYPE_CHECKING:
    from parley.acs.service import CallAutomation
    from parley.records.store import CallStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # how often this instance says it is alive (and holds its calls)
TTL_S = 6.0  # an instance silent this long is dead: its calls are cleaned up by a survivor
RECENT_MS = 120_000  # after a call ends, late callbacks still go to the instance where it ended
REAPING_LOCK_MS = 30_000  # one survivor cleans up after a dead instance; another may retry after this


class Cluster:
    def __init__(
        self,
        settings: Settings,
        registry: CallRegistry,
        *,
        call_automation: CallAutomation | None = None,
        store: CallStore | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        ttl_s: float = TTL_S,
    ) -> None:
        assert settings.redis_url is not None
        self.instance = instance_id(settings)
        self.link = RedisLink(settings.redis_url.get_secret_value())
        self.registry = registry
        self.call_automation = call_automation
        self.store = store
        self.max_calls = settings.cluster_max_calls
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.commands = CommandBus(self.link, self.instance, self._execute)
        self.book = RedisCallBook(self.link, self.instance)
        if call_automation is not None:
            call_automation.shared = self.book
        self.held: dict[str, list[str]] = {}  # call id -> the ids it is held by (call id, ACS key)
        self.unchecked = 0  # calls admitted while Redis was unreachable (not counted in the cluster cap)
        self.reaped: list[str] = []  # instances this one cleaned up after
        client = self.link.client
        self._claim = client.register_script(scripts.CLAIM)
        self._release = client.register_script(scripts.RELEASE)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._clean_up = client.register_script(scripts.CLEAN_UP)
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifespan

    async def start(self) -> None:
        self._spawn(self.commands.listen(), "cluster-commands")
        try:  # the channel first: a command or callback for this instance's first call must find it
            await asyncio.wait_for(self.commands.subscribed.wait(), 2.0)
        except TimeoutError:
            log.error("cluster: not subscribed to %s yet (Redis unreachable?); retrying", keys.channel(self.instance))
        await self._clean_up_previous_run()
        await self._beat()
        self._spawn(self._keep_alive(), "cluster-heartbeat")
        log.info(
            "cluster: instance %s on Redis; cluster cap %s",
            self.instance,
            self.max_calls if self.max_calls is not None else "none",
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            if task.get_name() in ("cluster-commands", "cluster-heartbeat"):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:  # leaving on purpose: nobody needs to clean up after this instance
            pipe = self.link.client.pipeline(transaction=True)
            pipe.delete(keys.heartbeat(self.instance))
            pipe.srem(keys.INSTANCES, self.instance)
            await self.link.run("leave the cluster", pipe.execute())
        except ClusterUnavailable:
            pass
        await self.link.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ media sockets

    async def before_media(self, websocket: WebSocket) -> None:
        """Before the media socket's checks: the ACS call it names, which another instance may have
        answered, read from the shared book into this one's."""
        key = websocket.query_params.get("callId", "")
        if self.call_automation is not None and key:
            await self.call_automation.recall(key)

    async def claim(self, call_id: str, websocket: WebSocket) -> Refusal | None:
        """Hold the call for this instance (None), or why the cluster refuses it."""
        key = websocket.query_params.get("callId", "")
        ids = [call_id] + ([key] if key and key != call_id else [])
        try:
            result = await self.link.run(
                "claim a call",
                self._claim(args=[self.instance, int(self.ttl_s * 1000), self.max_calls or 0, *ids]),
            )
        except ClusterUnavailable:
            self.unchecked += 1  # the call goes on here; the heartbeat holds it once Redis is back
            self.held[call_id] = ids
            return None
        status = result[0] if result else "?"
        if status == "duplicate_call_id":
            return Refusal(409, "duplicate_call_id", f"call {call_id} is live on another instance")
        if status == "cluster_capacity":
            return Refusal(503, "cluster_capacity", f"the cluster is at its limit of {self.max_calls} calls")
        self.held[call_id] = ids
        self._hold_early_callbacks(key, result[1:])
        return None

    def release(self, call_id: str) -> None:
        """The call ended here (in the background: the socket's task may be ending with the server)."""
        ids = self.held.pop(call_id, None)
        if ids is not None:
            self._spawn(self._released(ids), f"cluster-release-{call_id}")

    async def _released(self, ids: list[str]) -> None:
        try:
            await self.link.run("release a call", self._release(args=[self.instance, RECENT_MS, *ids]))
        except ClusterUnavailable:
            pass  # its hold expires (TTL_S) and the heartbeat no longer renews it

    def _hold_early_callbacks(self, key: str, messages: list[str]) -> None:
        """Callbacks other instances received before this socket: the call writes them when it starts."""
        call = self.call_automation.calls.by_key(key) if self.call_automation is not None and key else None
        for raw in messages:
            try:
                t, event = _callback(raw)
            except ValueError as exc:
                log.error("call %s: a held callback that is not one (%s)", key, exc)
                continue
            if call is not None:
                call.early_events.append((t, event.record()))

    # ------------------------------------------------------------------ commands

    async def hang_up(self, call_id: str) -> str:
        """End a call on whichever instance holds it (its closing line, then the hang-up)."""
        return await self.commands.request("hang_up", call_id)

    async def transfer(self, call_id: str, target: str) -> str:
        return await self.commands.request("transfer", call_id, target=target)

    async def _execute(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "callback":
            await self._apply_callback(message)
            return
        call_id = str(message.get("call_id", ""))
        if op == "hang_up":
            session = self._session(call_id)
            if session is not None:
                session.finish_politely("hangup_requested")
            elif self.call_automation is not None:
                await self.call_automation.hang_up(call_id)
            else:
                raise CallNotOwned(f"call {call_id} is not live on instance {self.instance}")
        elif op == "transfer":
            if self.call_automation is None:
                raise CommandFailed("transfer needs ACS Call Automation, which is not configured")
            await self.call_automation.transfer(call_id, str(message.get("target", "")))
        else:
            raise CommandFailed(f"unknown command {op!r}")

    def _session(self, call_id: str) -> Any | None:
        session = self.registry.session(call_id)
        if session is None and self.call_automation is not None:
            call = self.call_automation.calls.find(call_id)
            if call is not None and call.media_call_id is not None:
                session = self.registry.session(call.media_call_id)
        return session

    async def _apply_callback(self, message: dict[str, Any]) -> None:
        key = str(message.get("key", ""))
        if self.call_automation is None:
            log.error("call %s: a callback from another instance, but ACS is not configured here", key)
            return
        t, event = _callback(message)
        await self.call_automation.recall(key)
        self.call_automation.apply_callback(key, event, t)

    # ------------------------------------------------------------------ liveness

    async def _clean_up_previous_run(self) -> None:
        """A process that ran under this instance id before (a restarted container with a fixed
        PARLEY_INSTANCE_ID) and died with live calls: nobody else will see it dead (this process
        renews its heartbeat), so its calls are released here, before this one holds any."""
        try:
            client = self.link.client
            if await self.link.run("look for a previous run", client.exists(keys.instance_calls(self.instance))):
                await self.clean_up_after(self.instance, "a previous process under this id")
        except ClusterUnavailable:
            pass

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._beat()
            try:
                await self._reap()
            except ClusterUnavailable:
                pass
            except Exception:  # a bug here must not stop the heartbeat
                log.exception("cluster: cleaning up after dead instances failed")

    async def _beat(self) -> None:
        held = [
            f"{'m' if index == 0 else 'a'}:{value}" for ids in self.held.values() for index, value in enumerate(ids)
        ]
        try:
            await self.link.run("heartbeat", self._heartbeat(args=[self.instance, int(self.ttl_s * 1000), *held]))
        except ClusterUnavailable:
            pass

    async def _reap(self) -> None:
        client = self.link.client
        instances = {str(name) for name in await self.link.run("list instances", client.smembers(keys.INSTANCES))}
        for other in sorted(instances - {self.instance}):
            if await self.link.run("check an instance", client.exists(keys.heartbeat(other))):
                continue
            lock = client.set(keys.reaping(other), self.instance, nx=True, px=REAPING_LOCK_MS)
            if await self.link.run("lock a dead instance", lock):
                await self.clean_up_after(other)

    async def clean_up_after(self, dead: str, why: str = "") -> list[str]:
        """Release what a dead instance held; returns the ids of the calls it left."""
        orphans: list[str] = await self.link.run("clean up after an instance", self._clean_up(args=[dead]))
        self.reaped.append(dead)
        log.warning(
            "cluster: instance %s is gone (%s): %d call id(s) released",
            dead,
            why or f"no heartbeat for {self.ttl_s:.0f} s",
            len(orphans),
        )
        if self.call_automation is not None:
            await self._hang_up_orphans(orphans)
        mark_lost = getattr(self.store, "mark_lost", None)  # the shared records store: calls end server_lost
        if callable(mark_lost):
            try:
                lost = await asyncio.to_thread(mark_lost, dead)
                log.warning("cluster: %d call record(s) of %s marked server_lost", len(lost), dead)
            except Exception:  # the records are not worth stopping the clean-up for
                log.exception("cluster: marking the calls of %s lost failed", dead)
        return orphans

    async def _hang_up_orphans(self, ids: list[str]) -> None:
        """ACS keeps a call up after its media stream is gone: the caller would wait on a silent line."""
        assert self.call_automation is not None
        seen: set[str] = set()
        for call_id in ids:
            call = await self.call_automation.recall(call_id)
            if call is None or call.key in seen:
                continue
            seen.add(call.key)
            still_up = bool(call.connection_id) and not call.disconnected
            # Released first: from the moment ACS hears the hang-up, no instance may open its media.
            await self.book.release(call_fields(call))
            self.call_automation.calls.forget(call)
            if still_up and call.connection_id:
                try:
                    await self.call_automation.hang_up(call.connection_id)
                except Exception as exc:  # noqa: BLE001 - one failed request must not stop the others
                    log.warning("call %s: could not hang up the call a dead instance left: %s", call.key, exc)

    # ------------------------------------------------------------------ figures

    async def describe(self) -> dict[str, object]:
        """For GET /api/cluster."""
        body: dict[str, object] = {
            "instance": self.instance,
            "held_calls": sorted(self.held),
            "cluster_max_calls": self.max_calls,
            "redis_failures": self.link.failures,
            "redis_down": self.link.down,
            "admitted_unchecked": self.unchecked,
            "reaped": list(self.reaped),
        }
        try:
            client = self.link.client
            body["instances"] = sorted(await self.link.run("list instances", client.smembers(keys.INSTANCES)))
            body["live_calls"] = await self.link.run("count calls", client.scard(keys.LIVE_CALLS))
        except ClusterUnavailable as exc:
            body["error"] = str(exc)
        return body


def _callback(message: str | dict[str, Any]) -> tuple[float, Any]:
    """A callback another instance sent (JSON or parsed): its time on this clock, and the event."""
    import json

    fields = json.loads(message) if isinstance(message, str) else message
    if not isinstance(fields, dict) or not isinstance(fields.get("event"), dict):
        raise ValueError("no event")
    wall = fields.get("wall")
    age = max(0.0, time.time() - wall) if isinstance(wall, (int, float)) else 0.0
    return time.monotonic() - age, event_from_fields(fields["event"])


def build_cluster(
    settings: Settings,
    registry: CallRegistry,
    *,
    call_automation: CallAutomation | None = None,
    store: CallStore | None = None,
) -> Cluster | None:
    """The cluster, or None without PARLEY_REDIS_URL (one process: nothing shared)."""
    if settings.redis_url is None:
        return None
    return Cluster(settings, registry, call_automation=call_automation, store=store)
