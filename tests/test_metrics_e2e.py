"""GET /metrics after real calls: a barge-in over loopback measured as the records say, refusals
counted; `parley serve` processes sharing PROMETHEUS_MULTIPROC_DIR, each scrape merging them all,
with their traces exported to the console and over OTLP/HTTP to a local receiver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from parley.caller import CallOptions, run_call
from tests.conftest import TEST_GREETING, make_server

SRC = Path(__file__).resolve().parents[1] / "src"


def scrape(http_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{http_url}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def scrape_until(http_url: str, name: str, expected: float, within_s: float = 10.0) -> dict:  # type: ignore[type-arg]
    """The scrape once `name` (no labels) reads `expected`: a call's end is recorded just after
    its socket closes."""
    deadline = time.monotonic() + within_s
    while True:
        found = scrape(http_url)
        if found.get((name, ())) == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


async def test_a_barge_in_call_and_a_refusal_show_in_the_metrics(hours_pcm: np.ndarray) -> None:
    server = make_server(engines="plumbing", greeting=TEST_GREETING)
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(server.url + "?callId=a%20b"):
                pass
        assert refused.value.response.status_code == 400
        report = await run_call(CallOptions(url=server.url, pcm=hours_pcm, barge_in_at=1.0, max_wait_s=5.0))
        found = await asyncio.to_thread(scrape_until, server.http_url, "parley_active_calls", 0.0)
    finally:
        server.stop()
    assert report.errors == []
    assert report.stop_audio_count >= 1
    assert found[("parley_active_calls", ())] == 0
    assert found[("parley_calls_total", ())] == 1
    assert found[("parley_calls_refused_total", (("reason", "bad_call_id"),))] == 1
    assert found[("parley_bargein_onset_to_stop_seconds_count", ())] >= 1
    assert found[("parley_bargein_decision_to_stop_seconds_count", ())] >= 1
    assert found[("parley_bargein_events_total", (("event", "paused"),))] >= 1
    assert found[("parley_voice_to_voice_seconds_count", ())] == 1
    assert found[("parley_speech_end_to_final_seconds_count", ())] >= 1
    assert found[("parley_event_loop_lag_seconds_count", ())] > 0
    # The histogram holds what the records say: the first StopAudio after the caller's onset (the
    # speech_onset that paused the agent, or speech_started when no onset came first).
    stop = next(e["t"] for e in report.events if e["event"] == "stop_audio_sent")
    onset = [
        e["onset_t"] for e in report.events if e["event"] in ("speech_onset", "speech_started") and e["t"] <= stop
    ][-1]
    if found[("parley_bargein_onset_to_stop_seconds_count", ())] == 1:
        assert found[("parley_bargein_onset_to_stop_seconds_sum", ())] == pytest.approx(stop - onset, abs=1e-6)
    # The caller's own measure (its clip's first loud frame -> StopAudio received) is close to ours.
    print(f"onset -> StopAudio: server {(stop - onset) * 1000:.1f} ms, caller {report.onset_to_stop_ms[0]:.1f} ms")


# --- `parley serve` processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/acs"


@contextlib.contextmanager
def parley_serve(tmp_path: Path, name: str, **env_overrides: str) -> Iterator[Serve]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PARLEY_", "OTEL_", "PROMETHEUS_"))}
    env.update(
        PYTHONPATH=str(SRC),
        PARLEY_HOST="127.0.0.1",
        PARLEY_PORT=str(port),
        PARLEY_ENGINES="plumbing",
        PARLEY_STORE="memory",
        PARLEY_GREETING="Hello there.",
        PARLEY_OVERLOAD_LOOP_LAG_MS="2000",
        # One process each: these tests share PROMETHEUS_MULTIPROC_DIR between `parley serve`
        # processes themselves (a supervisor with workers makes a private one; tests/test_workers.py).
        PARLEY_WORKERS="1",
    )
    env.update(env_overrides)
    output = tmp_path / f"{name}.out"
    with output.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "parley.cli", "serve"], env=env, stdout=out, stderr=out)
    serve = Serve(process, port, output)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, output.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{serve.http}/livez", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "parley serve did not start"
            time.sleep(0.1)
        yield serve
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


class OtlpReceiver(BaseHTTPRequestHandler):
    """A collector's OTLP/HTTP endpoint, keeping what it was sent."""

    received: list[tuple[str, str, int]] = []  # noqa: RUF012 - one receiver per test

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("Content-Type", ""), len(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, int]]]]:
    OtlpReceiver.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OtlpReceiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", OtlpReceiver.received
    httpd.shutdown()
    httpd.server_close()


async def test_processes_sharing_a_multiprocess_dir_are_scraped_as_one(tmp_path: Path, otlp_receiver) -> None:  # type: ignore[no-untyped-def]
    endpoint, received = otlp_receiver
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus")}  # created by the first process
    traced = {"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    with (
        parley_serve(tmp_path, "first", **shared, **traced) as first,
        parley_serve(tmp_path, "second", **shared) as second,
    ):
        silence = np.zeros(16000, dtype=np.int16)
        report = await run_call(CallOptions(url=first.ws, pcm=silence, max_wait_s=2.0, greeting_wait_s=3.0))
        assert report.errors == []
        # The call was on the first process; the second one's scrape counts it, from the files.
        merged = await asyncio.to_thread(scrape_until, second.http, "parley_calls_total", 1.0)
        assert merged[("parley_calls_total", ())] == 1
        merged = await asyncio.to_thread(scrape_until, second.http, "parley_active_calls", 0.0)
        assert merged[("parley_active_calls", ())] == 0
        assert merged[("parley_turns_total", (("kind", "greeting"), ("outcome", "completed")))] == 1
        assert ("process_cpu_seconds_total", ()) not in merged  # per-process figures do not merge
        assert scrape(first.http)[("parley_calls_total", ())] == 1
        first.process.send_signal(signal.SIGTERM)  # drained at once (no call): spans flushed at the end
        assert first.process.wait(20) == 0
    output = first.output.read_text()
    assert '"name": "call"' in output and '"name": "turn"' in output  # the console exporter's JSON
    assert '"service.name": "parley"' in output
    assert received and {(path, kind) for path, kind, size in received if size > 0} == {
        ("/v1/traces", "application/x-protobuf")
    }
