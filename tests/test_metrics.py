"""Metrics from event records (parley.figures, parley.metrics): the figures each record completes,
the counters and histograms they feed, per-app registries, multiprocess files, and who may scrape."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from parley.figures import CallFigures, end_reason_label, engine_error_kind
from parley.media.events import CallRegistry, EventLog
from parley.metrics import MULTIPROC_DIR_ENV, Metrics, worker_exited
from parley.server import create_app
from parley.settings import Settings, load_settings

TOKEN = "metrics-token-for-tests"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


class Call:
    """Feeds one call's records, as an EventLog makes them, to an observer."""

    def __init__(self, observe: Any, call_id: str = "call-1") -> None:
        self.observe = observe
        self.call_id = call_id

    def __call__(self, event: str, t: float, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "t": t, "call_id": self.call_id, **fields}
        self.observe(record)
        return record


def barge_in_call(call: Call) -> None:
    """A greeting the caller talks over (paused at the VAD, then cancelled), then the answer."""
    call("call_started", 10.0)
    call("turn_started", 10.0, turn_id=1, kind="greeting")
    call("agent_text", 10.01, turn_id=1)
    call("first_audio_ready", 10.05, turn_id=1)
    call("first_audio_sent", 10.06, turn_id=1)
    call("speech_started", 11.2, utterance_id=1, onset_t=11.0)
    call("barge_in_paused", 11.2, turn_id=1, utterance_id=1, heard_ms=1100.0)
    call("stop_audio_sent", 11.204, turn_id=1)
    call("barge_in_decided", 11.5, turn_id=1, trigger="sustained_speech")
    call("barge_in_confirmed", 11.5, turn_id=1, reason="sustained_speech")
    call("turn_cancelled", 11.5, turn_id=1, heard_ms=1100.0, heard_text="", audio_ms=1300)
    call("final", 12.4, utterance_id=1, text="hours", speech_end_t=12.0)
    call("turn_started", 12.4, turn_id=2, kind="speech")
    call("agent_text", 12.7, turn_id=2)
    call("first_audio_ready", 12.8, turn_id=2)
    call("first_audio_sent", 12.85, turn_id=2)
    call("turn_completed", 14.0, turn_id=2, audio_ms=1100, text="")
    call("call_ended", 14.5, reason="caller_hangup (code 1000)")


# --- figures ---------------------------------------------------------------------------------------


def test_each_record_completes_its_figures() -> None:
    figures = CallFigures()
    seen: list[tuple[str, float, int | None]] = []
    barge_in_call(
        Call(lambda record: seen.extend((f.name, round(f.seconds, 3), f.turn_id) for f in figures.feed(record)))
    )
    assert seen == [
        ("tts_first_audio", 0.04, 1),
        ("turn_first_audio", 0.06, 1),
        ("bargein_decision_to_stop", 0.004, 1),  # paused at 11.2, StopAudio written at 11.204
        ("bargein_onset_to_stop", 0.204, 1),  # from the VAD's onset (11.0), not its detection
        ("speech_end_to_final", 0.4, None),
        ("agent_first_text", 0.3, 2),
        ("tts_first_audio", 0.1, 2),
        ("turn_first_audio", 0.45, 2),
        ("voice_to_voice", 0.85, 2),
    ]
    assert figures.turns == {}  # ended turns are forgotten


def test_a_key_barge_in_has_no_onset_and_a_stop_without_a_barge_in_is_not_measured() -> None:
    figures = CallFigures()
    call = Call(lambda record: seen.extend(figures.feed(record)))
    seen: list[Any] = []
    call("turn_started", 1.0, turn_id=1, kind="greeting")
    call("barge_in_decided", 2.0, turn_id=1, trigger="dtmf")
    call("stop_audio_sent", 2.01, turn_id=1)
    call("stop_audio_sent", 2.5, turn_id=1)  # a second StopAudio (the call finishing): no barge-in
    assert [(f.name, round(f.seconds, 3)) for f in seen] == [("bargein_decision_to_stop", 0.01)]
    seen.clear()
    call("turn_started", 3.0, turn_id=2, kind="dtmf")  # no voice-to-voice for a key input
    call("first_audio_sent", 3.2, turn_id=2)
    call("agent_text", 3.1, turn_id=9)  # a turn never started: ignored
    call("final", 3.3, utterance_id=1, text="")  # without speech_end_t: nothing to measure
    assert [f.name for f in seen] == ["turn_first_audio"]


