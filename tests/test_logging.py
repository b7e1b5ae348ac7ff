"""Logging never blocks a call: a bounded queue and a writer thread, JSON lines or a console format,
event records capped in size; and a real `parley serve` whose stdout nobody reads keeps answering."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from parley import logs
from parley.caller import CallOptions, run_call
from parley.media.events import MAX_FIELD_CHARS, EventLog, cap_field
from parley.settings import load_settings
from parley.transports import acs

# Each test configures logging its own way: conftest's fixture puts it back afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


# --- the format ------------------------------------------------------------------------------------


def test_json_lines_are_one_parseable_line_each_with_the_events_fields_merged(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    with out.open("w") as stream:  # a file, not a terminal: auto is JSON
        assert logs.resolve_format("auto", stream) == "json"
        logs.configure("debug", stream=stream)  # what callers said is logged only at DEBUG
        logging.getLogger("parley.test").info("a long message %s", "x" * 200)
        events = EventLog("call-1")
        events.emit("final", text="what are your opening hours " * 10, utterance_id=3)
        events.emit("input_error", error="y" * 5000)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("parley.test").exception("it failed")
        logs.shutdown()
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one whole JSON object
    assert len(records) == 4
    plain, final, error, failure = records
    assert plain["logger"] == "parley.test" and plain["level"] == "INFO"
    assert plain["message"] == "a long message " + "x" * 200 and len(lines[0]) > 200  # never wrapped at 80
    assert {"time", "level", "logger", "message"} <= plain.keys()
    # An event's own fields are keys of the line, not a JSON string inside the message.
    assert final["logger"] == "parley.events" and final["message"] == "final"
    assert final["event"] == "final" and final["call_id"] == "call-1" and final["utterance_id"] == 3
    assert final["text"].startswith("what are your opening hours") and isinstance(final["t"], float)
    assert len(error["error"]) < MAX_FIELD_CHARS + 40 and "chars]" in error["error"]
    assert failure["level"] == "ERROR" and "ValueError: boom" in failure["exception"]


def test_console_format_is_short_with_emoji_markers() -> None:
    stream = io.StringIO()
    assert logs.resolve_format("console", stream) == "console"
    # Not a terminal: no rich, no wrapping. DEBUG: what the agent said is logged only then.
    logs.configure("debug", log_format="console", stream=stream)
    events = EventLog("call-123")
    events.emit("barge_in_decided", turn_id=2, trigger="speech")
    events.emit("stop_audio_sent", turn_id=2)
    events.emit("turn_started", turn_id=3)
    events.emit("turn_completed", turn_id=3, text="We open at eleven.")
    events.emit("call_ended", reason="hangup")
    logging.getLogger("parley.server").info("call %s connected", "call-123")
    logs.shutdown()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6
    assert "🛑 barge_in_decided [call-123] turn_id=2 trigger=speech" in lines[0]
    assert "🛑 stop_audio_sent" in lines[1] and "▶️" in lines[2] and "✅ turn_completed" in lines[3]
    assert "text=We open at eleven." in lines[3] and "☎️" in lines[4]
    assert "INFO" in lines[5] and "parley.server: call call-123 connected" in lines[5]
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_auto_is_console_in_a_terminal() -> None:
    main, tty = os.openpty()
    try:
        with open(tty, "w", closefd=False) as terminal:
            assert logs.resolve_format("auto", terminal) == "console"
            assert logs.resolve_format("json", terminal) == "json"
    finally:
        os.close(main)
        os.close(tty)


def test_log_format_setting() -> None:
    assert load_settings().log_format == "auto"
    assert load_settings(log_format="json").log_format == "json"
    with pytest.raises(ValueError):
        load_settings(log_format="xml")


# --- never blocking --------------------------------------------------------------------------------


class StuckSink(logging.Handler):
    """A sink that hangs (a pipe nobody reads) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.unstuck = threading.Event()
        self.written: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.unstuck.wait()
        self.written.append(record.getMessage())


def test_a_stuck_sink_drops_and_counts_records_without_blocking_the_caller() -> None:
    sink = StuckSink()
    logs.configure("info", sink=sink, queue_records=10)
    log = logging.getLogger("parley.test")
    started = time.perf_counter()
    for i in range(1000):
        log.info("record %d", i)
    assert time.perf_counter() - started < 0.5  # the logging call never waited for the sink
    # One record is with the stuck sink, ten wait in the queue, the rest were dropped.
    dropped = logs.dropped()
    assert 985 <= dropped <= 990
    sink.unstuck.set()
    logs.shutdown()
    assert sink.written[0] == "record 0" and len(sink.written) == 1000 - dropped + 1
    assert sink.written[-1] == f"{dropped} log records were dropped: the log output was not keeping up"


