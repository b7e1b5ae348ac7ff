"""`parley bench soak`: many short calls through one server; does memory or the thread count creep?

Calls alternate between two endings that exercise the cancellation paths: barge in on the greeting
and hang up mid-utterance; speak after the greeting and hang up while the answer is playing.
RSS and threads are read from the server's /api/stats after a warm-up and after the last call,
with what holds the memory: the engine pools (created/disposed/idle/in use), the C heap (glibc
malloc: in use vs held free) and the Python heap (allocated blocks). `busy` runs CPU burners
beside the server for the whole soak: on a busy machine calls overlap more and the pools grow.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from parley.benchmarks.common import ServerUnderTest, load_clips, machine_info
from parley.caller import CallOptions, run_call

POOL_IDLE_S = 10.0
"""The soak's own server releases idle engines after this long (`engine_pool_idle_s`)..."""
SETTLE_S = 20.0
"""...and the soak waits this long after the warm-up and after the last call, so both figures are
taken with the pools shrunk back to their warm size: what is left is what the calls kept."""
BURNER = "while True: pass"


@contextmanager
def cpu_burners(count: int) -> Iterator[None]:
    """`count` processes spinning on a CPU each, for the machine to be busy while the soak runs."""
    burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(count)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def _sample(calls: int, stats: dict[str, Any]) -> dict[str, Any]:
    """One point of the soak: RSS, threads and what holds the memory."""
    return {
        "calls": calls,
        "rss_mb": stats["rss_mb"],
        "threads": stats["threads"],
        "live_calls": stats["calls"],
        "pools": stats.get("pools", {}),
        "memory": stats.get("memory", {}),
    }


MAX_WARMUP_CALLS = 200
MIN_WARMUP_CALLS = 112
"""The server keeps the event logs of the last 100 ended calls (`recent_calls_kept`): a bounded
cache, filled by the warm-up so the soak measures what grows beyond it (200 calls measured +11.7 MB
with none kept, the Python heap flat; with 100 kept and a 32-call warm-up the heap grew while the
cache filled)."""


