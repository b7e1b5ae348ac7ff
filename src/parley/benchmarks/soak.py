"""`parley bench soak`: many short calls through one server; does memory or the thread count creep?

Calls alternate between two endings that exercise the cancellation paths: barge in on the greeting
and hang up mid-utterance; speak after the greeting and hang up while the answer is playing.
RSS and threads are read from the server's /api/stats after a warm-up and after the last call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from parley.benchmarks.common import ServerUnderTest, load_clips, machine_info
from parley.caller import CallOptions, run_call

SETTLE_S = 2.0


MAX_WARMUP_CALLS = 200


async def _warm_up(server: ServerUnderTest, one: Callable[[int], Awaitable[None]], parallel: int) -> int:
    """Run overlapping calls, as in the soak, until the recognizer pool stops growing.

    Server-side sessions outlive the callers' by a little, so more than `parallel` overlap and the
    pools (one ~90 MB recognizer each) grow for a while: that is working size, not a leak, and the
    baseline must come after it. Returns the number of warm-up calls.
    """
    done = 0
    created = -1
    while done < MAX_WARMUP_CALLS:
        await asyncio.gather(*(one(done + i) for i in range(2 * parallel)))
        done += 2 * parallel
        now_created = server.stats().get("pools", {}).get("recognizer", {}).get("created", 0)
        if now_created == created:
            return done
        created = now_created
    return done


def _options(url: str, index: int, pcm: np.ndarray) -> CallOptions:
    if index % 2 == 0:
        return CallOptions(url=url, pcm=pcm, barge_in_at=0.3, end_after_stop_s=0.8, max_wait_s=1.0, fetch_events=False)
    return CallOptions(
        url=url, pcm=pcm, greeting_wait_s=0.5, end_after_answer_s=0.3, max_wait_s=3.0, fetch_events=False
    )


async def run(server: ServerUnderTest, calls: int, parallel: int, clips: list[Path] | None) -> dict[str, Any]:
    sources = load_clips(clips)
    shortest = min(sources, key=lambda clip: clip.pcm.size)
    errors: list[str] = []
    samples: list[dict[str, Any]] = []

    async def one(index: int) -> None:
        try:
            report = await run_call(_options(server.url, index, shortest.pcm))
            errors.extend(f"call {index}: {e}" for e in report.errors)
        except Exception as exc:  # noqa: BLE001 - a failed call is a finding, not the end of the soak
            errors.append(f"call {index}: {type(exc).__name__}: {exc}")

    warmup = await _warm_up(server, one, parallel)
    await asyncio.sleep(SETTLE_S)
    start = server.stats()
    samples.append({"calls": 0, "rss_mb": start["rss_mb"], "threads": start["threads"]})
    started = time.monotonic()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(calls):
        queue.put_nowait(index)

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            await one(warmup + index)
            done = index + 1
            if done % 100 == 0:
                stats = server.stats()
                samples.append({"calls": done, "rss_mb": stats["rss_mb"], "threads": stats["threads"]})

    await asyncio.gather(*(worker() for _ in range(parallel)))
    await asyncio.sleep(SETTLE_S)
    end = server.stats()
    return {
        "benchmark": "soak",
        "calls": calls,
        "parallel": parallel,
        "clip": shortest.name,
        "warmup_calls": warmup,
        "seconds": round(time.monotonic() - started, 1),
        "rss_mb_start": start["rss_mb"],
        "rss_mb_end": end["rss_mb"],
        "rss_growth_mb": round(end["rss_mb"] - start["rss_mb"], 1),
        "threads_start": start["threads"],
        "threads_end": end["threads"],
        "live_calls_end": end["calls"],
        "calls_ended_by_server": end["calls_ended"],
        "dropped_frames": end["dropped_frames"],
        "errors": len(errors),
        "error_samples": errors[:20],
        "samples": samples,
        "machine": machine_info(),
    }


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    return [
        ("calls", f"{result['calls']} ({result['parallel']} at a time, {result['seconds']} s)"),
        ("RSS start -> end (MB)", f"{result['rss_mb_start']} -> {result['rss_mb_end']}"),
        ("RSS growth (MB)", result["rss_growth_mb"]),
        ("threads start -> end", f"{result['threads_start']} -> {result['threads_end']}"),
        ("live calls at end", result["live_calls_end"]),
        ("errors", result["errors"]),
    ]
