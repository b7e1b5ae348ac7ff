"""`parley call --proto twilio` against a real parley server's /ws/twilio (plumbing engines: real
Silero VAD, a recognizer double, tones for speech): a barge-in is a `clear`, nothing of the cleared
turn follows it, and the recording holds both sides."""

from __future__ import annotations

import json
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from parley.audio import write_wav
from parley.cli import app
from parley.server import BackgroundServer
from parley.settings import load_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def plumbing() -> Iterator[BackgroundServer]:
    settings = load_settings(host="127.0.0.1", port=0, event_log=False, engines="plumbing")
    with BackgroundServer(settings) as server:
        yield server


def test_a_twilio_barge_in_is_a_clear_with_no_media_after_it(
    plumbing: BackgroundServer, hours_pcm: np.ndarray, tmp_path: Path
) -> None:
    clip, out, report_path = tmp_path / "hours.wav", tmp_path / "call.wav", tmp_path / "report.json"
    write_wav(clip, hours_pcm, 16000)
    result = runner.invoke(
        app,
        [
            "call",
            str(clip),
            "--url",
            f"127.0.0.1:{plumbing.port}",  # no path: /ws/twilio with --proto twilio
            "--proto",
            "twilio",
            "--barge-in-at",
            "1.0",
            "--out",
            str(out),
            "--json",
            str(report_path),
            "--max-wait",
            "4",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["proto"] == "twilio" and report["url"].startswith(f"ws://127.0.0.1:{plumbing.port}/ws/twilio?")
    assert report["errors"] == [] and report["events_error"] is None  # filed under the CallSid
    names = [event["event"] for event in report["events"]]
    assert "stream_started" in names and "stop_audio_sent" in names
    # The barge-in: the caller's speech stopped the greeting with a clear, and the speech was heard.
    assert report["stop_audio_count"] >= 1 and len(report["onset_to_stop_ms"]) >= 1
    assert report["stretches"][0][1] == pytest.approx(report["stops"][0], abs=1)  # cut where clear came
    assert report["media_after_clear"] == 0 and report["leaked_audio_ms"] == 0
    assert "final" in names
    assert report["marks_echoed"] > 0  # the server marks its playout; the caller echoed them
    assert "clear received" in result.output

    with wave.open(str(out), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, 16000)
        both = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)
    said, heard = both[:, 0], both[:, 1]
    ms = lambda value: round(value * 16)  # noqa: E731 - ms -> sample index
    start, cut = report["stretches"][0]
    onset = report["utterances"][0]["onset_ms"]
    assert heard[ms(start) : ms(cut)].any() and said[ms(onset) : ms(onset) + 1600].any()
    assert not said[: ms(start)].any()  # the caller was silent until it barged in


def test_a_server_with_a_twilio_auth_token_takes_only_signed_calls(
    hours_pcm: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = tmp_path / "hours.wav"
    write_wav(clip, hours_pcm[:8000], 16000)
    settings = load_settings(
        host="127.0.0.1", port=0, event_log=False, engines="plumbing", greeting="", twilio_auth_token="tw-secret"
    )
    monkeypatch.delenv("PARLEY_TWILIO_AUTH_TOKEN", raising=False)
    with BackgroundServer(settings) as server:
        argv = ["call", str(clip), "--url", f"127.0.0.1:{server.port}", "--proto", "twilio", "--max-wait", "1"]
        unsigned = runner.invoke(app, [*argv, "--quiet"])
        assert unsigned.exit_code == 2 and "HTTP 403" in unsigned.output, unsigned.output
        monkeypatch.setenv("PARLEY_TWILIO_AUTH_TOKEN", "tw-secret")  # signs the upgrade as Twilio would
        signed = runner.invoke(app, [*argv, "--quiet"])
    assert signed.exit_code == 0, signed.output