def test_shutdown_with_a_stuck_sink_returns() -> None:
    sink = StuckSink()
    logs.configure("info", sink=sink, queue_records=5)
    for i in range(50):
        logging.getLogger("parley.test").warning("record %d", i)
    started = time.perf_counter()
    logs.shutdown(timeout=0.3)
    assert time.perf_counter() - started < 1.5
    assert not logs.active() and logs.dropped() == 0
    sink.unstuck.set()


# --- event size ------------------------------------------------------------------------------------


def test_long_event_fields_are_truncated_in_the_log_and_the_events_api() -> None:
    events = EventLog("call-big", to_log=False)
    record = events.emit("dtmf", digits="1" * 65000)
    assert record["digits"].startswith("1" * MAX_FIELD_CHARS)
    assert record["digits"].endswith("…[+64500 chars]")
    assert events.snapshot()[0]["digits"] == record["digits"]
    short = events.emit("final", text="hello", utterance_id=1)
    assert short["text"] == "hello" and short["utterance_id"] == 1
    nested = cap_field({"a": ["z" * 600, 7], "b": ("q" * 501,)})
    assert nested["a"][0].endswith("…[+100 chars]") and nested["a"][1] == 7
    assert nested["b"][0].endswith("…[+1 chars]") and isinstance(nested["b"], tuple)


# --- a real server whose stdout is a pipe nobody reads ------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unread_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`parley serve` (plumbing engines, JSON logs, events logged) with stdout and stderr pipes that
    nobody reads: once their buffers (64 KiB) are full, every write to them would block."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PARLEY_")}
    env.update(
        PARLEY_ENGINES="plumbing",
        PARLEY_WORKERS="1",  # one process: /api/stats is the one whose log pipe is stuck
        PARLEY_PORT=str(port),
        PARLEY_HOST="127.0.0.1",
        # The floods below stall the loop on purpose (the log pipe is what is tested): overload
        # refusals (tests/test_admission.py) would refuse the calls that follow them.
        PARLEY_OVERLOAD_LOOP_LAG_MS="100000",
        PARLEY_MAX_INBOUND_RATE="1000",  # the floods below are not about the rate cap (test_limits.py is)
        PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "parley.cli", "serve"],
        cwd=tmp_path,  # no .env
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "parley serve exited"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "parley serve did not start"
            time.sleep(0.2)
        yield base, process
    finally:
        process.kill()
        process.wait(10)


async def flood_dtmf(url: str, messages: list[str]) -> None:
    call_id = f"flood-{uuid.uuid4()}"
    try:
        async with websockets.connect(url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            for message in messages:
                await ws.send(message)
            await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
    except websockets.ConnectionClosed:
        pass  # a server that refuses a message closes the call; the server must still answer


async def test_a_stdout_nobody_reads_never_freezes_the_server(
    unread_server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, process = unread_server
    ws_url = base.replace("http://", "ws://") + "/ws/acs"
    # The original freeze: one 65,000-digit DtmfData (its event line alone was larger than the pipe).
    huge = json.dumps({"kind": "DtmfData", "dtmfData": {"data": "1234567890" * 6500}})
    await flood_dtmf(ws_url, [huge] * 5)
    # Then far more records than the pipe holds: the writer thread is stuck, the queue fills and drops.
    await flood_dtmf(ws_url, [acs.dtmf_message("5")] * 12000)
    async with httpx.AsyncClient(base_url=base) as http:
        started = time.monotonic()
        health = await http.get("/healthz", timeout=1)
        assert health.status_code == 200 and time.monotonic() - started < 1
        report = await run_call(CallOptions(url=ws_url, pcm=np.zeros(16000, dtype=np.int16), max_wait_s=5))
        assert report.errors == [], report.errors
        assert report.close_code in (None, 1000), report.close_code
        assert report.frames_received > 0
        stats = (await http.get("/api/stats", timeout=1)).json()
        assert stats["log_records_dropped"] > 0
        started = time.monotonic()
        assert (await http.get("/healthz", timeout=1)).status_code == 200
        assert time.monotonic() - started < 1
    # Ctrl-C still stops it: the stuck writer thread gets a deadline and holds no lock exit needs.
    process.send_signal(signal.SIGINT)
    await asyncio.to_thread(process.wait, 15)


def test_other_handlers_still_get_an_events_json_as_its_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="parley.events"):  # digits are logged only at DEBUG
        EventLog("call-7").emit("dtmf", digits="12#")
    [record] = [r for r in caplog.records if r.name == "parley.events"]
    assert json.loads(record.getMessage()) == {
        "event": "dtmf",
        "t": pytest.approx(time.monotonic(), abs=5),
        "call_id": "call-7",
        "digits": "12#",
    }
