"""SHA-256 checks for model files loaded at startup (voices, speech-recognition models).

A truncated download, a Git LFS pointer left in place of the real file or a swapped model would
otherwise surface as a cryptic ONNX error, or as a model that quietly behaves differently. Pinned
digests may be written as hex (what `sha256sum` prints) or as unpadded URL-safe base64 (what a
wheel's RECORD file holds), so values can be copied from either source unchanged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import string
from pathlib import Path

_BLOCK_BYTES = 1 << 20  # 1 MB: bounded memory for ~100 MB models, few Python-level iterations
_DIGEST_BYTES = 32


class IntegrityError(RuntimeError):
    """A file's size or SHA-256 differs from its pinned value."""

    def __init__(self, path: Path, message: str, expected: str = "", actual: str = "") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.expected = expected
        self.actual = actual


def sha256_file(path: str | Path) -> bytes:
    """The raw SHA-256 digest of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK_BYTES):
            digest.update(block)
    return digest.digest()


def parse_digest(expected: str) -> bytes:
    """A pinned SHA-256 given as 64 hex digits or as (URL-safe or standard) base64, to 32 bytes."""
    value = expected.strip()
    if len(value) == 2 * _DIGEST_BYTES and all(c in string.hexdigits for c in value):
        return bytes.fromhex(value)
    urlsafe = value.replace("+", "-").replace("/", "_").rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(urlsafe + "=" * (-len(urlsafe) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _DIGEST_BYTES:
        raise ValueError(f"not a SHA-256 digest in hex or base64: {expected!r}")
    return raw


def format_digest(digest: bytes, like: str) -> str:
    """`digest` written like `like` (hex or unpadded URL-safe base64), for side-by-side errors."""
    if len(like.strip()) == 2 * _DIGEST_BYTES and all(c in string.hexdigits for c in like.strip()):
        return digest.hex()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def verify_sha256(path: str | Path, expected: str, *, size: int | None = None) -> None:
    """Raise IntegrityError unless the file's SHA-256 (and size, if given) match the pinned values.

    The size is compared first: it is free and catches truncated files and LFS pointers at once.
    A missing file raises FileNotFoundError.
    """
    path = Path(path)
    wanted = parse_digest(expected)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        message = f"size mismatch: expected {size} bytes, found {actual_size}"
        raise IntegrityError(path, message, str(size), str(actual_size))
    actual = sha256_file(path)
    if actual != wanted:
        shown = format_digest(actual, expected)
        message = f"SHA-256 mismatch: expected {expected}, got {shown}"
        raise IntegrityError(path, message, expected, shown)
