"""Per-call limits (issue 12): the polite finish, the handshake / idle / call-length deadlines, the
inbound rate cap, the DTMF length cap, the error-rate rule, and engines taken only after the handshake.

Most run on the in-memory harness (a real MediaHandler, scripted engines); a few over real sockets.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import websockets

from parley.media import handler as handler_module
from parley.testing.harness import CallHarness, ScriptedAgent, ScriptedSynthesizer
from parley.transports import acs
from tests.conftest import make_server

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
