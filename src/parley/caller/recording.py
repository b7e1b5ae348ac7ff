"""The call as a person would hear it: a stereo WAV, the caller on the left, the agent on the right.

Both channels are on the call's timeline (sample 0 = call start): the left holds each uplink frame
where the schedule put it (frame i from i*20 ms), exactly as sent (echo and room noise included);
the right holds the agent's audio where the caller's playout played it (cut where a StopAudio or
clear flushed it). Played together, the exchange sounds as it happened, barge-ins included.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def uplink_track(frames: Sequence[tuple[int, bytes]], samples_per_frame: int, length: int) -> np.ndarray:
    """The frames the caller sent, (schedule index, PCM16), laid out on the timeline, int16."""
    track = np.zeros(length, dtype=np.int16)
    for index, pcm in frames:
        start = index * samples_per_frame
        samples = np.frombuffer(pcm, dtype="<i2")[: max(0, length - start)]
        track[start : start + samples.size] = samples
    return track


def write_stereo_wav(path: Path | str, left: np.ndarray, right: np.ndarray, sample_rate: int) -> None:
    """A 16-bit stereo WAV; the shorter channel is padded with silence."""
    length = max(left.size, right.size)
    both = np.zeros((length, 2), dtype="<i2")
    both[: left.size, 0] = left
    both[: right.size, 1] = right
    path = Path(path)  # a str from a script works too
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(both.tobytes())
