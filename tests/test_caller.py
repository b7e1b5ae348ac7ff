"""Tests for the simulated ACS caller, against a small fake ACS-speaking server written here."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from rich.console import Console
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from parley.audio import read_wav
from parley.caller import (
    SILENCE,
    BargeInTrigger,
    CallOptions,
    CallReport,
    ClipFrames,
    DialError,
    PlayoutEmulator,
    Script,
    decision_to_stop_ms,
    events_url,
    leaked_audio_ms,
    media_url,
    onset_to_stop_ms,
    print_report,
    run_call,
    voice_to_voice_ms,
)
from parley.transports.acs import (
    AudioFrame,
    AudioMetadata,
    Dtmf,
    audio_data_message,
    parse_inbound,
    stop_audio_message,
)

LOUD_RMS = 32768 * 10 ** (-40 / 20)


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def speech_clip(rate: int, lead_s: float = 0.1, speech_s: float = 0.3) -> np.ndarray:
    """Leading digital silence, then noise at about -20 dBFS standing in for speech."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 3000, round(speech_s * rate)).clip(-32768, 32767).astype(np.int16)
    return np.concatenate([np.zeros(round(lead_s * rate), np.int16), noise])


def stereo(path: Path) -> np.ndarray:
    """A `parley call --out` WAV as (n, 2) int16: caller left, agent right."""
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 2
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, "<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


# --------------------------------------------------------------------------------------------
# A fake parley server: the ACS app side of the media stream
# --------------------------------------------------------------------------------------------


