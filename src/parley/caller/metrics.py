"""Barge-in and latency measurements from caller-side times and server events."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

LEAK_WINDOW_S: Final = 0.5
"""Without server events, audio received this soon after a StopAudio counts as leaked."""

EVENT_RACE_S: Final = 0.005
"""Server and caller read the same clock from different processes; a frame the server logged as
sent can reach us a hair before the logged time. This slack keeps such frames out of the leak."""

BRIEF_RESUME_REASONS: Final = frozenset({"onset_lost", "onset_not_sustained"})
"""Why a pause on an onset alone resumes when no speech follows it."""

REPLY_GAP_S: Final = 0.100
"""A pause in received agent audio longer than this ends what the agent was saying: audio after it
starts something new. Longer than parley's pacing gaps, shorter than any pause between turns."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def onset_to_stop_ms(onset: float | None, stops: Sequence[float], since: float | None = None) -> list[float]:
    """For each StopAudio received after the clip started (`since`, default the onset): onset send
    time -> StopAudio receive time. Negative when the VAD fired on sound before the first frame above
    -40 dBFS (a breath, a quiet first syllable): still a response to the caller, not a miss."""
    if onset is None:
        return []
    start = onset if since is None else min(since, onset)
    return [_ms(s - onset) for s in stops if s >= start]


@dataclass(frozen=True, slots=True)
class BriefPause:
    """A pause on a speech onset alone (`barge_in_paused` with trigger onset) that resumed because
    no speech followed, and how long the agent was silent."""

    pause: dict[str, Any]
    resume: dict[str, Any]
    ms: float


def brief_pauses(events: Sequence[dict[str, Any]]) -> list[BriefPause]:
    """The server's brief pauses, in order."""
    brief: list[BriefPause] = []
    paused: dict[str, Any] | None = None
    for event in events:
        name = event["event"]
        if name == "barge_in_paused":
            paused = event if event.get("trigger") == "onset" else None
        elif name == "barge_in_resumed" and paused is not None:
            if event.get("reason") in BRIEF_RESUME_REASONS:
                brief.append(BriefPause(paused, event, round((event["t"] - paused["t"]) * 1000, 1)))
            paused = None
        elif name in ("barge_in_decided", "turn_cancelled"):
            paused = None
    return brief


def decision_to_stop_ms(events: Sequence[dict[str, Any]]) -> list[float]:
    """Per barge-in: the server's decision to stop the audio (`barge_in_paused` in the default
    pause mode, else `barge_in_decided`) -> its stop_audio_sent for the same turn."""
    stops = [e for e in events if e["event"] == "stop_audio_sent"]
    result = []
    paused_turns = {e.get("turn_id") for e in events if e["event"] == "barge_in_paused"}
    decisions = [
        e
        for e in events
        if e["event"] == "barge_in_paused"
        or (e["event"] == "barge_in_decided" and e.get("turn_id") not in paused_turns)
    ]
    for decided in decisions:
        match = next(
            (s for s in stops if s.get("turn_id") == decided.get("turn_id") and s["t"] >= decided["t"]),
            None,
        )
        if match is not None:
            result.append(_ms(match["t"] - decided["t"]))
    return result


def _next_turn_audio(stop_at: float, events: Sequence[dict[str, Any]]) -> float:
    """When audio of a turn later than the one StopAudio cut began to be sent (inf if never)."""
    sent = [e for e in events if e["event"] == "stop_audio_sent" and e["t"] <= stop_at + EVENT_RACE_S]
    stopped_turn = sent[-1].get("turn_id") if sent else None
    since = sent[-1]["t"] if sent else stop_at
    for event in events:
        if event["event"] != "first_audio_sent" or event["t"] <= since:
            continue
        if stopped_turn is None or event.get("turn_id") != stopped_turn:
            return float(event["t"]) - EVENT_RACE_S
    return math.inf


def _leak_windows(stops: Sequence[float], events: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """Per stop, (stop, limit): agent audio received in between still belonged to the stopped turn.

    With server events, a leak lasts until the next turn's first_audio_sent; without them, audio
    within LEAK_WINDOW_S of the stop counts. Each window also ends at the next stop.
    """
    windows = []
    for k, stop_at in enumerate(stops):
        limit = _next_turn_audio(stop_at, events) if events else stop_at + LEAK_WINDOW_S
        if k + 1 < len(stops):
            limit = min(limit, stops[k + 1])
        windows.append((stop_at, limit))
    return windows


def leaked_audio_ms(
    stops: Sequence[float],
    received: Sequence[tuple[float, int]],
    events: Sequence[dict[str, Any]],
    sample_rate: int,
) -> float:
    """Agent audio received after a StopAudio (or clear) that still belonged to the turn it stopped."""
    windows = _leak_windows(stops, events)
    leaked = sum(n for stop_at, limit in windows for at, n in received if stop_at < at < limit)
    return _ms(leaked / sample_rate)


def media_after_clear(
    stops: Sequence[float], received: Sequence[tuple[float, int]], events: Sequence[dict[str, Any]]
) -> int:
    """Agent media messages received after a clear (ACS: StopAudio) that belonged to the turn it cut."""
    windows = _leak_windows(stops, events)
    return sum(1 for stop_at, limit in windows for at, _ in received if stop_at < at < limit)


def voice_to_voice_ms(speech_end: float | None, received: Sequence[tuple[float, int]]) -> float | None:
    """Caller's speech end -> the first agent audio received after it that starts a reply.

    Audio still streaming from before the speech end (a notice the caller talked over) is not a
    reply: the reply is the first audio after the speech end that follows a pause of more than
    REPLY_GAP_S in the agent's audio (or no earlier audio at all)."""
    if speech_end is None:
        return None
    previous: float | None = None
    for at, _ in received:
        if at > speech_end and (previous is None or at - previous > REPLY_GAP_S):
            return _ms(at - speech_end)
        previous = at
    return None