def test_engine_error_kinds_and_end_reason_labels() -> None:
    def kind(event: str, **fields: Any) -> str | None:
        return engine_error_kind({"event": event, **fields})

    assert kind("turn_failed", stage="agent") == "agent"
    assert kind("turn_failed", stage="voice") == "tts"
    assert kind("turn_failed", stage="apology") == "tts"
    assert kind("input_error", error="recognition failed: boom") == "stt"
    assert kind("input_error", error="hang up failed: 500") == "call_control"
    assert kind("input_error", error="transfer failed: 404") == "call_control"
    assert kind("input_error", error="invalid JSON") is None  # the peer's fault, not an engine's
    assert kind("final") is None
    assert end_reason_label("caller_hangup (code 1000)") == "caller_hangup"
    assert end_reason_label("intent:goodbye") == "intent"
    assert end_reason_label("error: RuntimeError") == "error"
    assert end_reason_label("hang up_failed") == "hang_up_failed"
    assert end_reason_label(None) == "unknown" and end_reason_label("") == "unknown"


# --- metrics ---------------------------------------------------------------------------------------


def test_a_call_feeds_the_counters_and_histograms() -> None:
    metrics = Metrics()
    call = Call(metrics.observe)
    call("call_started", 10.0)
    assert value(metrics, "parley_active_calls") == 1
    barge_in_call(Call(metrics.observe, "call-2"))
    call("turn_started", 20.0, turn_id=1, kind="speech")
    call("turn_failed", 20.5, turn_id=1, stage="agent", error="AgentStalled: 25 s")
    call("turn_completed", 21.0, turn_id=1, audio_ms=900, text="")  # the apology was spoken
    call("input_error", 21.2, error="recognition failed: the model crashed")
    call("turn_started", 22.0, turn_id=2, kind="speech")  # still open when the call ends
    call("call_ended", 23.0, reason="error: RuntimeError")
    call("acs_event", 23.5, type="CallDisconnected")  # after the end: ignored
    assert value(metrics, "parley_active_calls") == 0
    assert value(metrics, "parley_calls_total") == 2
    assert value(metrics, "parley_calls_ended_total", reason="caller_hangup") == 1
    assert value(metrics, "parley_calls_ended_total", reason="error") == 1
    assert value(metrics, "parley_bargein_onset_to_stop_seconds_count") == 1
    assert value(metrics, "parley_bargein_onset_to_stop_seconds_bucket", le="0.3") == 1
    assert value(metrics, "parley_bargein_onset_to_stop_seconds_bucket", le="0.2") == 0
    assert value(metrics, "parley_bargein_decision_to_stop_seconds_bucket", le="0.005") == 1
    assert value(metrics, "parley_voice_to_voice_seconds_count") == 1
    assert value(metrics, "parley_speech_end_to_final_seconds_sum") == pytest.approx(0.4)
    assert value(metrics, "parley_agent_first_text_seconds_count") == 1
    assert value(metrics, "parley_tts_first_audio_seconds_count") == 2
    assert value(metrics, "parley_bargein_events_total", event="paused") == 1
    assert value(metrics, "parley_bargein_events_total", event="decided") == 1
    assert value(metrics, "parley_engine_errors_total", kind="agent") == 1
    assert value(metrics, "parley_engine_errors_total", kind="stt") == 1
    assert value(metrics, "parley_turns_total", kind="greeting", outcome="cancelled") == 1
    assert value(metrics, "parley_turns_total", kind="speech", outcome="completed") == 1
    assert value(metrics, "parley_turns_total", kind="speech", outcome="failed") == 1
    assert value(metrics, "parley_turns_total", kind="speech", outcome="unfinished") == 1


def test_refusals_loop_lag_and_backlog() -> None:
    metrics = Metrics()
    metrics.call_refused("bad_call_id")
    metrics.call_refused("bad_call_id")
    metrics.call_refused("capacity")
    registry = CallRegistry(keep_ended=0)
    metrics.attach(registry)
    registry.stats.monitor.record(3.0)  # ms
    registry.stats.monitor.record(150.0)
    metrics.backlog(12)
    assert value(metrics, "parley_calls_refused_total", reason="bad_call_id") == 2
    assert value(metrics, "parley_calls_refused_total", reason="capacity") == 1
    assert value(metrics, "parley_event_loop_lag_seconds_count") == 2
    assert value(metrics, "parley_event_loop_lag_seconds_bucket", le="0.005") == 1
    assert value(metrics, "parley_recognition_backlog_frames") == 12
    assert value(metrics, "process_cpu_seconds_total") is not None  # one process: its own figures too


