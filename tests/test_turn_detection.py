"""Semantic end of turn: Smart Turn on real speech, and the segmenter's endpointing with it.

The segmenter tests run a real recognition thread (Silero VAD, pocketsphinx) on speech with a
pause in the middle. Deciders that answer at once make its choices deterministic; the real model
is used where its answer is unambiguous (a question, a filled pause).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from parley.engines import recognizer_pool, vad_pool
from parley.evaluation import variants
from parley.media.bridge import Final, ThreadBridge
from parley.media.recognition import FinalPass, RecognitionThread, SegmenterConfig, text_says_complete
from parley.models import SMART_TURN, ModelError, fetch, model_path
from parley.settings import Settings
from parley.speech.pocketsphinx import PocketsphinxRecognizer
from parley.speech.turn import WINDOW_SAMPLES, SmartTurn, TurnDetector
from parley.speech.vad import SileroVad
from tests.test_media_units import RecordingSink
from tests.test_recognition import frames_of

VADS = vad_pool(SileroVad, 2)
RECOGNIZERS = recognizer_pool(PocketsphinxRecognizer, 2)
RATE = 16000


@pytest.fixture(scope="module")
def models_dir() -> Path:
    """The same cache the server reads (`make test` fetches it at setup); fetched here if missing."""
    directory = Settings().models_dir
    try:
        model_path(SMART_TURN, directory)
    except ModelError:
        try:
            fetch(SMART_TURN, directory)
        except ModelError as exc:  # offline machine without the cache
            pytest.skip(f"Smart Turn model not available: {exc}")
    return directory


@pytest.fixture(scope="module")
def smart_turn(models_dir: Path) -> SmartTurn:
    return SmartTurn(models_dir)


@pytest.fixture(scope="module")
def say() -> variants.BlockingSynthesizer:
    return variants.default_voice()


def speech(voice: variants.BlockingSynthesizer, text: str) -> np.ndarray:
    pcm = np.frombuffer(voice.synthesize_blocking(text, RATE), dtype="<i2").astype(np.int16)
    return variants.trim_silence(pcm)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


# ---------------------------------------------------------------------------------- the model


def test_features_are_8_s_of_log_mel_with_the_speech_at_the_end(smart_turn: SmartTurn) -> None:
    tone = (3000 * np.sin(np.arange(RATE) * 2 * np.pi * 440 / RATE)).astype("<i2")
    features = smart_turn.features(tone.tobytes())
    assert features.shape == (1, 80, 800) and features.dtype == np.float32
    loudest = features[0].max(axis=0)  # per 10 ms frame: the tone's bin, or the floor in the padding
    assert loudest[-95:].min() > loudest[:700].max() + 0.5  # the second of tone is the last 100 frames
    longer = smart_turn.features(np.tile(tone, 10).tobytes())  # 10 s: only the last 8 s are heard
    assert longer.shape == (1, 80, 800)
    assert np.allclose(longer, smart_turn.features(np.tile(tone, 10)[-WINDOW_SAMPLES:].tobytes()))


def test_a_question_is_complete_and_a_filled_pause_is_not(
    smart_turn: SmartTurn, say: variants.BlockingSynthesizer
) -> None:
    question = np.concatenate([speech(say, "What time do you close tonight?"), silence(0.2)])
    thinking = np.concatenate([speech(say, "I'd like to order a, uh"), silence(0.2)])
    assert smart_turn.complete_probability(question.tobytes()) > 0.7
    assert smart_turn.complete_probability(thinking.tobytes()) < 0.3


def test_the_detector_runs_decisions_off_the_caller_thread_and_times_them(smart_turn: SmartTurn) -> None:
    detector = TurnDetector(smart_turn)
    try:
        detector.warm()
        future = detector.submit(silence(1.0).tobytes())
        assert 0.0 <= future.result(timeout=30) <= 1.0
        assert len(detector.decision_ms) == 1 and detector.decision_ms[0] > 0
    finally:
        detector.close()


# ---------------------------------------------------------------------------------- the segmenter


class Answers:
    """A decider that answers at once, with a fixed probability (or an error)."""

    def __init__(self, probability: float | None) -> None:
        self.probability = probability
        self.asked: list[int] = []  # bytes of audio each decision heard

    def submit(self, pcm: bytes) -> Future[float]:
        self.asked.append(len(pcm))
        future: Future[float] = Future()
        if self.probability is None:
            future.set_exception(RuntimeError("model broke"))
        else:
            future.set_result(self.probability)
        return future


class SurerWithSilence(Answers):
    """Incomplete after a short silence, complete once it has heard 300 ms of it."""

    def submit(self, pcm: bytes) -> Future[float]:
        samples = np.frombuffer(pcm, dtype="<i2")
        trailing = samples.size - int(np.flatnonzero(samples)[-1]) - 1 if samples.any() else samples.size
        self.probability = 0.9 if trailing >= 0.3 * RATE else 0.1
        return super().submit(pcm)


class ShutDown:
    def submit(self, pcm: bytes) -> Future[float]:
        raise RuntimeError("cannot schedule new futures after shutdown")


class Says:
    """A second pass that always hears the same words."""

    def __init__(self, text: str) -> None:
        self.text = text

    def transcribe(self, pcm: bytes) -> str:
        return self.text


async def finals_of(
    audio: np.ndarray, config: SegmenterConfig, real_time: bool = False, final_pass: FinalPass | None = None
) -> list[Final]:
    """The finals of a recognition thread fed `audio` (then 2.5 s of silence), at once or in real time."""
    sink = RecordingSink()
    thread = RecognitionThread(
        call_id="turn-test",
        input_rate=RATE,
        vads=VADS,
        recognizers=RECOGNIZERS,
        bridge=ThreadBridge(asyncio.get_running_loop(), sink),
        config=config,
        final_pass=final_pass,
    )
    thread.start()
    frames = frames_of(np.concatenate([silence(0.3), audio, silence(2.5)]), RATE // 50)
    start = time.monotonic()
    for index, frame in enumerate(frames):
        assert thread.submit(frame, start + index * 0.02)
        if real_time and index % 5 == 4:
            await asyncio.sleep(max(0.0, start + (index + 1) * 0.02 - time.monotonic()))
    deadline = time.monotonic() + 15
    while thread.backlog and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the last windows, and the finals' hop to the loop
    thread.stop()
    thread.join(5)
    assert not thread.alive
    return [event for kind, event, _ in sink.seen if kind == "final"]  # type: ignore[misc]


def paused_speech(voice: variants.BlockingSynthesizer, pause_s: float = 0.7) -> np.ndarray:
    return np.concatenate(
        [speech(voice, "I'd like to order a"), silence(pause_s), speech(voice, "large pepperoni pizza")]
    )


SILENCE_RULE = {"endpoint_silence_ms": 400, "early_final_ms": 200}


async def test_without_a_detector_the_pause_ends_the_utterance(say: variants.BlockingSynthesizer) -> None:
    assert len(await finals_of(paused_speech(say), SegmenterConfig(**SILENCE_RULE))) == 2


async def test_incomplete_waits_through_the_pause_and_asks_again_after_it(say: variants.BlockingSynthesizer) -> None:
    decider = Answers(0.1)
    config = SegmenterConfig(**SILENCE_RULE, turn_detector=decider, turn_max_silence_ms=1500)
    finals = await finals_of(paused_speech(say), config)
    assert len(finals) == 1  # one utterance: the pause did not end it, the long silence after did
    assert len(decider.asked) >= 2  # in the pause, and again in the closing silence
    assert all(0 < size <= 8 * RATE * 2 for size in decider.asked)


async def test_asked_again_where_the_silence_rule_would_end_the_turn(say: variants.BlockingSynthesizer) -> None:
    decider = SurerWithSilence(None)
    config = SegmenterConfig(**SILENCE_RULE, turn_detector=decider, turn_max_silence_ms=1500)
    assert len(await finals_of(paused_speech(say), config)) == 2  # the second ask, at 400 ms, ends it
    assert len(decider.asked) >= 3  # twice in the pause, at least once at the end


async def test_complete_ends_the_utterance_at_the_short_silence(say: variants.BlockingSynthesizer) -> None:
    config = SegmenterConfig(endpoint_silence_ms=3000, early_final_ms=200, turn_detector=Answers(0.9))
    assert len(await finals_of(paused_speech(say), config)) == 2  # a 0.7 s pause, far below 3 s


async def test_a_failing_model_falls_back_to_the_silence_rule(say: variants.BlockingSynthesizer) -> None:
    for decider in (Answers(None), ShutDown()):
        config = SegmenterConfig(**SILENCE_RULE, turn_detector=decider, turn_max_silence_ms=3000)
        assert len(await finals_of(paused_speech(say), config)) == 2  # 400 ms of the 700 ms pause


async def test_smart_turn_keeps_a_filled_pause_and_ends_a_question(
    smart_turn: SmartTurn, say: variants.BlockingSynthesizer
) -> None:
    """In real time with the real model: the filled pause is heard through; a question followed by
    a 1 s silence and another question is two turns, though 1 s is below turn_max_silence_ms."""
    detector = TurnDetector(smart_turn)
    try:
        detector.warm()
        config = SegmenterConfig(turn_detector=detector, turn_max_silence_ms=1500)
        filled = np.concatenate(
            [speech(say, "I'd like to order a, uh"), silence(0.8), speech(say, "large pepperoni pizza")]
        )
        assert len(await finals_of(filled, config, real_time=True)) == 1
        questions = np.concatenate(
            [speech(say, "What time do you close tonight?"), silence(1.0), speech(say, "Do you deliver?")]
        )
        assert len(await finals_of(questions, config, real_time=True)) == 2
    finally:
        detector.close()


@pytest.mark.parametrize(
    ("text", "model_says", "complete"),
    [
        ("My account number is", True, False),  # a fragment said with a falling voice
        ("I need to book a table for", True, False),
        ("I'd like to order a, uh", True, False),
        ("Can I pay with a credit card?", False, True),  # a question the model missed
        ("Can I get a?", False, False),  # a dangling word outweighs the question mark
        ("Where is my nearest branch.", True, True),
        ("Yes, I would like that.", False, False),
        ("", True, True),
    ],
)
def test_the_early_whisper_text_refines_the_verdict(text: str, model_says: bool, complete: bool) -> None:
    assert text_says_complete(text, model_says) is complete


async def test_a_complete_verdict_waits_for_the_early_text_and_yields_to_a_dangling_word(
    say: variants.BlockingSynthesizer,
) -> None:
    executor = ThreadPoolExecutor(1)
    try:
        config = SegmenterConfig(endpoint_silence_ms=3000, turn_detector=Answers(0.9), turn_max_silence_ms=1500)
        dangling = FinalPass(Says("I'd like to order a"), executor)
        assert len(await finals_of(paused_speech(say), config, final_pass=dangling)) == 1
        whole = FinalPass(Says("I'd like to order a pizza."), executor)
        assert len(await finals_of(paused_speech(say), config, final_pass=whole)) == 2
    finally:
        executor.shutdown()
