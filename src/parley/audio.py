"""PCM helpers: levels, framing, resampling, WAV files. All audio is 16-bit signed LE mono."""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

import numpy as np
import soxr

SILENCE_DBFS = -120.0
SPEECH_ONSET_DBFS = -40.0
"""A 20 ms frame whose RMS is above this counts as the caller speaking (how benchmarks time onsets)."""
FULL_SCALE = 32768.0


def pcm_to_float(pcm: bytes | np.ndarray) -> np.ndarray:
    samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
    return samples.astype(np.float32) / 32768.0


def float_to_pcm(samples: np.ndarray) -> bytes:
    scaled: np.ndarray = np.clip(samples, -1.0, 1.0) * 32767.0
    return scaled.astype("<i2").tobytes()


def dbfs(pcm: bytes | np.ndarray) -> float:
    """RMS level in dB relative to full scale (32768)."""
    samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
    if samples.size == 0:
        return SILENCE_DBFS
    if samples.dtype.kind not in "iu" or samples.dtype.itemsize > 2:
        rms = float(np.sqrt(np.mean(np.square(pcm_to_float(samples), dtype=np.float64))))
    else:
        # The player levels every frame it sends. The sum of squares of 16-bit samples is an exact
        # integer, so this is the float path's result to the bit, in a third of the time.
        wide = samples.astype(np.int64)
        rms = math.sqrt(int(np.dot(wide, wide)) / samples.size) / FULL_SCALE
    return float(20.0 * np.log10(rms)) if rms > 1e-6 else SILENCE_DBFS


