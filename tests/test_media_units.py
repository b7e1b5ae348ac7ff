"""Unit tests of the media pieces that need no socket: bridge, inbox, policy, player, writer."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from parley.media.bargein import ActiveTurn, BargeInPolicy, Signal
from parley.media.bridge import Final, Partial, SpeechStarted, ThreadBridge
from parley.media.events import EventLog
from parley.media.player import Player
from parley.media.turns import Pending, TurnInbox
from parley.media.writer import OutboundWriter
from parley.protocols import UserInput


class RecordingSink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, object, str]] = []

    def on_speech_started(self, event: SpeechStarted) -> None:
        self.seen.append(("speech", event, threading.current_thread().name))

    def on_partial(self, event: Partial) -> None:
        self.seen.append(("partial", event, threading.current_thread().name))

    def on_final(self, event: Final) -> None:
        self.seen.append(("final", event, threading.current_thread().name))

    def on_recognition_failed(self, message: str) -> None:
        self.seen.append(("failed", message, threading.current_thread().name))


async def test_bridge_delivers_on_the_loop_in_order_and_coalesces_partials() -> None:
    sink = RecordingSink()
    bridge = ThreadBridge(asyncio.get_running_loop(), sink)
    loop_thread = threading.current_thread().name

    def produce() -> None:
        bridge.schedule_barge_in(SpeechStarted(1, 0.0, 0.0))
        for i in range(50):
            bridge.queue_partial(Partial(1, f"p{i}", 0.0))
        bridge.queue_speech_result(Final(1, "done", 0.0, 0.0))
        bridge.queue_partial(Partial(2, "next", 0.0))

    thread = threading.Thread(target=produce, name="recognition-test")
    thread.start()
    thread.join()
    await asyncio.sleep(0.05)
    kinds = [kind for kind, _, _ in sink.seen]
    assert kinds[0] == "speech" and "final" in kinds
    assert all(name == loop_thread for _, _, name in sink.seen)
    # No partial of utterance 1 after its final; utterance 2's partial comes after it.
    final_at = kinds.index("final")
    assert all(event.utterance_id == 2 for kind, event, _ in sink.seen[final_at + 1 :])
    assert kinds.count("partial") < 50  # coalesced under burst


async def test_bridge_after_close_drops_everything() -> None:
    sink = RecordingSink()
    bridge = ThreadBridge(asyncio.get_running_loop(), sink)
    bridge.close()
    bridge.queue_speech_result(Final(1, "x", 0.0, 0.0))
    await asyncio.sleep(0.01)
    assert sink.seen == []


async def test_inbox_holds_while_caller_speaks_and_merges_speech() -> None:
    inbox = TurnInbox(capacity=2)
    inbox.hold()
    inbox.put(Pending("speech", UserInput("speech", text="one"), 1))
    inbox.put(Pending("speech", UserInput("speech", text="two"), 2))
    inbox.put(Pending("speech", UserInput("speech", text="three"), 3))  # over capacity: merged
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    inbox.release()
    item = await asyncio.wait_for(getter, 1)
    assert item.user.text == "one two three" and item.utterance_id == 3


async def test_inbox_never_merges_dtmf() -> None:
    inbox = TurnInbox(capacity=1)
    inbox.put(Pending("dtmf", UserInput("dtmf", digits="1"), 0))
    inbox.put(Pending("dtmf", UserInput("dtmf", digits="2"), 0))
    assert (await inbox.get()).user.digits == "1"
    assert (await inbox.get()).user.digits == "2"


@pytest.mark.parametrize(
    ("signal", "turn", "interrupt", "reason"),
    [
        (Signal("vad", 2), None, False, "agent_idle"),
        (Signal("vad", 2), ActiveTurn(1, False, 1), False, "not_interruptible"),
        (Signal("vad", 1), ActiveTurn(1, True, 1), False, "same_utterance"),
        (Signal("partial", 1, "trailing words"), ActiveTurn(1, True, 1), False, "same_utterance"),
        (Signal("partial", 2, "uh"), ActiveTurn(1, True, 1), False, "partial_too_short"),
        (Signal("partial", 2, "wait a moment"), ActiveTurn(1, True, 1), True, "partial"),
        (Signal("vad", 2), ActiveTurn(1, True, 1), True, "vad"),
        (Signal("dtmf"), ActiveTurn(1, True, 1), True, "dtmf"),
    ],
)
def test_barge_in_policy(signal: Signal, turn: ActiveTurn | None, interrupt: bool, reason: str) -> None:
    decision = BargeInPolicy(partial_min_chars=4).decide(signal, turn)
    assert (decision.interrupt, decision.reason) == (interrupt, reason)


def test_policy_can_disable_partial_and_dtmf_triggers() -> None:
    policy = BargeInPolicy(partial_min_chars=0, on_dtmf=False)
    assert not policy.decide(Signal("partial", 2, "a long partial"), ActiveTurn(1, True, 1)).interrupt
    assert not policy.decide(Signal("dtmf"), ActiveTurn(1, True, 1)).interrupt


class Socket:
    def __init__(self) -> None:
        self.sent: list[tuple[float, dict]] = []

    async def send_text(self, text: str) -> None:
        self.sent.append((time.monotonic(), json.loads(text)))


async def test_player_paces_frames_with_lead_and_tracks_what_was_heard() -> None:
    socket = Socket()
    writer = OutboundWriter(socket.send_text, EventLog("t", to_log=False))
    writer_task = asyncio.create_task(writer.run())
    player = Player(writer, frame_bytes=640, lead_ms=100)
    track = player.begin(1)
    start = time.monotonic()
    await player.play(track, bytes(640 * 10), text="hello there")  # 200 ms
    await player.play(track, bytes(640 * 10 + 100), text="general kenobi")  # partial tail frame
    await player.finish(track)
    elapsed = time.monotonic() - start
    await asyncio.sleep(0.01)
    writer_task.cancel()
    assert len(socket.sent) == 21  # the 100-byte tail is padded to a whole frame, not dropped
    assert all(len(message["AudioData"]["Data"]) == 856 for _, message in socket.sent)  # 640 B base64
    assert 0.40 <= elapsed <= 0.55  # finish waits for the playout clock (420 ms)
    # With a 100 ms lead, frame k is sent no earlier than (k*20 - 100) ms after the start.
    for k, (sent_t, _) in enumerate(socket.sent):
        assert sent_t - socket.sent[0][0] >= (k * 0.020 - 0.100) - 0.002
    assert track.heard_text(track.start_t + 0.1) == "hello"
    assert track.heard_text(track.end_t) == "hello there general kenobi"


async def test_writer_drops_cancelled_turn_audio_and_sends_stop_first() -> None:
    socket = Socket()
    events = EventLog("t", to_log=False)
    writer = OutboundWriter(socket.send_text, events)
    writer.send_audio(1, '{"Kind":"AudioData","AudioData":{"Data":"AAA="},"StopAudio":null}')
    writer.send_audio(1, '{"Kind":"AudioData","AudioData":{"Data":"AAA="},"StopAudio":null}')
    writer.stop_audio(1)
    writer.send_audio(1, '{"Kind":"AudioData","AudioData":{"Data":"AAA="},"StopAudio":null}')
    writer.send_audio(2, '{"Kind":"AudioData","AudioData":{"Data":"AAA="},"StopAudio":null}')
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.01)
    task.cancel()
    kinds = [message["Kind"] for _, message in socket.sent]
    assert kinds == ["StopAudio", "AudioData"]  # turn 1's frames dropped, turn 2's sent
    assert writer.frames_dropped == 3
    assert [e["event"] for e in events.snapshot()] == ["stop_audio_sent", "first_audio_sent"]
