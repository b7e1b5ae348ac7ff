"""8 kHz <-> 16 kHz for telephone audio: a streaming half-band FIR, exactly 2:1 per chunk.

Why not `soxr.ResampleStream` (used elsewhere for TTS): measured with python-soxr 1.1, its stream
gives nothing for the first 100 ms of 20 ms chunks and then releases ~100 ms at once (HQ; 60 ms at
LQ), so caller audio would reach the VAD in bursts, 100 ms late, and every barge-in would be that
much slower; its QQ quality is steady but has no anti-aliasing filter. The ratio here is exactly
two, so a windowed-sinc low-pass with a kept history gives every 20 ms chunk its 20 ms of output
at once, with a fixed 2 ms delay, and keeps the phone band (to 3.4 kHz) flat.
"""

from __future__ import annotations

from typing import Final

import numpy as np

_TAPS: Final = 63  # odd: a symmetric (linear-phase) filter, delay (63 - 1) / 2 samples at 16 kHz
_KAISER_BETA: Final = 7.0  # ~70 dB stop band


def _half_band() -> np.ndarray:
    """Low-pass at a quarter of the 16 kHz rate (4 kHz): the 8 kHz Nyquist frequency."""
    n = np.arange(_TAPS) - (_TAPS - 1) / 2
    taps = 0.5 * np.sinc(0.5 * n) * np.kaiser(_TAPS, _KAISER_BETA)
    normalised: np.ndarray = taps / taps.sum()  # unity gain at 0 Hz
    return normalised


_FILTER: Final = _half_band()


class _Fir:
    """The filter, applied chunk by chunk: the last taps-1 inputs carry over to the next chunk."""

    def __init__(self) -> None:
        self._history = np.zeros(_TAPS - 1)

    def apply(self, samples: np.ndarray) -> np.ndarray:
        buffer = np.concatenate([self._history, samples])
        self._history = buffer[-(_TAPS - 1) :]
        filtered: np.ndarray = np.convolve(buffer, _FILTER, mode="valid")  # one output per input
        return filtered

    def reset(self) -> None:
        self._history[:] = 0.0


def _to_int16(samples: np.ndarray) -> np.ndarray:
    rounded: np.ndarray = np.clip(np.rint(samples), -32768, 32767).astype(np.int16)
    return rounded


class Upsampler:
    """8 kHz -> 16 kHz: N samples in, 2N out (zeros between the samples, then the low-pass)."""

    def __init__(self) -> None:
        self._fir = _Fir()

    def process(self, samples: np.ndarray) -> np.ndarray:
        stuffed = np.zeros(2 * len(samples))
        stuffed[::2] = samples
        return _to_int16(2.0 * self._fir.apply(stuffed))  # x2: the zeros halved the level

    def reset(self) -> None:
        self._fir.reset()


class Downsampler:
    """16 kHz -> 8 kHz: the low-pass, then every other sample (N in, N/2 out for even N; an odd
    chunk's leftover phase carries over, so chunking never changes the output)."""

    def __init__(self) -> None:
        self._fir = _Fir()
        self._phase = 0  # index in the next chunk of the first sample to keep

    def process(self, samples: np.ndarray) -> np.ndarray:
        filtered = self._fir.apply(samples.astype(np.float64))
        kept = filtered[self._phase :: 2]
        self._phase = (self._phase + len(samples)) % 2
        return _to_int16(kept)

    def reset(self) -> None:
        """Forget the previous audio (a flushed reply must not bleed into the next)."""
        self._fir.reset()
        self._phase = 0
