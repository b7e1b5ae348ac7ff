"""The writer thread the durable stores share: records queued by any thread (never blocking),
written by one thread in batches, what cannot be queued or written dropped and counted.

Events named in COMMIT_NOW, call rows and `sync` requests are flushed at once; other events within
`batch_s` (or `batch_max` records). Retention runs every `purge_every_s`. A store supplies how a
call row and an event are written (`_write_call`, `_write_event`: records written, flush now?),
how a batch is made durable (`_flush`), the periodic `_purge_due` and `_close_backend`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from parley.records.store import CallRecord

log = logging.getLogger("parley.records")

_EVENT, _CALL, _SYNC, _STOP = range(4)


class BatchedWriter:
    # Errors of one record (a value JSON cannot hold): that record is dropped, the writer goes on.
    _record_errors: tuple[type[Exception], ...] = (ValueError, TypeError)

    def __init__(
        self, *, queue_size: int, batch_s: float, batch_max: int, purge_every_s: float, thread_name: str
    ) -> None:
        self.batch_s = batch_s
        self.batch_max = batch_max
        self.purge_every_s = purge_every_s
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_size)
        self._pending = 0  # records written since the last flush
        self._written = 0
        self._dropped = 0
        self._last_drop_log = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    # ------------------------------------------------------------------ writing (any thread)
    def begin_call(self, call: CallRecord) -> None:
        self._put((_CALL, call))

    def append(self, call_id: str, seq: int, record: Mapping[str, Any]) -> None:
        self._put((_EVENT, call_id, seq, record))

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._closed:
            self._drop(1, "the store is closed")
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop(1, "the writer queue is full")

    def _drop(self, count: int, why: str) -> None:
        self._dropped += count
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:  # one line per 10 s, whatever the rate
            self._last_drop_log = now
            log.warning("call records: %s; %d record(s) dropped so far", self._shown(why), self._dropped)

    def _shown(self, why: str) -> str:
        """`why` as it may be logged (a store whose errors can carry a secret scrubs it)."""
        return why

    # ------------------------------------------------------------------ control
    def sync(self, timeout: float = 2.0) -> bool:
        if self._closed or not self._thread.is_alive():
            return True  # nothing more will be written
        done = threading.Event()
        try:
            self._queue.put((_SYNC, done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        try:
            self._queue.put((_STOP,), timeout=timeout)
        except queue.Full:
            log.warning("call records: the writer queue stayed full; %d queued record(s) lost", self._queue.qsize())
        self._closed = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("call records: the writer did not finish within %.0f s", timeout)
            return
        self._close_backend()

    def stats(self) -> dict[str, int]:
        return {"written": self._written, "dropped": self._dropped, "queued": self._queue.qsize()}

    # ------------------------------------------------------------------ the store's part
    def _write_call(self, call: CallRecord) -> tuple[int, bool]:
        raise NotImplementedError

    def _write_event(self, call_id: str, seq: int, record: Mapping[str, Any]) -> tuple[int, bool]:
        raise NotImplementedError

    def _flush(self, pending: int) -> None:
        """Make the `pending` records written since the last flush durable (or drop and count them)."""
        raise NotImplementedError

    def _purge_due(self) -> None:
        """Retention, every `purge_every_s` (errors logged, never raised)."""

    def _close_backend(self) -> None:
        """The writer has stopped: release the connections."""

    # ------------------------------------------------------------------ the writer thread
    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, 0
        if pending:
            self._flush(pending)

    def _run(self) -> None:
        since = 0.0  # when the first record not flushed yet was written
        next_purge = time.monotonic() + self.purge_every_s
        waiters: list[threading.Event] = []
        stopping = False
        while not stopping:
            now = time.monotonic()
            timeout = next_purge - now
            if self._pending:
                timeout = min(timeout, since + self.batch_s - now)
            urgent = False
            for item in self._next_items(max(0.0, timeout)):
                kind = item[0]
                if kind == _EVENT:
                    written, commit_now = self._write(self._write_event, item)
                    urgent |= commit_now
                elif kind == _CALL:
                    written, _ = self._write(self._write_call, item)
                    urgent = True
                elif kind == _SYNC:
                    waiters.append(item[1])
                    written, urgent = 0, True
                else:
                    written, urgent, stopping = 0, True, True
                if written and not self._pending:
                    since = time.monotonic()
                self._pending += written
            if urgent or self._pending >= self.batch_max or time.monotonic() - since >= self.batch_s:
                self._flush_pending()
            for waiter in waiters:
                waiter.set()
            waiters.clear()
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.purge_every_s
                self._purge_due()

    def _next_items(self, timeout: float) -> list[tuple[Any, ...]]:
        """What is queued (up to `batch_max`), waiting up to `timeout` for the first."""
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(items) < self.batch_max:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _write(self, write: Callable[..., tuple[int, bool]], item: tuple[Any, ...]) -> tuple[int, bool]:
        try:
            return write(*item[1:])
        except self._record_errors as exc:
            self._drop(1, f"writing failed ({exc})")
            return 0, False
