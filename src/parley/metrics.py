"""Prometheus metrics for GET /metrics.

Everything a call contributes comes from its event records (one observer on the call registry, see
parley.figures), so the metrics cannot disagree with the records; the event-loop lag comes from the
loop-lag monitor and the recognition backlog from the overload watch's readings.

One process: each app has its own CollectorRegistry (never the global default one), so servers
made in one process (tests, benchmarks) count separately. Several worker processes (`parley serve
--workers N`): the supervisor sets PROMETHEUS_MULTIPROC_DIR, each worker writes its values to files
there, and a scrape of any worker merges them all (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from parley.figures import FIGURES, CallFigures, end_reason_label, engine_error_kind

if TYPE_CHECKING:
    from parley.media.events import CallRegistry

log = logging.getLogger(__name__)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets (seconds) for each figure: fine where the figure should be, wide enough to see it fail.
BUCKETS: dict[str, tuple[float, ...]] = {
    "bargein_onset_to_stop": (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
    "bargein_decision_to_stop": (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    "voice_to_voice": (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0),
    "speech_end_to_final": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
    "agent_first_text": (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0),
    "tts_first_audio": (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.6, 3.2),
    "turn_first_audio": (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0),
}
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def multiproc_dir() -> Path | None:
    """Where the workers' values go (None: one process, values in memory)."""
    value = os.environ.get(MULTIPROC_DIR_ENV, "").strip()
    return Path(value) if value else None