@dataclass
class FakeAgent:
    """Behaviour of the fake server, and what it observed."""

    greeting_s: float = 2.0
    greeting_paced: bool = False
    stop_on_speech: bool = True
    leak_frames: int = 0
    reply_s: float = 0.0
    hangup_after_s: float | None = None
    junk: list[str | bytes] = field(default_factory=list)
    serve_events: bool = True
    # observations
    headers: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)
    frame_sizes: set[int] = field(default_factory=set)
    uplink: list[bytes] = field(default_factory=list)  # every AudioData frame's PCM, in order
    dtmf: list[tuple[float, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    rate: int = 0
    _turn: int = 0
    _playing: asyncio.Task[None] | None = None

    def log(self, name: str, **extra: Any) -> None:
        self.events.append({"event": name, "t": time.monotonic(), "turn_id": extra.pop("turn_id", None), **extra})

    async def play(self, ws: ServerConnection, pcm: np.ndarray, paced: bool) -> None:
        self._turn += 1
        turn = self._turn
        self.log("turn_started", turn_id=turn, kind="greeting" if turn == 1 else "reply")
        step = self.rate // 50
        start = time.monotonic()
        for i in range(0, pcm.size, step):
            if i == 0:
                self.log("first_audio_sent", turn_id=turn)
            await ws.send(audio_data_message(pcm[i : i + step].tobytes()))
            if paced:
                await asyncio.sleep(max(0.0, start + (i // step + 1) * 0.02 - time.monotonic()))
        self.log("turn_completed", turn_id=turn)

    async def barge_in(self, ws: ServerConnection) -> None:
        self.log("barge_in_decided", turn_id=self._turn, trigger="vad")
        if self._playing is not None:
            self._playing.cancel()
        await ws.send(stop_audio_message())
        self.log("stop_audio_sent", turn_id=self._turn)
        for _ in range(self.leak_frames):  # a buggy server: audio of the cut turn still goes out
            await ws.send(audio_data_message(tone(0.02, self.rate).tobytes()))

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        first = parse_inbound(await ws.recv(), None)
        if not isinstance(first, AudioMetadata):
            self.problems.append(f"first message was {first!r}")
            return
        self.rate = first.format.sample_rate
        self.log("call_started")
        for junk in self.junk:
            await ws.send(junk)
        if self.greeting_s:
            self._playing = asyncio.create_task(self.play(ws, tone(self.greeting_s, self.rate), self.greeting_paced))
        if self.hangup_after_s is not None:
            asyncio.get_running_loop().call_later(self.hangup_after_s, lambda: asyncio.ensure_future(ws.close()))
        await self.listen(ws, first.format)

    async def listen(self, ws: ServerConnection, fmt: Any) -> None:
        speaking, last_loud, stopped = False, 0.0, False
        async for message in ws:
            at = time.monotonic()
            parsed = parse_inbound(message, fmt)
            if isinstance(parsed, Dtmf):
                self.dtmf.append((at, parsed.digits))
                continue
            if not isinstance(parsed, AudioFrame):
                self.problems.append(f"unexpected {parsed!r}")
                continue
            self.frame_times.append(at)
            self.frame_sizes.add(len(parsed.pcm))
            self.uplink.append(parsed.pcm)
            if parsed.silent != (not any(parsed.pcm)):
                self.problems.append("silent flag does not match the frame's content")
            if rms(parsed.pcm) > LOUD_RMS:
                if not speaking:
                    self.log("speech_started", onset_t=at)
                    if self.stop_on_speech and not stopped:
                        stopped = True
                        await self.barge_in(ws)
                speaking, last_loud = True, at
            elif speaking and at - last_loud > 0.2:
                speaking = False
                self.log("final", text="hello")
                if self.reply_s:
                    self._playing = asyncio.create_task(self.play(ws, tone(self.reply_s, self.rate, 660), True))

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Serve /api/calls/{id}/events from the same port, as parley will."""
        if not request.path.startswith("/api/calls/"):
            return None
        if not self.serve_events:
            return connection.respond(404, "not found\n")
        call_id = request.path.split("/")[3]
        return connection.respond(200, json.dumps({"call_id": call_id, "events": self.events}))


async def call(agent: FakeAgent, **options: Any) -> Any:
    async with websockets.serve(agent.handler, "127.0.0.1", 0, process_request=agent.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        return await run_call(CallOptions(url=f"ws://127.0.0.1:{port}/ws/acs", **options))


def assert_real_time_cadence(agent: FakeAgent, report: Any) -> None:
    times = np.array(agent.frame_times)
    assert len(times) == report.frames_sent
    span = times[-1] - times[0]
    # Absolute schedule: the last frame lands where n * 20 ms says, no accumulated drift.
    assert span == pytest.approx((len(times) - 1) * 0.02, abs=0.03)
    assert np.median(np.diff(times)) == pytest.approx(0.02, abs=0.004)
    # The worst single send is the machine's scheduling noise, not the caller's schedule (drift and
    # the median above are): this failed at 50 ms with four other jobs on the two cores.
    assert report.send_lateness_ms_max < 150


# --------------------------------------------------------------------------------------------
# Live calls
# --------------------------------------------------------------------------------------------


async def test_barge_in_call_measures_stop_and_cuts_playout(tmp_path: Path) -> None:
    agent = FakeAgent(greeting_s=2.0, reply_s=0.3)
    out = tmp_path / "heard.wav"
    report = await call(
        agent,
        pcm=speech_clip(16000),
        barge_in_at=0.5,
        out=out,
        call_id="call-1",
        correlation_id="corr-1",
        quiet_after_s=0.3,
        max_wait_s=3.0,
        dtmf=[(0.1, "12#")],
    )
    assert agent.problems == []
    assert agent.headers["x-ms-call-connection-id"] == "call-1"
    assert agent.headers["x-ms-call-correlation-id"] == "corr-1"
    assert agent.frame_sizes == {640}
    assert_real_time_cadence(agent, report)
    assert [d for _, d in agent.dtmf] == ["12#"]
    assert agent.dtmf[0][0] - report.t0 == pytest.approx(0.1, abs=0.06)

    # The clip started once the greeting had played 0.5 s (on the next 20 ms tick).
    greeting_start = report.stretches[0][0]
    assert report.rel_ms(report.clip_started_t) - greeting_start == pytest.approx(510, abs=60)
    # Onset is the first loud frame, after the clip's 100 ms of silence.
    assert report.speech_onset_t - report.clip_started_t == pytest.approx(0.1, abs=0.01)

    assert report.stop_audio_count == 1
    assert len(report.onset_to_stop_ms) == 1 and 0 <= report.onset_to_stop_ms[0] < 100
    assert len(report.decision_to_stop_ms) == 1 and 0 <= report.decision_to_stop_ms[0] < 20
    assert report.leaked_audio_ms == 0
    # The greeting was cut at StopAudio; then the 300 ms reply played in full.
    cut_stretch, reply_stretch = report.stretches
    assert cut_stretch[1] == pytest.approx(report.stops[0], abs=0.25)  # sample + 0.1 ms rounding
    assert report.stop_flushed_ms[0] == pytest.approx(2000 - (cut_stretch[1] - cut_stretch[0]), abs=1)
    # Paced frames arriving a little late leave tiny gaps, which stay inside one stretch.
    assert reply_stretch[1] - reply_stretch[0] == pytest.approx(300, abs=75)
    assert report.agent_audio_ms == pytest.approx(cut_stretch[1] - cut_stretch[0] + 300, abs=1)
    assert report.voice_to_voice_ms is not None and 150 < report.voice_to_voice_ms < 400
    assert not report.hung_up_by_server and report.errors == []
    # The caller hung up once the reply had been quiet for quiet_after_s.
    assert report.duration_ms - reply_stretch[1] == pytest.approx(300, abs=75)

    whats = [item["what"] for item in report.timeline]
    assert "audio cut by StopAudio" in whats and any(w.startswith("StopAudio received") for w in whats)
    assert any(w.startswith("barge-in decided") for w in whats)
    assert report.events[0]["event"] == "call_started"
    assert all("t_ms" in e for e in report.events)
    json.dumps(report.to_dict())

    # What the caller heard (the right channel): the greeting up to the cut, silence, the reply.
    with wave.open(str(out), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 2, 2)
        both = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)
    said, heard = both[:, 0], both[:, 1]
    # The left channel is the uplink as sent: every frame the fake server received, at its slot.
    assert said.tobytes()[: len(b"".join(agent.uplink))] == b"".join(agent.uplink)
    assert heard.size == pytest.approx(report.duration_ms * 16, abs=2)
    ms = lambda v: round(v * 16)  # noqa: E731 - ms -> sample index
    assert np.any(heard[ms(cut_stretch[0]) : ms(cut_stretch[1])])
    assert not np.any(heard[ms(cut_stretch[1]) + 1 : ms(reply_stretch[0]) - 1])
    assert np.count_nonzero(heard) == pytest.approx(report.agent_audio_ms * 16, rel=0.02)

    console = Console(file=io.StringIO(), width=140)
    print_report(report, console)
    text = console.file.getvalue()
    assert "speech onset -> StopAudio" in text and "voice-to-voice" in text and "barge-in decided" in text
    summary_only = Console(file=io.StringIO(), width=140)
    print_report(report, summary_only, timeline=False)
    assert "barge-in decided" not in summary_only.file.getvalue()


async def test_24k_greeting_then_speech_and_leak_detection() -> None:
    agent = FakeAgent(greeting_s=0.4, greeting_paced=True, leak_frames=3, reply_s=0.2)
    report = await call(agent, pcm=speech_clip(24000), sample_rate=24000, quiet_after_s=0.3)
    assert agent.problems == []
    assert agent.frame_sizes == {960}
    assert_real_time_cadence(agent, report)
    greeting = report.stretches[0]
    assert greeting[1] - greeting[0] == pytest.approx(400, abs=60)
    # Without barge_in_at the caller waits for 0.7 s of quiet after the greeting.
    assert report.rel_ms(report.clip_started_t) - greeting[1] == pytest.approx(710, abs=60)
    # The server stopped (nothing was playing) and then leaked three 20 ms frames of turn 1.
    assert report.stop_audio_count == 1
    assert report.leaked_audio_ms == pytest.approx(60)
    assert report.voice_to_voice_ms is not None


async def test_no_greeting_speaks_after_wait_and_events_failure_is_recorded() -> None:
    agent = FakeAgent(greeting_s=0, stop_on_speech=False, serve_events=False)
    report = await call(agent, pcm=speech_clip(16000, speech_s=0.2), greeting_wait_s=0.3, max_wait_s=0.3, progress=True)
    assert report.rel_ms(report.clip_started_t) == pytest.approx(300, abs=60)
    # Nobody answered: the caller hangs up max_wait_s after the clip.
    assert report.duration_ms - report.rel_ms(report.clip_ended_t) == pytest.approx(300, abs=60)
    assert report.events == [] and report.events_error is not None and "404" in report.events_error
    assert any(e.startswith("events fetch failed") for e in report.errors)
    assert report.agent_audio_ms == 0 and report.stretches == [] and report.voice_to_voice_ms is None
    assert report.frames_sent == len(agent.frame_times)


async def test_speakerphone_echo_and_background_reach_the_server(tmp_path: Path) -> None:
    agent = FakeAgent(greeting_s=0.5, stop_on_speech=False)
    # A loud background (above the onset threshold) whose length is not a whole number of frames.
    background = tone(0.0625, 16000, freq=1000, amplitude=3000)
    out = tmp_path / "heard.wav"
    report = await call(
        agent,
        pcm=np.zeros(1600, np.int16),
        echo_db=-20.0,
        echo_delay_ms=40,
        background=background,
        out=out,
        quiet_after_s=0.1,
        max_wait_s=0.1,
        greeting_wait_s=2.0,
    )
    assert agent.problems == []  # includes: silent=true only on all-zero frames
    uplink = np.frombuffer(b"".join(agent.uplink), "<i2").astype(np.int64)
    heard = stereo(out)[:, 1].astype(np.float64)  # the agent, as the caller heard it
    # Frame i carries timeline samples [(i-1)*320, i*320): uplink sample k is timeline sample k - 320.
    timeline = np.arange(uplink.size) - 320
    delayed = timeline - 640  # 40 ms earlier
    echo = np.where((delayed >= 0) & (delayed < heard.size), heard[np.clip(delayed, 0, heard.size - 1)], 0.0)
    expected = np.clip(np.round(background[timeline % background.size] + 0.1 * echo), -32768, 32767)
    assert np.abs(uplink - expected).max() <= 1
    assert np.abs(echo).max() > 700  # the greeting's echo really was there, at a tenth of 8000
    # Onset is the caller's own clip (silence here), never the background or the echo.
    assert report.clip_started_t is not None and report.speech_onset_t is None


def test_played_samples_reads_the_playout_timeline() -> None:
    emu = PlayoutEmulator(t0=10.0, sample_rate=1000)

    def ramp(a: int, b: int) -> bytes:
        return np.arange(a, b, dtype="<i2").tobytes()  # sample values = positions

    emu.receive(10.0, ramp(0, 100))
    emu.receive(10.05, ramp(100, 150))  # queued right behind: positions 100..150
    emu.receive(10.3, ramp(300, 400))  # after a gap: 300..400
    assert emu.played_samples(90, 110).tolist() == list(range(90, 110))
    window = emu.played_samples(140, 310)
    assert window[:10].tolist() == list(range(140, 150)) and not window[10:160].any()
    assert window[160:].tolist() == list(range(300, 310))
    assert emu.played_samples(-5, 3).tolist() == [0] * 5 + [0, 1, 2]
    assert not emu.played_samples(400, 420).any() and emu.played_samples(5, 5).size == 0
    emu.stop(10.32)  # StopAudio cuts the last segment: nothing played after 320
    assert emu.played_samples(315, 325).tolist() == [315, 316, 317, 318, 319, 0, 0, 0, 0, 0]
    assert emu.played_between(10.095, 10.105).tolist() == list(range(95, 105))


async def test_server_hang_up_ends_the_call_cleanly(tmp_path: Path) -> None:
    agent = FakeAgent(greeting_s=0.2, hangup_after_s=0.3)
    report = await call(agent, pcm=speech_clip(16000), fetch_events=False, out=tmp_path / "o.wav")
    assert report.hung_up_by_server
    assert report.duration_ms == pytest.approx(300, abs=75)
    assert report.clip_started_t is None and report.speech_onset_t is None
    assert report.agent_audio_ms == pytest.approx(200, abs=1)
    assert report.close_code == 1000
    assert report.timeline[-1] == {"t_ms": report.duration_ms, "who": "server", "what": "hangs up"}
    assert (tmp_path / "o.wav").exists()


async def test_malformed_server_messages_are_recorded_not_fatal() -> None:
    junk: list[str | bytes] = [
        "not json",
        '{"kind":"AudioData","audioData":{"data":"@@@"}}',
        '{"Kind":"AudioData","AudioData":{"Data":"AAAA"}}',  # 3 bytes: half a sample
        '{"kind":"MarkData","markData":{}}',
        b"\x00\xff",
    ]
    agent = FakeAgent(greeting_s=0.1, junk=junk, stop_on_speech=False)
    report = await call(agent, pcm=speech_clip(16000, lead_s=0, speech_s=0.1), fetch_events=False, max_wait_s=0.2)
    assert len(report.errors) == len(junk)
    assert sum("malformed" in e for e in report.errors) == 4
    assert any("MarkData" in e for e in report.errors)
    assert report.agent_audio_ms == pytest.approx(100, abs=1)
    assert report.clip_started_t is not None and not report.hung_up_by_server


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def pcm_ms(ms: int, rate: int = 16000) -> bytes:
    return tone(ms / 1000, rate).tobytes()


def test_playout_queues_in_real_time_and_stop_cuts() -> None:
    emu = PlayoutEmulator(t0=100.0, sample_rate=16000)
    emu.receive(100.0, pcm_ms(1000))  # a whole second arrives at once: plays 0..1 s
    emu.receive(100.01, pcm_ms(500))  # queued behind it: 1..1.5 s
    assert emu.playout_end == pytest.approx(101.5)
    flushed = emu.stop(100.25)
    assert flushed == pytest.approx(1.25)
    assert emu.played_s == pytest.approx(0.25)
    [stretch] = emu.stretches
    assert (stretch.start, stretch.end, stretch.cut) == (100.0, 100.25, True)
    emu.receive(100.30, pcm_ms(100))  # 50 ms gap: same stretch
    emu.receive(100.50, pcm_ms(100))  # 100 ms gap: a new one
    assert [(s.start, s.end) for s in emu.stretches] == [(100.0, pytest.approx(100.4)), (100.5, 100.6)]
    emu.finish(100.55)  # the call ended mid-frame
    assert emu.played_s == pytest.approx(0.25 + 0.1 + 0.05)
    heard = emu.render(100.6)
    assert heard.size == 9600 and not heard[4000:4800].any() and not heard[8800:].any()


def test_playout_stretch_queries() -> None:
    emu = PlayoutEmulator(t0=0.0, sample_rate=16000)
    assert emu.stretch_at(1.0) is None and not emu.has_played(1.0) and emu.playout_end is None
    emu.receive(1.0, pcm_ms(2000))
    assert emu.has_played(1.0) and not emu.has_played(0.99)
    stretch = emu.stretch_at(1.5)
    assert stretch is not None and (stretch.start, stretch.end) == (1.0, 3.0)
    assert emu.started_since(1.0) and not emu.started_since(1.01)


def test_script_barge_in_needs_a_long_enough_stretch_and_gives_up_eventually() -> None:
    emu = PlayoutEmulator(t0=0.0, sample_rate=16000)
    emu.receive(0.0, pcm_ms(300))  # a 300 ms stretch can never reach 500 ms
    options = CallOptions(url="ws://x", quiet_after_s=0.1, max_wait_s=1.0)
    script = Script(2, BargeInTrigger(0.5), emu, options, give_up_at=3.0)
    assert [script.tick(t) for t in (0.0, 0.5, 0.6, 2.98)] == [SILENCE] * 4 and script.notes == []
    emu.receive(3.0, pcm_ms(1000))  # a new stretch from 3.0 s
    assert script.tick(3.0) == 0  # gave up waiting: speaks anyway, and says so
    assert script.notes and "spoke anyway" in script.notes[0]
    assert script.tick(3.02) == 1
    assert script.tick(3.04) == SILENCE and script.clip_end == 3.04
    assert script.tick(4.0) == SILENCE  # agent audio queued until 4.0 started before the clip ended
    assert script.tick(4.04) is None  # max_wait_s after the clip ended


def test_script_barge_in_fires_once_the_stretch_has_played_long_enough() -> None:
    emu = PlayoutEmulator(t0=0.0, sample_rate=16000)
    emu.receive(1.0, pcm_ms(2000))
    script = Script(1, BargeInTrigger(0.5), emu, CallOptions(url="ws://x"), give_up_at=99.0)
    assert script.tick(1.49) == SILENCE
    assert script.tick(1.5) == 0 and script.clip_start == 1.5


def test_measurements_from_times_and_events() -> None:
    stops = [10.0, 20.0]
    received = [(9.9, 320), (10.01, 320), (10.02, 320), (10.4, 320), (10.7, 320), (20.1, 320)]
    assert onset_to_stop_ms(9.95, stops) == [50.0, 10050.0]
    assert onset_to_stop_ms(None, stops) == []
    # A stop after the clip began but before the -40 dBFS onset counts, negative.
    assert onset_to_stop_ms(10.0, [9.98, 10.05], since=9.9) == [-20.0, 50.0]
    # Without events: audio within 0.5 s of each StopAudio is a leak.
    assert leaked_audio_ms(stops, received, [], 16000) == 20 * 4
    events = [
        {"event": "barge_in_decided", "t": 9.997, "turn_id": 1},
        {"event": "stop_audio_sent", "t": 9.999, "turn_id": 1},
        {"event": "first_audio_sent", "t": 10.3, "turn_id": 2},
        {"event": "barge_in_decided", "t": 19.99, "turn_id": 2},
        {"event": "stop_audio_sent", "t": 19.995, "turn_id": 2},
    ]
    # With events: only what came before turn 2's first audio, then everything after stop 2.
    assert leaked_audio_ms(stops, received, events, 16000) == 20 * 3
    assert decision_to_stop_ms(events) == [2.0, 5.0]
    assert voice_to_voice_ms(10.3, received) == pytest.approx(100.0)
    assert voice_to_voice_ms(30.0, received) is None


def test_clip_frames_flags() -> None:
    pcm = np.concatenate([np.zeros(320, np.int16), np.full(320, 50, np.int16), tone(0.02, 16000), [5]])
    clip = ClipFrames.from_pcm(pcm.astype(np.int16), 320)
    assert len(clip) == 4  # the last partial frame is zero-padded, not dropped
    assert clip.zero.tolist() == [True, False, False, False]
    assert clip.loud.tolist() == [False, False, True, False]  # 50/32768 is about -56 dBFS


def test_events_url() -> None:
    assert events_url("ws://127.0.0.1:8000/ws/acs?x=1", "a b") == "http://127.0.0.1:8000/api/calls/a%20b/events"
    assert events_url("wss://example.org/ws", "c") == "https://example.org/api/calls/c/events"


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())


def test_load_wav_downmixes_and_resamples(tmp_path: Path) -> None:
    left = tone(0.5, 44100)
    stereo = np.stack([left, left], axis=1)
    write_wav(tmp_path / "s.wav", stereo, 44100)
    mono = read_wav(tmp_path / "s.wav", 16000)
    assert mono.dtype == np.int16 and mono.shape == (8000,)
    assert np.abs(mono).max() == pytest.approx(8000, rel=0.05)


def test_load_wav_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.wav"):
        read_wav(tmp_path / "missing.wav", 16000)
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.wav.*not a PCM WAV"):
        read_wav(tmp_path / "text.wav", 16000)
    write_wav(tmp_path / "8bit.wav", np.full(100, 128, np.uint8), 8000, width=1)
    with pytest.raises(ValueError, match=r"8bit\.wav.*8-bit"):
        read_wav(tmp_path / "8bit.wav", 16000)


async def test_options_are_checked_before_dialling() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await run_call(CallOptions(url="ws://127.0.0.1:9/ws"))
    with pytest.raises(ValueError, match="int16"):
        await run_call(CallOptions(url="ws://127.0.0.1:9/ws", pcm=np.zeros(10, np.float32)))
    with pytest.raises(ValueError):
        await run_call(CallOptions(url="ws://127.0.0.1:9/ws", pcm=np.zeros(10, np.int16), dtmf=[(0, "x")]))
    with pytest.raises(ValueError, match="background"):
        await run_call(
            CallOptions(url="ws://127.0.0.1:9/ws", pcm=np.zeros(10, np.int16), background=np.zeros(0, np.int16))
        )


# --------------------------------------------------------------------------------------------
# What a new user runs into: URLs, dial errors, WAV files, misleading summary lines
# --------------------------------------------------------------------------------------------


def test_media_url_accepts_what_people_type() -> None:
    assert media_url("ws://127.0.0.1:8000/ws/acs") == "ws://127.0.0.1:8000/ws/acs"
    assert media_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/ws/acs"
    assert media_url("https://example.org/ws?callerId=1") == "wss://example.org/ws?callerId=1"
    assert media_url("127.0.0.1:8000") == "ws://127.0.0.1:8000/ws/acs"
    assert media_url(" localhost:8000/ws ") == "ws://localhost:8000/ws"
    with pytest.raises(ValueError, match="not a server URL"):
        media_url("ftp://example.org")
    with pytest.raises(ValueError, match="port"):
        media_url("http://127.0.0.1:99999")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_dial_errors_are_one_line_naming_the_url() -> None:
    pcm = speech_clip(16000)
    closed = f"ws://127.0.0.1:{free_port()}/ws/acs"
    with pytest.raises(DialError, match="connection refused \\(is the parley server running\\?\\)"):
        await run_call(CallOptions(url=closed, pcm=pcm))

    def only_ws_acs(connection: ServerConnection, request: Request) -> Response | None:
        return None if request.path == "/ws/acs" else connection.respond(404, "not found\n")

    async with websockets.serve(FakeAgent().handler, "127.0.0.1", 0, process_request=only_ws_acs) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/wrong"
        with pytest.raises(DialError) as error:
            await run_call(CallOptions(url=url, pcm=pcm))
    assert str(error.value) == f"no such endpoint: {url} (HTTP 404)" and error.value.status == 404


def float_wav(path: Path, samples: np.ndarray, rate: int, *, extensible: bool = False) -> None:
    """An IEEE-float WAV (format 3, or WAVE_FORMAT_EXTENSIBLE with the float sub-format)."""
    import struct

    channels = samples.shape[1] if samples.ndim == 2 else 1
    data = samples.astype("<f4").tobytes()
    if extensible:
        guid = struct.pack("<H", 3) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * 4 * channels, 4 * channels, 32, 22, 32, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_float_wav_is_converted_to_16_bit(tmp_path: Path) -> None:
    pcm = tone(0.5, 16000)
    float_wav(tmp_path / "f.wav", pcm / 32768.0, 16000)
    assert np.array_equal(read_wav(tmp_path / "f.wav", 16000), pcm)
    stereo = np.stack([pcm, pcm], axis=1) / 32768.0
    float_wav(tmp_path / "fx.wav", stereo, 16000, extensible=True)
    assert np.array_equal(read_wav(tmp_path / "fx.wav", 16000), pcm)
    float_wav(tmp_path / "loud.wav", np.array([2.0, -2.0, 0.5]), 16000)  # beyond full scale: clipped
    assert read_wav(tmp_path / "loud.wav", 16000).tolist() == [32767, -32768, 16384]


def test_a_file_that_is_not_a_wav_is_named_for_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "notes.wav").write_text("hello, this is not audio\n")
    with pytest.raises(ValueError, match=r"notes\.wav: not a PCM WAV file: it looks like text \('hello, this"):
        read_wav(tmp_path / "notes.wav", 16000)
    (tmp_path / "song.wav").write_bytes(b"ID3\x03\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="MP3 file: convert it to a 16-bit PCM WAV"):
        read_wav(tmp_path / "song.wav", 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_wav(tmp_path / "empty.wav", 16000)


async def test_speaking_over_a_notice_is_not_a_voice_to_voice() -> None:
    """The caller talks over a greeting that does not stop: the audio still streaming after their
    speech is the greeting, not a reply (it used to be reported as a voice-to-voice of ~10 ms)."""
    agent = FakeAgent(greeting_s=2.5, greeting_paced=True, stop_on_speech=False)
    report = await call(agent, pcm=speech_clip(16000, speech_s=0.3), barge_in_at=0.5, quiet_after_s=0.3)
    assert report.speech_end_t is not None and report.stop_audio_count == 0
    assert report.rel_ms(report.speech_end_t) < report.stretches[0][1] - 500  # spoke inside the greeting
    assert report.voice_to_voice_ms is None
    console = Console(file=io.StringIO(), width=200)
    print_report(report, console, timeline=False)
    assert "voice-to-voice: none (no agent reply began after the caller's speech ended)" in console.file.getvalue()


def test_voice_to_voice_starts_at_a_pause_in_the_agent_audio() -> None:
    streaming = [(9.0 + 0.02 * i, 320) for i in range(100)]  # 9.0 .. 10.98, through the speech end
    assert voice_to_voice_ms(10.0, streaming) is None
    assert voice_to_voice_ms(10.0, [*streaming, (11.5, 320), (11.52, 320)]) == pytest.approx(1500.0)
    assert voice_to_voice_ms(12.0, streaming) is None  # nothing after the speech end


async def test_summary_of_a_dtmf_only_call_has_no_empty_speech_times() -> None:
    agent = FakeAgent(greeting_s=0.3, stop_on_speech=False)
    report = await call(agent, pcm=np.zeros(1600, np.int16), dtmf=[(0.1, "12")], quiet_after_s=0.2, max_wait_s=0.3)
    assert [digits for _, digits in agent.dtmf] == ["12"]
    console = Console(file=io.StringIO(), width=200)
    print_report(report, console, timeline=False)
    text = console.file.getvalue()
    assert "None" not in text and "no speech in it" in text and "DTMF sent: '12' at" in text
    assert "voice-to-voice" not in text  # the caller never spoke: nothing to measure from
    assert "server, barge-in decision -> StopAudio sent: none" in text


def test_summary_names_the_pause_when_the_server_paused() -> None:
    from dataclasses import replace

    from parley.caller.report import _summary_lines

    base = dict.fromkeys(CallReport.__slots__)  # type: ignore[attr-defined]
    base.update(
        call_id="c",
        sample_rate=16000,
        t0=0.0,
        duration_ms=1000.0,
        frames_sent=50,
        frames_received=10,
        send_lateness_ms_max=1.0,
        stops=[500.0],
        stop_flushed_ms=[20.0],
        agent_audio_ms=200.0,
        stretches=[],
        onset_to_stop_ms=[90.0],
        decision_to_stop_ms=[0.2],
        leaked_audio_ms=0.0,
        media_after_clear=0,
        proto="acs",
        utterances=[],
        dtmf_sent=[],
        events=[{"event": "barge_in_decided", "t": 0.5}],
    )
    report = CallReport(**base)
    assert "server, barge-in decision -> StopAudio sent: 0 ms" in _summary_lines(report)
    paused = replace(report, events=[{"event": "barge_in_paused", "t": 0.4}, *report.events])
    assert "server, barge-in pause -> StopAudio sent: 0 ms" in _summary_lines(paused)


async def test_a_say_timeline_attributes_each_stop_to_its_utterance() -> None:
    agent = FakeAgent(greeting_s=3.0, reply_s=0.2)  # stops on the first speech only
    clip = speech_clip(16000, lead_s=0.1, speech_s=0.3)
    report = await call(agent, say=[(0.5, clip), (1.5, clip)], fetch_events=False, quiet_after_s=0.2, max_wait_s=0.5)
    first, second = report.utterances
    assert first["at_ms"] == pytest.approx(500, abs=25) and second["at_ms"] == pytest.approx(1500, abs=25)
    assert first["onset_ms"] - first["at_ms"] == pytest.approx(100, abs=10)  # after the clip's lead silence
    assert len(first["onset_to_stop_ms"]) == 1 and second["onset_to_stop_ms"] == []
    assert report.onset_to_stop_ms == first["onset_to_stop_ms"]
    # Frames between the utterances are digital silence, sent as such.
    assert agent.problems == [] and report.speech_onset_t is not None
    assert report.rel_ms(report.speech_end_t) == pytest.approx(second["end_ms"], abs=0.1)
