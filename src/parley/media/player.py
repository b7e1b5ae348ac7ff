"""Paced playout: 20 ms AudioData frames sent on a real-time clock with a small lead.

Pacing at real time (instead of pushing a whole reply at once) is what makes StopAudio cheap (ACS
has at most `lead` of audio queued to flush) and lets us know what the caller actually heard.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from parley.audio import Framer
from parley.media.writer import OutboundWriter
from parley.transports.acs import FRAME_MS, audio_data_message

_FRAME_S = FRAME_MS / 1000


@dataclass
class Segment:
    """A piece of reply text and where its audio sits in the track (ms from track start)."""

    text: str
    start_ms: float
    end_ms: float


@dataclass
class Track:
    """One turn's outbound audio and its playout clock."""

    turn_id: int
    framer: Framer
    start_t: float | None = None  # when the first frame plays at the caller (playout clock origin)
    frames: int = 0
    pushed_ms: float = 0.0  # audio handed to the player so far, sent or not
    segments: list[Segment] = field(default_factory=list)

    @property
    def sent_ms(self) -> float:
        return self.frames * FRAME_MS

    @property
    def end_t(self) -> float | None:
        return None if self.start_t is None else self.start_t + self.frames * _FRAME_S

    def heard_ms(self, now: float) -> float:
        if self.start_t is None:
            return 0.0
        return max(0.0, min(self.sent_ms, (now - self.start_t) * 1000))

    def heard_text(self, now: float) -> str:
        """The reply text the caller has heard so far (cut at a word inside the current segment)."""
        heard = self.heard_ms(now)
        parts = []
        for segment in self.segments:
            if segment.end_ms <= heard:
                parts.append(segment.text)
            elif segment.start_ms < heard:
                share = (heard - segment.start_ms) / max(1.0, segment.end_ms - segment.start_ms)
                parts.append(_prefix_words(segment.text, share))
        return " ".join(part for part in parts if part)


def _prefix_words(text: str, share: float) -> str:
    words = text.split()
    return " ".join(words[: int(len(words) * share + 1e-6)])  # epsilon: 0.5 s may be 0.4999...


class Player:
    """Sends a call's agent audio. Turns play one after another on one playout clock."""

    def __init__(self, writer: OutboundWriter, frame_bytes: int, lead_ms: int) -> None:
        self._writer = writer
        self._frame_bytes = frame_bytes
        self._lead_s = lead_ms / 1000
        self._playout_end_t = 0.0  # when the last frame sent (any turn) finishes playing
        self.current: Track | None = None

    def begin(self, turn_id: int) -> Track:
        self.current = Track(turn_id, Framer(self._frame_bytes))
        return self.current

    def track_of(self, turn_id: int) -> Track | None:
        """The track of `turn_id` if it is the one playing (a turn cancelled while thinking has none)."""
        return self.current if self.current is not None and self.current.turn_id == turn_id else None

    async def play(self, track: Track, pcm: bytes, text: str | None = None) -> None:
        """Queue `pcm` (any length) for playout, sending whole frames as the clock allows."""
        if text:
            track.segments.append(Segment(text, track.pushed_ms, track.pushed_ms))
        track.pushed_ms += len(pcm) / self._frame_bytes * FRAME_MS
        if track.segments:
            track.segments[-1].end_ms = track.pushed_ms
        await self._send_frames(track, track.framer.push(pcm))

    async def finish(self, track: Track) -> None:
        """Send the padded tail frame and wait until the caller has heard everything."""
        await self._send_frames(track, track.framer.flush())
        if track.end_t is not None:
            await _sleep_until(track.end_t)

    async def _send_frames(self, track: Track, frames: list[bytes]) -> None:
        for frame in frames:
            now = time.monotonic()
            if track.start_t is None:
                # Queue behind audio still playing from an earlier turn, else start now.
                track.start_t = max(now, self._playout_end_t)
            due = track.start_t + track.frames * _FRAME_S - self._lead_s
            if due > now:
                await _sleep_until(due)
            self._writer.send_audio(track.turn_id, audio_data_message(frame))
            track.frames += 1
            self._playout_end_t = max(self._playout_end_t, track.end_t or 0.0)

    def cut(self, now: float | None = None) -> None:
        """StopAudio was sent: the caller's queue is flushed, nothing is playing any more."""
        self._playout_end_t = time.monotonic() if now is None else now


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
