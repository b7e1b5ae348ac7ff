"""Paced playout: 20 ms AudioData frames sent on a real-time clock with a small lead.

Pacing at real time (instead of pushing a whole reply at once) is what makes StopAudio cheap (ACS
has at most `lead` of audio queued to flush) and lets us know what the caller actually heard.

A reply can be paused (a possible barge-in: StopAudio, nothing more is sent) and later resumed
(it was a cough or an "uh-huh"): the track keeps its frames, and playout restarts at the start of
the clause the caller was hearing, so they hear whole words again rather than a word cut in two.
A pause on a speech onset alone (a click; at most a few hundred ms) resumes where it stopped instead.

Where the far end reports what it has played (Twilio echoes named marks), the player sends a mark
every `mark_every` frames and what the caller heard follows the far end's confirmed position, not
only our clock: a far end that plays late, or slower than real time, has been heard less.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from parley.audio import Framer, dbfs
from parley.media.echo import EchoReference
from parley.media.writer import OutboundWriter
from parley.transports.acs import FRAME_MS, audio_data_message
from parley.transports.wire import Outbound

_FRAME_S = FRAME_MS / 1000
MARK_EVERY = 10  # frames (200 ms) between two playout marks, on wires that mark playout


@dataclass
class Segment:
    """A piece of reply text (a clause) and where its audio sits in the track (ms from its start)."""

    text: str
    start_ms: float
    end_ms: float
    interruptible: bool = True


@dataclass
class Track:
    """One turn's outbound audio and its playout clock."""

    turn_id: int
    framer: Framer
    frames: list[bytes] = field(default_factory=list)  # every frame so far: a pause may rewind
    next_frame: int = 0  # the next frame to send
    origin_frame: int = 0  # the frame that plays at `start_t` (not 0 after a resume)
    start_t: float | None = None  # when `origin_frame` plays at the caller
    frames_sent: int = 0  # including frames sent again after a resume
    pushed_ms: float = 0.0  # audio handed to the player so far, sent or not
    segments: list[Segment] = field(default_factory=list)
    paused_at_ms: float | None = None  # where the caller stopped hearing it, while paused
    furthest_ms: float = 0.0  # the furthest the caller ever heard (a resume replays from before it)
    # Marks (wires that mark playout): the far end's confirmed position (a frame index: everything
    # before it has played) and when that was learnt. `epoch` changes at each cut (a pause, a stop):
    # a flushed far end echoes its pending marks at once, and those say nothing about playout.
    epoch: int = 0
    confirmed_frame: int | None = None
    confirmed_t: float | None = None
    marked_frame: tuple[int, int] | None = None  # (epoch, frame) of the last mark sent
    confirm_slack_s: float = 2 * MARK_EVERY * _FRAME_S  # how far past its last mark the far end may be
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # pause/resume wake the pump
    waiter: asyncio.Future[bool] | None = None  # the pump's timed wait for a change (see _wait_changed)

    def notify_changed(self) -> None:
        """Paused or resumed: wake the pump, whether it waits for a change or for its next frame."""
        self.changed.set()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(True)

    @property
    def paused(self) -> bool:
        return self.paused_at_ms is not None

    @property
    def sent_ms(self) -> float:
        return self.frames_sent * FRAME_MS

    @property
    def end_t(self) -> float | None:
        """When the last frame sent so far finishes playing."""
        if self.start_t is None:
            return None
        return self.start_t + (self.next_frame - self.origin_frame) * _FRAME_S

    def heard_ms(self, now: float) -> float:
        """How far into the reply the caller has heard (its position, in ms of reply audio)."""
        if self.paused_at_ms is not None:
            return self.paused_at_ms
        if self.start_t is None:
            return self.origin_frame * FRAME_MS
        played = min(self.next_frame - self.origin_frame, max(0.0, (now - self.start_t) / _FRAME_S))
        clock_ms = (self.origin_frame + played) * FRAME_MS
        if self.confirmed_frame is None or self.confirmed_t is None:
            return clock_ms
        # The far end has played up to its last mark, and at best in real time since (bounded: a far
        # end that stalled sends no more marks).
        since_s = min(max(0.0, now - self.confirmed_t), self.confirm_slack_s)
        return min(clock_ms, self.confirmed_frame * FRAME_MS + since_s * 1000)

    def mark_name(self) -> str:
        """The mark after the frames sent so far: turn, epoch, frame index."""
        return f"{self.turn_id}:{self.epoch}:{self.next_frame}"

    def confirm(self, epoch: int, frame: int, now: float) -> bool:
        """The far end has played every frame before `frame` (a mark came back). False if the mark
        is stale (from before a cut, or not beyond what is known)."""
        if epoch != self.epoch or self.paused or frame > self.next_frame:
            return False
        if self.confirmed_frame is not None and frame <= self.confirmed_frame:
            return False
        self.confirmed_frame, self.confirmed_t = frame, now
        return True

    def heard_text(self, now: float) -> str:
        """The reply text the caller has heard so far (cut at a word inside the current segment),
        including what they heard before a pause that a resume then replayed from an earlier point."""
        heard = max(self.heard_ms(now), self.furthest_ms)
        parts = []
        for segment in self.segments:
            if segment.end_ms <= heard:
                parts.append(segment.text)
            elif segment.start_ms < heard:
                share = (heard - segment.start_ms) / max(1.0, segment.end_ms - segment.start_ms)
                parts.append(_prefix_words(segment.text, share))
        return " ".join(part for part in parts if part)

    def played_text(self, now: float) -> str:
        """The text of every clause that has started playing, whole (what an echo may repeat)."""
        heard = self.heard_ms(now)
        return " ".join(segment.text for segment in self.segments if segment.start_ms <= heard)

    def segment_at(self, now: float) -> Segment | None:
        """The clause the caller is hearing (or was, when paused)."""
        heard = self.heard_ms(now)
        return next((s for s in self.segments if s.start_ms <= heard < s.end_ms), None)


