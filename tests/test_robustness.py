"""Bad input over a real socket: logged, counted, and the call (and server) carry on."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import httpx
import numpy as np
import pytest
import websockets

from parley.caller import CallOptions, run_call
from parley.transports import acs

BAD_MESSAGES: list[str | bytes] = [
    "{not json",
    "[1, 2, 3]",
    '{"kind": "AudioData"}',
    '{"kind": "AudioData", "audioData": {"data": "***not base64***"}}',
    json.dumps({"kind": "AudioData", "audioData": {"data": base64.b64encode(bytes(700)).decode()}}),
    json.dumps(
        {
            "kind": "AudioMetadata",
            "audioMetadata": {"sampleRate": 24000, "encoding": "PCM", "channels": 1, "length": 960},
        }
    ),
    json.dumps({"kind": "DtmfData", "dtmfData": {"data": "x"}}),
    b"\xff\xfe binary garbage",
    '{"kind": "MarkData", "markData": {"id": 1}}',  # unknown kind: ignored, not an error
]


async def ended_events(server, call_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The call's events once the server has finished it (the close races with our next line)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = server.registry.find(call_id)
        if log is not None and log.of("call_ended"):
            return log.snapshot()
        await asyncio.sleep(0.02)
    raise AssertionError(f"call {call_id} did not end")


async def send_frames(ws, count: int, start: float) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        await ws.send(acs.inbound_audio_message(bytes(640), silent=True))


async def test_bad_messages_are_logged_and_the_call_goes_on(server, speech_dir) -> None:  # type: ignore[no-untyped-def]
    call_id = f"bad-{uuid.uuid4()}"
    async with websockets.connect(server.url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        for message in BAD_MESSAGES:
            await ws.send(message)
        await send_frames(ws, 25, time.monotonic())
    events = await ended_events(server, call_id)
    errors = [e["error"] for e in events if e["event"] == "input_error"]
    assert len(errors) == len(BAD_MESSAGES) - 1
    assert any("24000" in error and "16000" in error for error in errors)  # rate change refused
    ended = next(e for e in events if e["event"] == "call_ended")
    assert ended["input_errors"] == len(BAD_MESSAGES) - 1 and ended["frames_in"] == 25
    # The server is unharmed: a normal call right after works.
    report = await run_call(CallOptions(url=server.url, audio=speech_dir / "hours_16000.wav"))
    assert any(e["event"] == "turn_completed" and "eleven" in e.get("text", "") for e in report.events)


async def test_a_peer_sending_only_garbage_is_closed_with_1007(server) -> None:  # type: ignore[no-untyped-def]
    async with websockets.connect(server.url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            for _ in range(400):
                await ws.send("garbage")
                await asyncio.sleep(0)
            await asyncio.wait_for(ws.recv(), 5)
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007


async def test_oversize_message_closes_only_that_call(server) -> None:  # type: ignore[no-untyped-def]
    async with websockets.connect(server.url) as ws:
        await ws.send("x" * (server.settings.max_message_bytes + 1))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.http_url}/healthz")).json()["status"] == "ok"


async def test_audio_before_metadata_infers_the_format(server) -> None:  # type: ignore[no-untyped-def]
    call_id = f"nometa-{uuid.uuid4()}"
    async with websockets.connect(server.url, additional_headers={"x-ms-call-connection-id": call_id}) as ws:
        await send_frames(ws, 10, time.monotonic())
        message = await asyncio.wait_for(ws.recv(), 5)  # the greeting starts anyway
    assert isinstance(acs.parse_outbound(message), acs.OutboundAudio)
    events = await ended_events(server, call_id)
    assert next(e for e in events if e["event"] == "call_ended")["frames_in"] == 10


async def test_call_id_from_query_and_ws_alias(server) -> None:  # type: ignore[no-untyped-def]
    call_id = f"query-{uuid.uuid4()}"
    url = server.url.replace("/ws/acs", f"/ws?callId={call_id}")
    async with websockets.connect(url) as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(24000)))
        message = await asyncio.wait_for(ws.recv(), 5)
    assert len(acs.parse_outbound(message).pcm) == 960  # 24 kHz frames out
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{server.http_url}/api/calls/{call_id}/events")
        assert response.status_code == 200 and response.json()["events"][0]["event"] == "call_started"
        assert (await client.get(f"{server.http_url}/api/calls/nope/events")).status_code == 404


async def test_goodbye_intent_hangs_up(server) -> None:  # type: ignore[no-untyped-def]
    report = await run_call(CallOptions(url=server.url, pcm=np.zeros(8000, dtype=np.int16), dtmf=[(3.2, "9")]))
    assert report.hung_up_by_server
    ended = [e for e in report.events if e["event"] == "call_ended"]
    assert ended and ended[0]["reason"] == "intent:goodbye"
