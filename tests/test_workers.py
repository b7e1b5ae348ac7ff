"""`parley serve --workers N`: the supervisor, its workers on one port, their shared figures and records.

The fast tests cover the pieces (how many workers, the admission split, instance ids, the stats board,
the call records written by two processes); the slow ones run a real two-worker `parley serve` on
loopback: calls spread over both workers, SIGTERM drains both and exits 0, a SIGKILLed worker is
restarted and its calls (only its calls) are marked `server_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets
from typer.testing import CliRunner

from parley.admission import LIGHT, derive_max_calls, effective_max_calls
from parley.cli import app
from parley.records.sqlite import SqliteStore, db_path, recover_lost_calls
from parley.records.store import CallRecord
from parley.settings import load_settings
from parley.stats import WorkerStatsBoard
from parley.transports import acs
from parley.workers import (
    RUN_DIR_PREFIX,
    Supervisor,
    _remove_stale_run_dirs,
    base_instance_id,
    startup_problem,
    worker_count,
    worker_settings,
)

SRC = Path(__file__).resolve().parents[1] / "src"
ACS = {
    "acs_connection_string": "endpoint=https://x.communication.azure.com/;accesskey=YWJj",
    "acs_callback_url": "https://parley.example.com",
    "acs_auth_enabled": False,
}


# ------------------------------------------------------------------ how many, and what each admits


def test_an_explicit_worker_count_wins() -> None:
    assert worker_count(load_settings(workers=3)) == (3, "PARLEY_WORKERS")
    assert worker_count(load_settings(workers=3, engines="plumbing")) == (3, "PARLEY_WORKERS")


def test_embedded_models_get_one_worker_and_light_engines_one_per_core() -> None:
    assert worker_count(load_settings()) == (1, "derived: embedded models")
    count, origin = worker_count(load_settings(engines="plumbing"))
    assert count == max(1, round(len(os.sched_getaffinity(0)))) and "cores" in origin and "plumbing" in origin


def test_max_calls_is_the_servers_and_each_worker_admits_its_share() -> None:
    assert effective_max_calls(load_settings(max_calls=5)) == (5, "PARLEY_MAX_CALLS")
    assert effective_max_calls(load_settings(max_calls=5, workers=2)) == (3, "PARLEY_MAX_CALLS; 5 over 2 workers")
    assert effective_max_calls(load_settings(max_calls=1, workers=4))[0] == 1  # never 0
    value, origin = effective_max_calls(load_settings(engines="plumbing", workers=2))
    total = int(origin.rsplit("; ", 1)[1].split()[0])
    assert origin.startswith("derived: ") and origin.endswith(" over 2 workers") and value == math.ceil(total / 2)
    # The derived total counts one event loop (and one base footprint) per worker.
    assert derive_max_calls(LIGHT, cores=64, memory_mb=None) == 50
    assert derive_max_calls(LIGHT, cores=64, memory_mb=None, workers=4) == 200
    assert derive_max_calls(LIGHT, cores=64, memory_mb=2000, workers=2) == 30  # (1600 - 2 * 500) / 20


def test_each_worker_gets_an_instance_id_from_the_base() -> None:
    settings = load_settings(instance_id="eu-1", engines="plumbing")
    assert base_instance_id(settings) == "eu-1"
    worker = worker_settings(settings, 1, 2, base_instance_id(settings))
    assert (worker.instance_id, worker.workers, settings.workers) == ("eu-1-w1", 2, None)
    default = base_instance_id(load_settings())
    assert default.endswith(f"-{os.getpid()}") and re.fullmatch(r"[A-Za-z0-9._:-]+", default)
    # The worker's id still fits the setting (64 characters), however long the base.
    long_base = base_instance_id(load_settings(instance_id="x" * 64))
    assert len(worker_settings(settings, 12, 16, long_base).instance_id or "") <= 64


def test_workers_with_call_automation_need_redis() -> None:
    settings = load_settings(**ACS)
    problem = startup_problem(settings, 2)
    assert problem is not None and problem.startswith("workers > 1 with Call Automation needs PARLEY_REDIS_URL")
    assert startup_problem(settings, 1) is None
    assert startup_problem(load_settings(redis_url="redis://127.0.0.1:6379/0", **ACS), 2) is None
    assert startup_problem(load_settings(redis_url="", **ACS), 2) is not None  # blank: unset
    assert startup_problem(load_settings(engines="plumbing"), 2) is None


def test_parley_serve_refuses_workers_with_call_automation_and_no_redis(tmp_path: Path) -> None:
    env = {
        f"PARLEY_{key.upper()}": str(value).lower() if isinstance(value, bool) else value for key, value in ACS.items()
    }
    # Refused before anything starts (were it not, this would serve until killed).
    result = CliRunner().invoke(app, ["serve", "--workers", "2", "--port", "0"], env={**env, "PARLEY_REDIS_URL": ""})
    assert result.exit_code == 2
    assert "workers > 1 with Call Automation needs PARLEY_REDIS_URL" in " ".join(result.output.split())


# ------------------------------------------------------------------ the stats board


def test_workers_see_each_others_figures_and_a_reset_reaches_them_all(tmp_path: Path) -> None:
    first, second = WorkerStatsBoard(tmp_path, "i-w0"), WorkerStatsBoard(tmp_path, "i-w1")
    second.publish({"calls": 2, "loop_lag_ms": {"p99": 9.0}})
    seen = first.workers({"calls": 1})
    assert [(worker["instance"], worker["calls"]) for worker in seen] == [("i-w0", 1), ("i-w1", 2)]
    assert all(worker["reset_generation"] == 0 and worker["pid"] == os.getpid() for worker in seen)
    assert not second.reset_due()
    generation = first.request_reset()
    assert generation == 1 and second.reset_due() and second.generation == 1 and not second.reset_due()
    assert first.request_reset() == 2  # generations only grow
    assert WorkerStatsBoard(tmp_path, "i-w2").generation == 2  # a worker started later does not reset


def test_an_unreadable_snapshot_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "stats-broken.json").write_text("{not json")
    (tmp_path / "reset-generation").write_text("garbage")
    board = WorkerStatsBoard(tmp_path, "i-w0")
    assert board.generation == 0 and not board.reset_due()
    assert [worker["instance"] for worker in board.workers({"calls": 0})] == ["i-w0"]


async def test_the_publisher_follows_resets_and_survives_a_vanished_run_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    board, other = WorkerStatsBoard(run_dir, "i-w0"), WorkerStatsBoard(run_dir, "i-w1")
    resets: list[bool] = []

    def snapshot(reset: bool) -> dict[str, object]:
        resets.append(reset)
        return {"calls": 0}

    task = asyncio.create_task(board.run(snapshot))
    try:
        await asyncio.sleep(0.3)
        assert json.loads(board.path.read_text())["instance"] == "i-w0" and resets == [False]
        other.request_reset()
        await asyncio.sleep(0.3)
        assert True in resets and json.loads(board.path.read_text())["reset_generation"] == 1
        for path in run_dir.iterdir():
            path.unlink()
        run_dir.rmdir()  # the supervisor is gone: publishing fails, the worker goes on
        await asyncio.sleep(0.7)
        assert not task.done()
        assert "worker stats: could not publish" in caplog.text
    finally:
        task.cancel()


# ------------------------------------------------------------------ call records from several processes


def _write_calls(data_dir: str, prefix: str, calls: int, events: int) -> None:
    """A worker's records: `calls` calls of `events` events each, ended (runs in its own process)."""
    store = SqliteStore(Path(data_dir))
    for index in range(calls):
        call_id = f"{prefix}-{index}"
        store.begin_call(CallRecord(call_id, "", "test", time.time()))
        for seq in range(1, events):
            store.append(call_id, seq, {"event": "partial", "t": seq * 0.01, "text": "x" * 50})
        store.append(call_id, events, {"event": "call_ended", "t": 1.0, "reason": "hangup"})
    store.close(timeout=60)
    assert store.stats()["dropped"] == 0


