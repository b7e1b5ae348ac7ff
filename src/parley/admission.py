"""Who gets a media socket: admission control, overload protection and the graceful drain.

Every media WebSocket is admitted or refused here BEFORE it is accepted, so a refusal costs one
HTTP response, never a recognizer or a thread:

- 400 `bad_call_id`: the call id (`x-ms-call-connection-id` or `?callId=`) is too long or holds
  characters outside a safe set (ids end up in logs, file names and URLs);
- 409 `duplicate_call_id`: a socket with that call id is live (it would take over the call's record);
- 503 `draining`: the server is shutting down (first SIGTERM);
- 503 `overloaded`: the event loop is late, recognition is behind, or the shared executors are
  backed up; live calls come first;
- 503 `capacity`: `max_calls` sockets are admitted already (sockets still in their handshake count).

`AdmissionController` keeps the slots (reserved synchronously on the event loop, so two upgrades
can never take the last slot both), the overload state (`OverloadGate`: thresholds with hysteresis,
so readiness does not flap), and the drain. The pieces that decide are pure and unit-tested; the
server (parley.server) feeds them readings and sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parley.settings import Settings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# How many calls by default
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallCost:
    """What one call costs a server with a given engine profile, for the default `max_calls`."""

    profile: str
    calls_per_core: float
    loop_cap: int  # the one event loop's limit, whatever the cores
    mb_per_call: float
    base_mb: float  # the process before any call: shared models, Python


# Embedded speech (pocketsphinx partials, Whisper finals, Silero; Piper): each call holds its own
# ~90 MB recognizer plus a VAD, and costs ~110 ms of CPU per second of call in pocketsphinx and
# Silero alone; Whisper finals and Piper synthesis share the same cores on top (bench/README.md:
# 2 cores held 15 calls with the loop lag p99 at 71 ms and finals queueing). 6 calls per core keeps
# headroom for the turns; ~750 MB before any call (Whisper, Piper, Python).
EMBEDDED = CallCost("embedded speech", calls_per_core=6, loop_cap=400, mb_per_call=120, base_mb=1000)
# Cloud recognition (or the plumbing doubles): no recognizer model per call, little CPU; the limit
# is the single event loop that parses every call's 50 frames a second (bench/README.md: 25 calls
# at 11 ms loop lag p99, 50 at 73 ms on one core's worth of loop).
LIGHT = CallCost("light (cloud or plumbing)", calls_per_core=25, loop_cap=50, mb_per_call=20, base_mb=500)


def call_cost(settings: Settings) -> CallCost:
    if settings.engines == "plumbing" or settings.stt == "azure":
        return LIGHT
    return EMBEDDED


def derive_max_calls(cost: CallCost, cores: float, memory_mb: float | None, workers: int = 1) -> int:
    """The default `max_calls` of the whole server: the fewest of what the cores, the event loops (one
    per worker process) and the memory (a base per worker) hold (>= 1)."""
    limits = [cost.calls_per_core * max(cores, 0.5), float(cost.loop_cap * workers)]
    if memory_mb is not None:  # keep a fifth of the memory for the rest of the machine
        limits.append((0.8 * memory_mb - cost.base_mb * workers) / cost.mb_per_call)
    return max(1, math.floor(min(limits)))


def available_cores() -> float:
    """CPU cores this process may use: its affinity, and a cgroup v2 quota when one is set."""
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    quota = _read_first_line(Path("/sys/fs/cgroup/cpu.max"))  # "max 100000" or "200000 100000"
    if quota:
        parts = quota.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                cores = min(cores, int(parts[0]) / int(parts[1]))
            except (ValueError, ZeroDivisionError):
                pass
    return cores


def available_memory_mb() -> float | None:
    """Memory this process may use: the machine's, or a cgroup v2 limit when lower."""
    try:
        import psutil

        total = psutil.virtual_memory().total / 2**20
    except Exception:  # noqa: BLE001 - psutil unavailable or /proc unreadable: no memory bound
        return None
    limit = _read_first_line(Path("/sys/fs/cgroup/memory.max"))
    if limit and limit.isdigit():
        total = min(total, int(limit) / 2**20)
    return total


