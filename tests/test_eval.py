"""Evaluations: the audio variants, the WER scorer, barge-in scoring, and smoke runs of both CLIs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from parley.benchmarks.common import default_clips
from parley.caller.metrics import brief_pauses
from parley.cli import app
from parley.evaluation import variants
from parley.evaluation.bargein import outcome, summarize
from parley.evaluation.stt import parse_variant
from parley.evaluation.wer import aggregate, normalize, number_to_words, word_errors

RATE = 16000
runner = CliRunner()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return default_clips()[1].pcm  # "he was not an ill disposed young man", 3 s


def rms_db(samples: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(samples.astype(np.float64) ** 2)))


def band_fraction(pcm: np.ndarray, above_hz: float) -> float:
    power = np.abs(np.fft.rfft(pcm.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(pcm.size, 1 / RATE)
    return float(power[freqs > above_hz].sum() / power.sum())


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", variants.NOISE_KINDS)
@pytest.mark.parametrize("snr", [10.0, 0.0])
def test_add_noise_hits_the_snr_over_active_speech(speech: np.ndarray, kind: str, snr: float) -> None:
    noisy = variants.add_noise(speech, snr, kind, seed=3)  # type: ignore[arg-type]
    mask = variants.active_mask(speech)
    assert 0.5 < mask.mean() < 0.95  # the leading silence and pauses are not "active"
    noise = noisy.astype(np.float64) - speech
    assert rms_db(speech[mask]) - rms_db(noise[mask]) == pytest.approx(snr, abs=0.5)
    assert np.array_equal(noisy, variants.add_noise(speech, snr, kind, seed=3))  # deterministic
    assert not np.array_equal(noisy, variants.add_noise(speech, snr, kind, seed=4))


def test_noise_kinds_have_their_spectra() -> None:
    white, pink, babble = (variants.make_noise(RATE * 2, kind, seed=1) for kind in variants.NOISE_KINDS)
    assert band_fraction(white, 4000) == pytest.approx(0.5, abs=0.02)  # flat to 8 kHz
    assert band_fraction(pink, 4000) < 0.15  # 1/f: most power low
    assert band_fraction(babble, 4000) < 0.1

    def frames(x: np.ndarray) -> np.ndarray:  # RMS of each 20 ms frame
        return np.sqrt(np.mean(x[: x.size // 320 * 320].reshape(-1, 320) ** 2, axis=1))

    # Babble comes and goes with the syllables; white noise is steady.
    assert np.std(frames(babble)) > 3 * np.std(frames(white))


def test_noise_bed_level_and_seamless_loop() -> None:
    bed = variants.noise_bed(1.0, "pink", -40.0, seed=2)
    assert bed.size == RATE and variants.active_level_dbfs(bed) == pytest.approx(-40.0, abs=0.5)
    # Circular synthesis: the jump across the loop point is like any other sample step.
    steps = np.abs(np.diff(bed.astype(np.int32)))
    assert abs(int(bed[0]) - int(bed[-1])) <= steps.max()


def test_telephone_is_band_limited_and_keeps_length(speech: np.ndarray) -> None:
    line = variants.telephone(speech)
    assert line.dtype == np.int16 and line.size == speech.size
    assert band_fraction(speech, 3600) > 0.005
    assert band_fraction(line, 3600) < 1e-4
    # Still the same speech at a similar level (the band below 300 Hz carries a few dB of it).
    assert variants.active_level_dbfs(line) == pytest.approx(variants.active_level_dbfs(speech), abs=6)


def test_mulaw_round_trip() -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    codes = variants.mulaw_encode(pcm)
    assert codes.dtype == np.uint8
    assert (codes[pcm == 0][0], codes[pcm == 32767][0], codes[pcm == -32768][0]) == (0xFF, 0x80, 0x00)
    back = variants.mulaw_decode(codes).astype(np.int32)
    error = np.abs(back - pcm)
    # Half a quantisation step: 4 near zero, 512 in the top segment (plus clipping above 32124).
    assert error[np.abs(pcm.astype(np.int32)) < 100].max() <= 4
    assert error[np.abs(pcm.astype(np.int32)) <= 32124].max() <= 512
    # 8-bit companding keeps a speech-level sine about 38 dB clean.
    t = np.arange(RATE) / RATE
    sine = (3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    noise = variants.mulaw_decode(variants.mulaw_encode(sine)).astype(np.float64) - sine
    assert rms_db(sine) - rms_db(noise) > 33


def test_add_echo_level_and_delay(speech: np.ndarray) -> None:
    near = np.zeros(RATE, np.int16)
    echo = variants.add_echo(near, speech, level_db=-20.0, delay_ms=40)
    delay = 640
    assert not echo[:delay].any()
    expected = np.round(speech[: RATE - delay] * 0.1)
    assert np.abs(echo[delay:] - expected).max() <= 1
    assert rms_db(echo[delay:]) - rms_db(speech[: RATE - delay]) == pytest.approx(-20.0, abs=0.1)
    both = variants.add_echo(speech[:RATE], speech, level_db=-6.0, delay_ms=0)
    assert rms_db(both) - rms_db(speech[:RATE]) == pytest.approx(20 * np.log10(1.5), abs=0.2)


def test_cough_is_short_loud_and_deterministic() -> None:
    one = variants.cough(450, seed=1)
    assert one.size == round(0.45 * RATE)
    frames = one[: one.size // 320 * 320].reshape(-1, 320).astype(np.float64)
    levels = 10 * np.log10(np.mean(frames**2, axis=1) / 32768**2 + 1e-12)
    assert levels.max() == pytest.approx(-16.0, abs=0.5)
    assert levels.argmax() < 5  # fast attack: loudest at the start
    assert (levels < levels.max() - 20).sum() >= 3  # decays between and after the bursts
    assert np.array_equal(one, variants.cough(450, seed=1))
    assert not np.array_equal(one, variants.cough(450, seed=2))


def test_backchannel_is_trimmed_and_levelled(voice: Any) -> None:
    pcm = variants.backchannel("uh-huh", voice, level_dbfs=-24.0)
    assert 0.15 * RATE < pcm.size < 1.2 * RATE
    assert variants.active_level_dbfs(pcm) == pytest.approx(-24.0, abs=0.5)


def test_stt_variant_names() -> None:
    assert parse_variant("noise5").description == "pink noise at 5 dB SNR"
    assert parse_variant("noise10-babble").description == "babble noise at 10 dB SNR"
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("noisy")


# --------------------------------------------------------------------------------------------
# WER
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("And Mr. John Dashwood had then leisure.", "and mister john dashwood had then leisure"),
        ("He was not an ill-disposed young man.", "he was not an ill disposed young man"),
        ("Mrs. Jennings and Dr. Lee", "missus jennings and doctor lee"),
        ("mr john", "mister john"),  # pocketsphinx's dictionary spelling
        ("I'd like 2 pizzas, 45 minutes", "i'd like two pizzas forty five minutes"),
        ("It costs 1,250 or 100", "it costs one thousand two hundred fifty or one hundred"),
        ("\u201cYes,\u201d she said \u2014 \u2018quite\u2019   so!", "yes she said quite so"),
        ("Don\u2019t", "don't"),
        ("", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_number_words() -> None:
    assert [number_to_words(n) for n in (0, 13, 20, 99, 101, 1000, 21_005)] == [
        "zero",
        "thirteen",
        "twenty",
        "ninety nine",
        "one hundred one",
        "one thousand",
        "twenty one thousand five",
    ]


def test_word_errors_count_each_kind() -> None:
    errors = word_errors("the cat sat on the mat", "The cat sat on a mat today.")
    assert (errors.substitutions, errors.deletions, errors.insertions, errors.words) == (1, 0, 1, 6)
    assert errors.wer == pytest.approx(2 / 6)
    gone = word_errors("a b c", "")
    assert (gone.deletions, gone.wer) == (3, 1.0)
    assert word_errors("Mr. Dashwood", "mister dashwood").wer == 0.0
    # Corpus WER weighs clips by their length.
    total = aggregate([("a b c d e f g h i j", "a b c d e f g h i j"), ("x", "y")])
    assert total.wer == pytest.approx(1 / 11)


# --------------------------------------------------------------------------------------------
# Barge-in scoring
# --------------------------------------------------------------------------------------------


def fake_report(events: list[dict[str, Any]], clip_start: float | None = 2.0) -> Any:
    return SimpleNamespace(
        t0=0.0,
        clip_started_t=clip_start,
        duration_ms=6000.0,
        speech_onset_t=2.1,
        events=[{**e, "t_ms": e["t"] * 1000} for e in events],
    )


def test_outcome_reads_the_events() -> None:
    real = fake_report(
        [
            {"event": "barge_in_paused", "t": 2.2, "turn_id": 1},
            {"event": "barge_in_decided", "t": 2.45, "turn_id": 1, "trigger": "partial"},
            {"event": "turn_cancelled", "t": 2.46, "turn_id": 1},
            {"event": "turn_cancelled", "t": 6.5, "turn_id": 2},  # the caller hung up: no barge-in
        ]
    )
    result = outcome(real)
    assert (result.stopped, result.paused, result.resumed, result.early) == (True, True, False, False)
    assert result.onset_to_decided_ms == pytest.approx(350.0)

    backchannel = outcome(
        fake_report(
            [
                {"event": "barge_in_paused", "t": 2.2, "turn_id": 1},
                {"event": "barge_in_resumed", "t": 2.9, "turn_id": 1, "reason": "backchannel"},
                {"event": "turn_cancelled", "t": 6.5, "turn_id": 1},
            ]
        )
    )
    assert (backchannel.stopped, backchannel.paused, backchannel.resumed) == (False, True, True)

    echo = [{"event": "barge_in_paused", "t": 1.0, "turn_id": 1}]
    assert outcome(fake_report(echo)).early and not outcome(fake_report(echo)).paused
    assert outcome(fake_report(echo), whole_call=True).paused  # noise/echo: the whole call counts
    errored = [{"event": "turn_cancelled", "t": 3.0, "turn_id": 1, "error": "boom"}]
    assert not outcome(fake_report(errored)).stopped


def test_summaries_and_targets() -> None:
    trial = {
        "stopped": False,
        "paused": True,
        "pending": False,
        "resumed": True,
        "false": False,
        "missed": False,
        "echo_suppressed": 0,
        "errors": [],
        "onset_to_stop_ms": None,
        "onset_to_decided_ms": None,
        "agent_audio_ms": 6000.0,
        "brief_pause_ms": [],
    }
    fine = summarize("backchannel", [trial] * 20)
    assert (fine["paused"], fine["resumed"], fine["passed"]) == (20, 20, True)
    one_stop = summarize("backchannel", [trial] * 19 + [{**trial, "stopped": True}])
    two_stops = summarize("backchannel", [trial] * 18 + [{**trial, "stopped": True}] * 2)
    assert one_stop["passed"] and not two_stops["passed"]  # 5 % of 20 is one
    missed = summarize("interrupt", [{**trial, "missed": True, "onset_to_stop_ms": 250.0}])
    assert not missed["passed"] and missed["onset_to_stop_ms"]["p50"] == 250.0
    # With nothing said: brief pauses (resumed on their own) count apart from false stops, at most
    # one per minute of agent speech, each within 300 ms.
    quiet = {**trial, "paused": False, "resumed": False}
    one_brief = summarize("noise_bed", [{**quiet, "brief_pause_ms": [170.0]}] + [quiet] * 9)  # 1 in 60 s
    assert one_brief["passed"] and (one_brief["brief_pauses"], one_brief["brief_pauses_per_min"]) == (1, 1.0)
    two_brief = summarize("noise_bed", [{**quiet, "brief_pause_ms": [170.0, 160.0]}] + [quiet] * 9)
    assert not two_brief["passed"]
    slow_brief = summarize("noise_bed", [{**quiet, "brief_pause_ms": [350.0]}] + [quiet] * 9)
    assert not slow_brief["passed"] and slow_brief["brief_pause_ms"]["max"] == 350.0


def test_brief_pauses_are_onset_pauses_that_resumed_for_want_of_speech() -> None:
    def event(name: str, t: float, **fields: object) -> dict[str, object]:
        return {"event": name, "t": t, **fields}

    brief = event("barge_in_paused", 1.0, trigger="onset")
    events = [
        brief,
        event("stop_audio_sent", 1.001),
        event("barge_in_resumed", 1.17, reason="onset_lost"),
        event("barge_in_paused", 2.0, trigger="onset"),  # speech followed: a backchannel, not brief
        event("barge_in_resumed", 3.0, reason="backchannel"),
        event("barge_in_paused", 4.0, trigger="vad"),
        event("barge_in_resumed", 4.2, reason="onset_lost"),  # (only an onset pause is brief)
        event("barge_in_paused", 5.0, trigger="onset"),
        event("barge_in_decided", 5.1, trigger="sustained_speech"),
    ]
    pauses = brief_pauses(events)
    assert [(pause.pause, pause.ms) for pause in pauses] == [(brief, 170.0)]
    assert pauses[0].resume is events[2]  # its resume belongs to it too


# --------------------------------------------------------------------------------------------
# Smoke runs (figures not asserted: the recognizers and the server change)
# --------------------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    result = runner.invoke(app, ["eval", *args, "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] and data["machine"]["python"]
    return data


def test_eval_stt_smoke(tmp_path: Path) -> None:
    data = run_cli(tmp_path, "stt", "--variants", "clean,telephone", "--limit", "1")
    assert data["mode"] == "two-pass" and len(data["clips"]) == 1
    assert set(data["variants"]) == {"clean", "telephone"}
    for summary in data["variants"].values():
        assert {"pocketsphinx", "whisper", "final_wer", "per_clip"} <= set(summary)
        assert set(summary["whisper"]["compute_ms"]) == {"p50", "p95", "p99", "max"}
        [entry] = summary["per_clip"]
        assert entry["whisper"]["text"] and entry["pocketsphinx"]["text"]
    assert data["variants"]["clean"]["final_wer"] < 0.5  # Whisper reads a clean clip nearly perfectly


def test_eval_stt_rejects_unknown_variants(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "stt", "--variants", "clean,underwater"])
    assert result.exit_code == 2 and "unknown variant" in result.output


def test_eval_bargein_smoke(tmp_path: Path) -> None:
    data = run_cli(tmp_path, "bargein", "--trials", "1", "--scenarios", "echo,interrupt", "--server", "inprocess")
    assert set(data["scenarios"]) == {"echo", "interrupt"}
    for name, summary in data["scenarios"].items():
        assert summary["trials"] == 1 and len(summary["per_trial"]) == 1
        for key in ("stopped", "paused", "resumed", "false", "missed", "target", "passed"):
            assert key in summary, (name, key)
        [trial] = summary["per_trial"]
        assert 1.0 <= trial["barge_in_at_s"] <= 1.8
        assert any(event["event"] == "turn_started" for event in trial["events"])
    assert set(data["scenarios"]["interrupt"]["onset_to_stop_ms"]) == {"p50", "p95", "p99", "max"}
