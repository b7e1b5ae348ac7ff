"""Graceful drain of a real `parley serve` process: SIGTERM over real sockets.

The first SIGTERM stops admitting (/readyz 503, new sockets 503) while live calls go on; at the drain
timeout each live caller hears the closing line and is hung up; the process exits 0 once the last
call has ended. A second SIGTERM ends the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from parley.transports import acs

SRC = Path(__file__).resolve().parents[1] / "src"
DRAIN_TIMEOUT_S = 3.0
# The plumbing voice "speaks" 60 ms per character (a tone): the greeting lasts ~6 s, longer than the
# drain timeout, so audio is still flowing when the drain ends the call; the closing line ~1.7 s.
LONG_GREETING = "This greeting is long on purpose so that it is still playing when the drain times out."
CLOSING = "We are closing now, goodbye."


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/acs"

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for text in self.log_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(text))
        return lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def parley_serve(tmp_path: Path, **settings: str) -> Iterator[Server]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PARLEY_")}
    env.update(
        PYTHONPATH=str(SRC),
        PARLEY_HOST="127.0.0.1",
        PARLEY_PORT=str(port),
        PARLEY_ENGINES="plumbing",
        PARLEY_WORKERS="1",  # one process: its log in order (two workers drain in tests/test_workers.py)
        PARLEY_LOG_FORMAT="json",
        PARLEY_STORE="memory",
        PARLEY_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
        PARLEY_GREETING=LONG_GREETING,
        PARLEY_CLOSING_TEXT=CLOSING,
    )
    env.update({f"PARLEY_{key.upper()}": value for key, value in settings.items()})
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "parley.cli", "serve"], cwd=tmp_path, env=env, stdout=log_file, stderr=log_file
        )
    server = Server(process, port, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.http}/livez", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "parley serve did not start"
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@dataclass
class LiveCall:
    """A caller that streams silence in real time and records what it receives, with times."""

    ws: Any
    audio_t: list[float] = field(default_factory=list)
    stop_audio_t: list[float] = field(default_factory=list)
    sent_t: list[float] = field(default_factory=list)
    closed_t: float | None = None
    close_code: int | None = None
    close_reason: str = ""

    async def send(self) -> None:
        start = time.monotonic()
        with contextlib.suppress(websockets.ConnectionClosed):
            for i in range(100_000):
                await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
                await self.ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                self.sent_t.append(time.monotonic())

    async def receive(self) -> None:
        try:
            async for message in self.ws:
                parsed = acs.parse_outbound(message)
                if isinstance(parsed, acs.OutboundAudio):
                    self.audio_t.append(time.monotonic())
                elif isinstance(parsed, acs.OutboundStop):
                    self.stop_audio_t.append(time.monotonic())
        except websockets.ConnectionClosed:
            pass
        self.closed_t = time.monotonic()
        if self.ws.close_code is not None:
            self.close_code, self.close_reason = self.ws.close_code, self.ws.close_reason or ""


@contextlib.asynccontextmanager
async def live_call(url: str, call_id: str) -> Any:
    async with websockets.connect(url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        call = LiveCall(ws)
        tasks = [asyncio.create_task(call.send()), asyncio.create_task(call.receive())]
        try:
            yield call
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def until(predicate: Any, within_s: float, what: str) -> float:
    deadline = time.monotonic() + within_s
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)
    return time.monotonic()


async def test_sigterm_drains_the_live_call_then_closes_it_politely_and_exits_0(tmp_path: Path) -> None:
    with parley_serve(tmp_path) as server:
        async with live_call(server.ws, "drain-live") as call, httpx.AsyncClient(base_url=server.http) as http:
            await until(lambda: _true(len(call.audio_t) > 25), 10, "the greeting did not start")
            sigterm_t = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await http.get("/readyz")).status_code == 503

            readyz_t = await until(not_ready, 5, "/readyz stayed 200")
            ready = await http.get("/readyz")
            assert ready.json()["reasons"] == ["draining"]
            assert (await http.get("/livez")).status_code == 200
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws)
            refused_t = time.monotonic()
            assert refused.value.response.status_code == 503 and b"draining" in refused.value.response.body

            await until(lambda: _true(call.closed_t is not None), DRAIN_TIMEOUT_S + 15, "the call was not closed")
        exit_t = await until(lambda: _true(server.process.poll() is not None), 15, "parley serve did not exit")
        assert server.process.returncode == 0
    assert call.closed_t is not None
    # The live call went on: the caller kept sending and kept hearing the greeting until the timeout.
    heard_during_drain = [t for t in call.audio_t if sigterm_t < t < sigterm_t + DRAIN_TIMEOUT_S - 0.2]
    assert len(heard_during_drain) > 0.8 * (DRAIN_TIMEOUT_S - 0.2) / 0.02
    assert len([t for t in call.sent_t if t > sigterm_t]) > 0.8 * DRAIN_TIMEOUT_S / 0.02
    # At the timeout: StopAudio (the greeting is cut), then the closing line, then the hang-up.
    assert len(call.stop_audio_t) == 1
    stop_t = call.stop_audio_t[0]
    assert DRAIN_TIMEOUT_S - 0.2 < stop_t - sigterm_t < DRAIN_TIMEOUT_S + 1.0
    closing_audio = [t for t in call.audio_t if t > stop_t]
    closing_s = len(CLOSING) * 0.06
    assert len(closing_audio) >= 0.9 * closing_s / 0.02  # the whole closing line reached the caller
    assert call.closed_t - closing_audio[-1] < 1.0  # ... and then the call was hung up
    assert (call.close_code, call.close_reason) == (1000, "server_drain")
    # What the log says, in order.
    messages = [line.get("message", "") for line in server.log_lines()]
    steps = [
        "SIGTERM: draining",
        "draining: refusing new calls; 1 live call(s)",
        "media socket refused (HTTP 503, draining)",
        "drain timeout: closing 1 call(s)",
        "call drain-live: finishing (server_drain)",
        "call drain-live ended: server_drain",
        "drain: every call has ended",
        "Application shutdown complete.",
    ]
    positions = [next((i for i, m in enumerate(messages) if m.startswith(step)), -1) for step in steps]
    assert -1 not in positions and positions == sorted(positions), list(zip(steps, positions, strict=True))
    ended = [line for line in server.log_lines() if line.get("message") == "call_ended"]
    assert ended and ended[0]["reason"] == "server_drain"
    timeline = {
        "SIGTERM": 0.0,
        "/readyz 503": readyz_t - sigterm_t,
        "new socket refused 503": refused_t - sigterm_t,
        "StopAudio (drain timeout)": stop_t - sigterm_t,
        "closing line first audio": closing_audio[0] - sigterm_t,
        "closing line last audio": closing_audio[-1] - sigterm_t,
        "socket closed": call.closed_t - sigterm_t,
        "process exited (0)": exit_t - sigterm_t,
    }
    print("drain timeline (s after SIGTERM):", json.dumps({k: round(v, 3) for k, v in timeline.items()}))


async def test_a_second_sigterm_ends_at_once(tmp_path: Path) -> None:
    with parley_serve(tmp_path, drain_timeout_s="60") as server:
        async with live_call(server.ws, "drain-forced") as call, httpx.AsyncClient(base_url=server.http) as http:
            await until(lambda: _true(len(call.audio_t) > 10), 10, "the greeting did not start")
            server.process.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await http.get("/readyz")).status_code == 503

            await until(not_ready, 5, "/readyz stayed 200")
            second_t = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            exit_t = await until(lambda: _true(server.process.poll() is not None), 5, "still running")
            await until(lambda: _true(call.closed_t is not None), 5, "the call was not closed")
        assert exit_t - second_t < 3.0
        assert server.process.returncode != 0  # not a clean drain: it says it was terminated
        assert call.close_code == 1012  # uvicorn's "service restart" close
        messages = [line.get("message", "") for line in server.log_lines()]
        assert any(m.startswith("SIGTERM again: ending now") for m in messages)


async def test_sigint_without_calls_exits_0_at_once(tmp_path: Path) -> None:
    with parley_serve(tmp_path) as server:
        sent_t = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        exit_t = await until(lambda: _true(server.process.poll() is not None), 10, "still running")
        assert server.process.returncode == 0 and exit_t - sent_t < 3.0
        messages = [line.get("message", "") for line in server.log_lines()]
        assert any(m.startswith("drain: every call has ended (0.0 s)") for m in messages)


async def _true(value: bool) -> bool:
    return value
