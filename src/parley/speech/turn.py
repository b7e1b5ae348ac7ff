"""Semantic end of turn: Smart Turn v3.2 (Pipecat's, BSD-2-Clause), audio in, "is the turn over?" out.

A silence alone cannot tell "How late are you open?" (done: answer now) from "I'd like to order
a ..." (thinking: wait). Smart Turn hears the intonation and the words' shape in the last 8 s of
the caller's audio and gives the probability that the turn is complete. The segmenter asks it
after a short silence (parley.media.recognition).

Its input is Whisper's log-mel spectrogram (80 bins, 10 ms hops) of exactly 8 s at 16 kHz: a
shorter utterance is zero-padded at the start, so the speech always ends where the model expects
the end; the waveform is first normalised to zero mean and unit variance (as the model was
trained). faster-whisper's numpy feature extractor computes the spectrogram. One onnxruntime
session serves every call (its `run` is thread-safe), one intra-op thread, as for Silero.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime
from faster_whisper.feature_extractor import FeatureExtractor

from parley.models import SMART_TURN, model_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW_S = 8
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_S
COMPLETE = 0.5  # the model's own decision threshold
_NORMALISE_EPS = 1e-7


class SmartTurn:
    """The Smart Turn v3.2 model, loaded once from the verified cache (ModelError if absent)."""

    def __init__(self, models_dir: Path) -> None:
        path = model_path(SMART_TURN, models_dir)
        options = onnxruntime.SessionOptions()
        # One thread per run: decisions of different calls run side by side on the executor, and
        # an idle intra-op pool would spin on the cores the calls need.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._features = FeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_S)

    def features(self, pcm: bytes) -> np.ndarray:
        """(1, 80, 800) float32 log-mel of the last <= 8 s of 16-bit 16 kHz PCM."""
        audio = np.frombuffer(pcm[len(pcm) % 2 :], dtype="<i2")[-WINDOW_SAMPLES:].astype(np.float32) / 32768.0
        padded = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        padded[WINDOW_SAMPLES - audio.size :] = audio  # the end of speech stays at the end of the window
        padded = (padded - padded.mean()) / np.sqrt(padded.var() + _NORMALISE_EPS)
        # padding=0: exactly 8 s gives 801 STFT frames, of which the extractor keeps 800.
        mel = self._features(padded, padding=0)
        return mel[np.newaxis].astype(np.float32, copy=False)

    def complete_probability(self, pcm: bytes) -> float:
        """Probability that the caller's turn is over, from the last <= 8 s of 16-bit 16 kHz PCM."""
        (logits,) = self._session.run(None, {"input_features": self.features(pcm)})
        return float(np.asarray(logits).reshape(-1)[0])  # the graph ends in a sigmoid already


class TurnDetector:
    """Smart Turn decisions off the recognition threads: ~50 ms of CPU each (measured on this
    project's 2-core machine), too long to stall VAD, so a small process-wide executor runs them
    and the segmenter goes on consuming frames while it waits."""

    def __init__(self, model: SmartTurn, executor: Executor | None = None) -> None:
        self.model = model
        self._owned = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="turn")
        self.decision_ms: list[float] = []  # recent decisions' cost, for evaluations
        self._keep = 1000

    def submit(self, pcm: bytes) -> Future[float]:
        return self._executor.submit(self._decide, pcm)

    def _decide(self, pcm: bytes) -> float:
        start = time.perf_counter()
        probability = self.model.complete_probability(pcm)
        self.decision_ms.append((time.perf_counter() - start) * 1000)
        if len(self.decision_ms) > self._keep:
            del self.decision_ms[: -self._keep]
        return probability

    def warm(self) -> None:
        """onnxruntime plans its buffers on the first run: ~100 ms the first caller would pay."""
        self.model.complete_probability(bytes(2 * SAMPLE_RATE))

    def close(self) -> None:
        if self._owned:
            self._executor.shutdown(wait=False, cancel_futures=True)
