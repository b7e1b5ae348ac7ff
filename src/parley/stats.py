"""Process-level health figures: event-loop lag, CPU, memory, threads, call counters.

The loop-lag monitor is a task that asks to wake every `interval` and records how late it woke:
the one number that says whether the event loop (and so every call's audio) is keeping up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from parley import native_memory

log = logging.getLogger(__name__)


def percentiles(values: list[float] | np.ndarray) -> dict[str, float | None]:
    """`{"p50","p95","p99","max"}` (None when there are no values)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(data.max()), 3),
    }


RECENT_WINDOW_S = 5.0  # what "the loop lag now" means for admission (parley.admission)


class LoopLagMonitor:
    def __init__(self, interval_s: float = 0.010, keep: int = 60_000) -> None:
        self.interval_s = interval_s
        self._lags_ms: deque[float] = deque(maxlen=keep)  # ~10 min at 10 ms
        # (monotonic time, lag) of the last seconds, never reset by /api/stats?reset=true: the
        # overload check reads it. Bounded by count too (2x the window at the nominal interval).
        self._recent: deque[tuple[float, float]] = deque(maxlen=int(2 * RECENT_WINDOW_S / interval_s) + 1)
        self.on_lag: Callable[[float], None] | None = None  # sees each lag in ms (parley.metrics' histogram)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, (loop.time() - expected) * 1000))

    def record(self, lag_ms: float, t: float | None = None) -> None:
        """One measurement (what `run` does every interval; tests feed it directly)."""
        self._lags_ms.append(lag_ms)
        self._recent.append((time.monotonic() if t is None else t, lag_ms))
        if self.on_lag is not None:
            self.on_lag(lag_ms)

    def recent_p99(self, window_s: float = RECENT_WINDOW_S, now: float | None = None) -> float | None:
        """p99 of the lags measured in the last `window_s` (None: no measurement in it). A loop that
        is stalled right now has not measured the stall yet: it shows once the loop runs again."""
        since = (time.monotonic() if now is None else now) - window_s
        values = [lag for t, lag in list(self._recent) if t >= since]
        if not values:
            return None
        return round(float(np.percentile(values, 99)), 3)

    def snapshot(self, reset: bool = False) -> dict[str, float | None]:
        values = list(self._lags_ms)
        if reset:
            self._lags_ms.clear()
        return percentiles(values)


@dataclass
class ServerStats:
    """Counters summed over ended calls (live calls report theirs at the end)."""

    calls_started: int = 0
    calls_ended: int = 0
    dropped_frames: int = 0
    input_errors: int = 0
    calls_refused: dict[str, int] = field(default_factory=dict)  # media sockets refused, by reason
    on_refused: Callable[[str], None] | None = None  # sees each refusal's reason (parley.metrics' counter)
    monitor: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    _process: psutil.Process = field(default_factory=psutil.Process)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call_ended(self, dropped_frames: int, input_errors: int) -> None:
        with self._lock:
            self.calls_ended += 1
            self.dropped_frames += dropped_frames
            self.input_errors += input_errors

    def call_refused(self, reason: str) -> None:
        with self._lock:
            self.calls_refused[reason] = self.calls_refused.get(reason, 0) + 1
        if self.on_refused is not None:
            self.on_refused(reason)

    def snapshot(self, live_calls: int, reset: bool = False) -> dict[str, object]:
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            memory = self._process.memory_info()
            threads = self._process.num_threads()
        return {
            "time": time.monotonic(),
            "calls": live_calls,
            "calls_started": self.calls_started,
            "calls_ended": self.calls_ended,
            "dropped_frames": self.dropped_frames,
            "input_errors": self.input_errors,
            "calls_refused": dict(self.calls_refused),
            "loop_lag_ms": self.monitor.snapshot(reset),
            "loop_lag_recent_p99_ms": self.monitor.recent_p99(),  # the last RECENT_WINDOW_S seconds
            "cpu_seconds": round(cpu.user + cpu.system, 3),
            "rss_mb": round(memory.rss / 2**20, 1),
            "threads": threads,
            "memory": memory_figures(),
        }


