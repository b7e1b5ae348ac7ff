"""The `parley` command: settings errors at startup and `parley call` against an in-process server."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from parley.cli import app
from parley.settings import SettingsError, load_settings

runner = CliRunner()


def test_bad_port_is_a_clear_startup_error() -> None:
    result = runner.invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2
    assert "port" in result.output and "PARLEY_PORT" in result.output


def test_bad_environment_setting_names_the_variable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PARLEY_VAD_THRESHOLD", "2")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "PARLEY_VAD_THRESHOLD" in result.output


def test_unknown_agent_lists_the_packaged_ones() -> None:
    result = runner.invoke(app, ["serve", "--agent", "no-such-agent", "--port", "0"])
    assert result.exit_code == 2 and "pizza" in result.output


def test_settings_consistency_check() -> None:
    try:
        load_settings(speech_start_ms=600, endpoint_silence_ms=500)
    except SettingsError as exc:
        assert "endpoint_silence_ms" in str(exc)
    else:
        raise AssertionError("expected SettingsError")


def test_env_and_flags(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PARLEY_PLAYOUT_LEAD_MS", "60")
    monkeypatch.setenv("PARLEY_PORT", "9000")
    settings = load_settings(port=9100)
    assert settings.playout_lead_ms == 60 and settings.port == 9100  # flag beats environment


def test_call_barges_in_and_writes_the_report(speech_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    report_path = tmp_path / "report.json"
    heard = tmp_path / "heard.wav"
    result = runner.invoke(
        app,
        [
            "call",
            str(speech_dir / "hours_16000.wav"),
            "--barge-in-at",
            "1.0",
            "--json",
            str(report_path),
            "--out",
            str(heard),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["stop_audio_count"] == 1
    assert len(report["onset_to_stop_ms"]) == 1
    assert report["agent_audio_ms"] > 1000
    assert {e["event"] for e in report["events"]} >= {
        "call_started",
        "barge_in_decided",
        "stop_audio_sent",
        "call_ended",
    }
    assert heard.stat().st_size > 32000
    assert "StopAudio" in result.output or "stop" in result.output.lower()


def test_call_with_a_missing_file_fails_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["call", str(tmp_path / "missing.wav"), "--url", "ws://127.0.0.1:9/ws"])
    assert result.exit_code == 2 and "missing.wav" in result.output


def test_startup_log_names_the_agent_the_engines_and_the_media_url(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from parley.server import BackgroundServer, describe_engines

    assert describe_engines(load_settings()) == (
        "engines: vad silero, stt two-pass (pocketsphinx partials, Whisper tiny.en finals), tts piper (en_US-joe-medium)"
    )
    assert "tts espeak (en-us)" in describe_engines(load_settings(stt="whisper", tts="espeak"))
    settings = load_settings(host="127.0.0.1", port=0, engines="plumbing", engine_pool_warm=0, event_log=False)
    with caplog.at_level(logging.INFO, logger="parley.server"), BackgroundServer(settings) as server:
        pass
    messages = [record.getMessage() for record in caplog.records if record.name == "parley.server"]
    assert any("PLUMBING" in message and "agent" in message for message in messages), messages
    assert f"media WebSocket: ws://127.0.0.1:{server.port}/ws/acs" in " ".join(messages)
