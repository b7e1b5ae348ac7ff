"""Barge-in policy: decides whether a caller signal interrupts the agent. Pure; the handler acts.

Signals: the VAD's sustained-speech gate (the earliest reliable one), a recognizer partial (the
seeds' trigger, useful when the VAD gate is set long), and a DTMF key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Trigger = Literal["vad", "partial", "dtmf"]


@dataclass(frozen=True, slots=True)
class Signal:
    trigger: Trigger
    utterance_id: int = 0  # 0 for DTMF
    text: str = ""


@dataclass(frozen=True, slots=True)
class ActiveTurn:
    """What the policy needs to know about the turn that is thinking or speaking."""

    turn_id: int
    interruptible: bool
    source_utterance_id: int  # the newest caller utterance this turn answers


@dataclass(frozen=True, slots=True)
class Decision:
    interrupt: bool
    reason: str


@dataclass(frozen=True, slots=True)
class BargeInPolicy:
    partial_min_chars: int = 4
    on_dtmf: bool = True

    def decide(self, signal: Signal, turn: ActiveTurn | None) -> Decision:
        if turn is None:
            return Decision(False, "agent_idle")
        if not turn.interruptible:
            return Decision(False, "not_interruptible")
        if signal.trigger == "dtmf":
            return Decision(self.on_dtmf, "dtmf" if self.on_dtmf else "dtmf_disabled")
        if signal.utterance_id <= turn.source_utterance_id:
            # A late signal of the very utterance this turn answers (the seeds' "turn guard").
            return Decision(False, "same_utterance")
        if signal.trigger == "partial" and not self._partial_long_enough(signal.text):
            return Decision(False, "partial_too_short")
        return Decision(True, signal.trigger)

    def _partial_long_enough(self, text: str) -> bool:
        return self.partial_min_chars > 0 and len(text.strip()) >= self.partial_min_chars
