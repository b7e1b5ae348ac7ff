"""`parley bench load`: N concurrent callers, each talking and barging in on a schedule.

`--profile plumbing` runs the server with cost-free test doubles for recognizer, agent and TTS
(`parley.testing.doubles`; the VAD stays real) to measure the server's own capacity; `embedded` runs the
default offline pipeline. The event-loop lag is measured inside the server (/api/stats; with
`--workers N`, in each worker: the worst worker's is the server's), pacing jitter and barge-in times
at the callers, CPU and RSS over the server's processes (supervisor and workers, summed). `--sweep`
raises N until the worst worker's loop lag p99 or the pacing jitter p99 exceeds 20 ms, the barge-in
p95 exceeds 250 ms, a barge-in is missed or a call fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from parley.benchmarks.common import Clip, ServerUnderTest, console, machine_info
from parley.benchmarks.loadgen import LoadPlan, run_load
from parley.figures import CallFigures
from parley.stats import percentiles

# LoadPlan, run_load

LAG_P99_LIMIT_MS = 20.0  # in every worker
JITTER_P99_LIMIT_MS = 20.0
BARGE_IN_P95_LIMIT_MS = 250.0
WORKERS_SETTLE_S = 5.0  # how long every worker may take to follow a reset or publish fresh figures
SWEEP_STEPS = (10, 25, 50, 75, 100, 150, 200, 250, 300, 350, 400, 500, 600)
# The embedded profile runs out of Whisper long before the loop: finer steps, and a limit on how
# long the final text takes (the caller's end of speech -> final ready, p95).
EMBEDDED_SWEEP_STEPS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32)
FINAL_READY_P95_LIMIT_MS = 1000.0
FIGURES_SAMPLE = 60  # calls whose records are read for the server-side figures


async def run_point(server: ServerUnderTest, calls: int, seconds: float, clip: Clip) -> dict[str, Any]:
    before = by_worker(reset_every_worker(server))
    tree_before = server.process_tree()
    client_cpu = time.process_time()
    started = time.monotonic()
    result = await run_load(
        server.url, LoadPlan(calls=calls, seconds=seconds, clip=clip.pcm, ramp_s=min(10.0, max(1.0, calls / 30)))
    )
    await asyncio.sleep(1.0)  # let the server finish the hang-ups it is still processing
    wall = time.monotonic() - started
    tree_after = server.process_tree()
    after = by_worker(fresh_stats(server, since=time.time()))
    errors = result.errors()
    lags = {name: snapshot["loop_lag_ms"] for name, snapshot in after.items()}
    if tree_before is not None and tree_after is not None:  # the supervisor and its workers, summed
        server_cpu_s, rss_mb = tree_after.cpu_s - tree_before.cpu_s, round(tree_after.rss_mb, 1)
    else:
        server_cpu_s = sum(after[name]["cpu_seconds"] - before.get(name, after[name])["cpu_seconds"] for name in after)
        rss_mb = round(sum(snapshot["rss_mb"] for snapshot in after.values()), 1)
    point: dict[str, Any] = {
        "calls": calls,
        "seconds": seconds,
        "workers": len(after),
        "loop_lag_ms": max(lags.values(), key=lambda lag: -1.0 if lag["p99"] is None else lag["p99"]),
        "pacing_jitter_ms": percentiles(result.jitter_ms()),
        "onset_to_stop_ms": percentiles(result.onset_to_stop_ms()),
        "barge_ins": len(result.onset_to_stop_ms()),
        "missed": result.missed(),
        "cpu_percent": round(100 * server_cpu_s / wall, 1),
        # Server CPU over the whole run (connects and hang-ups included) per second of call audio.
        "cpu_ms_per_call_s": round(1000 * server_cpu_s / (calls * seconds), 2),
        "client_cpu_percent": round(100 * (time.process_time() - client_cpu) / wall, 1),
        "rss_mb": rss_mb,
        "errors": len(errors),
        "error_samples": errors[:10],
        "dropped_frames": sum(_delta(after, before, name, "dropped_frames") for name in after),
    }
    point.update(server_figures(server, [call.call_id for call in result.calls]))
    if len(after) > 1:
        point["loop_lag_ms_by_worker"] = lags
        point["calls_by_worker"] = {name: _delta(after, before, name, "calls_started") for name in after}
    return point


def server_figures(server: ServerUnderTest, call_ids: list[str], sample: int = FIGURES_SAMPLE) -> dict[str, Any]:
    """The server's own latency figures of (a sample of) the calls, from their call records: the
    caller's end of speech -> final text ready, and -> the answer's first audio (voice-to-voice).
    The same derivation as /metrics (parley.figures); empty when the records cannot be read."""
    seconds: dict[str, list[float]] = {"speech_end_to_final": [], "voice_to_voice": []}
    try:
        for call_id in call_ids[:sample]:
            figures = CallFigures()
            for record in server.events(call_id):
                for figure in figures.feed(record):
                    if figure.name in seconds:
                        seconds[figure.name].append(figure.seconds)
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        console.print(f"[yellow]warning:[/yellow] no server figures from the call records: {exc}")
        return {}
    return {
        "final_ready_ms": percentiles([1000 * value for value in seconds["speech_end_to_final"]]),
        "voice_to_voice_ms": percentiles([1000 * value for value in seconds["voice_to_voice"]]),
    }


def by_worker(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A server's /api/stats by worker instance (one process: itself, as "server")."""
    workers = stats.get("workers")
    if not workers:
        return {"server": stats}
    return {str(worker["instance"]): worker for worker in workers}


