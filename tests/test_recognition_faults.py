"""The recognition side under faults and load, with engine doubles (no models): finals in the order
they were said, no work left on the shared executor by a call that ended, engines replaced after a
failure so a call never goes deaf."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from parley.media.bridge import Final
from parley.media.recognition import FinalPass, SegmenterConfig, SpeechSegmenter
from parley.testing.harness import CallHarness, LevelVad, ScriptedRecognizer

RATE = 16000


class CollectingBridge:
    def __init__(self) -> None:
        self.finals: list[Final] = []
        self.lock = threading.Lock()

    def queue_speech_result(self, event: Final) -> None:
        with self.lock:
            self.finals.append(event)

    def queue_partial(self, event: object) -> None:
        pass

    def schedule_barge_in(self, event: object) -> None:
        pass


class SlowForLongAudio:
    """A transcriber whose pass takes 0.5 ms per ms of audio, and names the audio's length."""

    sample_rate = RATE

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, pcm: bytes) -> str:
        self.calls += 1
        ms = len(pcm) // 32
        time.sleep(ms / 2000)
        return f"{ms} ms"


def utterance(seconds: float) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    speech = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()
    return speech + bytes(2 * round(0.4 * RATE))  # and the silence that ends it


def push(segmenter: SpeechSegmenter, pcm: bytes) -> None:
    for start in range(0, len(pcm), 640):
        segmenter.push(pcm[start : start + 640], time.monotonic())


def segmenter(bridge: CollectingBridge, transcriber: SlowForLongAudio, workers: int) -> SpeechSegmenter:
    config = SegmenterConfig(endpoint_silence_ms=200, early_final_ms=0, preroll_ms=0)
    final_pass = FinalPass(transcriber, ThreadPoolExecutor(workers))
    return SpeechSegmenter(LevelVad(), ScriptedRecognizer(), bridge, config, final_pass)  # type: ignore[arg-type]


def test_finals_are_delivered_in_the_order_they_were_said_with_several_workers() -> None:
    """Defect: with stt_workers > 1 a later, shorter utterance's final came first."""
    bridge = CollectingBridge()
    seg = segmenter(bridge, SlowForLongAudio(), workers=2)
    push(seg, utterance(1.2))  # its pass takes ~0.7 s
    push(seg, utterance(0.2))  # ~0.2 s: done first
    deadline = time.monotonic() + 5
    while len(bridge.finals) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [final.utterance_id for final in bridge.finals] == [1, 2]
    assert int(bridge.finals[0].text.split()[0]) > int(bridge.finals[1].text.split()[0])


def test_a_call_that_ends_mid_utterance_runs_no_final_pass_and_cancels_queued_ones() -> None:
    """Defect: a call that ended mid-utterance still ran a Whisper pass on the shared executor,
    ahead of live calls' finals, and its pending passes were not cancelled."""
    bridge = CollectingBridge()
    transcriber = SlowForLongAudio()
    busy = threading.Event()
    seg = segmenter(bridge, transcriber, workers=1)
    seg._final_pass._executor.submit(busy.wait, 5)  # type: ignore[union-attr]  # another call's pass
    push(seg, utterance(0.3))  # its pass is queued behind the other call's
    t = np.arange(RATE // 2) / RATE
    push(seg, (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes())  # speaking at hang-up
    assert seg.in_utterance
    seg.close()
    busy.set()
    seg._final_pass._executor.shutdown(wait=True)  # type: ignore[union-attr]
    assert transcriber.calls == 0 and bridge.finals == []


async def test_a_recognizer_that_breaks_is_replaced_and_the_call_hears_again() -> None:
    async with CallHarness() as call:
        call.recognizer.fail_next_feed = RuntimeError("decoder crashed")
        await call.say("first try", then_silence_s=0.5)
        await call.wait_for("input_error")
        await call.say("what time do you open")
        final = await call.wait_for("final", text="what time do you open")
        assert final["utterance_id"] >= 2
        assert (await call.wait_for("turn_completed"))["text"] == "Sure."
