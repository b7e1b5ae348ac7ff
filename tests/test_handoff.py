"""FrameHandoff: frames reach the recognition thread in order, and it is woken only when asked."""

from __future__ import annotations

import threading
import time

from parley.media.handoff import FrameHandoff


def consumer(
    handoff: FrameHandoff[int | None], wake_after: int, got: list[tuple[int, float]], patience_s: float = 0.1
) -> threading.Thread:
    def run() -> None:
        while (item := handoff.get(wake_after, patience_s)) is not None:
            got.append((item, time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(condition, timeout: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(condition())


def test_items_arrive_in_order_and_none_is_lost() -> None:
    handoff: FrameHandoff[int | None] = FrameHandoff()
    got: list[tuple[int, float]] = []
    thread = consumer(handoff, 1, got)
    for i in range(5000):
        handoff.put(i)
        if i % 97 == 0:
            time.sleep(0.0005)  # let the consumer fall asleep now and then
    handoff.put(None, urgent=True)
    thread.join(5)
    assert [item for item, _ in got] == list(range(5000))
    assert len(handoff) == 0


def test_a_sleeping_consumer_is_woken_only_when_enough_wait() -> None:
    handoff: FrameHandoff[int | None] = FrameHandoff()
    got: list[tuple[int, float]] = []
    thread = consumer(handoff, 3, got, patience_s=30)
    assert wait_for(lambda: handoff._sleeping)
    handoff.put(1)
    handoff.put(2)
    time.sleep(0.01)
    assert got == [] and len(handoff) == 2  # waiting, counted as the backlog
    handoff.put(3)
    assert wait_for(lambda: len(got) == 3)
    handoff.put(None, urgent=True)
    thread.join(2)
    assert not thread.is_alive()


def test_a_lone_item_is_taken_after_the_patience_if_no_other_follows() -> None:
    handoff: FrameHandoff[int | None] = FrameHandoff()
    got: list[tuple[int, float]] = []
    thread = consumer(handoff, 3, got)
    assert wait_for(lambda: handoff._sleeping)
    put_at = time.monotonic()
    handoff.put(1)
    assert wait_for(lambda: len(got) == 1)
    assert 0.0 < got[0][1] - put_at < 0.5  # the stream stopped: the last frame is not left waiting
    assert len(handoff) == 0
    handoff.put(None, urgent=True)
    thread.join(2)


def test_an_urgent_item_wakes_at_once() -> None:
    handoff: FrameHandoff[int | None] = FrameHandoff()
    got: list[tuple[int, float]] = []
    thread = consumer(handoff, 50, got)
    assert wait_for(lambda: handoff._sleeping)
    handoff.put(7)
    handoff.put(None, urgent=True)
    thread.join(2)
    assert not thread.is_alive() and [item for item, _ in got] == [7]


def test_a_frame_with_sound_wakes_a_consumer_that_asked_for_sound() -> None:
    handoff: FrameHandoff[int | None] = FrameHandoff()
    got: list[int | None] = []

    def consume() -> None:
        while (item := handoff.get(50, patience_s=30, wake_on_sound=True)) is not None:
            got.append(item)

    thread = threading.Thread(target=consume)
    thread.start()
    assert wait_for(lambda: handoff._sleeping)
    handoff.put(1)  # flagged silent by the far end: waits for its window
    time.sleep(0.01)
    assert got == []
    handoff.put(2, sound=True)
    assert wait_for(lambda: got == [1, 2])
    handoff.put(None, urgent=True)
    thread.join(2)
    assert not thread.is_alive()


def test_sound_does_not_wake_a_consumer_that_did_not_ask() -> None:
    handoff: FrameHandoff[int | None] = FrameHandoff()
    got: list[tuple[int, float]] = []
    thread = consumer(handoff, 3, got, patience_s=30)
    assert wait_for(lambda: handoff._sleeping)
    handoff.put(1, sound=True)
    time.sleep(0.01)
    assert got == []
    handoff.put(None, urgent=True)
    thread.join(2)


class _Vad:
    sample_rate = 16000
    window_samples = 512

    def __init__(self, probability: float) -> None:
        self.probability = probability

    def speech_probability(self, window: object) -> float:
        return self.probability

    def reset(self) -> None:
        pass


class _Sink:
    def schedule_barge_in(self, event: object) -> None:
        pass

    def queue_partial(self, event: object) -> None:
        pass

    def queue_speech_result(self, event: object) -> None:
        pass


class _Streaming:
    """A recognizer with partials: it must hear every frame at once while in an utterance."""

    sample_rate = 16000

    def begin(self) -> None:
        pass

    def feed(self, pcm: bytes) -> str | None:
        return "partial"

    def end(self) -> str:
        return ""

    def close(self) -> None:
        pass


def test_the_segmenter_asks_for_the_frames_that_complete_a_window() -> None:
    from parley.media.recognition import SegmenterConfig, SpeechSegmenter
    from parley.speech.silent import NoPartials

    loud = b"\x00\x10" * 320
    for recognizer, in_utterance_needs in ((NoPartials(), None), (_Streaming(), 1)):
        segmenter = SpeechSegmenter(_Vad(0.9), recognizer, _Sink(), SegmenterConfig())  # type: ignore[arg-type]
        assert segmenter.frames_to_decide(320) == 2  # 0 of 512 samples: two frames make a window
        segmenter.push(loud, 0.0)
        assert segmenter.frames_to_decide(320) == 1  # 320 buffered
        segmenter.push(loud, 0.02)  # a window decided (speech), 128 left
        assert segmenter.frames_to_decide(320) == 2  # one window decided (speech, no utterance yet), 128 left
        for i in range(5):
            segmenter.push(loud, 0.04 + i * 0.02)
        assert segmenter.in_utterance
        expected = in_utterance_needs or -(-(512 - 32 - segmenter._samples.size) // 320)
        assert segmenter.frames_to_decide(320) == max(1, expected)