class StreamResampler:
    """Resamples a PCM stream chunk by chunk, keeping filter state between chunks.

    A pass-through when the rates are equal, so callers need no special case.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, "int16", quality)

    def process(self, pcm: bytes, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        resampled: np.ndarray = self._stream.resample_chunk(samples, last=last)  # soxr is untyped
        return resampled.astype("<i2").tobytes()


class Framer:
    """Cuts a byte stream into fixed-size frames; `flush` pads the tail with silence.

    The padded last frame matters: dropping it loses the end of the agent's last word.
    """

    def __init__(self, frame_bytes: int) -> None:
        self.frame_bytes = frame_bytes
        self._buffer = bytearray()

    def push(self, pcm: bytes) -> list[bytes]:
        self._buffer += pcm
        whole = len(self._buffer) - len(self._buffer) % self.frame_bytes
        frames = [bytes(self._buffer[i : i + self.frame_bytes]) for i in range(0, whole, self.frame_bytes)]
        del self._buffer[:whole]
        return frames

    def flush(self) -> list[bytes]:
        if not self._buffer:
            return []
        frame = bytes(self._buffer) + bytes(self.frame_bytes - len(self._buffer))
        self._buffer.clear()
        return [frame]


def read_wav(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a 16-bit PCM WAV as int16 mono at `sample_rate` (channels averaged, rate resampled).
    A 32- or 64-bit float WAV is converted to 16-bit.

    Errors are ValueErrors naming the file: missing, not a WAV (saying what it seems to be), not
    16-bit PCM.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        # The wave module reads integer PCM only (3.11: not even in WAVE_FORMAT_EXTENSIBLE).
        samples, rate = _read_other_wav(path, exc)
    else:
        if width != 2:
            raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV is supported")
        samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    # Average in int32 so two full-scale channels cannot overflow int16.
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.astype(np.int32).mean(axis=1).round()
    mono = np.asarray(mono, dtype=np.int16)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.int16)


_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE

_MAGIC = (
    (b"ID3", "an MP3 file: convert it to a 16-bit PCM WAV"),
    (b"\xff\xfb", "an MP3 file: convert it to a 16-bit PCM WAV"),
    (b"\xff\xf3", "an MP3 file: convert it to a 16-bit PCM WAV"),
    (b"OggS", "an Ogg file: convert it to a 16-bit PCM WAV"),
    (b"fLaC", "a FLAC file: convert it to a 16-bit PCM WAV"),
    (b"\x1aE\xdf\xa3", "a WebM/Matroska file: convert it to a 16-bit PCM WAV"),
    (b"FORM", "an AIFF file: convert it to a 16-bit PCM WAV"),
)


def _read_other_wav(path: Path, error: Exception) -> tuple[np.ndarray, int]:
    """A file the wave module refused: a float WAV (converted to 16-bit) or 16-bit PCM in
    WAVE_FORMAT_EXTENSIBLE, as (int16 samples by channel, rate); else a ValueError saying what
    the file seems to be."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a PCM WAV file: {_what_is(data)}")
    fmt, pcm = _wav_chunks(data)
    if fmt is None or pcm is None or len(fmt) < 16:
        raise ValueError(f"{path}: not a PCM WAV file ({str(error) or 'no fmt or data chunk'})")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the format tag
    frame = channels * bits // 8
    if channels < 1 or frame < 1:
        raise ValueError(f"{path}: not a PCM WAV file ({channels} channels of {bits}-bit samples)")
    pcm = pcm[: len(pcm) // frame * frame]
    if tag == _WAVE_FORMAT_FLOAT and bits in (32, 64):
        floats = np.frombuffer(pcm, dtype="<f4" if bits == 32 else "<f8")
        ints = np.clip(np.round(np.nan_to_num(floats) * FULL_SCALE), -32768, 32767).astype(np.int16)
        return ints.reshape(-1, channels), rate
    if tag == _WAVE_FORMAT_PCM and bits == 16:
        return np.frombuffer(pcm, dtype="<i2").reshape(-1, channels), rate
    if tag == _WAVE_FORMAT_PCM:
        raise ValueError(f"{path}: {bits}-bit samples; only 16-bit PCM WAV is supported")
    raise ValueError(f"{path}: not a PCM WAV file (format {tag:#06x}, {bits}-bit; convert it to 16-bit PCM)")


def _wav_chunks(data: bytes) -> tuple[bytes | None, bytes | None]:
    """The payloads of a RIFF WAVE file's fmt and data chunks (None where missing)."""
    fmt = pcm = None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        payload = data[offset + 8 : offset + 8 + size]
        if chunk_id == b"fmt ":
            fmt = payload
        elif chunk_id == b"data":
            pcm = payload
        offset += 8 + size + (size & 1)
    return fmt, pcm


def _what_is(data: bytes) -> str:
    """What a file that is not a WAV seems to be, from its first bytes."""
    if not data:
        return "the file is empty"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return f"it is {kind}"
    if data[4:8] == b"ftyp":
        return "it is an MP4/M4A file: convert it to a 16-bit PCM WAV"
    if data[:4] == b"RIFF":
        return f"it is a RIFF {data[8:12].decode('latin-1')!r} file, not WAVE"
    # A multi-byte character cut at the 200th byte decodes as trailing replacement characters.
    text = data[:200].decode("utf-8", errors="replace").rstrip("\ufffd")
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        lines = text.strip().splitlines()
        return f"it looks like text ({lines[0][:40] if lines else ''!r})"
    return f"it starts with bytes {data[:8].hex(' ')}"


def to_frames(pcm: np.ndarray, samples_per_frame: int) -> np.ndarray:
    """int16 samples as (n, samples_per_frame) frames; the tail is zero-padded, not lost."""
    padded = np.zeros(-(-pcm.size // samples_per_frame) * samples_per_frame, dtype=np.int16)
    padded[: pcm.size] = pcm
    return padded.reshape(-1, samples_per_frame)


def loud_frames(frames: np.ndarray, threshold_dbfs: float = SPEECH_ONSET_DBFS) -> np.ndarray:
    """One bool per frame: RMS (full scale 32768) above `threshold_dbfs`."""
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    loud: np.ndarray = rms > FULL_SCALE * 10.0 ** (threshold_dbfs / 20.0)
    return loud


def write_wav(path: str | Path, pcm: bytes | np.ndarray, sample_rate: int) -> None:
    data = pcm.astype("<i2").tobytes() if isinstance(pcm, np.ndarray) else pcm
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(data)
