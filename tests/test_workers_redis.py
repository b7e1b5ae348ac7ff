"""`parley serve --workers 2` on Redis: every worker is an instance of the cluster (`<base>-w<i>`),
its calls are owned and recorded in Redis, and a worker killed and restarted under its id releases
what its previous process held, while the other worker's calls go on."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import redis

from tests.test_workers import held_calls, two_workers, until, wait_ready


def _isolated(redis_url: str, db: int) -> str:
    """The session's redis-server, another database: no other test's instances or calls."""
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def _owners(client: redis.Redis, prefix: str) -> dict[str, str]:
    owners: dict[str, str] = {}
    for key in client.scan_iter("parley:owner:held-*"):
        owner = client.get(key)
        if owner is not None and str(owner).startswith(prefix):
            owners[str(key).removeprefix("parley:owner:")] = str(owner)
    return owners


async def test_two_workers_are_two_instances_and_a_restarted_one_releases_its_calls(
    tmp_path: Path, redis_url: str
) -> None:
    url = _isolated(redis_url, 7)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    with two_workers(tmp_path, redis_url=url) as served:
        wait_ready(served)
        base = f"{served.stats()['workers'][0]['instance'].rsplit('-', 1)[0]}"
        workers = {str(worker["instance"]): int(worker["pid"]) for worker in served.stats()["workers"]}
        assert sorted(workers) == [f"{base}-w0", f"{base}-w1"]
        await until(lambda: set(workers) <= set(client.smembers("parley:instances")), 10, "no heartbeats")
        async with contextlib.AsyncExitStack() as stack:
            # Calls until both workers hold one (an idle server's kernel may give a burst to one worker).
            calls: list[Any] = []
            while len(set(_owners(client, base).values())) < 2:
                assert len(calls) < 40, "every call went to one worker"
                calls += await stack.enter_async_context(held_calls(served, 4))
                held = len(calls)
                await until(lambda: len(_owners(client, base)) == held, 10, "calls not all owned in Redis")  # noqa: B023
            owners = _owners(client, base)
            assert set(owners.values()) == set(workers)  # both workers hold calls, each as itself
            victim = f"{base}-w0"
            victims = sorted(call for call, owner in owners.items() if owner == victim)
            others = sorted(call for call, owner in owners.items() if owner != victim)
            # The records are in Redis (the default store with a Redis URL), each call owned by its worker.
            assert all(client.hget(f"parley:call:{call}", "instance") == victim for call in victims)
            killed_at = time.monotonic()
            os.kill(workers[victim], signal.SIGKILL)

            def released() -> bool:
                now = _owners(client, base)
                return not any(call in now for call in victims) and all(now.get(call) for call in others)

            await until(released, 20, "the restarted worker did not release its previous calls")
            assert time.monotonic() - killed_at < 20
            lost = {call: client.hget(f"parley:call:{call}", "end_reason") for call in victims}
            assert set(lost.values()) == {"server_lost"}, lost
            assert all(client.hget(f"parley:call:{call}", "end_reason") is None for call in others)  # still live
        served.process.send_signal(signal.SIGTERM)
        await until(lambda: served.process.poll() is not None, 20, "the server did not exit")
        assert served.process.returncode == 0
    client.close()
