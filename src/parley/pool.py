"""Pools of per-call engine instances (VAD, recognizer), reused from call to call.

Loading a pocketsphinx model takes ~0.5 s of CPU and Silero ~0.2 s. Paid at every call start, that
delays the call's first recognition and competes for the CPU every other call needs (before the
pool, with the Cython pocketsphinx binding, it stalled the event loop itself for hundreds of ms).
Instances are created ahead of time (warm-up at startup), handed to a call's recognition
thread, reset and returned when the call ends. Acquire/release are thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

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
    ) -> None:
        self.name = name
        self._create = create
        self._recycle = recycle
        self._dispose = dispose
        self._max_idle = max_idle
        self._idle: list[T] = []
        self._lock = threading.Lock()
        self.created = 0
        self.in_use = 0

    def acquire(self) -> T:
        """An idle instance, or a new one (call this off the event loop: creating may be slow)."""
        with self._lock:
            self.in_use += 1
            if self._idle:
                return self._idle.pop()
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
        try:
            self._recycle(item)
        except Exception:  # a broken instance is not worth keeping
            log.exception("%s pool: could not reset an instance; discarding it", self.name)
            self._dispose(item)
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(item)
                return
        self._dispose(item)

    def warm(self, count: int) -> None:
        """Create instances until `count` are idle (blocking; run it on a worker thread)."""
        while True:
            with self._lock:
                if len(self._idle) >= min(count, self._max_idle):
                    return
            item = self._create()
            with self._lock:
                self.created += 1
                self._idle.append(item)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for item in idle:
            self._dispose(item)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)
