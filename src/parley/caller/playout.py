"""ACS playout emulation: the caller's view of what the agent's audio sounded like.

ACS queues the audio an app sends and plays it in real time, flushing the queue on StopAudio;
`PlayoutEmulator` models that with a virtual playout clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Final

import numpy as np

STRETCH_GAP_S: Final = 0.060
"""A pause in agent playout longer than this starts a new stretch (a few lost frames do not)."""


@dataclass(frozen=True, slots=True)
class Stretch:
    """A span of continuous agent playout, in monotonic seconds; `cut` says whether a StopAudio
    ended it (rather than the agent's audio simply running out)."""

    start: float
    end: float
    cut: bool = False


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    cut: bool = False


class PlayoutEmulator:
    """ACS's outbound queue on a virtual playout clock.

    Positions are whole samples since call start (`t0`), so consecutive chunks join without
    rounding gaps and the `out` WAV can be rendered sample-exactly. A chunk received at r plays
    from max(r, end of the queue); StopAudio at s drops chunks not yet started and cuts the one
    playing at s.
    """

    def __init__(self, t0: float, sample_rate: int) -> None:
        self.t0 = t0
        self.rate = sample_rate
        self._gap = round(STRETCH_GAP_S * sample_rate)
        self._segments: list[tuple[int, bytes]] = []  # (start sample, pcm)
        self._stretches: list[_Span] = []
        self._end = 0  # where the queue runs dry
        self.stop_times: list[float] = []  # when each StopAudio arrived

    def _pos(self, t: float) -> int:
        return max(0, round((t - self.t0) * self.rate))

    def _time(self, pos: int) -> float:
        return self.t0 + pos / self.rate

    def receive(self, at: float, pcm: bytes) -> None:
        """Queue agent audio that arrived at `at`."""
        if not pcm:
            return
        start = max(self._pos(at), self._end)
        end = start + len(pcm) // 2
        self._segments.append((start, pcm))
        if self._stretches and start - self._stretches[-1].end <= self._gap:
            self._stretches[-1].end = end
            self._stretches[-1].cut = False  # audio resumed within the gap: one stretch
        else:
            self._stretches.append(_Span(start, end))
        self._end = end

    def stop(self, at: float) -> float:
        """StopAudio at `at`: flush the queue. Returns the seconds of audio that were flushed."""
        self.stop_times.append(at)
        return self._truncate(self._pos(at), by_stop=True) / self.rate

    def finish(self, at: float) -> None:
        """The call ended at `at`: whatever was still queued is never heard."""
        self._truncate(self._pos(at), by_stop=False)

    def _truncate(self, cut: int, *, by_stop: bool) -> int:
        """Drop queued audio from sample `cut` on; returns the number of samples dropped."""
        dropped = 0
        while self._segments and self._segments[-1][0] >= cut:
            dropped += len(self._segments.pop()[1]) // 2
        if self._segments:
            start, pcm = self._segments[-1]
            keep = cut - start
            if start + len(pcm) // 2 > cut:
                dropped += len(pcm) // 2 - keep
                self._segments[-1] = (start, pcm[: 2 * keep])
        while self._stretches and self._stretches[-1].start >= cut:
            self._stretches.pop()
        if self._stretches and self._stretches[-1].end > cut:
            self._stretches[-1].end = cut
            self._stretches[-1].cut = by_stop
        self._end = min(self._end, cut)
        return dropped

    # -- queries the sender makes on its 20 ms ticks ---------------------------------------

    def has_played(self, now: float) -> bool:
        """Whether any agent audio has started playing by `now`."""
        return bool(self._segments) and self._time(self._segments[0][0]) <= now

    @property
    def playout_end(self) -> float | None:
        """When the queued agent audio runs out (may be in the future), or None if none came."""
        return self._time(self._end) if self._segments else None

    def started_since(self, t: float) -> bool:
        """Whether some agent audio plays (or is queued to play) from `t` on."""
        return bool(self._segments) and self._time(self._segments[-1][0]) >= t

    def first_start_since(self, t: float) -> float | None:
        """When the first agent audio that plays from `t` on starts playing."""
        for start, _pcm in self._segments:
            start_t = self._time(start)
            if start_t >= t:
                return start_t
        return None

    def played_between(self, start: float, end: float) -> np.ndarray:
        """The agent audio that played from `start` to `end` (zeros where nothing did), int16."""
        return self.played_samples(round((start - self.t0) * self.rate), round((end - self.t0) * self.rate))

    def played_samples(self, first: int, last: int) -> np.ndarray:
        """Samples [first, last) of the playout timeline (positions since `t0`; may be negative).

        Called every 20 ms for echo, so it touches only the segments overlapping the interval:
        segments are sorted and never overlap, so a bisect finds the last one starting before
        `last` and the scan stops at the first one ending by `first`.
        """
        out = np.zeros(max(0, last - first), dtype=np.int16)
        index = bisect.bisect_left(self._segments, last, key=lambda segment: segment[0])
        while index > 0:
            index -= 1
            start, pcm = self._segments[index]
            end = start + len(pcm) // 2
            if end <= first:
                break
            lo, hi = max(first, start), min(last, end)
            out[lo - first : hi - first] = np.frombuffer(pcm, dtype="<i2", count=hi - lo, offset=2 * (lo - start))
        return out

    def stretch_at(self, now: float) -> Stretch | None:
        """The latest stretch that has started by `now` (possibly already over)."""
        pos = self._pos(now)
        for span in reversed(self._stretches):
            if span.start <= pos:
                return self._stretch(span)
        return None

    def _stretch(self, span: _Span) -> Stretch:
        return Stretch(self._time(span.start), self._time(span.end), span.cut)

    # -- results ---------------------------------------------------------------------------

    @property
    def stretches(self) -> list[Stretch]:
        return [self._stretch(span) for span in self._stretches]

    @property
    def played_s(self) -> float:
        return sum(len(pcm) // 2 for _, pcm in self._segments) / self.rate

    def render(self, until: float) -> np.ndarray:
        """What the caller heard from call start to `until`, as int16 mono."""
        heard = np.zeros(self._pos(until), dtype=np.int16)
        for start, pcm in self._segments:
            chunk = np.frombuffer(pcm, dtype="<i2")[: max(0, heard.size - start)]
            heard[start : start + chunk.size] = chunk
        return heard
