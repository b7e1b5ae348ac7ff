"""When the simulated caller speaks and when it hangs up, decided tick by tick."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Protocol

from parley.caller.options import CallOptions
from parley.caller.playout import PlayoutEmulator

GREETING_QUIET_S: Final = 0.7
"""Agent silence after which the greeting is taken to be over and the caller speaks."""


class SpeakTrigger(Protocol):
    def ready(self, now: float, playout: PlayoutEmulator) -> bool: ...


@dataclass(frozen=True, slots=True)
class AtOnceTrigger:
    """Start at once: a `say` timeline runs from call start, each utterance at its own time."""

    def ready(self, now: float, playout: PlayoutEmulator) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class BargeInTrigger:
    """Speak once the current stretch of agent playout has played `after_s` seconds."""

    after_s: float

    def ready(self, now: float, playout: PlayoutEmulator) -> bool:
        stretch = playout.stretch_at(now)
        if stretch is None:
            return False
        due = stretch.start + self.after_s
        # The stretch must really have lasted that long, not merely have started long ago.
        return now >= due and stretch.end >= due


@dataclass(frozen=True, slots=True)
class GreetingOverTrigger:
    """Speak once the greeting is over, or when none came within `wait_s` of call start."""

    t0: float
    wait_s: float
    quiet_s: float = GREETING_QUIET_S

    def ready(self, now: float, playout: PlayoutEmulator) -> bool:
        if not playout.has_played(now):
            return now - self.t0 >= self.wait_s
        end = playout.playout_end
        return end is not None and now - end >= self.quiet_s


@dataclass(frozen=True, slots=True)
class AnswerWatcher:
    """After the clip: done once the agent answered and then fell quiet, or after `max_wait_s`."""

    clip_end: float
    quiet_s: float
    max_wait_s: float
    end_after_answer_s: float | None = None

    def done(self, now: float, playout: PlayoutEmulator) -> bool:
        if now - self.clip_end >= self.max_wait_s:
            return True
        if not playout.started_since(self.clip_end):
            return False
        if self.end_after_answer_s is not None:
            answer = playout.first_start_since(self.clip_end)
            return answer is not None and now - answer >= self.end_after_answer_s
        end = playout.playout_end
        return end is not None and now - end >= self.quiet_s


class Phase(Enum):
    WAITING = auto()
    SPEAKING = auto()
    AFTER = auto()
    DONE = auto()


SILENCE: Final = -1
"""`Script.tick` result: send a silence frame."""


class Script:
    """Decides, tick by tick, whether the caller sends silence, a clip frame, or hangs up."""

    def __init__(
        self,
        n_frames: int,
        trigger: SpeakTrigger,
        playout: PlayoutEmulator,
        options: CallOptions,
        give_up_at: float,
    ) -> None:
        self.phase = Phase.WAITING
        self.clip_start: float | None = None
        self.clip_end: float | None = None
        self.notes: list[str] = []
        self._n = n_frames
        self._next = 0
        self._trigger = trigger
        self._playout = playout
        self._options = options
        self._give_up_at = give_up_at
        self._watcher: AnswerWatcher | None = None

    def tick(self, now: float) -> int | None:
        """Clip frame index to send now, SILENCE, or None when the call should end."""
        if self._ended_by_stop(now):
            self.phase = Phase.DONE
            return None
        if self.phase is Phase.WAITING:
            if not self._should_start(now):
                return SILENCE
            self.phase, self.clip_start = Phase.SPEAKING, now
        if self.phase is Phase.SPEAKING:
            if self._next < self._n:
                self._next += 1
                return self._next - 1
            self._begin_after(now)
        if self.phase is Phase.AFTER:
            assert self._watcher is not None
            if not self._watcher.done(now, self._playout):
                return SILENCE
            self.phase = Phase.DONE
        return None

    def _ended_by_stop(self, now: float) -> bool:
        """With `end_after_stop_s`: the barge-in under test has happened and been watched long enough."""
        limit = self._options.end_after_stop_s
        if limit is None or self.clip_start is None:
            return False
        stops = [t for t in self._playout.stop_times if t >= self.clip_start]
        return bool(stops) and now - stops[0] >= limit

    def _should_start(self, now: float) -> bool:
        if self._trigger.ready(now, self._playout):
            return True
        if now < self._give_up_at:
            return False
        # Never hang forever on an agent that does not behave as expected; say so in the report.
        waited = now - self._playout.t0
        if isinstance(self._trigger, BargeInTrigger):
            self.notes.append(
                f"barge-in point never reached: the agent did not talk {self._trigger.after_s:g} s without a pause"
                f" within {waited:.1f} s; spoke anyway"
            )
        else:
            self.notes.append(f"speech trigger not met after {waited:.1f} s; spoke anyway")
        return True

    def _begin_after(self, now: float) -> None:
        self.phase, self.clip_end = Phase.AFTER, now
        self._watcher = AnswerWatcher(
            now, self._options.quiet_after_s, self._options.max_wait_s, self._options.end_after_answer_s
        )
