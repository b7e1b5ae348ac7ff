"""End to end over a real uvicorn server on loopback, with the real embedded engines and real audio."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import pytest
import websockets

from parley.audio import read_wav
from parley.caller import CallOptions, CallReport, run_call
from parley.media.bridge import Partial, SpeechStarted
from parley.transports import acs
from tests.conftest import TEST_GREETING, make_server

HOURS_REPLY = "eleven in the morning"


def events_named(report: CallReport, name: str) -> list[dict]:
    return [event for event in report.events if event["event"] == name]


def completed_texts(report: CallReport) -> list[str]:
    return [event.get("text", "") for event in events_named(report, "turn_completed")]


async def call(server, **options) -> CallReport:  # type: ignore[no-untyped-def]
    return await run_call(CallOptions(url=server.url, **options))


@pytest.mark.parametrize("rate", [16000, 24000])
async def test_known_phrase_gets_the_matching_reply(server, speech_dir, rate: int) -> None:  # type: ignore[no-untyped-def]
    report = await call(server, audio=speech_dir / f"hours_{rate}.wav", sample_rate=rate)
    assert report.errors == []
    finals = [event["text"] for event in events_named(report, "final")]
    assert any("opening" in text for text in finals), finals
    assert any(HOURS_REPLY in text for text in completed_texts(report))
    assert report.stop_audio_count == 0
    assert report.voice_to_voice_ms is not None
    # The reply's audio reached the caller: greeting plus reply, several seconds in all.
    assert report.agent_audio_ms > 5000


async def test_barge_in_stops_the_agent_and_it_answers_the_interruption(server, speech_dir) -> None:  # type: ignore[no-untyped-def]
    report = await call(server, audio=speech_dir / "hours_16000.wav", barge_in_at=1.0)
    assert report.stop_audio_count == 1
    assert len(report.onset_to_stop_ms) == 1 and 0 < report.onset_to_stop_ms[0] < 1000
    assert report.leaked_audio_ms == 0
    # Default 'pause' mode: StopAudio at the VAD gate, the turn cancelled once words confirm it.
    paused = events_named(report, "barge_in_paused")
    decided = events_named(report, "barge_in_decided")
    assert paused and decided and paused[0]["turn_id"] == decided[0]["turn_id"]
    assert decided[0]["trigger"] in ("partial", "sustained_speech", "final")
    assert events_named(report, "barge_in_resumed") == []
    cancelled = events_named(report, "turn_cancelled")
    assert cancelled[0]["turn_id"] == decided[0]["turn_id"]
    assert 800 < cancelled[0]["heard_ms"] < 1600  # the caller heard about barge_in_at of the greeting
    # After the StopAudio, the agent answers what the caller said.
    assert any(HOURS_REPLY in text for text in completed_texts(report))
    stop_t = events_named(report, "stop_audio_sent")[0]["t"]
    next_audio = [e["t"] for e in events_named(report, "first_audio_sent") if e["turn_id"] != decided[0]["turn_id"]]
    assert next_audio and next_audio[0] > stop_t


async def test_no_audio_of_a_cancelled_turn_follows_its_stop_audio(server, speech_dir) -> None:  # type: ignore[no-untyped-def]
    """Checked on the raw socket: between StopAudio and the next turn's first frame, nothing."""
    clip = read_wav(speech_dir / "order_16000.wav", 16000)
    call_id = f"raw-{uuid.uuid4()}"
    received: list[tuple[float, str]] = []
    async with websockets.connect(server.url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))

        async def receive() -> None:
            async for message in ws:
                received.append((time.monotonic(), message))

        receiver = asyncio.create_task(receive())
        silence = bytes(640)
        speech = [clip[i : i + 320].tobytes().ljust(640, b"\0") for i in range(0, clip.size, 320)]
        frames = [silence] * 40 + speech + [silence] * 150
        start = time.monotonic()
        for i, frame in enumerate(frames):
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
            await ws.send(acs.inbound_audio_message(frame, silent=frame == silence))
        receiver.cancel()
    events = server.registry.find(call_id).snapshot()  # the turns we check were logged during the call
    stop = next(e for e in events if e["event"] == "stop_audio_sent")
    next_turn = next(e for e in events if e["event"] == "first_audio_sent" and e["turn_id"] > stop["turn_id"])
    kinds = [(t, acs.parse_outbound(m)) for t, m in received]
    stop_index = next(i for i, (_, m) in enumerate(kinds) if isinstance(m, acs.OutboundStop))
    after_stop = [t for t, m in kinds[stop_index + 1 :] if isinstance(m, acs.OutboundAudio)]
    assert after_stop, "the agent answered the interruption"
    assert min(after_stop) >= next_turn["t"]


