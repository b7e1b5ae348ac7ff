"""Unit tests of the media pieces that need no socket: bridge, inbox, policy, player, writer."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from parley.media.bargein import ActiveTurn, BargeInPolicy, Signal, SpeechEvidence, is_answer, is_farewell, is_hum
from parley.media.bridge import Final, Partial, SpeechContinues, SpeechStarted, ThreadBridge
from parley.media.events import EventLog
from parley.media.player import Player, Segment, Track
from parley.media.turns import Pending, TurnInbox
from parley.media.writer import OutboundWriter
from parley.protocols import UserInput


class RecordingSink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, object, str]] = []

    def on_speech_started(self, event: SpeechStarted) -> None:
        self.seen.append(("speech", event, threading.current_thread().name))

    def on_speech_continues(self, event: SpeechContinues) -> None:
        self.seen.append(("continues", event, threading.current_thread().name))

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


SPEAKING = ActiveTurn(1, True, 1, state="speaking")
PENDING = ActiveTurn(1, True, 1, state="speaking", pending=True, recent_text="our hours are eleven to ten")
THINKING = ActiveTurn(1, True, 1, state="thinking")


@pytest.mark.parametrize(
    ("signal", "turn", "action", "reason"),
    [
        (Signal("vad", 2), None, "none", "agent_idle"),
        (Signal("vad", 2), ActiveTurn(1, False, 1), "none", "not_interruptible"),
        (Signal("dtmf"), ActiveTurn(1, False, 1), "none", "not_interruptible"),
        (Signal("vad", 1), SPEAKING, "none", "same_utterance"),
        (Signal("partial", 1, "trailing words"), SPEAKING, "none", "same_utterance"),
        # speaking, default 'pause' mode: pause at the VAD gate, then wait for proof
        (Signal("vad", 2), SPEAKING, "pause", "vad"),
        (Signal("vad", 3), PENDING, "none", "already_pending"),
        (Signal("partial", 2, "uh"), SPEAKING, "none", "backchannel"),
        (Signal("partial", 2, "ok"), SPEAKING, "none", "backchannel"),
        (Signal("partial", 2, "wait a moment"), PENDING, "none", "awaiting_final"),
        (Signal("continues", 2), PENDING, "cancel", "sustained_speech"),
        (Signal("final", 2, "Uh-huh."), PENDING, "resume", "backchannel"),
        (Signal("final", 2, "Mm-hmm, okay."), PENDING, "resume", "backchannel"),
        (Signal("final", 2, ""), PENDING, "resume", "no_words"),
        (Signal("final", 2, "eleven to ten"), PENDING, "resume", "echo"),
        (Signal("final", 2, "No, I want a large one."), PENDING, "cancel", "final"),
        (Signal("final", 2, "Okay, cancel that"), PENDING, "cancel", "final"),
        (Signal("final", 2, "I'm on."), PENDING, "resume", "no_content"),
        (Signal("final", 2, "F."), PENDING, "resume", "no_content"),
        (Signal("final", 2, "No."), PENDING, "cancel", "final"),
        (Signal("final", 2, "Wait."), PENDING, "cancel", "final"),
        (Signal("timeout"), PENDING, "resume", "no_words"),
        (Signal("timeout"), SPEAKING, "none", "not_pending"),
        (Signal("dtmf"), SPEAKING, "cancel", "dtmf"),
        # thinking: any real speech cancels the answer being prepared
        (Signal("vad", 2), THINKING, "cancel", "vad"),
        (Signal("partial", 2, "uh"), THINKING, "none", "partial_too_short"),
    ],
)
def test_barge_in_policy(signal: Signal, turn: ActiveTurn | None, action: str, reason: str) -> None:
    decision = BargeInPolicy(partial_min_chars=4).decide(signal, turn)
    assert (decision.action, decision.reason) == (action, reason)


# How Whisper tiny.en spelled listeners' hums and short answers in this repo's measurements
# (espeak-ng and Piper voices, two levels, two closing silences): a backchannel must not depend on
# one spelling, and a short real answer must never be taken for one.
HUM_SPELLINGS = [
    "Uh-huh.",
    "Uh-uh.",
    "FER.",
    "Uh.",
    "Fuh.",
    "F.",
    "Hmm.",
    "Mhm.",
    "Mm-mm",
    "mmm",
    "Mmm, Mm, Mm",
    "mamamamamamamam",
    "Huh?",
    "Er...",
    "I'm.",
    "I'm... I'm... I'm... I",
    "I'll...",
    "Hm-hm.",
    "Ahh.",
    "And I'm them",
    "I'm mom",
    "I'm not",
    "I'm um",
    "I'm on",
    "Ah",
]
SHORT_ANSWERS = ["Yes.", "No", "No.", "Stop", "Stop.", "2.", "Two.", "Wait.", "Wait", "Yes, please", "Nope.", "10."]


@pytest.mark.parametrize("text", HUM_SPELLINGS)
def test_a_hum_said_over_the_agent_is_not_a_request_however_it_is_spelled(text: str) -> None:
    decision = BargeInPolicy().decide(Signal("final", 2, text), PENDING)
    assert decision.action == "resume" and decision.said_over_agent, decision


@pytest.mark.parametrize("text", SHORT_ANSWERS)
def test_a_short_answer_said_over_the_agent_is_a_request(text: str) -> None:
    unsure = SpeechEvidence(voiced_ms=380, avg_logprob=-1.8, no_speech_prob=0.5)  # clipped, doubtful
    for evidence in (None, unsure):
        decision = BargeInPolicy().decide(Signal("final", 2, text, evidence), PENDING)
        assert decision.action == "cancel" and not decision.said_over_agent, (text, evidence)


def test_a_short_answer_is_a_request_even_when_the_agent_just_said_it() -> None:
    turn = ActiveTurn(1, True, 1, pending=True, recent_text="small, medium or large? Yes or no?")
    assert BargeInPolicy().decide(Signal("final", 2, "Yes."), turn).action == "cancel"


def test_hum_shaped_real_words_are_requests() -> None:
    for text in ("Ham.", "Farm.", "Form."):
        assert BargeInPolicy().decide(Signal("final", 2, text), PENDING).action == "cancel", text


def test_one_doubtful_short_word_is_unclear_but_a_confident_one_is_a_request() -> None:
    doubtful = SpeechEvidence(voiced_ms=300, avg_logprob=-1.5, no_speech_prob=0.55)
    confident = SpeechEvidence(voiced_ms=300, avg_logprob=-0.3, no_speech_prob=0.1)
    long_voiced = SpeechEvidence(voiced_ms=900, avg_logprob=-1.5, no_speech_prob=0.55)
    policy = BargeInPolicy()
    assert policy.decide(Signal("final", 2, "Number.", doubtful), PENDING).reason == "unclear"
    assert policy.decide(Signal("final", 2, "Number.", confident), PENDING).action == "cancel"
    assert policy.decide(Signal("final", 2, "Number.", long_voiced), PENDING).action == "cancel"
    assert policy.decide(Signal("final", 2, "Large pepperoni.", doubtful), PENDING).action == "cancel"
    assert policy.decide(Signal("final", 2, "Number.", None), PENDING).action == "cancel"


def test_echo_by_words_resumes_but_is_answered_and_needs_a_line_that_echoes() -> None:
    decision = BargeInPolicy().decide(Signal("final", 2, "eleven to ten"), PENDING)
    assert (decision.action, decision.reason) == ("resume", "echo") and not decision.said_over_agent
    no_echo_line = ActiveTurn(1, True, 1, pending=True, recent_text=PENDING.recent_text, line_echo=False)
    assert BargeInPolicy().decide(Signal("final", 2, "eleven to ten"), no_echo_line).action == "cancel"


def test_farewells() -> None:
    assert all(is_farewell(t) for t in ("Thanks, bye.", "No, that's all, thanks.", "Goodbye!", "bye bye"))
    assert not any(is_farewell(t) for t in ("What time do you close?", "I want a pizza", "", "wait"))


def test_hum_and_answer_token_rules() -> None:
    assert all(is_hum(token) for token in ("fuh", "fer", "uh", "hmm", "mhm", "mmm", "huh", "er", "mamama", "ahh"))
    assert not any(is_hum(token) for token in ("no", "two", "yes", "hi", "home", "more", "ham", "f", "stop"))
    assert all(is_answer(token) for token in ("yes", "no", "stop", "wait", "two", "10", "4th"))
    assert not any(is_answer(token) for token in ("yeah", "okay", "uh", "pizza"))


def test_policy_modes() -> None:
    assert BargeInPolicy(speaking="stop").decide(Signal("vad", 2), SPEAKING).action == "cancel"
    assert BargeInPolicy(speaking="confirm").decide(Signal("vad", 2), SPEAKING).action == "hold"
    confirm = BargeInPolicy(speaking="confirm")
    assert confirm.decide(Signal("partial", 2, "o que"), PENDING).action == "none"
    assert confirm.decide(Signal("partial", 2, "wait a moment"), PENDING).action == "cancel"
    assert BargeInPolicy(speaking="stop").decide(Signal("partial", 2, "wait"), SPEAKING).action == "cancel"
    assert BargeInPolicy(speaking="off").decide(Signal("continues", 2), SPEAKING).action == "none"
    assert BargeInPolicy(thinking="off").decide(Signal("vad", 2), THINKING).action == "none"
    custom = BargeInPolicy(backchannels=("go on",))
    assert custom.decide(Signal("final", 2, "Go on."), PENDING).reason == "backchannel"
    assert custom.decide(Signal("final", 2, "yeah"), PENDING).action == "cancel"


def test_policy_can_disable_partial_and_dtmf_triggers() -> None:
    policy = BargeInPolicy(partial_min_chars=0, on_dtmf=False, speaking="stop")
    assert not policy.decide(Signal("partial", 2, "a long partial"), PENDING).interrupt
    assert not policy.decide(Signal("dtmf"), SPEAKING).interrupt


class Socket:
    def __init__(self) -> None:
        self.sent: list[tuple[float, dict]] = []

    async def send_text(self, text: str) -> None:
        self.sent.append((time.monotonic(), json.loads(text)))


def start_player(lead_ms: int) -> tuple[Socket, OutboundWriter, asyncio.Task[None], Player, Track]:
    """A player writing through a running writer to a recording socket, with turn 1's track."""
    socket = Socket()
    writer = OutboundWriter(socket.send_text, EventLog("t", to_log=False))
    writer_task = asyncio.create_task(writer.run())
    player = Player(writer, frame_bytes=640, lead_ms=lead_ms)
    return socket, writer, writer_task, player, player.begin(1)


