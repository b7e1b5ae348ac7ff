"""audio.dbfs: the exact integer path gives the float formula's level to the bit."""

from __future__ import annotations

import numpy as np

from parley.audio import SILENCE_DBFS, dbfs, pcm_to_float


def float_level(pcm: bytes | np.ndarray) -> float:
    """The formula as it was: float32 samples, mean of float64 squares."""
    samples = pcm_to_float(pcm)
    if samples.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return float(20.0 * np.log10(rms)) if rms > 1e-6 else SILENCE_DBFS


def test_frame_levels_are_those_of_the_float_formula() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3000):
        size = int(rng.choice([320, 480, 1, 7, 16000]))
        pcm = rng.normal(0, 10 ** rng.uniform(0, 4.6), size).clip(-32768, 32767).astype(np.int16)
        assert dbfs(pcm.tobytes()) == float_level(pcm.tobytes())
        assert dbfs(pcm) == float_level(pcm)


def test_silence_full_scale_and_empty() -> None:
    assert dbfs(bytes(640)) == SILENCE_DBFS
    assert dbfs(b"") == SILENCE_DBFS
    assert dbfs(np.full(320, -32768, np.int16)) == 0.0
    assert dbfs(np.full(320, 0.5, np.float32)) == float_level(np.full(320, 0.5, np.float32))  # other dtypes: as before
