"""PCM helpers: levels, framing, resampling, WAV files. All audio is 16-bit signed LE mono."""

from __future__ import annotations

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
    samples = pcm_to_float(pcm)
    if samples.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * np.log10(rms) if rms > 1e-6 else SILENCE_DBFS


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

    Errors are ValueErrors naming the file: missing, not a PCM WAV, not 16-bit.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from None
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV is supported")
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    # Average in int32 so two full-scale channels cannot overflow int16.
    mono = samples[:, 0] if channels == 1 else samples.astype(np.int32).mean(axis=1).round()
    mono = np.asarray(mono, dtype=np.int16)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.int16)


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