async def test_player_paces_frames_with_lead_and_tracks_what_was_heard() -> None:
    socket, _writer, writer_task, player, track = start_player(lead_ms=100)
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


async def test_player_pause_stops_sending_and_resume_restarts_the_clause() -> None:
    socket, writer, writer_task, player, track = start_player(lead_ms=40)

    async def speak() -> None:
        for text in ("one two", "three four", "five six"):
            await player.play(track, bytes(640 * 10), text=text)  # 200 ms each
        await player.finish(track)

    speaking = asyncio.create_task(speak())
    await asyncio.sleep(0.3)  # inside the second clause
    writer.pause_audio(1)
    heard = player.pause(track, time.monotonic())
    assert 260 <= heard <= 360 and track.paused
    await asyncio.sleep(0.02)
    sent_at_pause = len(socket.sent)
    await asyncio.sleep(0.2)
    assert len(socket.sent) == sent_at_pause  # nothing while paused
    assert not speaking.done()  # a paused reply does not complete
    assert [m["Kind"] for _, m in socket.sent].count("StopAudio") == 1
    assert player.resume(track) == 200.0  # the start of "three four"
    await asyncio.wait_for(speaking, 2)
    audio_after_stop = [m for _, m in socket.sent[sent_at_pause:] if m["Kind"] == "AudioData"]
    assert len(audio_after_stop) == 20  # 400 ms: clauses two and three, from the start of two
    assert track.heard_text(time.monotonic()) == "one two three four five six"
    writer_task.cancel()


