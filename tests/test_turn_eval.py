"""`parley eval turns`: its CLI, its scoring, and a one-turn-per-kind smoke run against real servers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from parley.cli import app
from parley.evaluation.turns import SAMPLE_RATE, TurnSet, summarize
from parley.models import SMART_TURN, ModelError, model_path
from parley.settings import Settings

runner = CliRunner()


def test_unknown_modes_are_refused_before_any_work() -> None:
    result = runner.invoke(app, ["eval", "turns", "--modes", "silence,telepathy"])
    assert result.exit_code == 2 and "unknown mode(s) telepathy" in result.output


def test_smart_turn_without_its_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_MODELS_DIR", str(tmp_path))
    result = runner.invoke(app, ["eval", "turns", "--limit", "1", "--quiet"])
    assert result.exit_code == 2 and "parley models fetch smart-turn" in result.output


def test_the_hesitant_turns_pause_where_they_say(tmp_path: Path) -> None:
    turns = TurnSet(cache_dir=tmp_path).turns(per_kind=2)
    assert [turn.kind for turn in turns] == ["complete", "complete", "hesitant", "hesitant"]
    filled, bare = turns[2], turns[3]
    assert filled.filler == "uh" and bare.filler is None
    for turn in (filled, bare):
        assert turn.pause_at_s is not None and turn.pause_s is not None and 0.5 <= turn.pause_s <= 1.0
        start = round(turn.pause_at_s * SAMPLE_RATE)
        assert not turn.pcm[start : start + round(turn.pause_s * SAMPLE_RATE)].any()
        assert turn.first_part().size == start
    assert list(tmp_path.glob("*.pcm"))  # the voice's audio is cached for the next run
    again = TurnSet(cache_dir=tmp_path).turns(per_kind=2)
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(turns, again, strict=True))


def test_summary_counts_cuts_and_checks_the_targets() -> None:
    def record(kind: str, v2v: float | None, cut: bool, filler: str | None = None) -> dict[str, object]:
        keys = ("end_of_speech_detected_ms", "final_text_ms", "first_audio_sent_ms")
        return {
            "kind": kind,
            "voice_to_voice_ms": v2v,
            "cut": cut,
            "filler": filler,
            "errors": [],
            **dict.fromkeys(keys),
        }

    fast = [record("complete", 400.0, False), record("complete", 420.0, False)]
    summary = summarize([*fast, record("hesitant", None, False, "uh"), record("hesitant", 500.0, True)])
    assert summary["cuts"] == 1 and summary["cut_rate"] == 0.5 and not summary["passed"]
    assert summary["cut_rate_filled_pause"] == 0.0 and summary["cut_rate_bare_pause"] == 1.0
    assert summarize([*fast, record("hesitant", 500.0, False)])["passed"]
    assert not summarize([record("complete", 900.0, False)])["passed"]


def test_eval_turns_smoke(tmp_path: Path) -> None:
    try:
        model_path(SMART_TURN, Settings().models_dir)
    except ModelError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "turns.json"
    args = ["eval", "turns", "--limit", "1", "--server", "inprocess", "--quiet", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"silence", "smart-turn"}
    for summary in data["modes"].values():
        assert summary["complete"] == 1 and summary["hesitant"] == 1 and summary["errors"] == 0
        assert summary["voice_to_voice_ms"]["p50"] is not None
    assert data["modes"]["silence"]["cuts"] == 1  # a 0.5-1 s pause is longer than the 500 ms rule
    assert data["model"]["decisions"] == 6 and data["model"]["decision_ms"]["p50"] > 0