def _read_first_line(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def effective_max_calls(settings: Settings) -> tuple[int, str]:
    """The calls this process admits: `settings.max_calls` or the derived default, which are the
    whole server's, split over `settings.workers` processes (rounded up: a worker is never left with
    none); and how it came about, for the startup log."""
    workers = settings.workers or 1
    if settings.max_calls is not None:
        total, origin = settings.max_calls, "PARLEY_MAX_CALLS"
    else:
        cost = call_cost(settings)
        cores = available_cores()
        memory = available_memory_mb()
        total = derive_max_calls(cost, cores, memory, workers)
        memory_text = f", {memory / 1024:.0f} GB" if memory is not None else ""
        origin = f"derived: {cores:g} cores{memory_text}, {cost.profile}"
    if workers == 1:
        return total, origin
    return math.ceil(total / workers), f"{origin}; {total} over {workers} workers"


# ---------------------------------------------------------------------------------------------
# Call ids
# ---------------------------------------------------------------------------------------------

MAX_CALL_ID_CHARS = 128
_SAFE_CALL_ID = re.compile(r"[A-Za-z0-9._:=+-]+")  # GUIDs, ACS ids, base64 keys; no '/', no spaces


def call_id_problem(value: str) -> str | None:
    """Why `value` cannot be a call id (None: it can)."""
    if len(value) > MAX_CALL_ID_CHARS:
        return f"call id longer than {MAX_CALL_ID_CHARS} characters ({len(value)})"
    if not _SAFE_CALL_ID.fullmatch(value):
        return "call id with characters outside A-Z a-z 0-9 . _ : = + -"
    return None


def shown_call_id(value: str | None, limit: int = 64) -> str:
    """A call id as it may appear in a log line: a refused one may be long or hold anything."""
    if value is None:
        return "-"
    text = value if len(value) <= limit else f"{value[:limit]}…[+{len(value) - limit} chars]"
    return repr(text) if call_id_problem(value) else text


# ---------------------------------------------------------------------------------------------
# Overload
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueReading:
    name: str  # the executor: synth, stt-final
    queued: int  # jobs waiting for a worker
    workers: int


@dataclass(frozen=True)
class LoadReading:
    """What the server looks like now."""

    loop_lag_p99_ms: float | None  # over the last seconds (None: not measured yet)
    backlog_frames: int = 0  # the worst live call's recognition backlog
    queues: tuple[QueueReading, ...] = ()


@dataclass(frozen=True)
class OverloadLimits:
    loop_lag_ms: float
    backlog_frames: int
    queued_jobs_per_worker: int
    # Hysteresis: overloaded as soon as one figure passes its limit; admitting again only once every
    # figure stayed below `clear_ratio` of its limit for `settle_s`.
    clear_ratio: float = 0.5
    settle_s: float = 3.0

    @classmethod
    def from_settings(cls, settings: Settings) -> OverloadLimits:
        return cls(settings.overload_loop_lag_ms, settings.overload_backlog_frames, settings.overload_queued_jobs)


def figures_over(reading: LoadReading, limits: OverloadLimits, ratio: float = 1.0) -> list[str]:
    """Each figure of `reading` above `ratio` x its limit, described ("loop lag p99 153 ms > 100 ms")."""
    over = []
    lag_limit = limits.loop_lag_ms * ratio
    if reading.loop_lag_p99_ms is not None and reading.loop_lag_p99_ms > lag_limit:
        over.append(f"loop lag p99 {reading.loop_lag_p99_ms:.0f} ms > {lag_limit:.0f} ms")
    backlog_limit = limits.backlog_frames * ratio
    if reading.backlog_frames > backlog_limit:
        over.append(f"recognition backlog {reading.backlog_frames} frames > {backlog_limit:.0f}")
    for queue in reading.queues:
        queue_limit = limits.queued_jobs_per_worker * max(1, queue.workers) * ratio
        if queue.queued > queue_limit:
            over.append(f"{queue.name} queue {queue.queued} jobs > {queue_limit:.0f}")
    return over


class OverloadGate:
    """Overloaded or not, from successive readings, with hysteresis (pure: time is passed in)."""

    def __init__(self, limits: OverloadLimits) -> None:
        self.limits = limits
        self.overloaded = False
        self.reasons: list[str] = []  # what made it overloaded (or still keeps it so)
        self._calm_since: float | None = None

    def update(self, reading: LoadReading, now: float) -> bool:
        """Take a reading; True while new calls must be refused."""
        over = figures_over(reading, self.limits)
        if over:
            self.overloaded, self.reasons, self._calm_since = True, over, None
            return True
        if not self.overloaded:
            return False
        still_high = figures_over(reading, self.limits, self.limits.clear_ratio)
        if still_high:
            self.reasons, self._calm_since = [f"cooling down: {text}" for text in still_high], None
            return True
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= self.limits.settle_s:
            self.overloaded, self.reasons, self._calm_since = False, [], None
            return False
        self.reasons = [f"cooling down: calm for {now - self._calm_since:.1f} of {self.limits.settle_s:.0f} s"]
        return True


def executor_queues(executors: Iterable[Executor]) -> tuple[QueueReading, ...]:
    """Jobs waiting on each shared thread pool (standard ThreadPoolExecutors; others are skipped)."""
    readings = []
    for index, executor in enumerate(executors):
        work_queue = getattr(executor, "_work_queue", None)
        if work_queue is None:
            continue
        name = getattr(executor, "_thread_name_prefix", "") or f"executor-{index}"
        readings.append(QueueReading(name, work_queue.qsize(), getattr(executor, "_max_workers", 1)))
    return tuple(readings)


def worst_backlog(sessions: Iterable[Any]) -> int:
    """The largest recognition backlog (frames queued for recognition) among live calls."""
    worst = 0
    for session in sessions:
        recognition = getattr(session, "recognition", None)
        if recognition is not None:
            worst = max(worst, int(recognition.backlog))
    return worst


# ---------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: int  # the HTTP status of the refused upgrade
    reason: str  # bad_call_id, duplicate_call_id, draining, overloaded, capacity
    message: str  # for the peer and the log


@dataclass(eq=False)
class Slot:
    """One admitted media socket, from before its accept until its call has ended."""

    call_id: str | None  # None: the peer gave none (the server names the call)
    admitted_t: float = field(default_factory=time.monotonic)


REFUSAL_LOG_INTERVAL_S = 1.0  # refusals of one reason are logged at most this often (and counted)
DRAIN_GRACE_S = 30.0  # after the drain timeout: how long the closing lines and hang-ups may take


class AdmissionController:
    """The slots, the overload state and the drain of one server (used on its event loop only)."""

    def __init__(
        self,
        max_calls: int,
        limits: OverloadLimits,
        *,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.max_calls = max_calls
        self.gate = OverloadGate(limits)
        self.draining = False
        self._slots: set[Slot] = set()
        self._ids: dict[str, Slot] = {}
        self._on_refused = on_refused
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self._empty: asyncio.Event | None = None
        self.drain_timeline: dict[str, float] = {}  # step -> seconds after the drain began

    @property
    def in_use(self) -> int:
        return len(self._slots)

    def admit(self, call_id: str | None, *, also_check: Sequence[str] = (), client: str = "-") -> Slot | Refusal:
        """A slot for a new media socket, or why it is refused (logged and counted). `also_check`:
        other ids the peer sent (the `?callId=` next to the header), validated the same way."""
        refusal = self._decide(call_id, also_check)
        if refusal is not None:
            self._refused(refusal, call_id, client)
            return refusal
        slot = Slot(call_id)
        self._slots.add(slot)
        if call_id is not None:
            self._ids[call_id] = slot
        return slot

    def _decide(self, call_id: str | None, also_check: Sequence[str]) -> Refusal | None:
        for value in (call_id, *also_check):
            if value is not None and (problem := call_id_problem(value)):
                return Refusal(400, "bad_call_id", problem)
        if call_id is not None and call_id in self._ids:
            return Refusal(409, "duplicate_call_id", f"call {call_id} is live on another socket")
        if self.draining:
            return Refusal(503, "draining", "the server is shutting down; call another instance")
        if self.gate.overloaded:
            return Refusal(503, "overloaded", "the server is overloaded: " + "; ".join(self.gate.reasons))
        if len(self._slots) >= self.max_calls:
            return Refusal(503, "capacity", f"the server is at its limit of {self.max_calls} calls")
        return None

    def release(self, slot: Slot) -> None:
        """The socket's call has ended (idempotent)."""
        self._slots.discard(slot)
        if slot.call_id is not None and self._ids.get(slot.call_id) is slot:
            del self._ids[slot.call_id]
        if not self._slots and self._empty is not None:
            self._empty.set()

    def withdraw(self, slot: Slot, refusal: Refusal, client: str = "-") -> None:
        """An admitted socket refused after all by a check beyond this server (the cluster's: its
        call id live on another instance, the cluster's cap): the slot is freed and the refusal
        logged and counted like this server's own."""
        self.release(slot)
        self._refused(refusal, slot.call_id, client)

    def _refused(self, refusal: Refusal, call_id: str | None, client: str) -> None:
        if self._on_refused is not None:
            self._on_refused(refusal.reason)
        # One line per refusal, but a flood of them (a peer retrying in a loop) is summarised: at
        # most one line per reason and second, saying how many were not logged. The counters in
        # /api/stats stay exact.
        now = time.monotonic()
        if now - self._last_logged.get(refusal.reason, -math.inf) < REFUSAL_LOG_INTERVAL_S:
            self._unlogged[refusal.reason] = self._unlogged.get(refusal.reason, 0) + 1
            return
        self._last_logged[refusal.reason] = now
        unlogged = self._unlogged.pop(refusal.reason, 0)
        log.warning(
            "media socket refused (HTTP %d, %s): call %s from %s: %s%s",
            refusal.status,
            refusal.reason,
            shown_call_id(call_id),
            client,
            refusal.message,
            f" (+{unlogged} more refused for this reason in the last second)" if unlogged else "",
        )

    # ------------------------------------------------------------------ overload

    def update(self, reading: LoadReading, now: float | None = None) -> None:
        """A new reading of the load; logs when the server enters or leaves overload."""
        was = self.gate.overloaded
        self.gate.update(reading, time.monotonic() if now is None else now)
        if self.gate.overloaded and not was:
            log.warning("overloaded: refusing new calls (%s)", "; ".join(self.gate.reasons))
        elif was and not self.gate.overloaded:
            log.warning("no longer overloaded: admitting new calls again")

    async def watch(self, read: Callable[[], LoadReading], interval_s: float = 0.25) -> None:
        """Take a reading every `interval_s`, for ever (a task of the server's lifespan)."""
        while True:
            try:
                self.update(read())
            except Exception:  # a broken reading must not end overload protection
                log.exception("reading the server load failed")
            await asyncio.sleep(interval_s)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether a load balancer should send new calls here, and the figures behind it."""
        reasons = []
        if self.draining:
            reasons.append("draining")
        if self.gate.overloaded:
            reasons.append("overloaded")
        if len(self._slots) >= self.max_calls:
            reasons.append("at_capacity")
        body: dict[str, object] = {
            "status": "unavailable" if reasons else "ready",
            "reasons": reasons,
            "calls": len(self._slots),
            "max_calls": self.max_calls,
        }
        if self.gate.reasons:
            body["overload"] = list(self.gate.reasons)
        return not reasons, body

    def describe(self) -> dict[str, object]:
        """For /api/stats."""
        return {
            "max_calls": self.max_calls,
            "admitted": len(self._slots),
            "draining": self.draining,
            "overloaded": self.gate.overloaded,
            "overload": list(self.gate.reasons),
            "drain_timeline_s": dict(self.drain_timeline),
        }

    # ------------------------------------------------------------------ drain

    async def drain(
        self,
        sessions: Callable[[], Iterable[Any]],
        timeout_s: float,
        grace_s: float = DRAIN_GRACE_S,
    ) -> dict[str, float]:
        """Stop admitting; let the live calls go on for up to `timeout_s`; then ask each one to
        finish politely (closing line, hang-up) and wait up to `grace_s` for them to end. Returns
        the timeline: seconds after the start at which each step happened."""
        started = time.monotonic()
        self.draining = True
        timeline = self.drain_timeline
        timeline["draining"] = 0.0
        log.warning(
            "draining: refusing new calls; %d live call(s) may go on for up to %.0f s", len(self._slots), timeout_s
        )
        if not await self._wait_until_empty(started + timeout_s):
            timeline["closing"] = round(time.monotonic() - started, 3)
            told: set[int] = set()
            log.warning("drain timeout: closing %d call(s) with the closing line", len(self._slots))
            deadline = time.monotonic() + grace_s
            # New handlers may still appear (sockets admitted before the drain, in their handshake):
            # each is told as soon as it is seen.
            while self._slots and time.monotonic() < deadline:
                for session in list(sessions()):
                    if id(session) not in told:
                        told.add(id(session))
                        _finish(session, "server_drain")
                await self._wait_until_empty(min(deadline, time.monotonic() + 0.1))
        elapsed = round(time.monotonic() - started, 3)
        if self._slots:
            timeline["gave_up"] = elapsed
            log.error("drain: %d call(s) still open after %.1f s; closing them", len(self._slots), elapsed)
        else:
            timeline["calls_ended"] = elapsed
            log.warning("drain: every call has ended (%.1f s)", elapsed)
        return dict(timeline)

    async def _wait_until_empty(self, deadline: float) -> bool:
        if self._empty is None:
            self._empty = asyncio.Event()
        if not self._slots:
            return True
        self._empty.clear()
        try:
            await asyncio.wait_for(self._empty.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        return not self._slots


def _finish(session: Any, reason: str) -> None:
    """Ask a live call (a MediaHandler) to end politely: its closing line, then the hang-up."""
    try:
        session.finish_politely(reason)
    except Exception:  # one call failing to finish must not stop the drain of the others
        log.exception("call %s: could not be finished politely", getattr(session, "call_id", "?"))
