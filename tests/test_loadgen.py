"""Tests for the load generator: its barge-in state machine on a fake clock, its audio encoding,
and a short run of a few concurrent callers against a real parley server (plumbing profile)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import statistics
import time
from collections.abc import Iterator

import numpy as np
import pytest
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from parley.benchmarks.loadgen import (
    FRAME_S,
    JITTER_SKIP_FRAMES,
    SILENCE,
    STOP_WINDOW_S,
    CallerState,
    LoadPlan,
    _MediaConnection,
    encode_audio,
    run_load,
)
from parley.server import BackgroundServer
from parley.transports.acs import (
    AudioFrame,
    AudioMetadata,
    audio_data_message,
    parse_inbound,
    stop_audio_message,
)
from tests.conftest import make_server

CLIP_FRAMES = 50
ONSET = 5


def make_state(after: float = 1.0, jitter: float = 0.0, clip_frames: int = CLIP_FRAMES) -> CallerState:
    return CallerState(
        t0=0.0,
        clip_frames=clip_frames,
        onset_index=ONSET,
        barge_in_after_s=after,
        barge_in_jitter_s=jitter,
        rng=random.Random(1),
    )


class Clock:
    """Drives a CallerState the way the socket loop does: a tick every 20 ms, agent audio
    arriving in between."""

    def __init__(self, state: CallerState) -> None:
        self.state = state
        self.now = 0.0
        self.sent: list[tuple[float, int]] = []

    def run(self, seconds: float, *, agent: bool) -> None:
        """Advance `seconds`; with `agent`, one agent frame arrives every 20 ms (offset 5 ms)."""
        for _ in range(round(seconds / FRAME_S)):
            if agent:
                self.state.on_audio(self.now + 0.005)
            self.now += FRAME_S
            self.sent.append((self.now, self.state.tick(self.now)))

    def clip_frames_sent(self) -> list[int]:
        return [frame for _, frame in self.sent if frame != SILENCE]


# --------------------------------------------------------------------------------------------
# CallerState on a fake clock
# --------------------------------------------------------------------------------------------


def test_silent_until_the_agent_has_talked_long_enough() -> None:
    clock = Clock(make_state(after=1.0))
    clock.run(0.5, agent=False)
    clock.run(0.96, agent=True)
    assert clock.clip_frames_sent() == []
    clock.run(0.06, agent=True)
    assert clock.clip_frames_sent()[:1] == [0]  # speaking from the tick at 1 s into the stretch


def test_no_barge_in_once_the_agent_has_gone_quiet() -> None:
    state = make_state(after=1.0)
    clock = Clock(state)
    clock.run(0.8, agent=True)  # a stretch shorter than the barge-in point
    clock.run(1.0, agent=False)
    assert clock.clip_frames_sent() == []


def test_the_whole_clip_is_sent_and_the_onset_measures_the_stop() -> None:
    state = make_state(after=0.2)
    clock = Clock(state)
    clock.run(0.3, agent=True)
    start = next(t for t, frame in clock.sent if frame == 0)
    onset_t = start + ONSET * FRAME_S
    clock.run(0.2, agent=True)
    state.on_stop(onset_t + 0.150)
    clock.run(CLIP_FRAMES * FRAME_S, agent=False)
    assert clock.clip_frames_sent() == list(range(CLIP_FRAMES))
    assert state.onset_to_stop_ms == [pytest.approx(150.0)]
    assert state.missed == 0 and state.errors == []


def test_barges_in_again_on_the_reply_after_a_stop() -> None:
    state = make_state(after=0.2)
    clock = Clock(state)
    clock.run(0.4, agent=True)
    state.on_stop(clock.now)
    clock.run(CLIP_FRAMES * FRAME_S, agent=False)  # the rest of the clip, agent quiet
    clock.run(0.4, agent=True)  # the reply
    state.on_stop(clock.now)
    clock.run(CLIP_FRAMES * FRAME_S, agent=False)
    assert clock.clip_frames_sent().count(0) == 2
    assert len(state.onset_to_stop_ms) == 2
    assert state.errors == []


def test_one_barge_in_per_stretch() -> None:
    # The agent ignores the barge-in and keeps talking: the caller must not speak again into
    # the same stretch, only into the next one.
    state = make_state(after=0.2, clip_frames=10)
    clock = Clock(state)
    clock.run(3.0, agent=True)
    assert clock.clip_frames_sent().count(0) == 1
    assert state.missed == 1
    clock.run(0.2, agent=False)
    clock.run(0.5, agent=True)
    assert clock.clip_frames_sent().count(0) == 2


def test_a_stop_after_the_window_is_missed_and_unexpected() -> None:
    state = make_state(after=0.2)
    clock = Clock(state)
    clock.run(0.4, agent=True)
    onset_t = next(t for t, frame in clock.sent if frame == ONSET)
    state.on_stop(onset_t + STOP_WINDOW_S + 0.01)
    assert state.missed == 1
    assert state.onset_to_stop_ms == []
    assert len(state.errors) == 1 and "unexpected StopAudio" in state.errors[0]


def test_missed_is_counted_at_the_next_tick_without_any_stop() -> None:
    state = make_state(after=0.2)
    clock = Clock(state)
    clock.run(0.3, agent=True)
    clock.run(STOP_WINDOW_S + 0.2, agent=False)
    assert state.missed == 1


def test_a_stop_without_a_barge_in_is_an_error() -> None:
    state = make_state()
    state.on_audio(0.1)
    state.on_stop(0.5)
    assert state.onset_to_stop_ms == [] and state.missed == 0
    assert state.errors == ["+500 ms: unexpected StopAudio (no barge-in pending)"]


def test_pending_barge_in_at_hang_up_is_neither_measured_nor_missed() -> None:
    state = make_state(after=0.2)
    clock = Clock(state)
    clock.run(0.5, agent=True)
    state.finish(clock.now)
    assert state.missed == 0 and state.onset_to_stop_ms == []


def test_jitter_skips_the_burst_and_ends_with_the_stop() -> None:
    state = make_state(after=100.0)
    # A stretch: a burst of 5 frames at once, then one frame every 20 ms with 3 ms of jitter.
    arrivals = [0.0] * 5 + [0.02 * k + (0.003 if k % 2 else 0.0) for k in range(1, 20)]
    for at in arrivals:
        state.on_audio(at)
    assert len(state.jitter_ms) == len(arrivals) - JITTER_SKIP_FRAMES
    assert state.jitter_ms == pytest.approx([3.0] * len(state.jitter_ms))  # gaps of 23 and 17 ms
    state.on_stop(0.5)
    state.on_audio(0.51)  # still in flight when the stop arrived: not part of any stretch
    assert len(state.jitter_ms) == len(arrivals) - JITTER_SKIP_FRAMES
    assert state.frames_received == len(arrivals) + 1


def test_leftover_frames_after_a_stop_do_not_start_a_stretch() -> None:
    state = make_state(after=0.2)
    clock = Clock(state)
    clock.run(0.3, agent=True)
    state.on_stop(clock.now)
    clock.run(CLIP_FRAMES * FRAME_S, agent=False)
    # Frames trickling in right after the stop would be within the gap; then a long quiet.
    state.on_audio(clock.now + 0.01)
    clock.run(1.0, agent=False)
    assert clock.clip_frames_sent().count(0) == 1


def test_barge_in_point_is_jittered_and_seeded() -> None:
    def first_clip_tick(seed: int) -> float:
        state = CallerState(
            t0=0.0,
            clip_frames=CLIP_FRAMES,
            onset_index=ONSET,
            barge_in_after_s=0.5,
            barge_in_jitter_s=0.5,
            rng=random.Random(seed),
        )
        clock = Clock(state)
        clock.run(1.2, agent=True)
        return next(t for t, frame in clock.sent if frame == 0)

    points = {seed: first_clip_tick(seed) for seed in range(8)}
    assert all(0.5 <= t <= 1.0 + 2 * FRAME_S for t in points.values())
    assert len(set(points.values())) > 3
    assert first_clip_tick(3) == points[3]


def test_errors_are_capped() -> None:
    state = make_state()
    for k in range(100):
        state.error(k, "garbage")
    state.finish(100.0)
    assert len(state.errors) == 21
    assert state.errors[-1] == "... and 80 more errors"


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def test_encoded_messages_are_valid_acs_frames() -> None:
    rate = 16000
    clip = np.concatenate([np.zeros(800, np.int16), np.full(700, 3000, np.int16)])
    audio = encode_audio(clip, rate)
    assert len(audio.clip) == 5  # 1500 samples -> 5 frames of 320, the last zero-padded
    assert audio.onset_index == 2  # frames 0-1 are silent, frame 2 is half speech
    metadata = parse_inbound(audio.metadata, None)
    assert isinstance(metadata, AudioMetadata) and metadata.format.sample_rate == rate
    silence = parse_inbound(audio.silence, metadata.format)
    assert isinstance(silence, AudioFrame) and silence.silent and not any(silence.pcm)
    frames = [parse_inbound(message, metadata.format) for message in audio.clip]
    assert [f.silent for f in frames] == [True, True, False, False, False]  # type: ignore[union-attr]
    assert b"".join(f.pcm for f in frames)[: clip.size * 2] == clip.tobytes()  # type: ignore[union-attr]


def test_a_clip_without_speech_is_refused() -> None:
    with pytest.raises(ValueError, match="dBFS"):
        encode_audio(np.full(3200, 10, np.int16), 16000)
    with pytest.raises(ValueError, match="int16"):
        encode_audio(np.zeros(3200, np.float32), 16000)


def test_the_server_prefixes_match_the_codec() -> None:
    # The receiver's fast path relies on parley's exact spelling of both messages.
    assert audio_data_message(b"\0\0").startswith('{"Kind":"AudioData"')
    assert stop_audio_message().startswith('{"Kind":"StopAudio"')


async def test_frames_before_attach_are_replayed_in_order() -> None:
    # The server may start the greeting before the caller has attached its listener.
    ws = _MediaConnection(ClientProtocol(parse_uri("ws://127.0.0.1:9/")))
    seen: list[tuple[bytes, float]] = []
    ws.process_event(Frame(Opcode.TEXT, b"first"))
    ws.process_event(Frame(Opcode.TEXT, b"second"))
    ws.attach(lambda frame, at: seen.append((bytes(frame.data), at)))
    ws.process_event(Frame(Opcode.TEXT, b"third"))
    assert [data for data, _ in seen] == [b"first", b"second", b"third"]
    assert seen[0][1] <= seen[1][1] <= seen[2][1] <= time.monotonic()


# --------------------------------------------------------------------------------------------
# Against servers
# --------------------------------------------------------------------------------------------


class RecordingServer:
    """Plays agent audio without end, records what the caller sends and when, and answers the
    caller's first speech frame of each utterance with a StopAudio after `stop_after_s`."""

    def __init__(self, stop_after_s: float = 0.05) -> None:
        self.stop_after_s = stop_after_s
        self.received: list[tuple[float, str]] = []

    async def handler(self, ws: ServerConnection) -> None:
        player = asyncio.create_task(self._play(ws))
        speaking = False
        try:
            async for message in ws:
                assert isinstance(message, str)  # text frames, as ACS sends
                self.received.append((time.monotonic(), message))
                loud = '"silent":false' in message
                if loud and not speaking:
                    await asyncio.sleep(self.stop_after_s)
                    await ws.send(stop_audio_message())
                speaking = loud
        except ConnectionClosed:
            pass
        finally:
            player.cancel()

    async def _play(self, ws: ServerConnection) -> None:
        frame = audio_data_message(b"\x01\x00" * 320)
        start = time.monotonic()
        for index in range(10**6):
            await asyncio.sleep(max(0.0, start + index * FRAME_S - time.monotonic()))
            await ws.send(frame)


