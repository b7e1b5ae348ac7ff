"""Process-level health figures: event-loop lag, CPU, memory, threads, call counters.

The loop-lag monitor is a task that asks to wake every `interval` and records how late it woke:
the one number that says whether the event loop (and so every call's audio) is keeping up.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil

from parley import native_memory


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