def _delta(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]], name: str, key: str) -> int:
    return int(after[name][key]) - int(before.get(name, {}).get(key, 0))


def reset_every_worker(server: ServerUnderTest) -> dict[str, Any]:
    """Reset the server's figures (every worker's) and return them once every worker has reset."""
    reset = server.stats(reset=True)
    if "workers" not in reset:
        return reset
    generation = reset["reset_generation"]
    return _poll(server, lambda worker: worker["reset_generation"] >= generation, "follow the reset")


def fresh_stats(server: ServerUnderTest, since: float) -> dict[str, Any]:
    """The server's figures with every worker's published at or after `since` (wall clock)."""
    stats = server.stats()
    if "workers" not in stats:
        return stats
    return _poll(server, lambda worker: worker["wall_time"] >= since, "publish fresh figures")


def _poll(server: ServerUnderTest, ready: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WORKERS_SETTLE_S
    while True:
        stats = server.stats()
        workers = stats["workers"]
        if len(workers) >= server.workers and all(ready(worker) for worker in workers):
            return stats
        if time.monotonic() > deadline:
            console.print(f"[yellow]warning:[/yellow] not every worker did {what} within {WORKERS_SETTLE_S:.0f} s")
            return stats
        time.sleep(0.1)


def within_limits(point: dict[str, Any]) -> bool:
    """The capacity limit: every worker's loop lag p99 and the callers' pacing jitter p99 within
    20 ms, barge-ins stopped within 250 ms (p95) and none missed, no call failed."""
    lag = point["loop_lag_ms"]["p99"]  # the worst worker's
    jitter = point["pacing_jitter_ms"]["p99"]
    barge = point["onset_to_stop_ms"]["p95"]
    return (
        lag is not None
        and lag <= LAG_P99_LIMIT_MS
        and jitter is not None
        and jitter <= JITTER_P99_LIMIT_MS
        and barge is not None
        and barge <= BARGE_IN_P95_LIMIT_MS
        and point["missed"] == 0
        and point["errors"] == 0
        and _final_ready_within_limit(point)
    )


def _final_ready_within_limit(point: dict[str, Any]) -> bool:
    """Only where finals come from a real recognizer (embedded); the plumbing double is instant."""
    if point.get("profile") != "embedded":
        return True
    p95 = point.get("final_ready_ms", {}).get("p95")
    return p95 is not None and p95 <= FINAL_READY_P95_LIMIT_MS


async def run(
    server: ServerUnderTest, calls: int, seconds: float, clip: Clip, profile: str, sweep: bool
) -> dict[str, Any]:
    summary: dict[str, Any] = {"benchmark": "load", "profile": profile, "machine": machine_info()}
    if not sweep:
        summary.update(await run_point(server, calls, seconds, clip))
        return summary
    points = []
    max_calls = 0
    steps = EMBEDDED_SWEEP_STEPS if profile == "embedded" else SWEEP_STEPS
    for n in [step for step in steps if step >= calls] or [calls]:
        point = await run_point(server, n, seconds, clip)
        point["profile"] = profile
        points.append(point)
        console.print(
            f"{n} calls: loop lag p99 {point['loop_lag_ms']['p99']} ms (worst worker), "
            f"pacing jitter p99 {point['pacing_jitter_ms']['p99']} ms, "
            f"barge-in p95 {point['onset_to_stop_ms']['p95']} ms, missed {point['missed']}, errors {point['errors']}, "
            f"final ready p95 {point.get('final_ready_ms', {}).get('p95')} ms"
        )
        if not within_limits(point):
            break
        max_calls = n
    summary.update(
        max_calls=max_calls,
        limits={
            "loop_lag_p99_ms": LAG_P99_LIMIT_MS,
            "pacing_jitter_p99_ms": JITTER_P99_LIMIT_MS,
            "onset_to_stop_p95_ms": BARGE_IN_P95_LIMIT_MS,
            "missed": 0,
            "errors": 0,
            **({"final_ready_p95_ms": FINAL_READY_P95_LIMIT_MS} if profile == "embedded" else {}),
        },
        points=points,
    )
    return summary


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    if "points" in result:
        rows: list[tuple[str, object]] = [("profile", result["profile"]), ("max_calls", result["max_calls"])]
        for point in result["points"]:
            rows.append((f"{point['calls']} calls: loop lag (worst worker)", point["loop_lag_ms"]))
            rows.append((f"{point['calls']} calls: pacing jitter", point["pacing_jitter_ms"]))
            rows.append((f"{point['calls']} calls: barge-in", point["onset_to_stop_ms"]))
            rows.append((f"{point['calls']} calls: CPU ms per call-second", point["cpu_ms_per_call_s"]))
            rows.append((f"{point['calls']} calls: errors", point["errors"]))
            if "final_ready_ms" in point:
                rows.append((f"{point['calls']} calls: final ready", point["final_ready_ms"]))
        return rows
    return [
        *_worker_rows(result),
        ("profile", result["profile"]),
        ("calls", result["calls"]),
        ("loop lag (server)", result["loop_lag_ms"]),
        ("pacing jitter (callers)", result["pacing_jitter_ms"]),
        ("onset -> StopAudio", result["onset_to_stop_ms"]),
        ("end of speech -> final ready (server)", result.get("final_ready_ms", "-")),
        ("voice-to-voice (server)", result.get("voice_to_voice_ms", "-")),
        ("barge-ins / missed", f"{result['barge_ins']} / {result['missed']}"),
        ("server CPU %", result["cpu_percent"]),
        ("server CPU ms per call-second", result["cpu_ms_per_call_s"]),
        ("client CPU %", result["client_cpu_percent"]),
        ("server RSS MB", result["rss_mb"]),
        ("errors", result["errors"]),
        ("dropped frames", result["dropped_frames"]),
    ]


def _worker_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    if "loop_lag_ms_by_worker" not in result:
        return []
    rows: list[tuple[str, object]] = [("workers", result["workers"])]
    for name, lag in result["loop_lag_ms_by_worker"].items():
        rows.append((f"loop lag {name} ({result['calls_by_worker'].get(name, 0)} calls)", lag))
    return rows
