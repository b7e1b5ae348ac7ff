"""Pools of per-call engine instances (VAD, recognizer), reused from call to call.

Loading a pocketsphinx model takes ~0.5 s of CPU and Silero ~0.2 s. Paid at every call start, that
delays the call's first recognition and competes for the CPU every other call needs (before the
pool, with the Cython pocketsphinx binding, it stalled the event loop itself for hundreds of ms).
Instances are created ahead of time (warm-up at startup), handed to a call's recognition
thread, reset and returned when the call ends. Acquire/release are thread-safe.

A burst of calls grows a pool (a recognizer is ~90 MB); afterwards the pool shrinks back: `shrink`
disposes of the instances idle for longer than `idle_s`, never going below the `warm` count, and
then returns the freed native memory to the system (`parley.native_memory.trim`). The server
calls it periodically off the event loop (`PoolReaper`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from parley import native_memory

T = TypeVar("T")
log = logging.getLogger(__name__)


class EnginePool(Generic[T]):
    def __init__(
        self,
        name: str,
        create: Callable[[], T],
        *,
        recycle: Callable[[T], None] = lambda item: None,
        dispose: Callable[[T], None] = lambda item: None,
        max_idle: int = 8,
        warm: int = 0,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._create = create
        self._recycle = recycle
        self._dispose = dispose
        self._max_idle = max_idle
        self.warm_count = warm  # idle instances `shrink` keeps
        self.idle_s = idle_s
        self._clock = clock
        self._idle: list[tuple[T, float]] = []  # (instance, when it became idle), most recent last
        self._lock = threading.Lock()
        self.created = 0
        self.disposed = 0
        self.released = 0  # instances given back (calls ended)
        self.in_use = 0

    def acquire(self) -> T:
        """An idle instance, or a new one (call this off the event loop: creating may be slow)."""
        with self._lock:
            self.in_use += 1
            if self._idle:
                return self._idle.pop()[0]  # the most recently used: the oldest ones age out
        try:
            item = self._create()
        except BaseException:
            with self._lock:
                self.in_use -= 1
            raise
        with self._lock:
            self.created += 1
        return item

    def release(self, item: T) -> None:
        with self._lock:
            self.in_use -= 1
            self.released += 1
        try:
            self._recycle(item)
        except Exception:  # a broken instance is not worth keeping
            log.exception("%s pool: could not reset an instance; discarding it", self.name)
            self._discard(item)
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append((item, self._clock()))
                return
        self._discard(item)

    def warm(self, count: int) -> None:
        """Create instances until `count` are idle (blocking; run it on a worker thread)."""
        while True:
            with self._lock:
                if len(self._idle) >= min(count, self._max_idle):
                    return
            item = self._create()
            with self._lock:
                self.created += 1
                self._idle.append((item, self._clock()))

    def shrink(self) -> int:
        """Dispose of the instances idle for more than `idle_s` beyond the first `warm_count`;
        returns how many (blocking: run it off the event loop)."""
        now = self._clock()
        with self._lock:
            keep = min(self.warm_count, len(self._idle))
            # The most recently used are at the end; the oldest beyond the warm ones go first.
            stale = [
                i for i, (_, since) in enumerate(self._idle[: len(self._idle) - keep]) if now - since > self.idle_s
            ]
            expired = [self._idle[i][0] for i in stale]
            for i in reversed(stale):
                del self._idle[i]
        for item in expired:
            self._discard(item)
        if expired:
            log.info("%s pool: released %d idle instance(s); %d idle kept", self.name, len(expired), self.idle)
        return len(expired)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for item, _ in idle:
            self._discard(item)

    def _discard(self, item: T) -> None:
        """Dispose of an instance; a failure is logged, never raised (the caller is freeing memory)."""
        try:
            self._dispose(item)
        except Exception:  # an engine that fails to close must not stop the others
            log.exception("%s pool: disposing of an instance failed", self.name)
        with self._lock:
            self.disposed += 1

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def figures(self) -> dict[str, int]:
        """`{"created", "disposed", "idle", "in_use"}` for /api/stats."""
        with self._lock:
            return {"created": self.created, "disposed": self.disposed, "idle": len(self._idle), "in_use": self.in_use}


class PoolReaper:
    """A daemon thread that, every `interval_s`, shrinks the pools and, when calls ended since the
    last round, trims the C heap.

    Each call's recognition runs on a thread of its own, so what its engines freed sits in one of
    glibc's per-thread arenas, where the next call's thread may not reuse it: without a trim, RSS
    creeps as calls come and go. Shrinking and trimming run here, not on the event loop: disposing
    of a recognizer frees ~90 MB and `malloc_trim` walks every arena (a few ms)."""

    def __init__(self, pools: list[EnginePool[Any]], interval_s: float = 5.0) -> None:
        self._pools = pools
        self.interval_s = interval_s
        self._releases = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def run_once(self) -> int:
        released = 0
        for pool in self._pools:
            try:
                released += pool.shrink()
            except Exception:  # the reaper must survive one bad pool
                log.exception("%s pool: shrinking failed", pool.name)
        releases = sum(pool.released for pool in self._pools)
        if released or releases != self._releases:
            self._releases = releases
            native_memory.trim()
        return released

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_once()