def test_two_processes_writing_one_database_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_calls, args=(str(tmp_path), name, 150, 20)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    with contextlib.closing(sqlite3.connect(db_path(tmp_path))) as db:
        assert db.execute("SELECT count(*) FROM calls WHERE end_reason = 'hangup'").fetchone() == (300,)
        assert db.execute("SELECT count(*) FROM events").fetchone() == (300 * 20,)


def test_recovery_marks_only_the_calls_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ended, not reaped: os.kill still finds it
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        assert recover_lost_calls(tmp_path) == []  # no database yet
        store = SqliteStore(tmp_path)
        store.close()
        host = os.uname().nodename
        with contextlib.closing(sqlite3.connect(db_path(tmp_path))) as db, db:
            for call_id, pid in (("of-the-dead", dead.pid), ("of-a-zombie", zombie.pid), ("of-the-living", alive.pid)):
                db.execute(
                    "INSERT INTO calls (call_id, agent, started_at, owner) VALUES (?, 'test', ?, ?)",
                    (call_id, time.time(), f"{host}:{pid}:abc"),
                )
        assert sorted(recover_lost_calls(tmp_path)) == ["of-a-zombie", "of-the-dead"]
        assert recover_lost_calls(tmp_path) == []  # once
        with contextlib.closing(sqlite3.connect(db_path(tmp_path))) as db:
            rows = dict(db.execute("SELECT call_id, end_reason FROM calls").fetchall())
        assert rows == {"of-the-dead": "server_lost", "of-a-zombie": "server_lost", "of-the-living": None}
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()


