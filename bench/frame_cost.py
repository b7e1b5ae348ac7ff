"""The recognition thread's cost per 20 ms frame (VAD, echo gate, onset watch), onset events off and on.

    .venv/bin/python bench/frame_cost.py > bench/results/frame-cost.json

Feeds 10 s of a silent line, of -50 dBFS white noise and of speech (the shipped LibriVox clips) to
a `SpeechSegmenter` with the agent playing the whole time (so level onsets are watched), three
times each, and prints the mean microseconds per `push` as JSON.
"""

from __future__ import annotations

import json
import time

import numpy as np

from parley.benchmarks.common import load_clips
from parley.media.echo import EchoGate, EchoReference
from parley.media.recognition import SegmenterConfig, SpeechSegmenter
from parley.speech.silent import NoPartials
from parley.speech.vad import SileroVad

RATE = 16000
SECONDS = 10


class _Sink:
    def schedule_barge_in(self, event: object) -> None:
        pass

    def queue_partial(self, event: object) -> None:
        pass

    def queue_speech_result(self, event: object) -> None:
        pass


def line(kind: str) -> np.ndarray:
    if kind == "silent line":
        return np.zeros(RATE * SECONDS, np.int16)
    if kind == "noise -50 dBFS":
        noise = np.random.default_rng(0).standard_normal(RATE * SECONDS) * 32767 * 10 ** (-50 / 20)
        return noise.astype(np.int16)
    return np.concatenate([clip.pcm for clip in load_clips(None)])[: RATE * SECONDS]


def mean_push_us(pcm: np.ndarray, onset: bool) -> float:
    reference = EchoReference(horizon_frames=2000)
    now = time.monotonic()
    for k in range(2000):
        reference.add(now + k * 0.02, -120.0)  # the agent playing (no echo) the whole time
    segmenter = SpeechSegmenter(
        SileroVad(),
        NoPartials(),
        _Sink(),  # type: ignore[arg-type]
        SegmenterConfig(onset_events=onset),
        echo_gate=EchoGate(reference),
    )
    frames = [pcm[i : i + 320].tobytes() for i in range(0, len(pcm) - 319, 320)]
    spent = []
    for k, frame in enumerate(frames):
        started = time.perf_counter()
        segmenter.push(frame, now + k * 0.02)
        spent.append(time.perf_counter() - started)
    return round(float(np.mean(spent)) * 1e6, 1)


def main() -> None:
    result: dict[str, dict[str, list[float]]] = {}
    for kind in ("silent line", "noise -50 dBFS", "speech"):
        for _ in range(3):
            for onset in (False, True):
                result.setdefault(kind, {}).setdefault("on" if onset else "off", []).append(
                    mean_push_us(line(kind), onset)
                )
    print(json.dumps({"benchmark": "frame_cost", "mean_push_us": result}, indent=1))


if __name__ == "__main__":
    main()
