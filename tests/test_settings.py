"""Settings: list values from the environment, and every bad setting as one line naming its variable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from parley.acs import config as acs_config
from parley.audio import write_wav
from parley.cli import app
from parley.settings import Settings, SettingsError, load_settings

runner = CliRunner()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("uh-huh", ["uh-huh"]),
        ("uh-huh, okay ,mm-hmm", ["uh-huh", "okay", "mm-hmm"]),
        ('["uh huh", "right, sure"]', ["uh huh", "right, sure"]),
        ("", []),
    ],
)
def test_list_settings_take_commas_or_json(monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]) -> None:
    monkeypatch.setenv("PARLEY_BACKCHANNELS", value)
    monkeypatch.setenv("PARLEY_AZURE_SPEECH_PHRASES", value)
    monkeypatch.setenv("PARLEY_AZURE_SPEECH_LANGUAGES", value)
    settings = load_settings()
    assert settings.backchannels == expected
    assert settings.azure_speech_phrases == expected
    assert settings.azure_speech_languages == expected


def test_list_settings_from_a_dotenv_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PARLEY_AZURE_SPEECH_PHRASES=Contoso,Fabrikam\n")
    assert load_settings().azure_speech_phrases == ["Contoso", "Fabrikam"]


def test_flags_still_take_lists() -> None:
    assert load_settings(backchannels=["yeah"]).backchannels == ["yeah"]


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("PARLEY_PORT", "abc", "error: PARLEY_PORT: Input should be a valid integer"),
        ("PARLEY_BACKCHANNELS", "[uh-huh", "error: PARLEY_BACKCHANNELS: not a JSON list"),
        ("PARLEY_BACKCHANNELS", "[1]", "error: PARLEY_BACKCHANNELS: item 0: Input should be a valid string"),
        ("PARLEY_AZURE_SPEECH_LANGUAGES", "de-DE", "error: PARLEY_AZURE_SPEECH_LANGUAGES: needs two or more"),
        ("PARLEY_LLM_PROVIDER", "compatible", "error: PARLEY_LLM_BASE_URL: needed with PARLEY_LLM_PROVIDER=compatible"),
        ("PARLEY_SPEECH_START_MS", "600", "error: PARLEY_ENDPOINT_SILENCE_MS: must be longer than"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, line: str
) -> None:
    monkeypatch.setenv(variable, value)
    if variable == "PARLEY_AZURE_SPEECH_LANGUAGES":  # checked only when Azure Speech is used
        monkeypatch.setenv("PARLEY_STT", "azure")
        monkeypatch.setenv("PARLEY_AZURE_SPEECH_KEY", "key")
        monkeypatch.setenv("PARLEY_AZURE_SPEECH_REGION", "westeurope")
    clip = tmp_path / "silence.wav"  # `call` reads its WAV before the settings: give it a real one
    write_wav(clip, np.zeros(1600, dtype=np.int16), 16000)
    commands = [["serve"], ["call", str(clip)]] if variable != "PARLEY_PORT" else [["serve"]]  # call: port 0
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(line), result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit)


def test_a_bad_flag_names_the_flag_too() -> None:
    result = runner.invoke(app, ["serve", "--port", "70000", "--bargein", "never"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: PARLEY_PORT (--port): Input should be less than or equal to 65535 (got 70000)",
        "error: PARLEY_BARGEIN_SPEAKING (--bargein): Input should be 'pause', 'confirm', 'stop' or 'off' (got 'never')",
    ]


def test_secrets_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ACS_OUTBOUND_TOKEN", "short-secret")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "short-secret" not in result.output
    assert "PARLEY_ACS_OUTBOUND_TOKEN" in result.output


def test_settings_error_keeps_the_field_names_for_library_callers() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(port=-1, stt="vosk")
    assert [problem.field for problem in caught.value.problems] == ["port", "stt"]
    assert str(caught.value).splitlines()[0].startswith("port (PARLEY_PORT): Input should be greater than")


def test_acs_checks_live_in_the_acs_config_module() -> None:
    assert acs_config.settings_problems(Settings()) == []
    settings = Settings.model_construct(**{**Settings().model_dump(), "acs_endpoint": "https://x.example"})
    problems = acs_config.settings_problems(settings)
    assert any("PARLEY_ACS_CALLBACK_URL" in problem for problem in problems)
    assert any("PARLEY_ACS_RESOURCE_ID" in problem for problem in problems)


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("parley 0.")


def test_help_shows_defaults_and_every_packaged_agent() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output and "8000" in result.output
    assert "listen on ." not in result.output and "TCP port ." not in result.output
    for name in ("bank-desk", "pizza-local", "pizza-llm", "bank-llm", "openai"):
        assert name in result.output