async def test_trailing_partial_does_not_cancel_the_reply_it_started(server, speech_dir) -> None:  # type: ignore[no-untyped-def]
    call_id = f"trailing-{uuid.uuid4()}"
    task = asyncio.create_task(call(server, audio=speech_dir / "hours_16000.wav", call_id=call_id, quiet_after_s=1.0))
    handler = None
    reply_turn = None
    deadline = time.monotonic() + 20
    while reply_turn is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        handler = server.registry.session(call_id)
        if handler is None:
            continue
        turns = [e for e in handler.events.of("first_audio_sent") if e["turn_id"] > 1]
        reply_turn = turns[0]["turn_id"] if turns else None
    assert handler is not None and reply_turn is not None
    final = handler.events.of("final")[-1]

    def late_signals() -> None:  # as a recognizer thread would, for the utterance already answered
        handler.bridge.queue_partial(
            Partial(final["utterance_id"], "what are your opening hours now", time.monotonic())
        )
        handler.bridge.schedule_barge_in(SpeechStarted(final["utterance_id"], time.monotonic(), time.monotonic()))

    threading.Thread(target=late_signals).start()
    report = await task
    assert report.stop_audio_count == 0
    assert events_named(report, "barge_in_decided") == []
    ignored = [e for e in events_named(report, "barge_in_ignored") if e["turn_id"] == reply_turn]
    assert ignored and ignored[0]["reason"] == "same_utterance"
    assert any(e["turn_id"] == reply_turn for e in events_named(report, "turn_completed"))


def call_threads(call_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"recognition-{call_id[:12]}"]


def call_tasks(server, call_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    async def names() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if call_id in t.get_name()]

    loop = server.app.state.loop
    return asyncio.run_coroutine_threadsafe(names(), loop).result(5)


async def test_hangup_mid_playback_ends_everything_and_spares_the_other_call(server, speech_dir) -> None:  # type: ignore[no-untyped-def]
    doomed = f"hang-{uuid.uuid4().hex[:8]}"
    other = asyncio.create_task(call(server, audio=speech_dir / "hours_16000.wav"))
    ws = await websockets.connect(server.url, additional_headers={"x-ms-call-connection-id": doomed})
    await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
    got_audio = 0
    start = time.monotonic()
    for i in range(250):  # silence while the greeting plays, until it has played a while (<= 5 s)
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        await ws.send(acs.inbound_audio_message(bytes(640), silent=True))
        while True:
            try:
                await asyncio.wait_for(ws.recv(), 0.001)
                got_audio += 1
            except TimeoutError:
                break
        if got_audio > 10 and i >= 50:
            break
    assert got_audio > 10 and call_threads(doomed)
    ws.transport.abort()  # the caller vanishes without a close frame
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (server.registry.session(doomed) or call_threads(doomed)):
        await asyncio.sleep(0.05)
    assert server.registry.session(doomed) is None
    assert call_threads(doomed) == []
    assert call_tasks(server, doomed) == []
    ended = server.registry.find(doomed).of("call_ended")
    assert ended and ended[0]["reason"].startswith("caller_hangup")
    report = await other
    assert any(HOURS_REPLY in text for text in completed_texts(report))


async def test_dtmf_reaches_the_agent(server) -> None:  # type: ignore[no-untyped-def]
    silence = np.zeros(16000, dtype=np.int16)
    report = await call(server, pcm=silence, dtmf=[(3.2, "1")], max_wait_s=8)
    assert [e["digits"] for e in events_named(report, "dtmf")] == ["1"]
    assert any(HOURS_REPLY in text for text in completed_texts(report))


async def test_non_interruptible_greeting_is_not_stopped(speech_dir) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(greeting_interruptible=False, greeting=TEST_GREETING)
    try:
        report = await call(srv, audio=speech_dir / "hours_16000.wav", barge_in_at=1.0)
    finally:
        srv.stop()
    assert report.stop_audio_count == 0
    ignored = events_named(report, "barge_in_ignored")
    assert ignored and ignored[0]["reason"] == "not_interruptible"
    # The caller's words were still answered once the greeting finished.
    assert any(HOURS_REPLY in text for text in completed_texts(report))
