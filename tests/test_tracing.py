"""OpenTelemetry spans from event records (parley.tracing), with the real SDK and its in-memory
exporter: a call span with its turn spans after a real call with a barge-in; failures, unfinished
turns; which OTEL_* variables turn tracing on; nothing of OpenTelemetry imported when off."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from parley.caller import CallOptions, run_call
from parley.tracing import CallTracer, tracer_from_env, wanted_exporters
from tests.conftest import TEST_GREETING, make_server

SRC = Path(__file__).resolve().parents[1] / "src"


def in_memory(agent: str = "plumbing") -> tuple[CallTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return CallTracer(provider, agent), exporter


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_a_real_call_makes_a_call_span_with_its_turns(hours_pcm: np.ndarray) -> None:
    tracer, exporter = in_memory()
    server = make_server(engines="plumbing", greeting=TEST_GREETING)
    server.registry.observers.append(tracer.observe)
    try:
        report = await run_call(CallOptions(url=server.url, pcm=hours_pcm, barge_in_at=1.0, max_wait_s=5.0))
    finally:
        server.stop()  # every call has ended (and so every span) once the server has stopped
    assert report.errors == []
    spans = exporter.get_finished_spans()
    [call] = named(spans, "call")
    turns = sorted(named(spans, "turn"), key=lambda span: span.attributes["parley.turn.id"])  # type: ignore[index]
    assert call.attributes is not None and call.context is not None
    assert call.attributes["parley.call_id"] == report.call_id
    assert call.attributes["parley.agent"] == "plumbing"
    assert str(call.attributes["parley.end_reason"]).startswith("caller_hangup")
    assert call.attributes["parley.turns"] == len(turns) == 2
    assert call.attributes["parley.barge_ins"] >= 1  # type: ignore[operator]
    assert call.attributes["parley.frames_in"] > 0  # type: ignore[operator]
    for turn in turns:
        assert turn.parent is not None and turn.parent.span_id == call.context.span_id
        assert turn.context is not None and turn.context.trace_id == call.context.trace_id
        assert call.start_time is not None and turn.start_time is not None and turn.end_time is not None
        assert call.start_time <= turn.start_time <= turn.end_time
    greeting, answer = turns
    assert attributes(greeting) >= {("parley.turn.kind", "greeting"), ("parley.turn.outcome", "cancelled")}
    events = [event.name for event in greeting.events]
    assert "barge_in_paused" in events and "barge_in_decided" in events
    assert greeting.attributes is not None and "parley.bargein_onset_to_stop_ms" in greeting.attributes
    assert answer.attributes is not None
    assert answer.attributes["parley.turn.kind"] == "speech" and answer.attributes["parley.turn.outcome"] == "completed"
    assert answer.attributes["parley.voice_to_voice_ms"] > 0  # type: ignore[operator]
    # No words of the caller's or the agent's in any span.
    assert not any("hours" in str(value) for span in spans for value in (span.attributes or {}).values())


def attributes(span: ReadableSpan) -> set[tuple[str, Any]]:
    return set((span.attributes or {}).items())


def feed(tracer: CallTracer, call_id: str = "call-1") -> Any:
    def record(event: str, t: float, **fields: Any) -> None:
        tracer.observe({"event": event, "t": t, "call_id": call_id, **fields})

    return record


def test_failures_and_unfinished_turns() -> None:
    tracer, exporter = in_memory()
    record = feed(tracer)
    record("call_started", 1.0, correlation_id="corr-1")
    record("turn_started", 1.0, turn_id=1, kind="speech")
    record("turn_failed", 1.5, turn_id=1, stage="voice", error="RuntimeError: no voice")
    record("turn_completed", 2.0, turn_id=1, audio_ms=800, text="")
    record("input_error", 2.1, error="recognition failed: crashed")
    record("turn_started", 3.0, turn_id=2, kind="dtmf")
    record("call_ended", 4.0, reason="error: RuntimeError", frames_in=150)
    record("acs_event", 4.5, type="CallDisconnected")  # after the call: no span to put it on
    spans = exporter.get_finished_spans()
    [call] = named(spans, "call")
    failed, unfinished = sorted(named(spans, "turn"), key=lambda span: span.attributes["parley.turn.id"])  # type: ignore[index]
    assert failed.status.status_code is StatusCode.ERROR and failed.status.description == "RuntimeError: no voice"
    assert attributes(failed) >= {("parley.turn.outcome", "failed"), ("parley.turn.failed_stage", "voice")}
    assert unfinished.attributes is not None and unfinished.attributes["parley.turn.outcome"] == "unfinished"
    assert call.status.status_code is StatusCode.ERROR
    assert attributes(call) >= {
        ("parley.correlation_id", "corr-1"),
        ("parley.engine_errors", 2),
        ("parley.frames_in", 150),
        ("parley.turns", 2),
    }
    assert [(event.name, dict(event.attributes or {})) for event in call.events] == [
        ("engine_error", {"kind": "tts"}),
        ("engine_error", {"kind": "stt"}),
    ]
    assert call.end_time is not None and call.start_time is not None
    assert call.end_time - call.start_time == pytest.approx(3e9, rel=1e-6)  # event times, in wall-clock ns


def test_a_bad_record_costs_a_span_not_the_call(caplog: pytest.LogCaptureFixture) -> None:
    tracer, exporter = in_memory()
    with caplog.at_level(logging.ERROR, logger="parley.tracing"):
        tracer.observe({"event": "call_started", "call_id": "call-1"})  # no time: a bug upstream
    assert "could not account for the event call_started" in caplog.text
    assert exporter.get_finished_spans() == ()


# --- switched on by the standard variables ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "OTLP, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, []),
    ],
)
def test_which_variables_turn_traces_on(env: dict[str, str], expected: list[str]) -> None:
    assert wanted_exporters(env) == expected


def test_an_unknown_exporter_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="parley.tracing"):
        assert wanted_exporters({"OTEL_TRACES_EXPORTER": "jaeger,console"}) == ["console"]
    assert "ignoring jaeger" in caplog.text


def test_the_service_is_parley_unless_otel_service_name_says(monkeypatch: pytest.MonkeyPatch) -> None:
    tracer = tracer_from_env("support", {"OTEL_TRACES_EXPORTER": "console"})
    assert tracer is not None and tracer.agent == "support"
    assert tracer.provider.resource.attributes["service.name"] == "parley"
    tracer.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "voice-line")  # the SDK reads its own variables
    tracer = tracer_from_env("", {"OTEL_TRACES_EXPORTER": "console"})
    assert tracer is not None and tracer.provider.resource.attributes["service.name"] == "voice-line"
    tracer.shutdown()


def test_without_the_sdk_traces_are_off_and_it_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="parley.tracing"):
        assert tracer_from_env("", {"OTEL_TRACES_EXPORTER": "console"}) is None
    assert "pip install 'parley[otel]'" in caplog.text


def test_off_means_nothing_of_opentelemetry_is_imported() -> None:
    """(FastAPI itself imports the OpenTelemetry API for its own spans, no-ops without a global provider.)"""
    code = (
        "import sys\n"
        "from parley.server import create_app\n"
        "from parley.settings import load_settings\n"
        "app = create_app(load_settings(engines='plumbing', event_log=False, store='memory'))\n"
        "assert app.state.registry.observers, 'metrics observe the calls'\n"
        "print(sorted(name for name in sys.modules if name.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
