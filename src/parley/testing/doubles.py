"""Cost-free TEST DOUBLES for the recognizer, agent and synthesizer.

Used by `parley bench load --profile plumbing` (settings `engines=plumbing`) to measure the server's
own capacity: sockets, codec, VAD (kept real), turn handling, pacing and barge-in, without the cost
of speech engines. Never use them for real calls: they do not recognise or say anything.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from functools import lru_cache

import numpy as np

from parley.protocols import AgentOutput, CallContext, Say, UserInput
from parley.speech.silent import NoPartials

DOUBLE_UTTERANCE = "plumbing test utterance"
_MS_PER_CHAR = 60  # how long the synthesizer double "speaks" a text


class RecognizerDouble(NoPartials):
    """Recognises every VAD-detected utterance as the same fixed text; no partials."""

    def end(self) -> str:
        return DOUBLE_UTTERANCE


class AgentDouble:
    """Greets, then answers every input with the same sentence."""

    voice = None
    greeting_interruptible = True

    def __init__(self, context: CallContext, greeting: str, reply: str) -> None:
        self._greeting = greeting
        self._reply = reply

    def greeting(self) -> str | None:
        return self._greeting

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        yield Say(self._reply)


@lru_cache(maxsize=4)
def _tone(sample_rate: int, seconds: float) -> bytes:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    wave = 0.2 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (wave * 32767).astype("<i2").tobytes()


class SynthesizerDouble:
    """Returns a precomputed tone, 60 ms per character of text, in 100 ms chunks."""

    async def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        seconds = max(0.2, len(text) * _MS_PER_CHAR / 1000)
        pcm = _tone(sample_rate, round(seconds, 1))
        chunk = sample_rate * 2 // 10
        for start in range(0, len(pcm), chunk):
            yield pcm[start : start + chunk]
