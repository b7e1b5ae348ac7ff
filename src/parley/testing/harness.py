"""An in-memory call: a real MediaHandler driven through a fake socket with cost-free engines.

Orchestration (turns, barge-in, faults, cleanup) is tested here in milliseconds, without uvicorn,
models or audio files. Everything the handler does is real: the codec parses real ACS messages,
the recognition thread segments real PCM with a level VAD, the player paces real frames; only the
engines are doubles whose behaviour a test scripts (what the caller "said", what the agent does,
how the voice fails).

    async with CallHarness(agent=ScriptedAgent(reply="Sure.")) as call:
        await call.say("what time do you open")
        await call.wait_for("turn_completed", turn_id=2)
        assert call.sent_audio_ms() > 0
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.websockets import WebSocketState

from parley.engines import Engines
from parley.media.handler import MediaHandler
from parley.pool import EnginePool
from parley.protocols import AgentOutput, CallContext, Say, Synthesizer, UserInput
from parley.settings import Settings
from parley.transports import acs
from parley.voice.guarded import GuardedSynthesizer, SynthesisLimits

SAMPLE_RATE = 16000
FRAME_S = 0.02
LOUD = 0.3  # amplitude of the caller's "speech" tone (-13 dBFS)


# ------------------------------------------------------------------------------- engine doubles
class LevelVad:
    """Speech is any window louder than -30 dBFS: the harness speaks in tones."""

    sample_rate = SAMPLE_RATE
    window_samples = 512

    def speech_probability(self, window: np.ndarray) -> float:
        return 1.0 if float(np.sqrt(np.mean(window * window))) > 0.03 else 0.0

    def reset(self) -> None:
        pass


class ScriptedRecognizer:
    """Finals are whatever the test said the caller said, in order; no partials."""

    sample_rate = SAMPLE_RATE

    def __init__(self) -> None:
        self.finals: deque[str] = deque()
        self.fail_next_feed: Exception | None = None
        self.feed_delay_s = 0.0  # a recognizer slower than real time (an overloaded machine)

    def begin(self) -> None:
        pass

    def feed(self, pcm: bytes) -> str | None:
        if self.fail_next_feed is not None:
            error, self.fail_next_feed = self.fail_next_feed, None
            raise error
        if self.feed_delay_s:
            time.sleep(self.feed_delay_s)
        return None

    def end(self) -> str:
        return self.finals.popleft() if self.finals else ""

    def close(self) -> None:
        pass


def tone(seconds: float, sample_rate: int = SAMPLE_RATE, freq: float = 440.0) -> bytes:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (0.2 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()


AgentBehaviour = Callable[[UserInput], AsyncIterator[AgentOutput]]


class ScriptedAgent:
    """Answers every input with `reply`, or with what `behaviour` (a test's async generator) does."""

    voice: str | None = None
    greeting_interruptible = True

    def __init__(self, *, greeting: str | None = None, reply: str = "Sure.", behaviour: AgentBehaviour | None = None):
        self._greeting = greeting
        self._reply = reply
        self.behaviour = behaviour
        self.inputs: list[UserInput] = []

    def greeting(self) -> str | None:
        return self._greeting

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        self.inputs.append(user)
        if self.behaviour is not None:
            async for output in self.behaviour(user):
                yield output
            return
        yield Say(self._reply)


@dataclass
class ScriptedSynthesizer:
    """`ms_per_char` of tone per clause (one chunk per 100 ms), or a scripted failure:
    'raise' | 'hang' | 'silent' (no audio) | 'raise_mid' (after the first chunk), for the next
    `failures` clauses (-1: always)."""

    ms_per_char: float = 4.0
    freq: float = 440.0
    fault: str | None = None
    failures: int = -1
    calls: list[str] = field(default_factory=list)

    async def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        self.calls.append(text)
        fault = self._take_fault()
        if fault == "raise":
            raise ConnectionError("synthesis endpoint refused the connection")
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "silent":
            return
        pcm = tone(max(0.06, len(text) * self.ms_per_char / 1000), sample_rate, self.freq)
        chunk = sample_rate * 2 // 10
        for start in range(0, len(pcm), chunk):
            yield pcm[start : start + chunk]
            if fault == "raise_mid":
                raise ConnectionError("synthesis stream broke")
            await asyncio.sleep(0)

    def _take_fault(self) -> str | None:
        if self.fault is None or self.failures == 0:
            return None
        if self.failures > 0:
            self.failures -= 1
        return self.fault


# ------------------------------------------------------------------------------- the socket
class FakeSocket:
    """The subset of Starlette's WebSocket the handler uses, in memory."""

    def __init__(self) -> None:
        self.inbound: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[tuple[float, acs.OutboundMessage]] = []
        self.application_state = WebSocketState.CONNECTED
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.send_delay_s = 0.0  # a slow reader on the other end

    async def receive(self) -> dict[str, Any]:
        return await self.inbound.get()

    async def send_text(self, data: str) -> None:
        if self.send_delay_s:
            await asyncio.sleep(self.send_delay_s)
        self.sent.append((time.monotonic(), acs.parse_outbound(data)))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.application_state = WebSocketState.DISCONNECTED
        self.close_code = code
        self.close_reason = reason


# ------------------------------------------------------------------------------- the harness
def harness_settings(**overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "event_log": False,
        "echo_gate": False,
        "greeting": "",
        "endpoint_silence_ms": 200,
        "early_final_ms": 0,
        "resume_after_ms": 300,
        "playout_lead_ms": 60,
        "agent_timeout_s": 2.0,
        "tts_first_audio_timeout_s": 0.5,
        "tts_chunk_timeout_s": 0.5,
        "turn_cleanup_timeout_s": 0.5,
        # The harness sends the caller's audio at once, far faster than real time (see frames()).
        "max_inbound_rate": 1000.0,
    }
    defaults.update(overrides)
    return Settings(_env_file=None, **defaults)


class CallHarness:
    """One call on a real MediaHandler over a FakeSocket (use `async with`)."""

    def __init__(
        self,
        *,
        agent: ScriptedAgent | None = None,
        synthesizer: Synthesizer | None = None,
        fallback: Synthesizer | None = None,
        call_id: str = "harness-call",
        **settings: Any,
    ) -> None:
        self.settings = harness_settings(**settings)
        self.agent = agent or ScriptedAgent()
        self.recognizer = ScriptedRecognizer()
        self.primary = synthesizer or ScriptedSynthesizer()
        self.voice = GuardedSynthesizer(
            self.primary,
            fallback,
            name="harness voice",
            limits=SynthesisLimits(
                self.settings.tts_first_audio_timeout_s,
                self.settings.tts_chunk_timeout_s,
                self.settings.turn_cleanup_timeout_s,
            ),
        )
        self.engines = Engines(
            vads=EnginePool("vad", LevelVad),
            recognizers=EnginePool("recognizer", lambda: self.recognizer),
            synthesizer_for=lambda voice: self.voice,
            agent_factory=lambda context: self._agent_for(context),
        )
        self.socket = FakeSocket()
        self.handler = MediaHandler(call_id=call_id, settings=self.settings, engines=self.engines)
        self._task: asyncio.Task[None] | None = None

    def _agent_for(self, context: CallContext) -> ScriptedAgent:
        return self.agent

    async def __aenter__(self) -> CallHarness:
        self._task = asyncio.create_task(self.handler.run(self.socket), name="harness-handler")  # type: ignore[arg-type]
        self.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(SAMPLE_RATE)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            await self.hang_up()
        self.engines.close()

    # --- the caller ---------------------------------------------------------------------------
    def send(self, message: str) -> None:
        self.socket.inbound.put_nowait({"type": "websocket.receive", "text": message})

    def frames(self, seconds: float, loud: bool) -> None:
        """`seconds` of caller audio, sent at once (the segmenter counts windows, not wall time)."""
        samples = round(FRAME_S * SAMPLE_RATE)
        level = LOUD if loud else 0.0
        t = np.arange(samples) / SAMPLE_RATE
        pcm = (level * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()
        for _ in range(round(seconds / FRAME_S)):
            self.send(acs.inbound_audio_message(pcm))

    async def say(self, text: str, seconds: float = 0.3, then_silence_s: float | None = None) -> None:
        """The caller says `text`: a tone the VAD hears as speech, then the silence that ends it."""
        self.recognizer.finals.append(text)
        self.frames(seconds, loud=True)
        silence = then_silence_s if then_silence_s is not None else self.settings.endpoint_silence_ms / 1000 + 0.1
        self.frames(silence, loud=False)

    def dtmf(self, digits: str) -> None:
        self.send(acs.dtmf_message(digits))

    async def hang_up(self) -> None:
        self.socket.inbound.put_nowait({"type": "websocket.disconnect", "code": 1000})
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)

    # --- what happened ------------------------------------------------------------------------
    @property
    def events(self) -> list[dict[str, Any]]:
        return self.handler.events.snapshot()

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name and all(e.get(k) == v for k, v in match.items())]

    async def wait_for(self, name: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.named(name, **match)
            if found:
                return found[0]
            await asyncio.sleep(0.005)
        story = [
            (e["event"], e.get("turn_id"), e.get("reason") or e.get("error") or e.get("text")) for e in self.events
        ]
        raise AssertionError(f"no {name} {match or ''} within {timeout} s; events: {story}")

    async def until(self, condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result if not asyncio.iscoroutine(result) else await result:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"condition not met within {timeout} s")

    def sent_audio_ms(self) -> float:
        frames = sum(isinstance(message, acs.OutboundAudio) for _, message in self.socket.sent)
        return frames * FRAME_S * 1000

    def stop_audio_count(self) -> int:
        return sum(isinstance(message, acs.OutboundStop) for _, message in self.socket.sent)

    def call_tasks(self) -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if self.handler.call_id in t.get_name()]


def as_json(events: list[dict[str, Any]]) -> str:
    return json.dumps(events, default=str, indent=1)
