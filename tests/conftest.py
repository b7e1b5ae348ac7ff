"""Shared fixtures: real test speech (espeak-ng, generated, never committed) and a real server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from parley.audio import write_wav
from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.testing.fake_llm import FakeLlm, ServerThread
from parley.voice.espeak import EspeakSynthesizer

# Phrases the pocketsphinx default recognises well enough from espeak-ng's en-us voice
# (measured: "what are your opening hours" -> "what are your opening hours|dollars").
HOURS_PHRASE = "what are your opening hours"
ORDER_PHRASE = "I want to order a pizza"


@pytest.fixture(scope="session")
def voice() -> EspeakSynthesizer:
    return EspeakSynthesizer(ThreadPoolExecutor(1), "en-us", 175)


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory, voice: EspeakSynthesizer) -> Path:
    """WAV files of caller phrases at 16 kHz, plus 24 kHz variants."""
    root = tmp_path_factory.mktemp("speech")
    for name, text in {"hours": HOURS_PHRASE, "order": ORDER_PHRASE}.items():
        for rate in (16000, 24000):
            pcm = voice.synthesize_blocking(text, rate)
            write_wav(root / f"{name}_{rate}.wav", pcm, rate)
    return root


@pytest.fixture(scope="session")
def hours_pcm(voice: EspeakSynthesizer) -> np.ndarray:
    return np.frombuffer(voice.synthesize_blocking(HOURS_PHRASE, 16000), dtype=np.int16)


def make_server(**overrides: object) -> BackgroundServer:
    settings = load_settings(host="127.0.0.1", port=0, event_log=False, **overrides)
    return BackgroundServer(settings).start()


# Long enough to barge in on at 1 s, short enough to keep the suite quick.
TEST_GREETING = "Hi, thanks for calling. How can I help you today?"


@pytest.fixture(scope="module")
def server():
    srv = make_server(greeting=TEST_GREETING)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeLlm]:
    """A local fake OpenAI-compatible server (real HTTP + SSE), one per test module."""
    app = FakeLlm()
    server = ServerThread(app)
    app.url = server.start()
    yield app
    server.stop()
