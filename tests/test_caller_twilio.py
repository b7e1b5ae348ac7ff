"""The simulated caller as Twilio Media Streams: against a small fake Twilio-app server written here,
and its wire with plain function calls."""

from __future__ import annotations

import asyncio
import json
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.server import ServerConnection

from parley.caller import AgentAudio, AgentMark, AgentStop, CallOptions, Ignored, TwilioCallerWire, run_call
from parley.transports import twilio

LOUD_RMS = 32768 * 10 ** (-40 / 20)


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def speech_clip(lead_s: float = 0.1, speech_s: float = 0.4) -> np.ndarray:
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 3000, round(speech_s * 16000)).clip(-32768, 32767).astype(np.int16)
    return np.concatenate([np.zeros(round(lead_s * 16000), np.int16), noise])


@dataclass
class FakeTwilioApp:
    """The app side of a Twilio stream: a greeting sent all at once with a mark after it, `clear` on
    the caller's first loud chunk (then `leak` more media of the cleared greeting, if asked)."""

    greeting_s: float = 3.0
    leak: int = 0
    # observations
    path: str = ""
    events: list[str] = field(default_factory=list)
    start: twilio.Start | None = None
    chunks: list[twilio.Media] = field(default_factory=list)
    digits: list[str] = field(default_factory=list)
    greeting_sent: float = 0.0
    cleared_at: float | None = None
    marks: dict[str, float] = field(default_factory=dict)  # name -> when its echo came back
    problems: list[str] = field(default_factory=list)

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.path = ws.request.path
        async for message in ws:
            event = twilio.parse_inbound(message)
            self.events.append(type(event).__name__)
            if isinstance(event, twilio.Start):
                self.start = event
                await self.greet(ws, event.stream_sid)
            elif isinstance(event, twilio.Media):
                self.chunks.append(event)
                await self.listen(ws, event)
            elif isinstance(event, twilio.Mark):
                self.marks[event.name] = time.monotonic()
            elif isinstance(event, twilio.DtmfEvent):
                self.digits.append(event.digit)

    async def greet(self, ws: ServerConnection, sid: str) -> None:
        self.greeting_sent = time.monotonic()
        pcm = twilio.mulaw_encode(tone(self.greeting_s, 8000))
        for i in range(0, len(pcm), twilio.FRAME_BYTES):
            await ws.send(twilio.media_message(sid, pcm[i : i + twilio.FRAME_BYTES]))
        await ws.send(twilio.mark_message(sid, "greeting"))

    async def listen(self, ws: ServerConnection, media: twilio.Media) -> None:
        samples = twilio.mulaw_decode(media.payload).astype(np.float64)
        if self.cleared_at is not None or np.sqrt(np.mean(samples**2)) < LOUD_RMS:
            return
        await ws.send(twilio.clear_message(media.stream_sid))
        self.cleared_at = time.monotonic()
        for _ in range(self.leak):  # a buggy app: more of the cleared greeting
            await ws.send(twilio.media_message(media.stream_sid, twilio.mulaw_encode(tone(0.02, 8000))))
        await ws.send(twilio.mark_message(media.stream_sid, "after-clear"))  # nothing queued: echoed at once


async def call(app: FakeTwilioApp, **options: Any) -> Any:
    async with websockets.serve(app.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        return await run_call(CallOptions(url=f"ws://127.0.0.1:{port}/ws/twilio", proto="twilio", **options))


async def test_a_twilio_call_speaks_the_stream_echoes_marks_and_clears_on_barge_in(tmp_path: Path) -> None:
    app = FakeTwilioApp(greeting_s=3.0)
    out = tmp_path / "call.wav"
    report = await call(
        app,
        pcm=speech_clip(),
        barge_in_at=0.5,
        agent="bank",
        dtmf=[(0.1, "1#")],
        out=out,
        fetch_events=False,
        quiet_after_s=0.3,
        max_wait_s=0.5,
    )
    assert app.problems == []
    # The agent asked for, and the CallSid the server files the call under (its events API).
    assert app.path == f"/ws/twilio?agent=bank&callId={report.call_id}"
    # Twilio's order: connected, start, then media every 20 ms (dtmf and mark echoes among them), stop.
    assert app.events[:3] == ["Connected", "Start", "Media"] and app.events[-1] == "Stop"
    assert app.start is not None and app.start.call_sid == report.call_id and report.call_id.startswith("CA")
    assert dict(app.start.custom_parameters) == {"agent": "bank"}
    assert {len(media.payload) for media in app.chunks} == {160}
    assert [media.chunk for media in app.chunks] == list(range(1, len(app.chunks) + 1))
    assert [media.timestamp_ms for media in app.chunks] == [20 * i for i in range(len(app.chunks))]
    assert app.digits == ["1", "#"]

    # The barge-in: onset -> clear, the greeting cut where clear arrived, the queued rest flushed.
    assert report.proto == "twilio" and report.stop_audio_count == 1
    assert len(report.onset_to_stop_ms) == 1 and 0 <= report.onset_to_stop_ms[0] < 150
    [stretch] = report.stretches
    assert stretch[1] == pytest.approx(report.stops[0], abs=1)
    assert report.stop_flushed_ms[0] == pytest.approx(3000 - (stretch[1] - stretch[0]), abs=25)
    assert report.media_after_clear == 0 and report.leaked_audio_ms == 0
    # Marks: the greeting's came back when clear flushed it (not 3 s after it was sent); the one
    # sent with nothing queued came back at once.
    assert app.cleared_at is not None
    assert app.marks["greeting"] - app.cleared_at == pytest.approx(0.0, abs=0.1)
    assert app.marks["after-clear"] - app.cleared_at == pytest.approx(0.0, abs=0.1)
    assert report.marks_echoed == 2
    assert report.errors == []

    # The recording: the caller's speech on the left, the greeting up to the clear on the right.
    with wave.open(str(out), "rb") as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (2, 16000)
        both = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)
    said, heard = both[:, 0], both[:, 1]
    ms = lambda value: round(value * 16)  # noqa: E731 - ms -> sample index
    onset = report.rel_ms(report.speech_onset_t)
    assert said[ms(onset) : ms(onset + 100)].any() and not said[: ms(onset) - 400].any()
    assert np.count_nonzero(heard[ms(stretch[0]) + 40 : ms(stretch[1])]) > 0.9 * ms(stretch[1] - stretch[0] - 2.5)
    assert not heard[ms(stretch[1]) + 1 :].any()


