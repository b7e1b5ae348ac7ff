"""Playout marks: what the caller heard follows the far end's echoed marks (Twilio's `mark`)."""

from __future__ import annotations

import asyncio
import time

from parley.audio import Framer
from parley.media.events import EventLog
from parley.media.player import MARK_EVERY, Player, Segment, Track
from parley.media.writer import OutboundWriter


def _track(sent_frames: int = 50) -> Track:
    """A track whose `sent_frames` frames started playing at t=0, with a clause per 200 ms."""
    track = Track(1, Framer(640))
    track.frames = [bytes(640)] * sent_frames
    track.next_frame = sent_frames
    track.start_t = 0.0
    words = ["one two", "three four", "five six", "seven eight", "nine ten"]
    track.segments = [Segment(text, i * 200.0, (i + 1) * 200.0) for i, text in enumerate(words)]
    return track


def test_without_marks_the_clock_says_what_was_heard() -> None:
    track = _track()
    assert track.heard_ms(0.5) == 500.0
    assert track.heard_text(0.5) == "one two three four five"


def test_a_late_far_end_has_been_heard_less() -> None:
    track = _track()
    # The far end confirmed 200 ms of audio at t=0.45 s: at t=0.55 it is at 300 ms, not 550.
    assert track.confirm(track.epoch, 10, 0.45)
    assert track.heard_ms(0.55) == 300.0
    assert track.heard_text(0.55) == "one two three"
    # The clock still caps it: the far end cannot be ahead of real time since the start.
    assert track.confirm(track.epoch, 40, 0.5)
    assert track.heard_ms(0.5) == 500.0


def test_past_its_last_mark_a_far_end_that_stalls_is_not_assumed_to_play_on() -> None:
    track = _track()
    assert track.confirm(track.epoch, 10, 0.2)
    assert track.heard_ms(5.0) == 200.0 + track.confirm_slack_s * 1000


def test_stale_marks_say_nothing() -> None:
    track = _track()
    assert track.confirm(0, 20, 0.4)
    assert not track.confirm(0, 10, 0.45)  # behind what is known
    assert not track.confirm(0, 60, 0.45)  # beyond what was sent
    assert not track.confirm(7, 25, 0.45)  # another epoch (from before a cut)
    track.paused_at_ms = 300.0
    assert not track.confirm(0, 25, 0.45)  # paused: the far end echoes what it flushed


async def test_the_player_marks_every_n_frames_and_after_the_tail() -> None:
    sent: list[str] = []

    async def send(message: object) -> None:
        sent.append(str(message))

    writer = OutboundWriter(send, EventLog("t", to_log=False))
    writer_task = asyncio.create_task(writer.run())
    player = Player(writer, 640, lead_ms=400, encode=lambda _pcm: "A", mark=lambda name: f"M {name}")
    track = player.begin(4)
    await player.play(track, bytes(640 * 25))
    await player.finish(track)
    await asyncio.sleep(0.01)
    writer_task.cancel()
    marks = [message for message in sent if message.startswith("M")]
    assert marks == ["M 4:0:10", "M 4:0:20", "M 4:0:25"]
    assert sent.index("M 4:0:10") == MARK_EVERY  # after its frames, in order
    assert writer.frames_sent == 25  # marks are not audio


async def test_cancelled_turns_send_no_marks_and_a_cut_makes_earlier_marks_stale() -> None:
    sent: list[str] = []

    async def send(message: object) -> None:
        sent.append(str(message))

    writer = OutboundWriter(send, EventLog("t", to_log=False), stop_message=lambda: "CLEAR")
    player = Player(writer, 640, lead_ms=400, encode=lambda _pcm: "A", mark=lambda name: f"M {name}")
    track = player.begin(2)
    playing = asyncio.create_task(player.play(track, bytes(640 * 15)))
    await asyncio.sleep(0.05)
    writer.stop_audio(2)
    player.cut(time.monotonic())
    playing.cancel()
    writer_task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.01)
    writer_task.cancel()
    assert sent == ["CLEAR"]  # the stop message made when needed; nothing of turn 2 after it
    assert not player.played("2:0:10", time.monotonic())  # the flushed far end's echo: stale
    assert not player.played("not a mark", time.monotonic())
    assert not player.played("9:1:10", time.monotonic())  # another turn


async def test_a_far_end_playing_at_half_speed_has_heard_about_half() -> None:
    """The far end plays each 20 ms frame in 40 ms and echoes marks when it reaches them."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def send(message: object) -> None:
        queue.put_nowait(str(message))

    writer = OutboundWriter(send, EventLog("t", to_log=False))
    writer_task = asyncio.create_task(writer.run())
    player = Player(writer, 640, lead_ms=2000, encode=lambda _pcm: "A", mark=lambda name: name)
    track = player.begin(1)

    async def far_end() -> None:
        while True:
            message = await queue.get()
            if message == "A":
                await asyncio.sleep(0.04)
            else:
                player.played(message, time.monotonic())

    playing = asyncio.create_task(far_end())
    words = " ".join(f"w{i}" for i in range(50))
    await player.play(track, bytes(640 * 50), text=words)  # 1 s, sent at once (2 s lead)
    await asyncio.sleep(0.8)
    now = time.monotonic()
    clock_ms = (now - track.start_t) * 1000 if track.start_t else 0.0
    heard = track.heard_ms(now)
    playing.cancel()
    writer_task.cancel()
    assert clock_ms >= 780
    assert 250 <= heard <= 0.75 * clock_ms  # ~400 ms played of the ~800 the clock would say
    assert len(track.heard_text(now).split()) < 0.8 * len(words.split()) * clock_ms / 1000
