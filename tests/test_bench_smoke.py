"""Every benchmark in a short smoke run (CI keeps them working; the figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from parley.cli import app

runner = CliRunner()
PERCENTILE_KEYS = {"p50", "p95", "p99", "max"}


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    result = runner.invoke(app, ["bench", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] and data["machine"]["python"]
    return data


def test_bargein_smoke(tmp_path: Path) -> None:
    data = bench(tmp_path, "bargein", "--trials", "2")
    assert set(data["onset_to_stop_ms"]) == PERCENTILE_KEYS
    assert set(data["decision_to_stop_ms"]) == PERCENTILE_KEYS
    assert data["leaked_audio_ms"] == 0 and data["trials"] == 2 and "missed" in data


def test_bargein_noise_smoke(tmp_path: Path) -> None:
    data = bench(tmp_path, "bargein", "--noise", "--trials", "3")
    assert data["mode"] == "noise" and "false_stops" in data
    assert set(data["false_stops_by_bed"]) == {"white-20dBFS", "pink-20dBFS", "ringback-440+480Hz"}


def test_latency_smoke(tmp_path: Path) -> None:
    data = bench(tmp_path, "latency", "--trials", "2")
    assert set(data["voice_to_voice_ms"]) == PERCENTILE_KEYS
    assert "final_text_ms" in data["server_breakdown_ms"]


@pytest.mark.parametrize("profile", ["plumbing", "embedded"])
def test_load_smoke(tmp_path: Path, profile: str) -> None:
    data = bench(tmp_path, "load", "--calls", "3", "--seconds", "6", "--profile", profile)
    for key in (
        "calls",
        "loop_lag_ms",
        "pacing_jitter_ms",
        "onset_to_stop_ms",
        "cpu_percent",
        "cpu_ms_per_call_s",
        "rss_mb",
        "errors",
        "dropped_frames",
    ):
        assert key in data
    assert data["calls"] == 3 and data["profile"] == profile
    # The server's own figures, from the calls' records: every caller spoke, so finals were made.
    assert data["final_ready_ms"]["p50"] is not None and data["voice_to_voice_ms"]["p50"] is not None


def test_soak_smoke(tmp_path: Path) -> None:
    data = bench(tmp_path, "soak", "--calls", "4", "--parallel", "2", "--settle", "1")
    for key in ("rss_mb_start", "rss_mb_end", "rss_growth_mb", "threads_start", "threads_end"):
        assert key in data
    assert data["errors"] == 0 and data["live_calls_end"] == 0
    assert data["busy_burners"] == 0
    assert {"created", "disposed", "idle", "in_use"} <= set(data["pools_end"]["recognizer"])
    assert "python_blocks" in data["memory_end"]
    assert all("pools" in sample and "memory" in sample for sample in data["samples"])


def test_soak_cpu_burners_run_only_inside_the_block() -> None:
    from parley.benchmarks.soak import cpu_burners

    with cpu_burners(1):
        children = psutil.Process().children()
        assert len(children) == 1 and children[0].cpu_times().user >= 0
    assert not children[0].is_running()


def test_soak_idle_sockets_smoke(tmp_path: Path) -> None:
    data = bench(tmp_path, "soak", "--idle-sockets", "3", "--hold", "1", "--settle", "1")
    assert data["connected"] == 3 and data["refused"] == 0 and data["live_calls_held"] == 3
    for key in ("rss_mb_idle", "rss_mb_held", "rss_mb_after", "rss_held_above_idle_mb"):
        assert key in data


def test_llm_smoke(tmp_path: Path) -> None:
    data = bench(tmp_path, "llm", "--trials", "2", "--server", "inprocess")
    for key in ("first_clause_to_audio_ms", "cancel_to_stream_closed_ms", "cancel_to_server_saw_close_ms"):
        assert set(data[key]) == PERCENTILE_KEYS
    assert data["errors"] == 0 and data["trials"] == 2
