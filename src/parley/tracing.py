"""OpenTelemetry traces: a `call` span per call, with a child `turn` span per agent turn.

Built from the call's event records (an observer on the call registry, like parley.metrics), so a
span says what the records say: a turn's kind, outcome and latencies, its barge-ins as span events.
No text the caller or the agent said goes into a span.

On only when the OpenTelemetry SDK is installed (`pip install 'parley[otel]'`) and the standard
variables ask for traces: OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set
(OTLP over HTTP), or OTEL_TRACES_EXPORTER=otlp or console. Otherwise nothing of OpenTelemetry is
imported and calls pay nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from parley import __version__
from parley.figures import CallFigures, engine_error_kind

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
EXPORTERS = frozenset({"otlp", "console"})
DEFAULT_SERVICE_NAME = "parley"
_BARGE_IN_FIELDS = ("trigger", "reason", "heard_ms", "from_ms", "utterance_id")


def wanted_exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters the OTEL_* variables ask for ([]: tracing off). OTEL_TRACES_EXPORTER names
    them (comma-separated; `none`: off); unset, an OTLP endpoint means `otlp`."""
    named = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not named:
        return ["otlp"] if any(env.get(variable, "").strip() for variable in ENDPOINT_VARIABLES) else []
    unknown = [name for name in named if name not in EXPORTERS | {"none"}]
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: ignoring %s (parley knows otlp, console, none)", ", ".join(unknown))
    return [] if "none" in named else [name for name in named if name in EXPORTERS]


def tracer_from_env(agent: str = "", env: Mapping[str, str] | None = None) -> CallTracer | None:
    """The call tracer the environment asks for, exporting as it says (None: tracing off, or the
    SDK is not installed, which is logged)."""
    exporters = wanted_exporters(os.environ if env is None else env)
    if not exporters:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError as exc:
        log.warning(
            "traces are asked for (OTEL_*) but OpenTelemetry is not installed (%s): pip install 'parley[otel]'", exc
        )
        return None
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # OTEL_SERVICE_NAME unset
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for name in exporters:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # its endpoint, headers and timeout from the OTEL_* variables
        provider.add_span_processor(BatchSpanProcessor(exporter))  # spans leave off the event loop
    log.info("traces: %s, service %s", " and ".join(exporters), resource.attributes.get(SERVICE_NAME))
    return CallTracer(provider, agent)


class _CallSpans:
    __slots__ = ("barge_ins", "engine_errors", "failed_turns", "figures", "span", "turns", "turns_started")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.figures = CallFigures()
        self.turns: dict[int, Span] = {}  # open turns
        self.turns_started = 0
        self.failed_turns: set[int] = set()
        self.barge_ins = 0
        self.engine_errors = 0


class CallTracer:
    """Spans from event records: `observe` is the call registry's event observer."""

    def __init__(self, provider: TracerProvider, agent: str = "") -> None:
        self.provider = provider
        self.agent = agent
        self._tracer = provider.get_tracer("parley", __version__)
        self._calls: dict[str, _CallSpans] = {}
        # Event times are time.monotonic(); spans want wall-clock nanoseconds.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()

    def observe(self, record: dict[str, Any]) -> None:
        try:
            self._observe(record)
        except Exception:  # a bug here must cost a span, never the call
            log.exception("traces: could not account for the event %s", record.get("event"))

    def shutdown(self) -> None:
        """Export what is left (blocks: call it off the event loop)."""
        self.provider.shutdown()

    def _ns(self, record: Mapping[str, Any]) -> int:
        return int(record["t"] * 1e9) + self._wall_offset_ns

    def _observe(self, record: dict[str, Any]) -> None:
        name = record["event"]
        call_id = record["call_id"]
        if name == "call_started":
            self._call_started(call_id, record)
            return
        call = self._calls.pop(call_id, None) if name == "call_ended" else self._calls.get(call_id)
        if call is None:
            return
        if name == "call_ended":
            self._call_ended(call, record)
            return
        for figure in call.figures.feed(record):
            span = call.turns.get(figure.turn_id) if figure.turn_id is not None else call.span
            if span is not None:
                span.set_attribute(f"parley.{figure.name}_ms", round(figure.seconds * 1000, 1))
        if (kind := engine_error_kind(record)) is not None:
            call.engine_errors += 1
            call.span.add_event("engine_error", {"kind": kind}, timestamp=self._ns(record))
        turn_id = record.get("turn_id")
        if not isinstance(turn_id, int):
            return
        if name == "turn_started":
            self._turn_started(call, turn_id, record)
            return
        turn = call.turns.get(turn_id)
        if turn is None:
            return
        if name.startswith("barge_in_"):
            call.barge_ins += name == "barge_in_decided"
            fields = {key: record[key] for key in _BARGE_IN_FIELDS if record.get(key) is not None}
            turn.add_event(name, fields, timestamp=self._ns(record))
        elif name == "turn_failed":
            from opentelemetry.trace import Status, StatusCode

            call.failed_turns.add(turn_id)
            turn.set_attribute("parley.turn.failed_stage", str(record.get("stage", "")))
            turn.set_status(Status(StatusCode.ERROR, str(record.get("error", ""))))
        elif name in ("turn_completed", "turn_cancelled"):
            del call.turns[turn_id]
            self._turn_ended(turn, record, turn_id in call.failed_turns)
            call.failed_turns.discard(turn_id)

    def _call_started(self, call_id: str, record: dict[str, Any]) -> None:
        from opentelemetry.trace import SpanKind

        attributes = {"parley.call_id": call_id, "parley.agent": self.agent}
        if record.get("correlation_id"):
            attributes["parley.correlation_id"] = str(record["correlation_id"])
        span = self._tracer.start_span("call", kind=SpanKind.SERVER, attributes=attributes, start_time=self._ns(record))
        self._calls[call_id] = _CallSpans(span)

    def _turn_started(self, call: _CallSpans, turn_id: int, record: dict[str, Any]) -> None:
        from opentelemetry import trace

        call.turns_started += 1
        call.turns[turn_id] = self._tracer.start_span(
            "turn",
            context=trace.set_span_in_context(call.span),
            attributes={"parley.turn.id": turn_id, "parley.turn.kind": str(record.get("kind", ""))},
            start_time=self._ns(record),
        )

    def _turn_ended(self, turn: Span, record: dict[str, Any], failed: bool) -> None:
        failed = failed or bool(record.get("error"))
        if record["event"] == "turn_completed":
            outcome = "failed" if failed else "completed"
        else:
            outcome = "failed" if failed else "cancelled"
        turn.set_attribute("parley.turn.outcome", outcome)
        for key in ("audio_ms", "heard_ms"):
            if isinstance(record.get(key), int | float):
                turn.set_attribute(f"parley.turn.{key}", record[key])
        turn.end(end_time=self._ns(record))

    def _call_ended(self, call: _CallSpans, record: dict[str, Any]) -> None:
        end = self._ns(record)
        for turn in call.turns.values():  # the call ended first
            turn.set_attribute("parley.turn.outcome", "unfinished")
            turn.end(end_time=end)
        span = call.span
        reason = str(record.get("reason", ""))
        span.set_attribute("parley.end_reason", reason)
        span.set_attribute("parley.turns", call.turns_started)
        span.set_attribute("parley.barge_ins", call.barge_ins)
        span.set_attribute("parley.engine_errors", call.engine_errors)
        for key in ("frames_in", "frames_sent", "dropped_frames", "input_errors"):
            if isinstance(record.get(key), int):
                span.set_attribute(f"parley.{key}", record[key])
        if reason.startswith("error"):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, reason))
        span.end(end_time=end)
