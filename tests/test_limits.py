"""Per-call limits (issue 12): the polite finish, the handshake / idle / call-length deadlines, the
inbound rate cap, the DTMF length cap, the error-rate rule, and engines taken only after the handshake.

Most run on the in-memory harness (a real MediaHandler, scripted engines); a few over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx
import pytest
import websockets

from parley.media import handler as handler_module
from parley.media.limits import FRAME_S, Deadlines, ErrorWindow, InboundRateLimiter, message_cost
from parley.testing.harness import CallHarness, ScriptedAgent, ScriptedSynthesizer
from parley.transports import acs
from tests.conftest import make_server
from tests.test_robustness import ended_events

LONG_REPLY = "We open at eleven, and we close late tonight, every single day of the week, holidays too."
CLOSING = "We are closing now. Goodbye."


class RecordingControl:
    """Call control double: records hang-ups (ACS Call Automation in production)."""

    def __init__(self) -> None:
        self.hung_up: list[str] = []

    async def hang_up(self, call_id: str) -> None:
        self.hung_up.append(call_id)

    async def transfer(self, call_id: str, target: str) -> None:  # pragma: no cover - not used here
        raise AssertionError("no transfer expected")


def audio_after_last_stop(call: CallHarness) -> int:
    sent = [message for _, message in call.socket.sent]
    stops = [i for i, message in enumerate(sent) if isinstance(message, acs.OutboundStop)]
    assert stops, "no StopAudio was sent"
    return sum(isinstance(message, acs.OutboundAudio) for message in sent[stops[-1] + 1 :])


# ------------------------------------------------------------------------------- finish_politely
async def test_finish_politely_stops_the_reply_speaks_the_closing_line_then_hangs_up() -> None:
    control = RecordingControl()
    async with CallHarness(
        agent=ScriptedAgent(reply=LONG_REPLY),
        synthesizer=ScriptedSynthesizer(ms_per_char=20),
        closing_text=CLOSING,
        call_id="polite",
        bargein_on_dtmf=False,
    ) as call:
        call.engines.call_control = control
        await call.say("when do you open")
        await call.wait_for("first_audio_sent", turn_id=1)
        call.dtmf("12#")  # a key input waits for its turn behind the reply
        await call.wait_for("dtmf_input")
        assert len(call.handler.inbox) == 1
        call.handler.finish_politely("draining")
        call.handler.finish_politely("a second time")  # does nothing
        call.frames(0.4, loud=True)  # the caller talks over the goodbye: it is not interruptible
        call.dtmf("3#")
        assert call._task is not None
        await asyncio.wait_for(call._task, 10)
    assert call.named("turn_cancelled", turn_id=1)
    closing = call.named("turn_completed", turn_id=2)
    assert closing and closing[0]["text"] == CLOSING
    assert call.named("turn_started", turn_id=2)[0]["kind"] == "closing"
    assert not call.named("turn_started", turn_id=3), "the waiting keys and what came after were dropped"
    assert not call.named("barge_in_decided", turn_id=2)
    # After the last StopAudio (turn 1's), only the closing line's audio went out: none of turn 1's.
    assert audio_after_last_stop(call) * 20 == closing[0]["audio_ms"]
    ended = call.named("call_ended")
    assert len(ended) == 1 and ended[0]["reason"] == "draining"
    assert call.socket.close_code == 1000 and call.socket.close_reason == "draining"
    assert control.hung_up == ["polite"]


async def test_finish_politely_while_the_agent_is_thinking_drops_its_answer() -> None:
    agent = ScriptedAgent()

    async def slow(user):  # type: ignore[no-untyped-def]
        await asyncio.sleep(5)
        yield  # pragma: no cover

    agent.behaviour = slow
    async with CallHarness(agent=agent, closing_text=CLOSING) as call:
        await call.say("hello")
        await call.wait_for("turn_started", turn_id=1)
        call.handler.finish_politely("max_call_duration")
        assert call._task is not None
        await asyncio.wait_for(call._task, 10)
    assert call.named("turn_cancelled", turn_id=1)
    assert call.named("turn_completed", turn_id=2)[0]["text"] == CLOSING
    assert call.named("call_ended")[0]["reason"] == "max_call_duration"


async def test_finish_politely_before_the_media_started_ends_the_call_at_once() -> None:
    control = RecordingControl()
    call = CallHarness(closing_text=CLOSING, call_id="no-media")
    call.engines.call_control = control
    task = asyncio.create_task(call.handler.run(call.socket))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # connected, no AudioMetadata
    started = time.monotonic()
    call.handler.finish_politely("draining")
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1
    assert not call.socket.sent
    assert call.named("call_ended")[0]["reason"] == "draining"
    assert call.socket.close_code == 1000 and control.hung_up == ["no-media"]
    call.engines.close()


async def test_a_closing_line_that_does_not_end_in_time_does_not_hold_the_call(monkeypatch, caplog) -> None:
    monkeypatch.setattr(handler_module, "_CLOSING_LIMIT_S", 0.5)
    long_closing = "This goodbye goes on and on and on. " * 10  # ~36 s of tone at 100 ms a character
    async with CallHarness(synthesizer=ScriptedSynthesizer(ms_per_char=100), closing_text=long_closing) as call:
        call.frames(0.1, loud=False)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        call.handler.finish_politely("draining")
        assert call._task is not None
        await asyncio.wait_for(call._task, 5)
    assert time.monotonic() - started < 2
    assert call.named("call_ended")[0]["reason"] == "draining"
    assert "the closing line did not end within" in caplog.text


async def test_finish_politely_over_a_real_socket() -> None:
    server = make_server(greeting="Hello there, how can I help you today?", closing_text=CLOSING)
    try:
        call_id = f"polite-{uuid.uuid4()}"
        loop = server.app.state.loop
        async with websockets.connect(server.url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
            await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
            await asyncio.wait_for(ws.recv(), 10)  # the greeting is playing
            handler = server.registry.session(call_id)
            loop.call_soon_threadsafe(handler.finish_politely, "draining")
            kinds: list[str] = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    message = acs.parse_outbound(await asyncio.wait_for(ws.recv(), 15))
                    kinds.append("stop" if isinstance(message, acs.OutboundStop) else "audio")
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "draining")
        assert "stop" in kinds and kinds.count("audio") > 50  # the greeting stopped; ~2 s of goodbye
        events = server.registry.find(call_id)
        assert events is not None
        assert events.of("turn_completed")[-1]["text"] == CLOSING
        assert events.of("call_ended")[0]["reason"] == "draining"
    finally:
        server.stop()


# ------------------------------------------------------------------------------- the pure rules
def test_the_rate_limiter_lets_a_backlog_through_and_stops_a_sustained_flood() -> None:
    # A new call: 2 s at once pass; at real time the bucket fills by 3 s a second, to 10 s.
    limiter = InboundRateLimiter(4.0, now=0.0, burst_s=10.0, initial_s=2.0)
    assert all(limiter.admit(0.0) for _ in range(100))
    t = 0.0
    for _ in range(200):  # 4 s of real time
        t += FRAME_S
        assert limiter.admit(t)
    assert limiter.tokens == pytest.approx(10.0 - FRAME_S)  # full, less the last frame
    # A network stall: 9 s of frames at once, then real time for a minute: never refused.
    assert all(limiter.admit(t) for _ in range(450))
    assert all(limiter.admit(t + i * FRAME_S) for i in range(1, 3000))
    # 5x real time: the full bucket empties at 1 s per second: refused after ~10 s.
    limiter = InboundRateLimiter(4.0, now=0.0, burst_s=10.0, initial_s=10.0)
    t, admitted = 0.0, 0
    while limiter.admit(t):
        admitted += 1
        t += FRAME_S / 5
    assert 9.5 < t < 10.5 and admitted == pytest.approx(2500, rel=0.05)
    # A flood as soon as the call starts: refused after initial_s worth of frames.
    limiter = InboundRateLimiter(4.0, now=0.0, burst_s=10.0, initial_s=2.0)
    assert sum(limiter.admit(0.0) for _ in range(1000)) == 100
    with pytest.raises(ValueError):
        InboundRateLimiter(4.0, now=0.0, burst_s=2.0, initial_s=3.0)


def test_a_message_costs_one_frame_per_started_2_kib() -> None:
    frame_16k = acs.inbound_audio_message(bytes(640))
    frame_24k = acs.inbound_audio_message(bytes(960))
    assert message_cost(len(frame_16k)) == message_cost(len(frame_24k)) == FRAME_S
    assert message_cost(0) == FRAME_S
    assert message_cost(65536) == pytest.approx(32 * FRAME_S)


def test_the_error_window_is_not_reset_by_good_messages() -> None:
    window = ErrorWindow(max_errors=100, window_s=10.0)
    # Alternating good and bad frames at 50 frames/s: 25 errors a second; closed within 4.1 s.
    t = 0.0
    while not window.add(t):
        t += 0.04
    assert t == pytest.approx(100 * 0.04, abs=0.05)
    # A few errors a second forever: never.
    window = ErrorWindow(max_errors=100, window_s=10.0)
    assert not any(window.add(i * 0.2) for i in range(5000))


def test_deadlines_name_the_first_one_passed() -> None:
    d = Deadlines(100.0, handshake_s=5, idle_s=30, max_call_s=60)
    assert d.expired(104.9) is None and d.next_check() == 105.0
    assert d.expired(105.0) == "handshake_timeout"
    d.handshake_done()
    d.message(120.0)
    assert d.expired(149.0) is None and d.next_check() == 150.0
    assert d.expired(150.0) == "idle_timeout"
    d.message(159.0)
    assert d.expired(160.0) == "max_call_duration"
    assert d.expired(161.0) is None, "max_call_duration is reported once"
    assert d.next_check() == 189.0


# ------------------------------------------------------------------------------- limits on the harness
def started_without_media(**settings: object) -> tuple[CallHarness, asyncio.Task[None]]:
    call = CallHarness(**settings)
    task = asyncio.create_task(call.handler.run(call.socket))  # type: ignore[arg-type]
    return call, task


async def test_a_socket_without_a_handshake_is_closed_and_takes_no_engines(caplog) -> None:
    call, task = started_without_media(handshake_timeout_s=0.3, call_id="silent-peer")
    call.dtmf("1")  # not a handshake
    call.send("garbage")
    await asyncio.wait_for(task, 3)
    assert call.socket.close_code == 1008 and call.socket.close_reason == "handshake_timeout"
    assert call.named("call_ended")[0]["reason"] == "handshake_timeout"
    assert call.engines.vads.created == call.engines.recognizers.created == 0
    lines = [r for r in caplog.records if "handshake_timeout" in r.getMessage()]
    assert len(lines) == 1 and "silent-peer" in lines[0].getMessage()
    call.engines.close()


async def test_audio_completes_the_handshake_too() -> None:
    call, task = started_without_media(handshake_timeout_s=0.3, idle_timeout_s=0.6)
    call.frames(0.1, loud=False)
    await asyncio.wait_for(task, 3)  # ended by the idle timeout, not the handshake one
    assert call.socket.close_reason == "idle_timeout"
    call.engines.close()


async def test_a_peer_that_goes_quiet_is_closed_by_the_idle_timeout(caplog) -> None:
    async with CallHarness(idle_timeout_s=0.4, call_id="quiet-peer") as call:
        started = time.monotonic()
        for _ in range(5):  # messages keep it open
            call.frames(0.02, loud=False)
            await asyncio.sleep(0.2)
        assert not call._task.done()  # type: ignore[union-attr]
        await asyncio.wait_for(call._task, 3)  # type: ignore[arg-type]
    assert 1.1 < time.monotonic() - started < 2.0  # the last message at 0.8 s, + 0.4 s
    assert call.socket.close_code == 1008 and call.socket.close_reason == "idle_timeout"
    assert call.named("call_ended")[0]["reason"] == "idle_timeout"
    assert "quiet-peer" in caplog.text and "idle_timeout" in caplog.text


async def test_a_call_longer_than_max_call_s_ends_politely() -> None:
    async with CallHarness(max_call_s=0.5, closing_text=CLOSING) as call:
        await call.say("hello")
        await call.wait_for("turn_completed", turn_id=1)
        closing = await call.wait_for("turn_completed", turn_id=2, timeout=5)
        await asyncio.wait_for(call._task, 5)  # type: ignore[arg-type]
    assert closing["text"] == CLOSING
    assert call.named("call_ended")[0]["reason"] == "max_call_duration"
    assert call.socket.close_code == 1000 and call.socket.close_reason == "max_call_duration"


async def test_a_peer_flooding_faster_than_the_cap_is_closed_with_1008(caplog) -> None:
    async with CallHarness(max_inbound_rate=4.0, call_id="flooder") as call:
        call.frames(20.0, loud=False)  # 20 s of audio at once: more than the 2 s a new call may send
        await asyncio.wait_for(call._task, 5)  # type: ignore[arg-type]
    assert call.socket.close_code == 1008 and call.socket.close_reason == "inbound_rate_exceeded"
    ended = call.named("call_ended")[0]
    assert (
        ended["reason"] == "inbound_rate_exceeded" and 95 <= ended["frames_in"] < 200
    )  # 2 s (AudioMetadata counts too)
    lines = [r.getMessage() for r in caplog.records if "inbound_rate_exceeded" in r.getMessage()]
    assert len(lines) == 1 and "flooder" in lines[0] and "4x real time" in lines[0]


async def test_a_backlog_within_the_burst_then_real_time_is_not_closed() -> None:
    async with CallHarness(max_inbound_rate=10.0) as call:
        call.frames(1.5, loud=False)  # the call starts with a little backlog
        await asyncio.sleep(1.0)  # the bucket fills (at 10x real time here, to be quick)
        call.frames(9.0, loud=False)  # a stalled network delivers 9 s at once
        for _ in range(20):  # then 1.4 s at 3.5x real time
            call.frames(0.14, loud=False)
            await asyncio.sleep(0.04)
        await call.until(lambda: call.handler.frames_in == 665)
        assert not call._task.done()  # type: ignore[union-attr]


async def test_a_dtmf_message_with_too_many_keys_is_an_input_error_not_processed(caplog) -> None:
    async with CallHarness(max_dtmf_message_digits=32, log_dtmf=True) as call:
        call.dtmf("1" * 33)
        call.dtmf("9" * 5000)
        call.dtmf("1" * 32 + "#")  # one too many as well (the terminator is a key)
        call.dtmf("12#")
        await call.wait_for("dtmf_input")
        errors = call.named("input_error")
    assert [e["error"].split(" (")[0] for e in errors] == [
        "DtmfData with 33 keys",
        "DtmfData with 5000 keys",
        "DtmfData with 33 keys",
    ]
    assert [e["digits"] for e in call.named("dtmf")] == ["12#"]
    assert "99999" not in caplog.text


async def test_alternating_good_and_bad_frames_are_closed_with_1007() -> None:
    async with CallHarness(call_id="alternating") as call:
        for _ in range(120):
            call.frames(0.02, loud=False)
            call.send('{"kind": "AudioData", "audioData": {"data": "***"}}')
        await asyncio.wait_for(call._task, 5)  # type: ignore[arg-type]
    assert call.socket.close_code == 1007 and call.socket.close_reason == "protocol_errors"
    assert call.named("call_ended")[0]["input_errors"] == 51


async def test_a_few_bad_frames_among_good_ones_are_tolerated() -> None:
    async with CallHarness() as call:
        for _ in range(40):  # 40 x (1 bad + 10 good): 40 errors, 8 s of audio
            call.frames(0.2, loud=False)
            call.send("garbage")
        await call.until(lambda: call.handler.input_errors == 40)
        assert not call._task.done()  # type: ignore[union-attr]


# ------------------------------------------------------------------------------- over real sockets
@pytest.fixture(scope="module")
def limited_server():  # type: ignore[no-untyped-def]
    server = make_server(engines="plumbing", greeting="", handshake_timeout_s=1.0, max_dtmf_message_digits=8)
    yield server
    server.stop()


async def pools(server) -> dict:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{server.http_url}/api/stats")).json()["pools"]


async def test_sockets_that_only_connect_take_no_engines_and_are_closed_after_the_handshake_timeout(
    limited_server,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(websockets.connect(limited_server.url)) for _ in range(10)]
        await asyncio.sleep(0.3)
        assert limited_server.registry.live_count == 10
        in_use = await pools(limited_server)
        assert in_use["vad"]["in_use"] == in_use["recognizer"]["in_use"] == 0
        for ws in sockets:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "handshake_timeout")
    # A socket that sends AudioMetadata takes its engines (and gives them back when it ends).
    async with websockets.connect(limited_server.url) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        await send_silence(ws, 10)
        await asyncio.sleep(0.3)
        in_use = await pools(limited_server)
        assert in_use["vad"]["in_use"] == in_use["recognizer"]["in_use"] == 1


async def send_silence(ws, count: int) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        await ws.send(acs.inbound_audio_message(bytes(640), silent=True))


async def test_a_flooding_peer_is_closed_with_1008_over_a_real_socket(limited_server) -> None:
    call_id = f"flood-{uuid.uuid4()}"
    frame = acs.inbound_audio_message(bytes(640), silent=True)
    sent = 0
    async with websockets.connect(limited_server.url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(20_000):  # (no reading: the close is seen when a send fails)
                await ws.send(frame)
                sent += 1
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "inbound_rate_exceeded")
    events = limited_server.registry.find(call_id)
    assert events is not None
    ended = events.of("call_ended")[0]
    assert ended["reason"] == "inbound_rate_exceeded" and ended["frames_in"] < 200 < sent


async def test_a_long_dtmf_message_over_a_real_socket_is_refused_and_the_call_goes_on(limited_server) -> None:
    call_id = f"dtmf-{uuid.uuid4()}"
    async with websockets.connect(limited_server.url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        await ws.send(acs.dtmf_message("1" * 60_000))
        await send_silence(ws, 10)
    events = await ended_events(limited_server, call_id)
    errors = [e["error"] for e in events if e["event"] == "input_error"]
    assert errors == ["DtmfData with 60000 keys (max_dtmf_message_digits is 8); ignored"]
    assert not [e for e in events if e["event"] == "dtmf"]
    assert next(e for e in events if e["event"] == "call_ended")["frames_in"] == 10


async def test_keys_still_being_collected_when_the_call_ends_are_dropped_with_it() -> None:
    """The inter-digit timer dies with the call: no `dtmf_input` (and no turn) after `call_ended`."""
    async with CallHarness(dtmf_interdigit_ms=150, log_dtmf=True) as call:
        call.frames(0.1, loud=False)
        call.dtmf("12")
        await call.wait_for("dtmf")
        await call.hang_up()
        await asyncio.sleep(0.4)  # well past the inter-digit time
    names = [event["event"] for event in call.events]
    assert names[-1] == "call_ended" and "dtmf_input" not in names