class Metrics:
    """The metrics of one server (one app); `observe` is the call registry's event observer."""

    def __init__(self) -> None:
        self.directory = multiproc_dir()
        _store_values_for(self.directory)
        # In multiprocess mode the values live in the files and a scrape collects them afresh: the
        # metric objects belong to no registry.
        self.registry: CollectorRegistry | None = None if self.directory else CollectorRegistry()
        if self.registry is not None:
            ProcessCollector(registry=self.registry)  # CPU, memory, open files (one process only)
        registry = self.registry
        self.active_calls = Gauge(
            "parley_active_calls", "Calls in progress.", registry=registry, multiprocess_mode="livesum"
        )
        self.calls = Counter("parley_calls", "Calls started.", registry=registry)
        self.calls_ended = Counter(
            "parley_calls_ended", "Calls ended, by end reason (without its details).", ["reason"], registry=registry
        )
        self.calls_refused = Counter(
            "parley_calls_refused",
            "Media sockets refused before their call started, by reason (bad_call_id, duplicate_call_id,"
            " draining, overloaded, capacity).",
            ["reason"],
            registry=registry,
        )
        self.turns = Counter(
            "parley_turns", "Agent turns ended, by kind and outcome.", ["kind", "outcome"], registry=registry
        )
        self.bargein_events = Counter(
            "parley_bargein_events",
            "Barge-in events: paused, pending, resumed, decided, confirmed, ignored.",
            ["event"],
            registry=registry,
        )
        self.engine_errors = Counter(
            "parley_engine_errors",
            "Engine failures seen by calls, by kind (stt, tts, agent, call_control).",
            ["kind"],
            registry=registry,
        )
        self.figures = {
            name: Histogram(f"parley_{name}_seconds", f"{meaning} (s).", buckets=BUCKETS[name], registry=registry)
            for name, meaning in FIGURES.items()
        }
        self.event_loop_lag = Histogram(
            "parley_event_loop_lag_seconds",
            "How late the event loop woke for a 10 ms timer (every call's audio waits as long).",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.recognition_backlog = Gauge(
            "parley_recognition_backlog_frames",
            "Audio frames waiting for recognition in the live call furthest behind.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._calls: dict[str, _CallState] = {}

    def attach(self, registry: CallRegistry) -> None:
        """Count what `registry`'s calls record, the loop lag its monitor measures and the calls refused."""
        registry.observers.append(self.observe)
        registry.stats.monitor.on_lag = self.loop_lag
        registry.stats.on_refused = self.call_refused

    def close(self) -> None:
        """This process serves no more calls: in multiprocess mode its live gauges stop counting."""
        if self.directory is not None:
            worker_exited(os.getpid())

    # ------------------------------------------------------------------ feeds
    def observe(self, record: dict[str, Any]) -> None:
        """One event record of a call (EventLog calls this; it must never raise into the call)."""
        try:
            self._observe(record)
        except Exception:  # a bug here must cost a figure, never the call
            log.exception("metrics: could not account for the event %s", record.get("event"))

    def call_refused(self, reason: str) -> None:
        self.calls_refused.labels(reason).inc()

    def loop_lag(self, lag_ms: float) -> None:
        self.event_loop_lag.observe(lag_ms / 1000)

    def backlog(self, frames: int) -> None:
        self.recognition_backlog.set(frames)

    def _observe(self, record: dict[str, Any]) -> None:
        name = record["event"]
        call_id = record["call_id"]
        if name == "call_started":
            self._calls[call_id] = _CallState()
            self.calls.inc()
            self.active_calls.inc()
            return
        call = self._calls.pop(call_id, None) if name == "call_ended" else self._calls.get(call_id)
        if call is None:  # a record after its call ended (a late Call Automation callback)
            return
        if name == "call_ended":
            self._call_ended(call, record)
            return
        for figure in call.figures.feed(record):
            self.figures[figure.name].observe(max(0.0, figure.seconds))
        if name.startswith("barge_in_"):
            self.bargein_events.labels(name.removeprefix("barge_in_")).inc()
        elif name == "turn_started":
            call.turn_kinds[record["turn_id"]] = str(record.get("kind", ""))
        elif name in ("turn_completed", "turn_cancelled"):
            self._turn_ended(call, record)
        elif (kind := engine_error_kind(record)) is not None:
            self.engine_errors.labels(kind).inc()
            if name == "turn_failed":
                call.failed_turns.add(record["turn_id"])

    def _turn_ended(self, call: _CallState, record: dict[str, Any]) -> None:
        turn_id = record["turn_id"]
        kind = call.turn_kinds.pop(turn_id, "")
        failed = turn_id in call.failed_turns or bool(record.get("error"))
        call.failed_turns.discard(turn_id)
        outcome = "failed" if failed else "completed" if record["event"] == "turn_completed" else "cancelled"
        self.turns.labels(kind, outcome).inc()

    def _call_ended(self, call: _CallState, record: dict[str, Any]) -> None:
        for kind in call.turn_kinds.values():  # the call ended first
            self.turns.labels(kind, "unfinished").inc()
        self.active_calls.dec()
        self.calls_ended.labels(end_reason_label(record.get("reason"))).inc()

    # ------------------------------------------------------------------ exposition
    def exposition(self) -> bytes:
        """The text format for a scrape: this process's registry, or every worker's files merged."""
        if self.registry is not None:
            return generate_latest(self.registry)
        scrape = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(scrape, path=str(self.directory))
        return generate_latest(scrape)


class _CallState:
    """What the metrics keep of a live call (only its events touch it, in order)."""

    __slots__ = ("failed_turns", "figures", "turn_kinds")

    def __init__(self) -> None:
        self.figures = CallFigures()
        self.turn_kinds: dict[int, str] = {}  # open turns
        self.failed_turns: set[int] = set()


def _store_values_for(directory: Path | None) -> None:
    """prometheus_client storing values in `directory` (None: in memory). It picks how once, when
    first imported: a worker that imported it before the supervisor set the variable would keep its
    values to itself, a server made after a test unset it would write to a directory that is gone.
    A directory that is missing is created; one that cannot be stops startup, saying why."""
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"{MULTIPROC_DIR_ENV}={directory} is not a usable directory: {exc}") from exc
    if getattr(values.ValueClass, "_multiprocess", False) != (directory is not None):
        values.ValueClass = values.MultiProcessValue() if directory is not None else values.MutexValue


def worker_exited(pid: int) -> None:
    """For the supervisor, when a worker process has ended: its live gauges (active calls,
    recognition backlog) stop counting. Its counters and histograms stay in the totals."""
    directory = multiproc_dir()
    if directory is not None:
        prometheus_multiprocess.mark_process_dead(pid, str(directory))


def metrics_router(metrics: Metrics, dependencies: Sequence[Any]) -> APIRouter:
    """GET /metrics, behind `dependencies` (the API guard)."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text format (in multiprocess mode: every worker's values, read from their files)."""
        body = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