def memory_figures() -> dict[str, object]:
    """Where the RSS is: the Python heap (pymalloc blocks, tracemalloc when tracing) and the C heap
    (glibc malloc: bytes in use vs held free in its arenas, the fragmentation `malloc_trim` returns)."""
    figures: dict[str, object] = {"python_blocks": sys.getallocatedblocks()}
    if tracemalloc.is_tracing():
        figures["tracemalloc_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
    figures.update(native_memory.malloc_figures())
    return figures


# ---------------------------------------------------------------------------------------------
# Worker processes (parley.workers): every worker's figures, whichever worker a request lands on
# ---------------------------------------------------------------------------------------------

RESET_POLL_S = 0.1  # how soon a worker sees another worker's /api/stats?reset=true
PUBLISH_EVERY_S = 0.5  # how stale another worker's figures in /api/stats may be


class WorkerStatsBoard:
    """The /api/stats figures of the workers of one `parley serve --workers N`, through files in the
    supervisor's private run directory: with one shared listening socket a request lands on any
    worker, so each worker writes its snapshot there (`stats-<instance>.json`, replaced atomically)
    and answers with every worker's. A reset bumps a generation number in `reset-generation`, which
    every worker polls, so `reset=true` resets them all (each snapshot says the generation it has)."""

    def __init__(self, run_dir: Path, instance: str) -> None:
        self.run_dir = Path(run_dir)
        self.instance = instance
        self.path = self.run_dir / f"stats-{instance}.json"
        self._reset_path = self.run_dir / "reset-generation"
        self.generation = self._read_generation()  # a worker (re)started later does not reset
        self._last_error_log = -math.inf

    def _read_generation(self) -> int:
        try:
            return int(self._reset_path.read_text() or 0)
        except (OSError, ValueError):  # no reset yet (or a file being replaced: seen next poll)
            return 0

    def request_reset(self) -> int:
        """Every worker resets its loop-lag figures (this one: by its caller, now); the new generation."""
        self.generation = max(self.generation, self._read_generation()) + 1
        self._write(self._reset_path, str(self.generation))
        return self.generation

    def reset_due(self) -> bool:
        """Whether another worker asked for a reset since this one last looked."""
        generation = self._read_generation()
        if generation <= self.generation:
            return False
        self.generation = generation
        return True

    def annotate(self, snapshot: dict[str, object]) -> dict[str, object]:
        snapshot.update(
            instance=self.instance, pid=os.getpid(), wall_time=round(time.time(), 3), reset_generation=self.generation
        )
        return snapshot

    def publish(self, snapshot: dict[str, object]) -> None:
        self._write(self.path, json.dumps(self.annotate(snapshot), default=str))

    def workers(self, own: dict[str, object]) -> list[dict[str, object]]:
        """Every worker's latest snapshot (this worker's: `own`, fresh), by instance id."""
        found: dict[str, dict[str, object]] = {}
        for path in sorted(self.run_dir.glob("stats-*.json")):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):  # a worker that just died (its file removed): skipped
                continue
            found[str(snapshot.get("instance", path.stem))] = snapshot
        found[self.instance] = self.annotate(dict(own))
        return [found[name] for name in sorted(found)]

    async def run(self, snapshot: Callable[[bool], dict[str, object]]) -> None:
        """Publish this worker's snapshot every PUBLISH_EVERY_S and follow resets, for ever (a task
        of the server's lifespan). `snapshot(reset)` is what /api/stats answers."""
        next_publish = 0.0
        while True:
            await asyncio.sleep(RESET_POLL_S)
            try:
                reset = self.reset_due()
                if reset:
                    snapshot(True)  # the figures since the last reset end here
                if reset or time.monotonic() >= next_publish:
                    next_publish = time.monotonic() + PUBLISH_EVERY_S
                    self.publish(snapshot(False))
            except Exception:  # a full disk must not end the stats (or the worker): retried next time
                if time.monotonic() - self._last_error_log >= 60:
                    self._last_error_log = time.monotonic()
                    log.exception("worker stats: could not publish to %s", self.run_dir)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)  # readers see the old file or the new one, never half of one