async def _warm_up(
    server: ServerUnderTest, one: Callable[[int], Awaitable[None]], parallel: int, min_calls: int
) -> int:
    """Run overlapping calls, as in the soak, until the recognizer pool stops growing (and at
    least `min_calls`).

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
        if now_created == created and done >= min_calls:
            return done
        created = now_created
    return done


def _options(url: str, index: int, pcm: np.ndarray) -> CallOptions:
    if index % 2 == 0:
        return CallOptions(url=url, pcm=pcm, barge_in_at=0.3, end_after_stop_s=0.8, max_wait_s=1.0, fetch_events=False)
    return CallOptions(
        url=url, pcm=pcm, greeting_wait_s=0.5, end_after_answer_s=0.3, max_wait_s=3.0, fetch_events=False
    )


async def run(
    server: ServerUnderTest,
    calls: int,
    parallel: int,
    clips: list[Path] | None,
    busy: int = 0,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    with cpu_burners(busy):
        result = await _soak(server, calls, parallel, clips, settle_s)
    result["busy_burners"] = busy
    return result


async def _soak(
    server: ServerUnderTest, calls: int, parallel: int, clips: list[Path] | None, settle_s: float
) -> dict[str, Any]:
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

    warmup = await _warm_up(server, one, parallel, min(MIN_WARMUP_CALLS, calls))  # short smoke runs stay short
    await asyncio.sleep(settle_s)
    start = server.stats()
    samples.append(_sample(0, start))
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
                samples.append(_sample(done, stats))

    await asyncio.gather(*(worker() for _ in range(parallel)))
    seconds = time.monotonic() - started
    await asyncio.sleep(settle_s)
    end = server.stats()
    samples.append(_sample(calls, end))
    return {
        "benchmark": "soak",
        "calls": calls,
        "parallel": parallel,
        "clip": shortest.name,
        "warmup_calls": warmup,
        "seconds": round(seconds, 1),
        "settle_s": settle_s,
        "rss_mb_start": start["rss_mb"],
        "rss_mb_end": end["rss_mb"],
        "rss_growth_mb": round(end["rss_mb"] - start["rss_mb"], 1),
        "threads_start": start["threads"],
        "threads_end": end["threads"],
        "pools_start": start.get("pools", {}),
        "pools_end": end.get("pools", {}),
        "memory_start": start.get("memory", {}),
        "memory_end": end.get("memory", {}),
        "live_calls_end": end["calls"],
        "calls_ended_by_server": end["calls_ended"],
        "dropped_frames": end["dropped_frames"],
        "errors": len(errors),
        "error_samples": errors[:20],
        "samples": samples,
        "machine": machine_info(),
    }


async def idle_sockets(
    server: ServerUnderTest,
    sockets: int,
    hold_s: float,
    busy: int = 0,
    metadata: bool = False,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """RSS with `sockets` media WebSockets that connect and never send audio: what an idle or
    half-open peer costs. With `metadata`, each sends one AudioMetadata (which starts the call's
    recognition: a VAD and a recognizer from the pools). Figures: idle, held `hold_s`, and
    `settle_s` after they left (pools shrink back meanwhile)."""
    import websockets

    from parley.transports.acs import AudioFormat, audio_metadata_message

    with cpu_burners(busy):
        await asyncio.sleep(1.0)
        idle = server.stats()
        connections = []
        refused: list[str] = []
        for index in range(sockets):
            try:
                connection = await websockets.connect(f"{server.url}?callId=idle-{index}", open_timeout=10)
                connections.append(connection)
                if metadata:
                    await connection.send(audio_metadata_message(AudioFormat(16000)))
            except Exception as exc:  # noqa: BLE001 - a refused socket is a finding (admission control)
                refused.append(f"socket {index}: {type(exc).__name__}: {exc}")
        await asyncio.sleep(hold_s)
        held = server.stats()
        still_open = sum(1 for connection in connections if connection.close_code is None)
        for connection in connections:
            await connection.close()
        await asyncio.sleep(settle_s)
        after = server.stats()
    return {
        "benchmark": "soak-idle-sockets",
        "sockets": sockets,
        "sent_audio_metadata": metadata,
        "settle_s": settle_s,
        "connected": len(connections),
        "refused": len(refused),
        "refused_samples": refused[:5],
        "open_after_hold": still_open,
        "hold_s": hold_s,
        "busy_burners": busy,
        "rss_mb_idle": idle["rss_mb"],
        "rss_mb_held": held["rss_mb"],
        "rss_mb_after": after["rss_mb"],
        "rss_held_above_idle_mb": round(held["rss_mb"] - idle["rss_mb"], 1),
        "rss_after_above_idle_mb": round(after["rss_mb"] - idle["rss_mb"], 1),
        "threads_idle": idle["threads"],
        "threads_held": held["threads"],
        "live_calls_held": held["calls"],
        "samples": [_sample(0, idle), _sample(sockets, held), _sample(0, after)],
        "machine": machine_info(),
    }


def idle_summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    return [
        ("sockets (connected / refused)", f"{result['sockets']} ({result['connected']} / {result['refused']})"),
        ("open after hold", f"{result['open_after_hold']} ({result['hold_s']} s)"),
        (
            "RSS idle -> held -> after (MB)",
            f"{result['rss_mb_idle']} -> {result['rss_mb_held']} -> {result['rss_mb_after']}",
        ),
        ("RSS held above idle (MB)", result["rss_held_above_idle_mb"]),
        ("threads idle -> held", f"{result['threads_idle']} -> {result['threads_held']}"),
    ]


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    return [
        ("calls", f"{result['calls']} ({result['parallel']} at a time, {result['seconds']} s)"),
        ("RSS start -> end (MB)", f"{result['rss_mb_start']} -> {result['rss_mb_end']}"),
        ("RSS growth (MB)", result["rss_growth_mb"]),
        ("threads start -> end", f"{result['threads_start']} -> {result['threads_end']}"),
        ("recognizers start -> end", f"{_pool(result['pools_start'])} -> {_pool(result['pools_end'])}"),
        ("C heap in use start -> end (MB)", f"{_heap(result['memory_start'])} -> {_heap(result['memory_end'])}"),
        ("CPU burners", result["busy_burners"]),
        ("live calls at end", result["live_calls_end"]),
        ("errors", result["errors"]),
    ]


def _pool(pools: dict[str, Any]) -> str:
    pool = pools.get("recognizer")
    return "-" if pool is None else f"{pool['created'] - pool.get('disposed', 0)} held ({pool['idle']} idle)"


def _heap(memory: dict[str, Any]) -> str:
    return str(memory.get("malloc_in_use_mb", "-"))
