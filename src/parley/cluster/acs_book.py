"""The ACS call book on Redis (parley.acs.shared.SharedCalls): a hash per call under its key, an
index by ACS call connection id, and the routing of callbacks to the instance of the media socket."""

from __future__ import annotations

import json
import logging
import time

from parley.acs.shared import Delivery, event_fields
from parley.acs.webhooks import CallbackEvent
from parley.cluster import keys, scripts
from parley.cluster.link import ClusterUnavailable, RedisLink

log = logging.getLogger(__name__)

BOOK_TTL_S = 6 * 3600  # longer than any call; refreshed whenever the call changes
RELEASED_TTL_S = 600  # a call over is remembered as over a while (late media sockets refused), then forgotten
HELD_KEPT = 32  # callbacks held per call until its media socket connects (as CallBook does locally)
HELD_TTL_MS = 120_000  # a media socket comes within seconds of the answer, or never


class RedisCallBook:
    def __init__(self, link: RedisLink, instance: str) -> None:
        self.link = link
        self.instance = instance
        self._deliver = link.client.register_script(scripts.DELIVER)

    async def save(self, fields: dict[str, str], ttl_s: int = BOOK_TTL_S) -> None:
        key, connection_id = fields["key"], fields.get("connection_id", "")
        pipe = self.link.client.pipeline(transaction=True)
        pipe.hset(keys.acs_call(key), mapping=dict(fields.items()))
        pipe.expire(keys.acs_call(key), ttl_s)
        if connection_id:
            pipe.set(keys.acs_connection(connection_id), key, ex=ttl_s)
        try:
            await self.link.run("share an ACS call", pipe.execute())
        except ClusterUnavailable:
            pass  # logged by the link; the call goes on here, other instances will not know it

    async def load(self, call_id: str) -> dict[str, str] | None:
        try:
            key = await self.link.run("look up an ACS call", self.link.client.get(keys.acs_connection(call_id)))
            name = keys.acs_call(str(key) if key else call_id)
            fields = await self.link.run("read an ACS call", self.link.client.hgetall(name))
        except ClusterUnavailable:
            return None
        return {str(name): str(value) for name, value in fields.items()} if fields else None

    async def release(self, fields: dict[str, str]) -> None:
        """The call is over for every instance (its instance died): no media socket may open it."""
        await self.save(fields | {"disconnected": "1"}, RELEASED_TTL_S)

    async def drop(self, key: str, connection_id: str | None) -> None:
        names = [keys.acs_call(key)] + ([keys.acs_connection(connection_id)] if connection_id else [])
        try:
            await self.link.run("forget an ACS call", self.link.client.delete(*names))
        except ClusterUnavailable:
            pass  # expires on its own (BOOK_TTL_S)

    async def deliver(self, key: str, event: CallbackEvent) -> Delivery:
        message = json.dumps({"op": "callback", "key": key, "event": event_fields(event), "wall": time.time()})
        try:
            where = await self.link.run(
                "send a callback to its call",
                self._deliver(args=[self.instance, key, message, HELD_KEPT, HELD_TTL_MS]),
            )
        except ClusterUnavailable:
            return "local"  # recorded here if the media socket is here; nowhere else can be asked
        if where not in ("forwarded", "held"):
            if where != "local":
                log.error("call %s: unexpected answer from the delivery script: %.40r", key, where)
            return "local"
        return "forwarded" if where == "forwarded" else "held"