def _prefix_words(text: str, share: float) -> str:
    words = text.split()
    return " ".join(words[: int(len(words) * share + 1e-6)])  # epsilon: 0.5 s may be 0.4999...


class Player:
    """Sends a call's agent audio. Turns play one after another on one playout clock."""

    def __init__(
        self,
        writer: OutboundWriter,
        frame_bytes: int,
        lead_ms: int,
        echo_reference: EchoReference | None = None,
        encode: Callable[[bytes], Outbound] = audio_data_message,
        mark: Callable[[str], Outbound] | None = None,
        mark_every: int = MARK_EVERY,
    ) -> None:
        self._writer = writer
        self._encode = encode  # the wire's frame message
        self._mark = mark  # the wire's playout mark, if its far end echoes marks
        self._mark_every = mark_every
        self._frame_bytes = frame_bytes
        self._lead_s = lead_ms / 1000
        self._echo_reference = echo_reference
        self._playout_end_t = 0.0  # when the last frame sent (any turn) finishes playing
        self.current: Track | None = None

    def begin(self, turn_id: int) -> Track:
        self.current = Track(turn_id, Framer(self._frame_bytes))
        return self.current

    def track_of(self, turn_id: int) -> Track | None:
        """The track of `turn_id` if it is the one playing (a turn cancelled while thinking has none)."""
        return self.current if self.current is not None and self.current.turn_id == turn_id else None

    async def play(self, track: Track, pcm: bytes, text: str | None = None, interruptible: bool = True) -> None:
        """Queue `pcm` (any length) for playout, sending whole frames as the clock allows."""
        if text:
            track.segments.append(Segment(text, track.pushed_ms, track.pushed_ms, interruptible))
        track.pushed_ms += len(pcm) / self._frame_bytes * FRAME_MS
        if track.segments:
            track.segments[-1].end_ms = track.pushed_ms
        track.frames.extend(track.framer.push(pcm))
        await self._pump(track)

    def played(self, name: str, now: float) -> bool:
        """A mark came back: the far end has played up to it. False for a mark that tells nothing
        (another turn's, from before a cut, or not one of ours)."""
        track = self.current
        try:
            turn_id, epoch, frame = (int(part) for part in name.split(":"))
        except ValueError:
            return False
        if track is None or track.turn_id != turn_id:
            return False
        return track.confirm(epoch, frame, now)

    async def finish(self, track: Track) -> None:
        """Send the padded tail frame and wait until the caller has heard everything."""
        track.frames.extend(track.framer.flush())
        while True:
            await self._pump(track)
            if not track.paused:
                self._send_mark(track)  # after the tail: when it comes back, all was heard
            end = track.end_t
            if end is None or time.monotonic() >= end:
                return
            track.changed.clear()
            if not await _wait_changed(track, end - time.monotonic()) and not track.paused:
                return  # (a pause during the last frames must not let the turn complete)

    async def _pump(self, track: Track) -> None:
        """Send the frames due, on the playout clock; while paused, wait for resume (or cancel)."""
        while track.next_frame < len(track.frames) or track.paused:
            if track.paused:
                track.changed.clear()
                await track.changed.wait()
                continue
            now = time.monotonic()
            if track.start_t is None:
                # Queue behind audio still playing from an earlier turn, else start now.
                track.start_t = max(now, self._playout_end_t)
            play_t = track.start_t + (track.next_frame - track.origin_frame) * _FRAME_S
            if play_t < now:
                # Late (the loop stalled longer than the lead): the far end ran dry and plays this
                # frame when it arrives. Follow its clock, so what we think was heard (history,
                # resume point, echo reference) is what it can have played, not what we sent.
                track.start_t += now - play_t
                play_t = now
            elif play_t - self._lead_s > now:
                track.changed.clear()
                await _wait_changed(track, play_t - self._lead_s - now)  # until due, or paused meanwhile
                continue
            frame = track.frames[track.next_frame]
            self._writer.send_audio(track.turn_id, self._encode(frame))
            if self._echo_reference is not None:
                self._echo_reference.add(play_t, dbfs(frame))
            track.next_frame += 1
            track.frames_sent += 1
            self._playout_end_t = max(self._playout_end_t, play_t + _FRAME_S)
            if track.next_frame % self._mark_every == 0:
                self._send_mark(track)

    def _send_mark(self, track: Track) -> None:
        if self._mark is None or track.marked_frame == (track.epoch, track.next_frame):
            return
        track.marked_frame = (track.epoch, track.next_frame)
        self._writer.send_mark(track.turn_id, self._mark(track.mark_name()))

    def pause(self, track: Track, now: float) -> float:
        """StopAudio was sent for `track`: stop sending, remember what was heard. Returns it (ms)."""
        heard = track.heard_ms(now)
        track.paused_at_ms = heard
        track.furthest_ms = max(track.furthest_ms, heard)
        self.cut(now)
        track.notify_changed()
        return heard

    def resume(self, track: Track, *, replay_clause: bool = True) -> float:
        """Play `track` again: from the start of the clause the caller was hearing, or (after a
        pause too short to lose the thread) exactly where it stopped. Returns that position (ms)."""
        if track.paused_at_ms is None:
            return track.heard_ms(time.monotonic())
        restart_ms = track.paused_at_ms
        if replay_clause:
            clause = track.segment_at(time.monotonic())  # paused: its position is frozen
            if clause is not None:
                restart_ms = clause.start_ms
        track.origin_frame = track.next_frame = min(len(track.frames), int(restart_ms // FRAME_MS))
        track.start_t = None
        track.paused_at_ms = None
        track.confirmed_frame = track.confirmed_t = None  # marks of the new epoch confirm from here
        track.notify_changed()
        return track.origin_frame * FRAME_MS

    def cut(self, now: float | None = None) -> None:
        """StopAudio was sent: the caller's queue is flushed, nothing is playing any more."""
        self._playout_end_t = time.monotonic() if now is None else now
        if self.current is not None:
            self.current.epoch += 1  # the marks the far end flushes say nothing about playout
        if self._echo_reference is not None:
            self._echo_reference.cut(self._playout_end_t)


async def _wait_changed(track: Track, seconds: float) -> bool:
    """Wait until the track changes (pause, resume) or `seconds` pass; True if it changed.

    The pump waits here before every frame, so it costs one future and one timer, no more: a timer
    that resolves the future, never a cancellation. `asyncio.timeout` (cancelling the task and
    turning that into a TimeoutError, twice an exception per frame) cost several times as much;
    `asyncio.wait_for` also swallowed a cancellation that arrived in the same loop iteration as
    the event it waited for (Python 3.11), which left a paused and cancelled turn waiting forever.
    Here a cancellation always reaches the task: the future is only ever resolved, and a task
    cancelled after that raises CancelledError at its next step.
    """
    if track.changed.is_set():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    timer = loop.call_later(seconds, _time_up, waiter)
    track.waiter = waiter
    try:
        return await waiter
    finally:
        timer.cancel()
        track.waiter = None


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
