"""The connection to Redis: every request bounded in time, failures logged once and counted.

Redis is a helper, not a dependency of a live call: when it is unreachable, requests fail fast
(`ClusterUnavailable`) and each caller falls back to what this instance can do alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_TIMEOUT_S = 0.5  # a Redis that does not answer within this is treated as down for this request


class ClusterUnavailable(Exception):
    """Redis did not answer (the message says what was asked and why it failed)."""


class RedisLink:
    def __init__(self, url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self.failures = 0  # requests that failed (for /api/stats)
        self.down = False  # the last request failed: logged once until one succeeds

    async def run(self, what: str, request: Awaitable[T]) -> T:
        """Await a request; ClusterUnavailable if Redis fails or takes longer than the timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await request
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(what, exc)
            raise ClusterUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        if self.down:
            self.down = False
            log.warning("Redis answers again (%d failed requests in all)", self.failures)
        return result

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        if not self.down:
            self.down = True
            log.error(
                "Redis unreachable (%s: %s: %s): calls go on on this instance alone; retrying",
                what,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        await self.client.aclose()
