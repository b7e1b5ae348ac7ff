"""The small Protocols every engine plugs in behind.

The media handler only knows these shapes; it never imports an engine. Engines are plain objects
(no framework base class): anything with the right methods works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Vad(Protocol):
    """Frame-level voice activity detector. Runs on the recognition thread only."""

    sample_rate: int
    window_samples: int

    def speech_probability(self, window: np.ndarray) -> float:
        """Probability (0..1) that a float32 window of exactly `window_samples` holds speech."""
        ...

    def reset(self) -> None: ...


@runtime_checkable
class Recognizer(Protocol):
    """An utterance recognizer driven by the VAD segmenter on the recognition thread.

    `begin` opens an utterance, `feed` takes 16-bit mono PCM at `sample_rate` and may return a new
    partial hypothesis (or None when nothing changed), `end` closes the utterance and returns its
    final text ("" when nothing was recognised). Calls never overlap; they must not block on I/O.
    A recognizer whose final comes later (a cloud service) returns a `concurrent.futures.Future`
    of the text from `end` instead; it is delivered when resolved, from whichever thread resolves it,
    like the accurate second pass's finals (and no second pass runs for that utterance).
    """

    sample_rate: int

    def begin(self) -> None: ...

    def feed(self, pcm: bytes) -> str | None: ...

    def end(self) -> str | Future[str]: ...

    def close(self) -> None: ...


@runtime_checkable
class Transcriber(Protocol):
    """A whole-utterance recognizer: the accurate second pass that produces the final text.

    `transcribe` is blocking CPU work; the recognition thread runs it on a bounded executor and
    never waits for it. It must be safe to call from several threads.
    """

    sample_rate: int

    def transcribe(self, pcm: bytes) -> str: ...


class ScoredText(Protocol):
    """A final text with the recognizer's own confidence in it."""

    text: str
    avg_logprob: float
    no_speech_prob: float


@runtime_checkable
class ScoringTranscriber(Protocol):
    """A Transcriber that can also say how sure it is (Whisper): the barge-in policy weighs a
    short doubtful sound said over the agent differently from a clear word."""

    def transcribe_detailed(self, pcm: bytes) -> ScoredText: ...


@runtime_checkable
class Synthesizer(Protocol):
    """Text to 16-bit mono PCM at the requested rate, streamed in chunks as it is produced.

    Cancelling the consuming task must stop the synthesis work promptly.
    """

    def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class UserInput:
    """What the caller gave the agent in one turn: recognised speech or DTMF digits."""

    kind: Literal["speech", "dtmf"]
    text: str = ""
    digits: str = ""


@dataclass(frozen=True, slots=True)
class Say:
    """Agent output: text to speak. Agents may yield many of these per turn (streaming).

    `interruptible=False` plays the text through whatever the caller says (legal notices).
    `voice` names the voice to speak it in: None = the agent's own voice (its `voice` attribute),
    "" = the server's default voice (a multi-agent scenario stamps each member's voice).
    """

    text: str
    interruptible: bool = True
    voice: str | None = None


@dataclass(frozen=True, slots=True)
class Hangup:
    """Agent output: end the call once what was said before it has been played."""

    reason: str = "agent_hangup"


@dataclass(frozen=True, slots=True)
class Transfer:
    """Agent output: transfer the call to `target` (a phone number or user id) once what was said
    before it has been played. Needs a transport that can transfer (ACS Call Automation)."""

    target: str
    reason: str = "agent_transfer"


@dataclass(frozen=True, slots=True)
class Handoff:
    """Between the agents of a scenario only (the handler never sees it): the agent passes the
    caller to the scenario agent named `to`. `handoff` is that agent's declared handoff entry."""

    to: str
    handoff: object = None


AgentOutput = Say | Hangup | Transfer | Handoff


@dataclass(frozen=True, slots=True)
class CallContext:
    """Facts about the call an agent may use (caller id, call id...)."""

    call_id: str
    correlation_id: str = ""
    caller_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Agent(Protocol):
    """One conversation's agent (one instance per call, so it may keep state)."""

    def greeting(self) -> str | None: ...

    def respond(self, user: UserInput) -> AsyncIterator[AgentOutput]: ...


class AgentFactory(Protocol):
    def __call__(self, context: CallContext) -> Agent: ...


@runtime_checkable
class CallControl(Protocol):
    """Acts on the phone call itself, beyond its media stream (ACS Call Automation).

    `call_id` is the call connection id the media stream carries. Both return once the request
    was accepted; the media socket closes when the call leaves this server.
    """

    async def hang_up(self, call_id: str) -> None: ...

    async def transfer(self, call_id: str, target: str) -> None: ...


@runtime_checkable
class ExpectsDigits(Protocol):
    """An agent that says how many keys make one input: a menu of single keys answers at the
    first key instead of waiting for the inter-digit timeout. None: no fixed count."""

    def digits_expected(self) -> int | None: ...