def test_the_registry_shows_observers_every_record_from_the_calls_start() -> None:
    """The handler records call_started before it registers the call: the observer still sees it."""
    metrics = Metrics()
    registry = CallRegistry(keep_ended=0)
    metrics.attach(registry)

    class Session:
        call_id = "call-1"
        dropped_frames = 0
        input_errors = 0

        def __init__(self) -> None:
            self.events = EventLog("call-1", to_log=False)

    session = Session()
    session.events.emit("call_started", correlation_id="")
    registry.started(session)
    assert value(metrics, "parley_active_calls") == 1
    session.events.emit("call_ended", reason="caller_hangup")
    registry.ended(session)
    assert value(metrics, "parley_active_calls") == 0
    assert value(metrics, "parley_calls_total") == 1


def test_each_app_counts_its_own_calls() -> None:
    first, second = Metrics(), Metrics()
    Call(first.observe)("call_started", 1.0)
    assert value(first, "parley_calls_total") == 1
    assert value(second, "parley_calls_total") == 0


def test_a_bad_record_costs_a_figure_not_the_call(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    Call(metrics.observe)("call_started", 1.0)
    with caplog.at_level(logging.ERROR, logger="parley.metrics"):
        metrics.observe({"event": "turn_started", "call_id": "call-1"})  # no time: a bug upstream
    assert "could not account for the event turn_started" in caplog.text
    assert value(metrics, "parley_active_calls") == 1


# --- multiprocess ----------------------------------------------------------------------------------


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "prometheus"  # missing: the first Metrics() creates it
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(directory))
    yield directory
    monkeypatch.delenv(MULTIPROC_DIR_ENV)
    Metrics()  # back to values in memory for the tests that follow
    assert not getattr(values.ValueClass, "_multiprocess", False)


def test_multiprocess_mode_writes_files_every_scrape_merges(multiproc_dir: Path) -> None:
    """Each worker writes its own files (per pid); here one process stands in for them all."""
    metrics = Metrics()
    assert metrics.registry is None and multiproc_dir.is_dir()
    barge_in_call(Call(metrics.observe))
    Call(metrics.observe, "call-live")("call_started", 20.0)
    metrics.call_refused("draining")
    metrics.backlog(7)
    assert list(multiproc_dir.glob("*.db"))
    assert value(metrics, "parley_calls_total") == 2
    assert value(metrics, "parley_active_calls") == 1
    assert value(metrics, "parley_calls_refused_total", reason="draining") == 1
    assert value(metrics, "parley_bargein_onset_to_stop_seconds_count") == 1
    assert value(metrics, "parley_recognition_backlog_frames") == 7
    assert value(metrics, "process_cpu_seconds_total") is None  # no per-process collector across workers
    metrics.close()  # this worker is done: its live gauges no longer count, its totals do
    assert value(metrics, "parley_active_calls") is None
    assert value(metrics, "parley_calls_total") == 2
    worker_exited(12345)  # a pid that wrote nothing: nothing to remove


def test_an_unusable_multiprocess_directory_stops_startup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(MULTIPROC_DIR_ENV, str(blocker / "prometheus"))
    with pytest.raises(RuntimeError, match=r"PROMETHEUS_MULTIPROC_DIR=.* is not a usable directory"):
        Metrics()
    monkeypatch.delenv(MULTIPROC_DIR_ENV)
    Metrics()


# --- the endpoint ----------------------------------------------------------------------------------


def plumbing(**overrides: Any) -> Settings:
    defaults: dict[str, Any] = {"port": 0, "event_log": False, "engines": "plumbing", "engine_pool_warm": 0}
    return load_settings(**(defaults | overrides))


def test_metrics_need_the_bearer_when_a_token_is_set() -> None:
    client = TestClient(create_app(plumbing(host="0.0.0.0", api_token=TOKEN)))  # ASGI only: no socket
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "parley_active_calls 0.0" in response.text


def test_metrics_off_means_no_endpoint_and_no_open_door() -> None:
    assert TestClient(create_app(plumbing(host="127.0.0.1", metrics=False))).get("/metrics").status_code == 404
    # Bound beyond loopback without a token: refused, as /api/stats is.
    assert TestClient(create_app(plumbing(host="0.0.0.0"))).get("/metrics").status_code == 403
