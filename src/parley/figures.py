"""A call's latency figures, derived from its event records as they are recorded.

Metrics (parley.metrics) and traces (parley.tracing) both report these, from the same records the
events API and the call records hold, so no figure can disagree with the record it came from.
Each record is looked at once, by its name: cheap enough to run on every event of every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What each figure measures (seconds), for the metrics' help text and the docs.
FIGURES = {
    "bargein_onset_to_stop": "the caller's speech onset (the onset frame or VAD window) -> StopAudio written, for a barge-in",
    "bargein_decision_to_stop": "the barge-in decision (pause or stop) -> StopAudio written",
    "voice_to_voice": "the caller's end of speech -> the first audio frame of the answer written",
    "speech_end_to_final": "the caller's end of speech -> the final recognition result",
    "agent_first_text": "turn start -> the agent's first text (an LLM's first clause: first token and the clause)",
    "tts_first_audio": "the turn's first text -> its first synthesized audio ready",
    "turn_first_audio": "turn start -> the turn's first audio frame written",
}

AGENT_TURNS = frozenset({"speech", "dtmf"})  # turns the agent answers (greetings and closing lines are said)
_NONE: tuple[Figure, ...] = ()


@dataclass(frozen=True, slots=True)
class Figure:
    name: str  # a key of FIGURES
    seconds: float
    turn_id: int | None = None


class _Turn:
    __slots__ = ("first_audio", "first_text_t", "kind", "stop_from", "t0")

    def __init__(self, kind: str, t0: float) -> None:
        self.kind = kind
        self.t0 = t0
        self.first_text_t: float | None = None
        self.first_audio = False
        # A barge-in waiting for its StopAudio: (decision time, the speech onset or None for a key).
        self.stop_from: tuple[float, float | None] | None = None


class CallFigures:
    """The figures of one call. `feed` each of its records, in order; it returns the figures that
    record completes (usually none)."""

    def __init__(self) -> None:
        self.onset_t: float | None = None  # of the caller's latest utterance
        self.speech_end_t: float | None = None  # of the latest final, until a turn that is not an answer to it
        self.turns: dict[int, _Turn] = {}

    def feed(self, record: dict[str, Any]) -> tuple[Figure, ...]:
        name = record["event"]
        t = record["t"]
        if name in ("speech_onset", "speech_started"):  # (an utterance's start repeats its onset's time)
            onset = record.get("onset_t")
            self.onset_t = onset if isinstance(onset, float | int) else t
            return _NONE
        if name == "final":
            end = record.get("speech_end_t")
            if not isinstance(end, float | int):
                return _NONE
            self.speech_end_t = end
            return (Figure("speech_end_to_final", t - end),)
        turn_id = record.get("turn_id")
        if not isinstance(turn_id, int):
            return _NONE
        if name == "turn_started":
            kind = str(record.get("kind", ""))
            self.turns[turn_id] = _Turn(kind, t)
            if kind != "speech":
                self.speech_end_t = None  # voice-to-voice is for spoken inputs only (as the call records say)
            return _NONE
        turn = self.turns.get(turn_id)
        if turn is None:
            return _NONE
        if name == "agent_text":
            return self._first_text(turn, turn_id, t)
        if name == "first_audio_ready":
            if turn.first_text_t is None:
                return _NONE
            return (Figure("tts_first_audio", t - turn.first_text_t, turn_id),)
        if name == "first_audio_sent":
            return self._first_audio(turn, turn_id, t)
        if name in ("barge_in_paused", "barge_in_decided"):
            if turn.stop_from is None:
                speech = name == "barge_in_paused" or record.get("trigger") != "dtmf"
                turn.stop_from = (t, self.onset_t if speech else None)
            return _NONE
        if name == "stop_audio_sent":
            return self._stopped(turn, turn_id, t)
        if name in ("turn_completed", "turn_cancelled"):
            del self.turns[turn_id]
        return _NONE

    def _first_text(self, turn: _Turn, turn_id: int, t: float) -> tuple[Figure, ...]:
        if turn.first_text_t is not None:
            return _NONE
        turn.first_text_t = t
        if turn.kind not in AGENT_TURNS:
            return _NONE
        return (Figure("agent_first_text", t - turn.t0, turn_id),)

    def _first_audio(self, turn: _Turn, turn_id: int, t: float) -> tuple[Figure, ...]:
        if turn.first_audio:
            return _NONE
        turn.first_audio = True
        first = Figure("turn_first_audio", t - turn.t0, turn_id)
        if turn.kind == "speech" and self.speech_end_t is not None:
            return first, Figure("voice_to_voice", t - self.speech_end_t, turn_id)
        return (first,)

    def _stopped(self, turn: _Turn, turn_id: int, t: float) -> tuple[Figure, ...]:
        """StopAudio written: a barge-in's, or one without (the call finishing), which is not measured."""
        if turn.stop_from is None:
            return _NONE
        decided_t, onset_t = turn.stop_from
        turn.stop_from = None
        decision = Figure("bargein_decision_to_stop", t - decided_t, turn_id)
        if onset_t is None:
            return (decision,)
        return decision, Figure("bargein_onset_to_stop", t - onset_t, turn_id)


def engine_error_kind(record: dict[str, Any]) -> str | None:
    """Which engine a failure record is about (None: the record is not an engine failure).

    `turn_failed` names its stage (the agent, the voice, or the apology's voice); the recognition
    thread (VAD or recognizer) and Call Automation requests report theirs as `input_error`."""
    name = record["event"]
    if name == "turn_failed":
        stage = record.get("stage")
        return "agent" if stage == "agent" else "tts"
    if name == "input_error":
        error = str(record.get("error", ""))
        if error.startswith("recognition failed"):
            return "stt"
        if error.startswith(("hang up failed", "transfer failed")):
            return "call_control"
    return None


def end_reason_label(reason: object) -> str:
    """A call's end reason without its details, a bounded set for a metric label:
    `caller_hangup (code 1000)` -> `caller_hangup`, `intent:goodbye` -> `intent`, `error: X` -> `error`."""
    text = str(reason or "unknown").split(":", 1)[0].split(" (", 1)[0].strip()
    return text.replace(" ", "_")[:40] or "unknown"
