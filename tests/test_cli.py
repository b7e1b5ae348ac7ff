"""The `parley` command: settings errors at startup and `parley call` against an in-process server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from typer.testing import CliRunner

from parley.cli import app
from parley.server import BackgroundServer
from parley.settings import SettingsError, load_settings
from tests.conftest import make_server

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
    # The models take seconds to load: the wait is announced on stderr.
    assert "starting an in-process parley server (loading models)..." in result.output


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


# --------------------------------------------------------------------------------------------
# `parley call` against a running server: what a new user runs into. Every error is one line.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plumbing_server() -> Iterator[BackgroundServer]:
    """A running server with cost-free engine doubles (real VAD): quick to start and to answer."""
    server = make_server(engines="plumbing", greeting="Hi there.")
    yield server
    server.stop()


def one_line_error(output: str, exit_code: int) -> str:
    assert exit_code == 2, output
    assert "Traceback" not in output and output.count("\n") == 1, output
    assert output.startswith("error: ")
    return output.strip()


def test_call_accepts_an_http_url(plumbing_server: BackgroundServer, speech_dir: Path) -> None:
    url = f"http://127.0.0.1:{plumbing_server.port}"  # no path: /ws/acs
    result = runner.invoke(app, ["call", str(speech_dir / "hours_16000.wav"), "--url", url, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "voice-to-voice (caller's speech end -> agent's reply)" in result.output


def test_call_asking_for_an_agent_the_server_lacks_is_refused_in_one_line(
    plumbing_server: BackgroundServer, speech_dir: Path
) -> None:
    url = f"http://127.0.0.1:{plumbing_server.port}"
    result = runner.invoke(app, ["call", str(speech_dir / "hours_16000.wav"), "--url", url, "--agent", "bank"])
    line = one_line_error(result.output.splitlines()[-1] + "\n", result.exit_code)
    assert line == (
        f"error: the server refused the media WebSocket: ws://127.0.0.1:{plumbing_server.port}/ws/acs?agent=bank"
        f" (HTTP 400: unknown_agent: this server loads {plumbing_server.settings.agent} (PARLEY_AGENTS))"
    )


def test_call_to_a_wrong_path_is_a_404_in_one_line(plumbing_server: BackgroundServer, speech_dir: Path) -> None:
    # A bare host:port/path is taken as ws://; the server answers an unknown WebSocket path with 404.
    result = runner.invoke(
        app, ["call", str(speech_dir / "hours_16000.wav"), "--url", f"127.0.0.1:{plumbing_server.port}/wrong"]
    )
    line = one_line_error(result.output, result.exit_code)
    assert line == f"error: no such endpoint: ws://127.0.0.1:{plumbing_server.port}/wrong (HTTP 404)"


async def test_server_answers_unknown_websocket_paths_with_404(plumbing_server: BackgroundServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{plumbing_server.port}/api/nothing-here")
    assert refused.value.response.status_code == 404
    assert b"/ws/acs" in refused.value.response.body
    for path in ("/ws/acs", "/ws"):  # the media endpoints still accept
        async with websockets.connect(f"ws://127.0.0.1:{plumbing_server.port}{path}") as ws:
            assert ws.response.status_code == 101


def test_call_to_a_closed_port_says_the_server_may_not_run(speech_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(app, ["call", str(speech_dir / "hours_16000.wav"), "--url", f"ws://127.0.0.1:{port}/ws/acs"])
    line = one_line_error(result.output, result.exit_code)
    assert line == f"error: cannot connect to 127.0.0.1:{port}: connection refused (is the parley server running?)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "ftp://example.org"], "is not a server URL: expected ws://host:port/ws/acs"),
        (["--dtmf", "1"], "--dtmf '1': the format is SECONDS:DIGITS, e.g. 6.5:1"),
        (["--dtmf", "2:x"], "'x' are not DTMF keys"),
        (["--barge-in-at", "-1"], "--barge-in-at must be >= 0 seconds"),
    ],
)
def test_call_argument_errors_are_one_line(speech_dir: Path, args: list[str], message: str) -> None:
    url = [] if "--url" in args else ["--url", "ws://127.0.0.1:9/ws/acs"]  # never dialled
    result = runner.invoke(app, ["call", str(speech_dir / "hours_16000.wav"), *url, *args])
    assert message in one_line_error(result.output, result.exit_code)


def test_call_with_a_text_file_says_what_it_is(tmp_path: Path) -> None:
    notes = tmp_path / "notes.wav"
    notes.write_text("call the bank about my card\n")
    result = runner.invoke(app, ["call", str(notes)])  # fails before starting any server
    line = one_line_error(result.output, result.exit_code)
    assert line == f"error: {notes}: not a PCM WAV file: it looks like text ('call the bank about my card')"


def test_call_whose_barge_in_point_never_came_exits_non_zero(
    plumbing_server: BackgroundServer, speech_dir: Path
) -> None:
    result = runner.invoke(
        app,
        [
            "call",
            str(speech_dir / "hours_16000.wav"),
            "--url",
            plumbing_server.url,
            "--barge-in-at",
            "50",
            "--max-wait",
            "0.5",
            "--quiet",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "error: barge-in point never reached: the agent did not talk 50 s without a pause" in result.output
