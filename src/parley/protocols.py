"""The small Protocols every engine and agent plugs in behind.

The media handler only knows these shapes; it never imports an engine. Engines and agents are plain
objects (no framework base class): anything with the right methods works.

Some capabilities are optional: an agent or synthesizer that has them gets more from the server,
one that has not still works. Each is a Protocol of its own, checked with `isinstance` where it is
used (`MultiVoiceSynthesizer`, `SpeakingPreferences`, `TruncatesReplies`, `KeepsHistory`,
`ReportsEvents`). docs/extending.md describes them all.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

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


@runtime_checkable
class MultiVoiceSynthesizer(Synthesizer, Protocol):
    """Optional: a synthesizer that can speak in other voices than its default one.

    `with_voice(name)` returns the synthesizer for voice `name` (itself for None or its own voice);
    it is called once per voice, at startup for the voices agents name, and may load a model. It
    raises (any exception) when the voice does not exist; the default voice is used then.
    Without it, every agent speaks in the default voice.
    """

    def with_voice(self, voice: str | None) -> Synthesizer: ...


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
    """One conversation's agent (one instance per call, so it may keep state).

    `greeting()` is asked once, when the call's audio starts: the text to open with, or None.
    `respond(user)` answers one caller turn; write it as an async generator (`async def` with
    `yield`). The server closes the generator (`aclose()`) the moment the caller barges in, so a
    `finally:` in it (or `async with` around an HTTP stream) runs at once; it must not swallow
    `GeneratorExit` or `CancelledError`.
    """

    def greeting(self) -> str | None: ...

    def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]: ...


class AgentFactory(Protocol):
    """Builds the agent of one call; called on the event loop as the call connects (keep it quick)."""

    def __call__(self, context: CallContext) -> Agent: ...


# Optional agent capabilities: the handler and the scenario look for them with isinstance.


@runtime_checkable
class SpeakingPreferences(Protocol):
    """Optional: how the agent's words are delivered.

    `voice`: the voice its `Say`s are spoken in when they name none (None: the server's default;
    the synthesizer must be a `MultiVoiceSynthesizer` for another voice to be used).
    `greeting_interruptible`: may the caller barge in on its greeting (without it: yes). The
    server's `greeting_interruptible` setting, when given, overrides it. Both are read when used,
    so they may change during the call (a scenario answers with whichever agent is active).
    """

    @property
    def voice(self) -> str | None: ...

    @property
    def greeting_interruptible(self) -> bool: ...


@runtime_checkable
class TruncatesReplies(Protocol):
    """Optional: an agent that remembers what it said hears what the caller actually heard.

    After a barge-in the handler calls `truncate_last_reply(heard_text)` synchronously, before the
    interrupted reply's cleanup ran: the agent keeps only `heard_text` (the words played before the
    interruption, possibly "") of its last reply. `forget_input=True` means nothing was heard and
    the same caller input will be answered again (merged with what comes next): the agent drops that
    input too so it is not remembered twice.
    """

    def truncate_last_reply(self, heard_text: str, *, forget_input: bool = False) -> None: ...


@runtime_checkable
class RecordsSpoken(Protocol):
    """Optional: an agent told of words said in its name outside a reply: a greeting the server
    spoke for it (PARLEY_GREETING), a handoff announcement. It belongs in the agent's history:
    the model must know it already said hello."""

    def record_spoken(self, text: str) -> None: ...


Message = dict[str, Any]
"""One chat message: {"role": "user" | "assistant", "content": text} (the OpenAI chat shape)."""


@runtime_checkable
class KeepsHistory(TruncatesReplies, RecordsSpoken, Protocol):
    """Optional: an agent with a conversation history that a scenario carries across handoffs.

    `history()` is the conversation so far as plain user/assistant messages;
    `before_last_input=True` leaves out the latest caller input and what followed it (the next
    agent answers that input itself). `adopt_history(messages)` continues a conversation another
    agent had. `record_spoken(text)` notes words said in this agent's name outside a reply (a
    handoff announcement, a greeting the scenario spoke for it).
    """

    def history(self, *, before_last_input: bool = False) -> list[Message]: ...

    def adopt_history(self, messages: list[Message]) -> None: ...

    def record_spoken(self, text: str) -> None: ...


class AgentEventListener(Protocol):
    """Receives an agent's events: `listener("agent_handoff", source=..., target=...)`."""

    def __call__(self, name: str, /, **fields: Any) -> None: ...


@runtime_checkable
class ReportsEvents(Protocol):
    """Optional: an agent whose handoffs and tool calls go into the call's event log.

    The handler calls `listen(listener)` once, right after building the agent; the agent then calls
    `listener(name, **fields)` with `name` "agent_handoff" or "tool_called" (other names are
    ignored) and JSON-serialisable fields.
    """

    def listen(self, listener: AgentEventListener) -> None: ...


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
