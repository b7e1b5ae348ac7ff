"""Commands for a call, sent to the instance holding its media socket over Redis pub/sub: one
channel per instance, replies on the requester's channel. The same channel brings the callbacks
other instances received for its calls."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from parley.cluster import keys
from parley.cluster.link import ClusterUnavailable, RedisLink

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 5.0  # a hang-up or transfer request to ACS is bounded below this
RESUBSCRIBE_S = 1.0  # after Redis dropped the subscription

Execute = Callable[[dict[str, Any]], Awaitable[None]]


class CallNotOwned(LookupError):
    """No live instance holds the call (ended, never here, or its instance died)."""


class CommandFailed(RuntimeError):
    """The instance holding the call could not carry the command out, or did not answer."""


class CommandBus:
    def __init__(self, link: RedisLink, instance: str, execute: Execute, reply_timeout_s: float = REPLY_TIMEOUT_S):
        self.link = link
        self.instance = instance
        self.execute = execute
        self.reply_timeout_s = reply_timeout_s
        self.subscribed = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[str | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def request(self, op: str, call_id: str, **fields: Any) -> str:
        """Carry out `op` on the call's instance (here, or sent there); returns that instance.
        CallNotOwned, CommandFailed, or ClusterUnavailable (Redis down)."""
        found = await self.link.run("find a call's instance", self.link.client.get(keys.owner(call_id)))
        if found is None:
            raise CallNotOwned(f"call {call_id} is not live on any instance")
        owner = str(found)
        message = {"op": op, "call_id": call_id, **fields}
        if owner == self.instance:
            try:
                await self.execute(message)
            except (CallNotOwned, CommandFailed):
                raise
            except Exception as exc:  # e.g. CallAutomationError: said as a failed command
                raise CommandFailed(f"{type(exc).__name__}: {exc}") from exc
            return owner
        request_id = uuid.uuid4().hex
        reply = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = reply
        try:
            message |= {"request_id": request_id, "reply_to": self.instance}
            receivers = await self.link.run(
                "send a command", self.link.client.publish(keys.channel(owner), json.dumps(message))
            )
            if not receivers:
                raise CallNotOwned(f"call {call_id}: its instance {owner} is not listening (gone?)")
            try:
                error = await asyncio.wait_for(reply, self.reply_timeout_s)
            except TimeoutError:
                raise CommandFailed(
                    f"call {call_id}: instance {owner} did not answer within {self.reply_timeout_s:.0f} s"
                ) from None
        finally:
            self._waiting.pop(request_id, None)
        if error is not None:
            raise CommandFailed(error)
        return owner

    async def listen(self) -> None:
        """Read this instance's channel for ever (a lifespan task); resubscribes after Redis failures."""
        while True:
            pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self.link.run("subscribe", pubsub.subscribe(keys.channel(self.instance)))
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis gone, a reset connection: listen again
                self.subscribed.clear()
                if not isinstance(exc, ClusterUnavailable):
                    self.link.failed("listen for commands", exc)
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), self.link.timeout_s)
                except Exception:  # noqa: BLE001 - a connection already broken
                    pass

    def _dispatch(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            log.error("cluster: a message that is not a command (%s): %.80r", exc, raw)
            return
        if message.get("op") == "reply":
            waiting = self._waiting.get(str(message.get("request_id")))
            if waiting is not None and not waiting.done():
                waiting.set_result(message.get("error"))
            return
        task = asyncio.create_task(self._serve(message), name=f"cluster-{message.get('op')}")
        self._tasks.add(task)  # a slow request to ACS must not hold up the channel
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: dict[str, Any]) -> None:
        error: str | None = None
        try:
            await self.execute(message)
        except (CallNotOwned, CommandFailed, ValueError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. CallAutomationError: the requester is told
            log.warning("cluster: %s for call %s failed: %s", message.get("op"), message.get("call_id"), exc)
            error = f"{type(exc).__name__}: {exc}"
        reply_to = message.get("reply_to")
        if not isinstance(reply_to, str) or not reply_to:
            if error is not None:
                log.warning(
                    "cluster: %s for call %s: %s", message.get("op"), message.get("call_id", message.get("key")), error
                )
            return
        reply = json.dumps({"op": "reply", "request_id": message.get("request_id"), "error": error})
        try:
            await self.link.run("reply to a command", self.link.client.publish(keys.channel(reply_to), reply))
        except ClusterUnavailable:
            pass  # the requester times out
