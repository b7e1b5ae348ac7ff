"""`parley serve --workers N`: N worker processes serving calls on one port.

One Python process runs one event loop, which parses every call's 50 frames a second: with cloud
or plumbing engines that loop, not the cores, is what limits a server (docs/scaling.md). The
supervisor here binds the listening socket once (so `--port 0` works and the port is logged once),
then starts N workers (multiprocessing's spawn: fresh interpreters, no forked threads or locks),
each running the normal app on that inherited socket. The kernel hands each new connection to
whichever worker accepts it first, so a busy worker takes fewer.

The supervisor
- recovers the call records of a previous server once, before any worker starts, and marks a
  dead worker's live calls `server_lost` (each call's record names its worker's process id);
- forwards SIGTERM/SIGINT (as SIGTERM) to every worker: the first drains each one (parley.server.ParleyServer),
  a second ends them at once; a terminal's Ctrl-C reaches the supervisor only (each worker runs in
  its own process group), so one Ctrl-C is one drain, not two;
- restarts a worker that died while serving (logged, with a growing back-off); a worker that fails
  before it ever served stops the whole server (a configuration error would fail every restart);
- exits with the workers' status (0: every worker ended cleanly);
- owns a private run directory: the workers' /api/stats figures (parley.stats.WorkerStatsBoard) and
  PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode), removed at exit.

Each worker's instance id is `<PARLEY_INSTANCE_ID or hostname-supervisor pid>-w<i>` (kept across a
restart), and it admits ceil(max_calls / N) calls: `max_calls` is the whole server's.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from types import FrameType

from parley.admission import EMBEDDED, available_cores, call_cost
from parley.settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after the 1st, 2nd, ... death in a row
STABLE_AFTER_S = 60.0  # a worker that served this long before dying starts the back-off afresh
PR_SET_PDEATHSIG = 1  # prctl(2)
RUN_DIR_PREFIX = "parley-workers-"  # then the supervisor's pid: tempfile's directory
STOP_WAIT_S = 10.0  # after the workers' exit was asked for twice: how long until they are killed
_INSTANCE_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def worker_count(settings: Settings) -> tuple[int, str]:
    """How many worker processes, and why (for the startup log)."""
    if settings.workers is not None:
        return settings.workers, "PARLEY_WORKERS"
    cost = call_cost(settings)
    if cost is EMBEDDED:  # each worker would load every model again: the memory, not the loop, limits
        return 1, "derived: embedded models"
    cores = available_cores()
    return max(1, math.floor(cores + 0.5)), f"derived: {cores:g} cores, {cost.profile}"


def startup_problem(settings: Settings, workers: int) -> str | None:
    """Why this server cannot run with `workers` processes (None: it can)."""
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url is not None else ""
    if workers > 1 and settings.acs_configured and not redis_url:
        return (
            f"workers > 1 with Call Automation needs PARLEY_REDIS_URL (workers {workers}): ACS's events"
            " for a call reach any worker, so the call book and hang-ups must be shared through Redis;"
            " set PARLEY_REDIS_URL, or PARLEY_WORKERS=1"
        )
    return None


def base_instance_id(settings: Settings) -> str:
    """The instance id the workers' ids extend: PARLEY_INSTANCE_ID, or `<hostname>-<supervisor pid>`."""
    if settings.instance_id:
        base = settings.instance_id
    else:
        base = f"{_INSTANCE_UNSAFE.sub('-', socket.gethostname())}-{os.getpid()}"
    return base[:58]  # room for "-w<i>" within the setting's 64 characters


