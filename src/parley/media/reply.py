"""Reply production for one turn: agent outputs -> clauses -> synthesized clips, ahead of playout.

    agent.respond(user) ─► reader task (its own, so a barge-in closes the agent's stream at once)
        ─► Say / Hangup / Transfer ─► clauses ─► synthesizer.stream(clause) ─► clips queue ─► player

The clip stream always ends, with `END`, unless the turn itself is cancelled (then nobody reads it):
- the agent raises, or stalls longer than `agent_s` before an output: the error is logged with the
  call id, `turn_failed` is recorded, and the apology line is spoken so the caller is not left in
  silence (the next question is answered as usual);
- the voice fails: a failure before a clause's first audio is hidden by the fallback voice (see
  parley.voice.guarded); one after it ends the turn the same way, the apology spoken by whichever
  voice still works;
- cleanup (closing the agent's stream) waits at most `cleanup_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from parley.media.events import EventLog
from parley.media.turns import Turn
from parley.protocols import Agent, AgentOutput, Hangup, Say, SpeakingPreferences, Synthesizer, Transfer
from parley.voice.clauses import quick_start, split_clauses

log = logging.getLogger(__name__)

END = object()  # end of a turn's audio stream


@dataclass(frozen=True, slots=True)
class Clip:
    """Synthesized audio of one piece of reply text (text only on its first chunk)."""

    text: str | None
    pcm: bytes
    interruptible: bool = True


@dataclass(frozen=True, slots=True)
class ReplyLimits:
    agent_s: float = 25.0  # to the agent's first output, and between two outputs
    cleanup_s: float = 2.0  # closing the agent's stream after the turn


async def wait_bounded(task: asyncio.Task[None], seconds: float, what: str) -> bool:
    """Wait for a cancelled task to end, at most `seconds`: a task stuck in its own cleanup must
    not hold the turn (or the call). False, with a warning, if it is left behind."""
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        log.warning("%s did not end within %.1f s; left behind", what, seconds)
    return bool(done)


class AgentStalled(TimeoutError):
    """The agent produced nothing for longer than its limit."""


class ReplyProducer:
    """Makes the audio of each turn of one call (the handler plays it)."""

    def __init__(
        self,
        *,
        call_id: str,
        agent: Agent,
        synthesizer_for: Callable[[str | None], Synthesizer],
        events: EventLog,
        sample_rate: int,
        limits: ReplyLimits | None = None,
        apology_text: str = "",
    ) -> None:
        self.call_id = call_id
        self.agent = agent
        self.synthesizer_for = synthesizer_for
        self.events = events
        self.sample_rate = sample_rate
        self.limits = limits or ReplyLimits()
        self.apology_text = apology_text

    async def produce(self, turn: Turn, clips: asyncio.Queue[object]) -> None:
        """Fill `clips` with the turn's audio, running ahead of playout (the next clause is made
        while one plays), then `END`."""
        outputs: asyncio.Queue[object] = asyncio.Queue()
        turn.agent_task = asyncio.create_task(self._read_agent(turn, outputs), name=f"agent-{self.call_id}-{turn.id}")
        first_audio = [True]
        try:
            await self._synthesize(turn, _until_end(outputs, self.limits.agent_s), clips, first_audio)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any agent or voice failure ends in the apology
            await self._fail(turn, clips, exc, first_audio)
        finally:
            await self._stop_reading(turn)
        await clips.put(END)

    async def _stop_reading(self, turn: Turn) -> None:
        task = turn.agent_task
        if task is not None and not task.done():
            task.cancel()
            await wait_bounded(task, self.limits.cleanup_s, f"call {self.call_id}: turn {turn.id}: the agent's stream")

    async def _fail(self, turn: Turn, clips: asyncio.Queue[object], error: Exception, first_audio: list[bool]) -> None:
        stage = "agent" if isinstance(error, AgentStalled) or turn.agent_error is error else "voice"
        log.error("call %s: turn %d failed (%s): %s: %s", self.call_id, turn.id, stage, type(error).__name__, error)
        self.events.emit("turn_failed", turn_id=turn.id, stage=stage, error=f"{type(error).__name__}: {error}")
        if not self.apology_text:
            return
        try:
            await self._speak(turn, Say(self.apology_text), clips, first_audio)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - no voice works at all: the turn ends silent, logged
            log.error("call %s: turn %d: the apology could not be spoken either: %s", self.call_id, turn.id, exc)
            self.events.emit("turn_failed", turn_id=turn.id, stage="apology", error=f"{type(exc).__name__}: {exc}")

    async def _read_agent(self, turn: Turn, outputs: asyncio.Queue[object]) -> None:
        """Read the agent as fast as it writes (the watchdog is on the reading side: an agent
        stuck even in its own cleanup cannot hold the turn)."""
        try:
            # aclosing: a cancelled read closes the agent's generator (and its HTTP stream) now,
            # not whenever the garbage collector finalises it.
            async with contextlib.aclosing(self._agent_outputs(turn)) as agent_outputs:
                async for output in agent_outputs:
                    if isinstance(output, Hangup | Transfer):
                        turn.control = output  # known now, though played after what comes before it
                    outputs.put_nowait(output)
        except asyncio.CancelledError:
            if turn.agent_started:
                self.events.emit("agent_stream_closed", turn_id=turn.id)
            raise
        except Exception as exc:  # noqa: BLE001 - fails the turn, on the synthesis side
            turn.agent_error = exc
            outputs.put_nowait(_AgentFailed(exc))
            return
        outputs.put_nowait(END)

    async def _synthesize(
        self, turn: Turn, outputs: AsyncIterator[AgentOutput], clips: asyncio.Queue[object], first_audio: list[bool]
    ) -> None:
        async for output in outputs:
            if isinstance(output, Hangup | Transfer):
                await clips.put(output)
                break
            assert isinstance(output, Say)
            self.events.emit("agent_text", turn_id=turn.id, text=output.text)
            await self._speak(turn, output, clips, first_audio)

    async def _speak(self, turn: Turn, say: Say, clips: asyncio.Queue[object], first_audio: list[bool]) -> None:
        """One Say cut into clauses, each synthesized as soon as the previous is queued: the first
        clause plays while the next is made, and a resumed reply restarts at a clause boundary."""
        synthesizer = self._synthesizer(say)
        clauses = split_clauses(say.text)
        for clause in quick_start(clauses) if first_audio[0] else clauses:
            text: str | None = clause
            async for pcm in synthesizer.stream(clause, self.sample_rate):
                if first_audio[0]:
                    self.events.emit("first_audio_ready", turn_id=turn.id)
                    first_audio[0] = False
                await clips.put(Clip(text, pcm, say.interruptible))
                text = None

    def _synthesizer(self, say: Say) -> Synthesizer:
        """The voice a Say names (None: the agent's current voice; "": the server default)."""
        voice = say.voice
        if voice is None and isinstance(self.agent, SpeakingPreferences):
            voice = self.agent.voice
        return self.synthesizer_for(voice or None)

    async def _agent_outputs(self, turn: Turn) -> AsyncGenerator[Say | Hangup | Transfer, None]:
        if turn.say is not None:
            yield Say(turn.say)
            return
        assert turn.user is not None
        turn.agent_started = True
        async with contextlib.aclosing(self.agent.respond(turn.user)) as outputs:
            async for output in outputs:
                if isinstance(output, Say) and not output.text.strip():
                    continue
                if not isinstance(output, Say | Hangup | Transfer):  # a Handoff outside a scenario
                    # Its type only: an agent's output may hold what it was about to say.
                    log.warning("call %s: ignoring agent output of type %s", self.call_id, type(output).__name__)
                    continue
                yield output


@dataclass(frozen=True, slots=True)
class _AgentFailed:
    error: Exception


async def _until_end(outputs: asyncio.Queue[object], agent_s: float) -> AsyncIterator[AgentOutput]:
    """The agent's outputs as the reader task queued them, each due within `agent_s`; the agent's
    failure is raised here, and so is its silence (AgentStalled)."""
    while True:
        try:
            async with asyncio.timeout(agent_s):
                item = await outputs.get()
        except TimeoutError:
            raise AgentStalled(f"the agent gave no output for {agent_s:.1f} s") from None
        if item is END:
            return
        if isinstance(item, _AgentFailed):
            raise item.error
        yield item  # type: ignore[misc]
