"""`parley bench load`: N concurrent callers, each talking and barging in on a schedule.

`--profile plumbing` runs the server with cost-free test doubles for recognizer, agent and TTS
(`parley.testing.doubles`; the VAD stays real) to measure the server's own capacity; `embedded` runs the
default offline pipeline. The event-loop lag is measured inside the server (/api/stats), pacing
jitter and barge-in times at the callers. `--sweep` raises N until the loop lag p99 exceeds 20 ms
or the barge-in p95 exceeds 250 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from parley.benchmarks.common import Clip, ServerUnderTest, console, machine_info
from parley.benchmarks.loadgen import LoadPlan, run_load
from parley.stats import percentiles

# LoadPlan, run_load

LAG_P99_LIMIT_MS = 20.0
BARGE_IN_P95_LIMIT_MS = 250.0
SWEEP_STEPS = (10, 25, 50, 75, 100, 150, 200, 250, 300, 350, 400, 500, 600)


async def run_point(server: ServerUnderTest, calls: int, seconds: float, clip: Clip) -> dict[str, Any]:
    before = server.stats(reset=True)
    client_cpu = time.process_time()
    started = time.monotonic()
    result = await run_load(
        server.url, LoadPlan(calls=calls, seconds=seconds, clip=clip.pcm, ramp_s=min(10.0, max(1.0, calls / 30)))
    )
    await asyncio.sleep(1.0)  # let the server finish the hang-ups it is still processing
    wall = time.monotonic() - started
    after = server.stats()
    errors = result.errors()
    server_cpu_s = after["cpu_seconds"] - before["cpu_seconds"]
    return {
        "calls": calls,
        "seconds": seconds,
        "loop_lag_ms": after["loop_lag_ms"],
        "pacing_jitter_ms": percentiles(result.jitter_ms()),
        "onset_to_stop_ms": percentiles(result.onset_to_stop_ms()),
        "barge_ins": len(result.onset_to_stop_ms()),
        "missed": result.missed(),
        "cpu_percent": round(100 * server_cpu_s / wall, 1),
        # Server CPU over the whole run (connects and hang-ups included) per second of call audio.
        "cpu_ms_per_call_s": round(1000 * server_cpu_s / (calls * seconds), 2),
        "client_cpu_percent": round(100 * (time.process_time() - client_cpu) / wall, 1),
        "rss_mb": after["rss_mb"],
        "errors": len(errors),
        "error_samples": errors[:10],
        "dropped_frames": after["dropped_frames"] - before["dropped_frames"],
    }


def within_limits(point: dict[str, Any]) -> bool:
    lag = point["loop_lag_ms"]["p99"]
    barge = point["onset_to_stop_ms"]["p95"]
    return (
        lag is not None
        and lag <= LAG_P99_LIMIT_MS
        and barge is not None
        and barge <= BARGE_IN_P95_LIMIT_MS
        and point["missed"] == 0
    )


async def run(
    server: ServerUnderTest, calls: int, seconds: float, clip: Clip, profile: str, sweep: bool
) -> dict[str, Any]:
    summary: dict[str, Any] = {"benchmark": "load", "profile": profile, "machine": machine_info()}
    if not sweep:
        summary.update(await run_point(server, calls, seconds, clip))
        return summary
    points = []
    max_calls = 0
    for n in [step for step in SWEEP_STEPS if step >= calls] or [calls]:
        point = await run_point(server, n, seconds, clip)
        points.append(point)
        console.print(
            f"{n} calls: loop lag p99 {point['loop_lag_ms']['p99']} ms, "
            f"barge-in p95 {point['onset_to_stop_ms']['p95']} ms, missed {point['missed']}"
        )
        if not within_limits(point):
            break
        max_calls = n
    summary.update(
        max_calls=max_calls,
        limits={"loop_lag_p99_ms": LAG_P99_LIMIT_MS, "onset_to_stop_p95_ms": BARGE_IN_P95_LIMIT_MS},
        points=points,
    )
    return summary


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    if "points" in result:
        rows: list[tuple[str, object]] = [("profile", result["profile"]), ("max_calls", result["max_calls"])]
        for point in result["points"]:
            rows.append((f"{point['calls']} calls: loop lag", point["loop_lag_ms"]))
            rows.append((f"{point['calls']} calls: barge-in", point["onset_to_stop_ms"]))
            rows.append((f"{point['calls']} calls: CPU ms per call-second", point["cpu_ms_per_call_s"]))
        return rows
    return [
        ("profile", result["profile"]),
        ("calls", result["calls"]),
        ("loop lag (server)", result["loop_lag_ms"]),
        ("pacing jitter (callers)", result["pacing_jitter_ms"]),
        ("onset -> StopAudio", result["onset_to_stop_ms"]),
        ("barge-ins / missed", f"{result['barge_ins']} / {result['missed']}"),
        ("server CPU %", result["cpu_percent"]),
        ("server CPU ms per call-second", result["cpu_ms_per_call_s"]),
        ("client CPU %", result["client_cpu_percent"]),
        ("server RSS MB", result["rss_mb"]),
        ("errors", result["errors"]),
        ("dropped frames", result["dropped_frames"]),
    ]
