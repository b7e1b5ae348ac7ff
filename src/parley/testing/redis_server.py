"""A real, throwaway redis-server for tests and benchmarks (Debian's `redis-server` package).

Started on a free loopback port with no persistence and a private directory, stopped afterwards.
`.ci/run` installs the package; where the binary is missing, `RedisUnavailable` says so and the
tests that need Redis skip with that message.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RedisUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up (asking for its password)
    except OSError:
        return False


@contextmanager
def redis_server(timeout: float = 10.0, *, port: int | None = None, password: str | None = None) -> Iterator[str]:
    """Yields the URL (redis://127.0.0.1:PORT/0, without the password) of a fresh redis-server on
    `port` (default: a free one; a given port lets a test stop Redis and start another where it
    was); stops it on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or _free_port()
    with tempfile.TemporaryDirectory(prefix="parley-redis-") as workdir:
        options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
        options += ["--requirepass", password] if password else []
        process = subprocess.Popen(
            [binary, *options, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=open(Path(workdir) / "stderr.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        try:
            deadline = time.monotonic() + timeout
            while not _answers(port):
                if process.poll() is not None:
                    log = (Path(workdir) / "stderr.log").read_text(errors="replace")[-500:]
                    raise RedisUnavailable(f"redis-server exited with code {process.returncode}: {log}")
                if time.monotonic() > deadline:
                    raise RedisUnavailable(f"redis-server did not answer on port {port} within {timeout:.0f} s")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