# ------------------------------------------------------------------ a real two-worker server


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    port: int = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/acs"

    def messages(self) -> list[str]:
        found = []
        for text in self.log_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                found.append(str(json.loads(text).get("message", "")))
        return found

    def stats(self, reset: bool = False) -> dict[str, Any]:
        return httpx.get(f"{self.http}/api/stats", params={"reset": reset}, timeout=5).json()


@contextlib.contextmanager
def two_workers(tmp_path: Path, **settings: str) -> Iterator[Served]:
    """`parley serve --workers 2 --port 0` (plumbing engines), once it answers on the port it logged."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PARLEY_")}
    env.update(
        PYTHONPATH=str(SRC),
        PARLEY_HOST="127.0.0.1",
        PARLEY_PORT="0",
        PARLEY_ENGINES="plumbing",
        PARLEY_LOG_FORMAT="json",
        PARLEY_LOG_LEVEL="info",
        PARLEY_OVERLOAD_LOOP_LAG_MS="2000",
        PARLEY_DATA_DIR=str(tmp_path / "data"),
        PARLEY_DRAIN_TIMEOUT_S="1",
        PARLEY_GREETING="",
    )
    env.update({f"PARLEY_{key.upper()}": value for key, value in settings.items()})
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "parley.cli", "serve", "--workers", "2"],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    served = Served(process, log_path, Path(env["PARLEY_DATA_DIR"]))
    try:
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def wait_ready(served: Served, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert served.process.poll() is None, served.log_path.read_text()
        urls = [m for m in served.messages() if m.startswith("media WebSocket: ws://127.0.0.1:")]
        if urls and not served.port:
            served.port = int(urls[0].split(":")[3].split("/")[0])
        if served.port:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if len(served.stats()["workers"]) == 2:
                    return
        assert time.monotonic() < deadline, "the two workers did not start"
        time.sleep(0.1)


@contextlib.asynccontextmanager
async def held_calls(served: Served, count: int, *, on_both: bool = False) -> AsyncIterator[list[Any]]:
    """`count` calls that stream silence in real time until the block ends (or the server hangs up).
    `on_both`: more, if need be, until both workers hold one (an idle server's kernel may hand a
    burst of connections to one worker: the first to wake takes them)."""
    sockets: list[Any] = []

    async def stream(ws: Any) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            while True:
                await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                await asyncio.sleep(0.02)

    tasks = []
    try:
        while len(sockets) < count or (on_both and live_owners(served) < 2):
            assert len(sockets) < count + 50, "every call went to one worker"
            call_id = f"held-{len(sockets)}-{uuid.uuid4().hex[:8]}"
            ws = await websockets.connect(served.ws, additional_headers={"x-ms-call-connection-id": call_id})
            sockets.append(ws)
            tasks.append(asyncio.create_task(stream(ws)))
            await asyncio.sleep(0.05)
        yield sockets
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()


async def until(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def live_owners(served: Served) -> int:
    """Worker processes holding a live call, by the call records (written as a call begins)."""
    with contextlib.closing(sqlite3.connect(db_path(served.data_dir))) as db:
        return int(db.execute("SELECT count(DISTINCT owner) FROM calls WHERE ended_at IS NULL").fetchone()[0])


def exists(path: str) -> bool:
    return Path(path).exists()


def live_by_worker(served: Served) -> dict[str, int]:
    return {worker["instance"]: worker["calls"] for worker in served.stats()["workers"]}


async def test_two_workers_share_the_port_spread_calls_reset_together_and_drain_on_sigterm(tmp_path: Path) -> None:
    with two_workers(tmp_path) as served:
        wait_ready(served)
        stats = served.stats()
        instances = [worker["instance"] for worker in stats["workers"]]
        assert [name.rsplit("-", 1)[1] for name in instances] == ["w0", "w1"]
        assert all(name.startswith(f"{os.uname().nodename}-{served.process.pid}") for name in instances)
        assert stats["admission"]["max_calls"] >= 1
        # prometheus_client's multiprocess mode: a private directory for every worker, gone at exit.
        metrics_dir = psutil.Process(stats["workers"][0]["pid"]).environ()["PROMETHEUS_MULTIPROC_DIR"]
        assert exists(metrics_dir) and Path(metrics_dir).parent.name.startswith("parley-workers-")
        async with held_calls(served, 16, on_both=True) as calls:
            held = len(calls)
            await until(lambda: sum(live_by_worker(served).values()) == held, 10, "the calls did not all arrive")
            assert all(count > 0 for count in live_by_worker(served).values()), live_by_worker(served)
            generation = served.stats(reset=True)["reset_generation"]
            await until(
                lambda: all(w["reset_generation"] >= generation for w in served.stats()["workers"]),
                3,
                "a worker did not reset",
            )
            started_t = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            await until(lambda: served.process.poll() is not None, 20, "the server did not exit")
        assert served.process.returncode == 0
        assert time.monotonic() - started_t < 15
    assert not exists(str(Path(metrics_dir).parent))
    messages = served.messages()
    assert sum(m.startswith("media WebSocket: ") for m in messages) == 1  # the supervisor's, once
    assert any(m.startswith("workers 2 (PARLEY_WORKERS)") for m in messages)
    assert sum(m.startswith("drain: every call has ended") for m in messages) == 2
    assert sum(m.startswith("worker ") and m.endswith("exited (exit code 0)") for m in messages) == 2
    with contextlib.closing(sqlite3.connect(db_path(tmp_path / "data"))) as db:
        reasons = dict(db.execute("SELECT end_reason, count(*) FROM calls GROUP BY end_reason").fetchall())
    assert reasons == {"server_drain": held}


async def test_a_killed_worker_is_restarted_and_only_its_calls_are_lost(tmp_path: Path) -> None:
    with two_workers(tmp_path) as served:
        wait_ready(served)
        async with held_calls(served, 10, on_both=True) as calls:
            held = len(calls)
            await until(lambda: sum(live_by_worker(served).values()) == held, 10, "the calls did not all arrive")
            await asyncio.sleep(1.0)  # every worker's published figures are fresh (PUBLISH_EVERY_S)
            workers = {worker["instance"]: worker["pid"] for worker in served.stats()["workers"]}
            by_worker = live_by_worker(served)
            assert all(count > 0 for count in by_worker.values()), by_worker
            victim, survivor = sorted(workers)
            os.kill(workers[victim], signal.SIGKILL)

            def restarted() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    now = {worker["instance"]: worker["pid"] for worker in served.stats()["workers"]}
                    return victim in now and now[victim] != workers[victim]
                return False

            await until(restarted, 20, "the killed worker was not restarted")
            with contextlib.closing(sqlite3.connect(db_path(tmp_path / "data"))) as db:
                rows = db.execute("SELECT owner, end_reason FROM calls").fetchall()
            lost = [reason for owner, reason in rows if f":{workers[victim]}:" in owner]
            kept = [reason for owner, reason in rows if f":{workers[survivor]}:" in owner]
            assert lost == ["server_lost"] * by_worker[victim]
            assert kept == [None] * by_worker[survivor]  # the other worker's calls are live
            assert live_by_worker(served)[survivor] == by_worker[survivor]
        served.process.send_signal(signal.SIGTERM)
        await until(lambda: served.process.poll() is not None, 20, "the server did not exit")
        assert served.process.returncode == 0
    died = [m for m in served.messages() if m.startswith(f"worker {victim} died (signal SIGKILL)")]
    assert died and f"{by_worker[victim]} live call(s) lost" in died[0]


def test_a_sigterm_while_the_workers_start_stops_them_all(tmp_path: Path) -> None:
    with two_workers(tmp_path) as served:
        deadline = time.monotonic() + 30
        while not any(m.startswith("media WebSocket: ") for m in served.messages()):
            assert served.process.poll() is None and time.monotonic() < deadline, served.log_path.read_text()
            time.sleep(0.01)
        served.process.send_signal(signal.SIGTERM)  # the workers are being spawned, or starting
        served.process.wait(20)
        assert served.process.returncode == 0
    assert sum(m.startswith("worker ") and " exited (" in m for m in served.messages()) == 2


async def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    with two_workers(tmp_path) as served:
        wait_ready(served)
        pids = [worker["pid"] for worker in served.stats()["workers"]]
        served.process.kill()
        served.process.wait(10)

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        def gone() -> bool:
            return not any(alive(pid) for pid in pids)

        await until(gone, 10, "a worker outlived its supervisor")


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    with two_workers(tmp_path, data_dir=str(not_a_dir)) as served:
        served.process.wait(60)
        assert served.process.returncode == 2
    messages = served.messages()
    assert any(re.match(r"worker \S+-w\d failed to start \(exit code 2\): stopping the server", m) for m in messages)
    assert any("cannot open the database" in m for m in messages)


# ------------------------------------------------------------------ parley bench load --workers


def _point(**changes: Any) -> dict[str, Any]:
    fine = {"p50": 1.0, "p95": 5.0, "p99": 10.0, "max": 12.0}
    point = {"loop_lag_ms": fine, "pacing_jitter_ms": fine, "onset_to_stop_ms": fine, "missed": 0, "errors": 0}
    point.update(changes)
    return point


def test_the_sweep_limit_counts_jitter_and_errors_too() -> None:
    from parley.benchmarks.load import within_limits

    late = {"p50": 1.0, "p95": 15.0, "p99": 25.0, "max": 40.0}
    assert within_limits(_point())
    assert not within_limits(_point(loop_lag_ms=late))
    assert not within_limits(_point(pacing_jitter_ms=late))
    assert not within_limits(_point(errors=1))
    assert not within_limits(_point(missed=1))
    assert not within_limits(_point(pacing_jitter_ms={"p50": None, "p95": None, "p99": None, "max": None}))


def test_bench_load_workers_needs_a_server_process_of_its_own() -> None:
    result = CliRunner().invoke(app, ["bench", "load", "--workers", "2", "--server", "inprocess"])
    assert result.exit_code == 2 and "--workers needs --server subprocess" in " ".join(result.output.split())


def test_bench_load_with_two_workers_reports_each_worker(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    result = CliRunner().invoke(
        app, ["bench", "load", "--workers", "2", "--calls", "6", "--seconds", "4", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["workers"] == 2 and len(data["loop_lag_ms_by_worker"]) == 2
    assert sum(data["calls_by_worker"].values()) == 6 and data["errors"] == 0
    worst = max(lag["p99"] for lag in data["loop_lag_ms_by_worker"].values())
    assert data["loop_lag_ms"]["p99"] == worst
    assert data["cpu_ms_per_call_s"] > 0 and data["rss_mb"] > 100  # a supervisor and two workers, summed


# ------------------------------------------------------------------ the supervisor's error paths


def test_a_taken_port_stops_parley_serve_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["serve", "--workers", "2", "--port", str(port)], env={"PARLEY_ENGINES": "plumbing"}
        )
    assert result.exit_code == 2 and "Address already in use" in result.output


def test_an_unreadable_records_database_is_left_to_the_workers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_path(tmp_path).write_bytes(b"this is not a database" * 100)
    supervisor = Supervisor(load_settings(data_dir=tmp_path, engines="plumbing"), 2)
    assert supervisor._recover_records("a previous server") == []
    assert "call records: could not mark the calls of a previous server lost" in caplog.text


async def test_a_second_sigterm_ends_the_workers_without_waiting_for_the_calls(tmp_path: Path) -> None:
    with two_workers(tmp_path, drain_timeout_s="120") as served:
        wait_ready(served)
        async with held_calls(served, 4):
            await until(lambda: sum(live_by_worker(served).values()) == 4, 10, "the calls did not all arrive")
            served.process.send_signal(signal.SIGTERM)
            await until(lambda: any("every worker drains" in m for m in served.messages()), 5, "no drain")
            served.process.send_signal(signal.SIGTERM)
            await until(lambda: served.process.poll() is not None, 20, "the server did not exit")
    assert served.process.returncode == 128 + signal.SIGTERM  # the workers died of it, as one process would
    assert any(m.startswith("SIGTERM again: every worker ends now") for m in served.messages())


def test_a_supervisor_removes_the_run_directories_killed_supervisors_left() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{dead.pid}-"))
    (left / "prometheus").mkdir()
    running = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
    try:
        _remove_stale_run_dirs()
        assert not left.exists() and running.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(running, ignore_errors=True)