async def test_a_mark_comes_back_once_the_audio_before_it_has_played() -> None:
    app = FakeTwilioApp(greeting_s=1.0)
    report = await call(
        app, pcm=speech_clip(), fetch_events=False, greeting_wait_s=3.0, quiet_after_s=0.2, max_wait_s=0.3
    )
    # No barge-in (the caller waits for the greeting to end): the mark waited for 1 s of playout.
    assert "greeting" in app.marks
    assert app.marks["greeting"] - app.greeting_sent >= 0.98
    assert app.marks["greeting"] - app.greeting_sent < 1.6  # the next 20 ms tick, on a busy machine
    assert report.stretches[0][1] - report.stretches[0][0] == pytest.approx(1000, abs=1)


async def test_media_after_clear_is_counted() -> None:
    app = FakeTwilioApp(greeting_s=2.0, leak=3)
    report = await call(app, pcm=speech_clip(), barge_in_at=0.4, fetch_events=False, max_wait_s=0.3)
    assert report.stop_audio_count == 1
    assert report.media_after_clear == 3 and report.leaked_audio_ms == pytest.approx(60)


async def test_a_twilio_call_is_16_khz() -> None:
    with pytest.raises(ValueError, match="a Twilio call runs at 16000 Hz"):
        await run_call(
            CallOptions(url="ws://127.0.0.1:9/ws/twilio", pcm=speech_clip(), proto="twilio", sample_rate=24000)
        )


def test_the_caller_wire_speaks_twilio() -> None:
    wire = TwilioCallerWire("CA" + "0" * 32, stream_sid="MZ1", custom_parameters={"agent": "pizza"})
    connected, start = (json.loads(message) for message in wire.hello())
    assert connected["event"] == "connected"
    assert start["start"]["customParameters"] == {"agent": "pizza"}
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    # Every 20 ms frame at 16 kHz is one 160-byte chunk at once (no resampler start-up burst).
    frames = [tone(0.02, 16000, amplitude=8000 * (k % 2)).tobytes() for k in range(4)]
    chunks = [twilio.parse_inbound(wire.frame(frame, silent=False)) for frame in frames]
    assert all(isinstance(chunk, twilio.Media) and len(chunk.payload) == 160 for chunk in chunks)
    assert [c.chunk for c in chunks if isinstance(c, twilio.Media)] == [1, 2, 3, 4]
    assert [json.loads(m)["dtmf"]["digit"] for m in wire.dtmf("12*")] == ["1", "2", "*"]
    assert json.loads(wire.bye()[0])["stop"]["callSid"] == wire.call_id
    assert json.loads(wire.mark_played("m") or "")["mark"]["name"] == "m"

    played = wire.parse(twilio.media_message("MZ1", twilio.mulaw_encode(tone(0.02, 8000))))
    assert isinstance(played, AgentAudio) and len(played.pcm) == 640  # 20 ms at 16 kHz
    assert isinstance(wire.parse(twilio.clear_message("MZ1")), AgentStop)
    assert wire.parse(twilio.mark_message("MZ1", "x")) == AgentMark("x")
    assert wire.parse('{"event":"dance","streamSid":"MZ1"}') == Ignored("dance")
    with pytest.raises(ValueError):
        wire.parse("not json")


async def test_malformed_twilio_messages_are_recorded_not_fatal() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.recv()
        for junk in ["not json", '{"event":"media","streamSid":"MZ","media":{"payload":"@@"}}', '{"event":"hm"}']:
            await ws.send(junk)
        await asyncio.sleep(0.3)
        await ws.close()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        report = await run_call(
            CallOptions(url=f"ws://127.0.0.1:{port}", proto="twilio", pcm=speech_clip(), fetch_events=False)
        )
    assert len(report.errors) == 3 and sum("malformed" in error for error in report.errors) == 2
    assert "unknown kind 'hm'" in report.errors[2] and report.hung_up_by_server