async def test_the_caller_sends_valid_acs_frames_on_a_steady_schedule(hours_pcm: np.ndarray) -> None:
    recorder = RecordingServer()
    async with websockets.serve(recorder.handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        plan = LoadPlan(calls=1, seconds=3.0, clip=hours_pcm, ramp_s=0.0, barge_in_after_s=0.3, barge_in_jitter_s=0.0)
        result = await run_load(f"ws://127.0.0.1:{port}", plan)
    (call,) = result.calls
    assert call.errors == []
    times = [t for t, _ in recorder.received]
    messages = [parse_inbound(m, None) for _, m in recorder.received]
    assert isinstance(messages[0], AudioMetadata)
    frames = messages[1:]
    assert all(isinstance(f, AudioFrame) for f in frames)
    assert len(frames) == call.frames_sent == pytest.approx(150, abs=2)
    # The clip went out whole and in order, inside silence.
    audio = encode_audio(hours_pcm, 16000)
    sent = [m for _, m in recorder.received[1:]]
    first = sent.index(audio.clip[0].decode())
    assert sent[first : first + len(audio.clip)] == [m.decode() for m in audio.clip]
    assert all(m == audio.silence.decode() for m in sent[:first])
    # On an absolute schedule: no drift, whatever the jitter of single arrivals.
    drift = [t - (times[1] + i * FRAME_S) for i, t in enumerate(times[1:])]
    assert statistics.median(drift) == pytest.approx(0.0, abs=0.01)
    assert max(abs(d) for d in drift) < 0.1
    # One barge-in per stretch: the recorder's audio never pauses, so exactly one.
    assert len(call.onset_to_stop_ms) == 1
    assert 50 <= call.onset_to_stop_ms[0] < 300


@pytest.fixture(scope="module")
def plumbing_server() -> Iterator[BackgroundServer]:
    server = make_server(engines="plumbing", greeting="a short greeting for tests only okay")
    yield server
    server.stop()


async def test_concurrent_calls_against_a_plumbing_server(
    plumbing_server: BackgroundServer, hours_pcm: np.ndarray
) -> None:
    seconds = 8.0
    # Barge in early: the test greeting is only ~2.1 s of tone, and on a VM with CPU steal the
    # server (sharing this process) stalls now and then, so agent audio pauses for >= 100 ms and
    # a new stretch begins. A short barge-in point still fits into the stretches that remain.
    plan = LoadPlan(
        calls=4,
        seconds=seconds,
        clip=hours_pcm,
        ramp_s=0.4,
        barge_in_after_s=0.4,
        barge_in_jitter_s=0.2,
    )
    result = await run_load(plumbing_server.url, plan)
    assert result.errors() == []
    assert result.missed() == 0, result.calls
    assert len(result.calls) == 4
    assert len({call.call_id for call in result.calls}) == 4
    for call in result.calls:
        assert call.onset_to_stop_ms, call
        assert all(0 < value < 1000 for value in call.onset_to_stop_ms), call
        assert abs(call.frames_sent - seconds * 50) <= 2, call
        assert call.frames_received > 100, call
        # The client paces on an absolute schedule: a frame is late only by a stall of this process
        # (it shares its loop with the server). One stall of ~200 ms was seen in a full CI-style run
        # on the two-core VM; the bound catches a client that falls behind, not a VM's hiccup.
        assert call.send_lateness_ms_max < 400, call
    jitter = result.jitter_ms()
    assert len(jitter) > 50
    assert statistics.median(jitter) < 10
    assert result.ended_t - result.started_t == pytest.approx(seconds + 0.3, abs=1.5)


async def _odd_server(ws: ServerConnection) -> None:
    """Plays 1 s of camelCase audio, then garbage, an unprompted stop, and hangs up with 1011."""
    # Keep reading, as a real server does: unread frames would stall the closing handshake.
    drain = asyncio.create_task(_drain(ws))
    pcm = b"\x01\x00" * 320
    camel = json.dumps({"kind": "audioData", "audioData": {"data": base64.b64encode(pcm).decode()}})
    for _ in range(50):
        await ws.send(camel)
        await asyncio.sleep(FRAME_S)
    await ws.send("not json")
    await ws.send(stop_audio_message())
    await ws.close(1011, "overloaded")
    await drain


async def _drain(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


async def test_misbehaving_server_is_recorded_per_call(hours_pcm: np.ndarray) -> None:
    async with websockets.serve(_odd_server, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        plan = LoadPlan(calls=2, seconds=3.0, clip=hours_pcm, ramp_s=0.0, barge_in_after_s=5.0)
        result = await run_load(f"ws://127.0.0.1:{port}", plan)
    for call in result.calls:
        assert call.frames_received == 50  # camelCase audio went through the slow path
        assert any("unparseable server message" in e for e in call.errors)
        assert any("unexpected StopAudio" in e for e in call.errors)
        assert any("code 1011 (overloaded)" in e for e in call.errors)
        assert call.frames_sent < 150  # stopped sending once the server hung up


async def test_connect_failure_is_an_error_of_that_call_only(hours_pcm: np.ndarray) -> None:
    plan = LoadPlan(calls=2, seconds=1.0, clip=hours_pcm, ramp_s=0.0)
    result = await run_load("ws://127.0.0.1:9/ws/acs", plan)  # port 9 (discard): refused
    assert len(result.errors()) == 2
    assert all("connect failed" in error for error in result.errors())
    assert all(call.frames_sent == 0 for call in result.calls)


@pytest.mark.parametrize(("name", "value"), [("calls", 0), ("seconds", 0.0), ("ramp_s", -1.0)])
async def test_bad_plans_are_refused_before_dialling(hours_pcm: np.ndarray, name: str, value: float) -> None:
    plan = LoadPlan(calls=1, seconds=1.0, clip=hours_pcm)
    setattr(plan, name, value)
    with pytest.raises(ValueError, match=name):
        await run_load("ws://127.0.0.1:9", plan)