def worker_settings(settings: Settings, index: int, count: int, base_id: str) -> Settings:
    """Worker `index`'s settings: its instance id, and how many workers split `max_calls`."""
    return settings.model_copy(update={"workers": count, "instance_id": f"{base_id}-w{index}"})


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The one listening socket every worker accepts on (inheritable by the spawned workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------


def _worker_main(settings: Settings, sock: socket.socket, run_dir: str, ready: Event, supervisor: int) -> None:
    """A worker: the normal app on the supervisor's socket (runs in the spawned process)."""
    _die_with(supervisor)
    os.setpgid(0, 0)  # signals come from the supervisor only (a terminal's Ctrl-C reaches its group)
    assert settings.instance_id is not None
    os.environ["PARLEY_INSTANCE_ID"] = settings.instance_id  # for whatever reads the environment
    from parley import logs, server
    from parley.stats import WorkerStatsBoard

    logs.configure(settings.log_level, log_format=settings.log_format)
    try:
        try:
            app = server.create_app(settings, worker_stats=WorkerStatsBoard(Path(run_dir), settings.instance_id))
        except (ValueError, RuntimeError, OSError) as exc:
            log.error("worker %s: cannot start: %s", settings.instance_id, exc)
            raise SystemExit(2) from None
        uvicorn_server = server.uvicorn_server(app, settings)
        assert isinstance(uvicorn_server, server.ParleyServer)
        uvicorn_server.announce = False

        def tell_ready() -> None:  # the supervisor tells a failed start from a crash by this
            while not uvicorn_server.started and not uvicorn_server.should_exit:
                time.sleep(0.05)
            if uvicorn_server.started:
                ready.set()

        threading.Thread(target=tell_ready, name="worker-ready", daemon=True).start()
        uvicorn_server.run(sockets=[sock])
        if not uvicorn_server.started:  # uvicorn logged why (the app's startup failed)
            raise SystemExit(3)
    finally:
        logs.shutdown()


def _die_with(supervisor: int) -> None:
    """End this worker when its supervisor dies (`kill -9`): nothing else would stop it, and it
    would hold the port and keep its calls' records live. Linux: the kernel sends SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before the line above
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# The supervisor
# ---------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready: Event
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs `count` workers on one socket until they have all ended; `run()` returns the exit status."""

    def __init__(self, settings: Settings, count: int, origin: str = "") -> None:
        self.settings = settings
        self.count = count
        self.origin = origin
        self.base_id = base_instance_id(settings)
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._restart_at: dict[int, float] = {}  # index -> when to start it again
        self._deaths_in_a_row: dict[int, int] = {}
        self._signals: list[int] = []  # received, not handled yet (the handler only notes them)
        self._stop_signals = 0
        self._kill_at: float | None = None
        self._exit_codes: list[int] = []
        self._failed_start: int | None = None
        self.run_dir: Path | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        sock = self._socket = bind_socket(self.settings.host, self.settings.port)
        self.port = sock.getsockname()[1]
        _remove_stale_run_dirs()
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        metrics_dir = self.run_dir / "prometheus"
        metrics_dir.mkdir()
        # Read by prometheus_client as each worker imports it: every worker's metrics in one place.
        given_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._recover_records("a previous server")
            self._announce()
            for index in range(self.count):
                self._start(index)
            self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            sock.close()
            if given_metrics_dir is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:  # the supervisor runs inside another program (tests): its environment as it was
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = given_metrics_dir
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self._status()

    def _announce(self) -> None:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        log.info(
            "workers %d (%s): instances %s-w0..w%d, supervisor pid %d",
            self.count,
            self.origin or "given",
            self.base_id,
            self.count - 1,
            os.getpid(),
        )
        log.info("media WebSocket: ws://%s:%d/ws/acs (ACS streams calls here; also /ws)", host, self.port)

    def _start(self, index: int) -> None:
        settings = worker_settings(self.settings, index, self.count, self.base_id)
        ready = self._context.Event()
        # The worker receives a duplicate of the listening socket's file descriptor.
        args = (settings, self._socket, str(self.run_dir), ready, os.getpid())
        process = self._context.Process(target=_worker_main, args=args, name=f"parley-worker-{index}")
        process.start()
        worker = self._workers[index] = _Worker(index, process, ready)
        log.info("worker %s started (pid %d)", settings.instance_id, process.pid)
        if self._signals or self._stop_signals:  # a stop signal came while it started: not forwarded to it
            _send(worker, signal.SIGTERM)

    def _supervise(self) -> None:
        while self._workers or (self._restart_at and not self._stop_signals):
            sentinels = [worker.process.sentinel for worker in self._workers.values()]
            wait(sentinels, timeout=0.2) if sentinels else time.sleep(0.2)
            self._handle_signals()
            for worker in [w for w in self._workers.values() if not w.process.is_alive()]:
                self._ended(worker)
            now = time.monotonic()
            for index, at in list(self._restart_at.items()):
                if now >= at and not self._stop_signals:
                    del self._restart_at[index]
                    self._start(index)
            if self._kill_at is not None and now >= self._kill_at:
                self._kill_all()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        """Forward at once (a handler: no logging here, a logging lock may be held where it interrupted).
        As SIGTERM, whichever it was: a worker treats both alike once it serves, and before that a
        SIGINT can be swallowed while the worker is still starting (it was seen to start and serve
        on), where SIGTERM's default action ends it."""
        self._signals.append(sig)
        self._forward(signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        for worker in list(self._workers.values()):
            _send(worker, sig)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            self._stop_signals += 1
            self._restart_at.clear()
            name = signal.Signals(sig).name
            if self._stop_signals == 1:
                log.warning("%s: every worker drains (new calls refused, live calls go on)", name)
            else:
                log.warning("%s again: every worker ends now", name)
                self._kill_at = time.monotonic() + STOP_WAIT_S

    def _ended(self, worker: _Worker) -> None:
        """A worker's process has ended: the shutdown, a failed start, or a crash to recover from."""
        worker.process.join()
        del self._workers[worker.index]
        code = worker.process.exitcode if worker.process.exitcode is not None else 1
        instance = f"{self.base_id}-w{worker.index}"
        self._forget(worker, instance)
        if self._stop_signals or self._signals:  # (a signal the loop has not handled yet counts)
            if not worker.ready.is_set() and self._stop_signals <= 1 and code in (-signal.SIGTERM, -signal.SIGINT):
                code = 0  # stopped while still starting: uvicorn's own handler ends it by the signal
            self._exit_codes.append(code)
            log.info("worker %s exited (%s)", instance, _describe_exit(code))
            return
        if not worker.ready.is_set():
            log.error("worker %s failed to start (%s): stopping the server", instance, _describe_exit(code))
            self._failed_start = code or 1
            self._stop_all(signal.SIGTERM)
            return
        served = time.monotonic() - worker.started_at
        deaths = 1 if served >= STABLE_AFTER_S else self._deaths_in_a_row.get(worker.index, 0) + 1
        self._deaths_in_a_row[worker.index] = deaths
        backoff = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]
        lost = self._recover_records(f"worker {instance}")
        log.error(
            "worker %s died (%s) after %.0f s; %d live call(s) lost; restarting it in %.1f s",
            instance,
            _describe_exit(code),
            served,
            len(lost),
            backoff,
        )
        self._restart_at[worker.index] = time.monotonic() + backoff

    def _forget(self, worker: _Worker, instance: str) -> None:
        """What a dead worker leaves: its stats file, its metrics (prometheus multiprocess mode)."""
        if self.run_dir is not None:
            (self.run_dir / f"stats-{instance}.json").unlink(missing_ok=True)
        pid = worker.process.pid
        if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            try:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(pid)
            except Exception as exc:  # noqa: BLE001 - stale gauges of a dead worker, never a stop
                log.warning("worker %s: its metrics could not be marked dead: %s", instance, exc)

    def _stop_all(self, sig: int) -> None:
        self._stop_signals += 1
        self._restart_at.clear()
        self._forward(sig)

    def _kill_all(self) -> None:
        for worker in list(self._workers.values()):
            if worker.process.is_alive():
                log.error("worker %d did not exit in time: killed", worker.index)
                worker.process.kill()
                worker.process.join(5)
                self._exit_codes.append(-signal.SIGKILL)
            self._workers.pop(worker.index, None)

    def _recover_records(self, whose: str) -> list[str]:
        """Mark the live calls of dead server processes `server_lost` (sqlite records only)."""
        if self.settings.store != "sqlite":
            return []
        from parley.records.sqlite import recover_lost_calls

        try:
            lost = recover_lost_calls(self.settings.data_dir)
        except Exception as exc:  # noqa: BLE001 - a locked or broken database: the workers report it
            log.warning("call records: could not mark the calls of %s lost: %s", whose, exc)
            return []
        if lost:
            log.info("call records: %d call(s) of %s marked server_lost", len(lost), whose)
        return lost

    def _status(self) -> int:
        if self._failed_start is not None:
            return self._failed_start
        for code in self._exit_codes:
            if code != 0:
                return 128 - code if code < 0 else code  # died of a signal: the shell's convention
        return 0


def _remove_stale_run_dirs() -> None:
    """The run directories of supervisors that were killed (`kill -9` leaves them): each is named
    after its supervisor's process id."""
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*-*"):
        pid_text = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        if pid_text.isdigit() and not _running(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _send(worker: _Worker, sig: int) -> None:
    if worker.process.pid is not None:
        try:
            os.kill(worker.process.pid, sig)
        except ProcessLookupError:  # it has just ended: the supervisor's loop collects it
            pass


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def run(settings: Settings, count: int, origin: str = "") -> int:
    """Serve with `count` worker processes until they have ended; the exit status."""
    return Supervisor(settings, count, origin).run()