@pytest.mark.parametrize("stage", ["play", "finish"])
async def test_a_turn_paused_then_cancelled_in_one_loop_iteration_still_ends(stage: str) -> None:
    """Regression: asyncio.wait_for (Python 3.11) swallowed a cancellation arriving in the same loop
    iteration as the pause that woke it; the turn then waited for a resume forever, and with it
    the call's route loop (a pause at the VAD gate and a barge-in confirmed right after it)."""
    _socket, _writer, writer_task, player, track = start_player(lead_ms=40)

    async def speak() -> None:
        await player.play(track, bytes(640 * 100))  # 2 s
        await player.finish(track)

    task = asyncio.create_task(speak())
    await asyncio.sleep(0.1 if stage == "play" else 0.0)
    if stage == "finish":
        await asyncio.sleep(0)
    player.pause(track, time.monotonic())  # sets the event the player waits on ...
    task.cancel()  # ... and the barge-in cancels the turn before the player runs again
    done, _ = await asyncio.wait([task], timeout=1.0)
    writer_task.cancel()
    assert done and task.cancelled()


def far_end_position_ms(sent: list[tuple[float, dict]], now: float) -> float:
    """What a real far end has played by `now`: each frame plays on arrival or right after the one
    before it, whichever is later (a jitter buffer that runs dry waits for the next frame)."""
    end = 0.0
    played = 0.0
    for arrived, message in sent:
        if message.get("Kind") != "AudioData":
            continue
        start = max(arrived, end)
        end = start + 0.02
        if start < now:
            played += min(0.02, now - start)
    return played * 1000


async def test_after_a_loop_stall_the_player_tracks_what_the_far_end_played() -> None:
    """Defect: after a stall longer than the playout lead, 'heard' ran ahead of the far end
    (+200 ms after a 300 ms stall), so heard text, finish() and the echo reference were wrong."""
    socket, _writer, writer_task, player, track = start_player(lead_ms=100)
    playing = asyncio.create_task(player.play(track, bytes(640 * 75)))  # 1.5 s
    await asyncio.sleep(0.3)
    time.sleep(0.3)  # noqa: ASYNC251 - the event loop stalls for 300 ms: the fault under test
    await asyncio.sleep(0.25)
    now = time.monotonic()
    error_ms = track.heard_ms(now) - far_end_position_ms(socket.sent, now)
    playing.cancel()
    writer_task.cancel()
    assert abs(error_ms) < 40, error_ms


def test_heard_text_keeps_what_was_heard_before_a_resume_replayed_it() -> None:
    """Defect: after a pause at 3.3 s and a resume from the clause start, a barge-in kept only the
    replayed words in the history, though the caller had heard more before the pause."""
    from parley.audio import Framer

    track = Track(1, Framer(640))
    track.segments = [Segment("First clause here.", 0, 1000), Segment("Second clause is longer.", 1000, 3000)]
    track.start_t = 0.0
    track.next_frame = 150  # 3 s sent
    track.furthest_ms = 2500  # heard this far before the pause
    track.origin_frame, track.start_t = 50, 10.0  # resumed at 1 s
    assert track.heard_text(10.2) == "First clause here. Second clause is"
