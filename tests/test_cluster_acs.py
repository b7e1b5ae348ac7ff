"""ACS calls across instances on one Redis: Microsoft's real SDK against the fake ACS of
test_acs_call_automation; one instance answers, another gets the media socket, callbacks and
hang-ups cross between them."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa

# The fake ACS, its TLS and ACS's tokens come from the ACS tests (the fixtures too, named here so
# pytest finds them; `_fresh_fake` is autouse: a clean fake for every test).
import test_acs_call_automation as acs_tests
import test_cluster as cluster_tests  # `parley serve` in a subprocess
from parley.server import BackgroundServer
from parley.transports import acs

FakeAcs, TlsFiles = acs_tests.FakeAcs, acs_tests.TlsFiles
acs_settings, bearer, callback_event = acs_tests.acs_settings, acs_tests.bearer, acs_tests.callback_event
incoming_call_event, incoming_url, start_parley = (
    acs_tests.incoming_call_event,
    acs_tests.incoming_url,
    acs_tests.start_parley,
)
tls, fake_acs, jwks_file, signing_key = acs_tests.tls, acs_tests.fake_acs, acs_tests.jwks_file, acs_tests.signing_key
_fresh_fake = acs_tests._fresh_fake


@pytest.fixture(scope="module")
def acs_pair(fake_acs: FakeAcs, jwks_file: Path, tls: TlsFiles, redis_url: str) -> Iterator[list[BackgroundServer]]:
    started = []
    try:
        for name in ("answers", "streams"):
            settings = acs_settings(
                fake_acs,
                jwks_file,
                redis_url=redis_url,
                instance_id=f"acs-{name}-{uuid.uuid4().hex[:6]}",
                store="memory",  # until the Redis records store is merged
                greeting="hi",
                closing_text="Goodbye.",
            )
            started.append(start_parley(settings, tls))
        yield started
    finally:
        for server in started:
            server.stop()


async def until(check: Callable[[], Any], within_s: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + within_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.05)
    return result


async def answer_on(server: BackgroundServer, fake: FakeAcs) -> tuple[str, str, str]:
    """An IncomingCall answered by `server`: our key, ACS's connection id, the media URL's path and query."""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post(incoming_url(), json=[incoming_call_event(f"ctx-{uuid.uuid4()}")])
    (answered,) = response.json()["answered"]
    answer = fake.named(":answer")[-1]
    parts = urlsplit(answer.json["mediaStreamingOptions"]["transportUrl"])
    return answered["call_id"], answered["call_connection_id"], f"{parts.path}?{parts.query}"


async def post_callback(server: BackgroundServer, key: str, kind: str, connection_id: str, key_pair: Any) -> Any:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post(
            f"/api/acs/callbacks/{key}", json=[callback_event(kind, connection_id)], headers=bearer(key_pair)
        )
    assert response.status_code == 200, response.text
    return response.json()


class MediaStream:
    """ACS's side of a media socket: metadata, then 20 ms of silence every 20 ms until closed."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.task = asyncio.create_task(self._stream())
        self.reader = asyncio.create_task(self._read())  # what parley sends: read, or it backs up

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> MediaStream:
        ws = await websockets.connect(url, additional_headers=headers)
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        await asyncio.wait_for(ws.recv(), 5)
        return cls(ws)

    async def _stream(self) -> None:
        try:
            while True:
                await self.ws.send(acs.inbound_audio_message(bytes(640), silent=True))
                await asyncio.sleep(0.02)
        except websockets.ConnectionClosed:
            pass

    async def _read(self) -> None:
        async for _message in self.ws:
            pass

    async def closed(self, within_s: float = 15) -> int | None:
        await asyncio.wait_for(self.ws.wait_closed(), within_s)
        return self.ws.close_code

    async def close(self) -> None:
        self.task.cancel()
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


def acs_events(server: BackgroundServer, call_id: str) -> list[str]:
    events = server.registry.find(call_id)
    return [event["type"] for event in events.of("acs_event")] if events is not None else []


async def test_answered_on_one_streamed_on_another_callbacks_and_hang_up_cross(
    acs_pair: list[BackgroundServer], fake_acs: FakeAcs, signing_key: rsa.RSAPrivateKey
) -> None:
    answers, streams = acs_pair
    key, connection_id, media_path = await answer_on(answers, fake_acs)
    # A callback before any media socket: held for whichever instance gets it.
    assert await post_callback(answers, key, "CallConnected", connection_id, signing_key) == {
        "received": 1,
        "recorded": 1,
    }
    headers = {"x-ms-call-connection-id": connection_id} | bearer(signing_key, lifetime_s=3600)
    stream = await MediaStream.open(f"ws://127.0.0.1:{streams.port}{media_path}", headers)
    try:
        assert streams.registry.session(connection_id) is not None  # B took a call A answered
        assert acs_events(streams, connection_id) == ["CallConnected"]  # the held callback came along
        # A callback delivered to the answering instance reaches the call's log on the streaming one.
        await post_callback(answers, key, "ParticipantsUpdated", connection_id, signing_key)
        await until(lambda: acs_events(streams, connection_id) == ["CallConnected", "ParticipantsUpdated"])
        assert answers.registry.find(connection_id) is None
        # A hang-up asked of the answering instance: the streaming one says goodbye and hangs up.
        async with httpx.AsyncClient(base_url=answers.http_url, timeout=30) as http:
            response = await http.post(f"/api/calls/{connection_id}/hangup")
        assert response.status_code == 200, response.text
        assert response.json()["instance"] == streams.settings.instance_id
        assert await stream.closed() == 1000
        (terminate,) = await asyncio.to_thread(fake_acs.wait_for, ":terminate")
        assert terminate.path == f"/calling/callConnections/{connection_id}:terminate" and terminate.signature_ok
    finally:
        await stream.close()
    ended = streams.registry.find(connection_id)
    assert ended is not None and ended.of("call_ended")[-1]["reason"] == "hangup_requested"
    # ACS confirms, to the answering instance again: the ended call's log on B still gets it.
    await post_callback(answers, key, "CallDisconnected", connection_id, signing_key)
    await until(lambda: acs_events(streams, connection_id)[-1:] == ["CallDisconnected"])


async def test_call_disconnected_at_one_instance_ends_the_call_on_another(
    acs_pair: list[BackgroundServer], fake_acs: FakeAcs, signing_key: rsa.RSAPrivateKey
) -> None:
    answers, streams = acs_pair
    key, connection_id, media_path = await answer_on(streams, fake_acs)  # answered where it streams
    headers = {"x-ms-call-connection-id": connection_id} | bearer(signing_key, lifetime_s=3600)
    stream = await MediaStream.open(f"ws://127.0.0.1:{streams.port}{media_path}", headers)
    try:
        await post_callback(answers, key, "CallDisconnected", connection_id, signing_key)
        await stream.closed()
    finally:
        await stream.close()
    ended = streams.registry.find(connection_id)
    assert ended is not None and ended.of("call_ended")[-1]["reason"] == "acs_disconnected"
    # Over for everyone: neither instance opens a media socket for it any more.
    for server in acs_pair:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{server.port}{media_path}", additional_headers=headers)
        assert refused.value.response.status_code == 403


async def test_a_media_socket_for_a_call_nobody_answered_is_refused(
    acs_pair: list[BackgroundServer], signing_key: rsa.RSAPrivateKey
) -> None:
    _answers, streams = acs_pair
    headers = {"x-ms-call-connection-id": "conn-unknown"} | bearer(signing_key)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            f"ws://127.0.0.1:{streams.port}/ws/acs?callId={uuid.uuid4().hex}", additional_headers=headers
        )
    assert refused.value.response.status_code == 403


async def test_a_callback_for_an_unknown_call_is_not_recorded(
    acs_pair: list[BackgroundServer], signing_key: rsa.RSAPrivateKey
) -> None:
    answers, _streams = acs_pair
    result = await post_callback(answers, uuid.uuid4().hex, "CallConnected", "conn-unknown", signing_key)
    assert result == {"received": 1, "recorded": 0}


async def test_held_callbacks_that_are_not_callbacks_are_skipped(
    acs_pair: list[BackgroundServer], fake_acs: FakeAcs, signing_key: rsa.RSAPrivateKey, redis_url: str, caplog
) -> None:  # type: ignore[no-untyped-def]
    answers, streams = acs_pair
    key, connection_id, media_path = await answer_on(answers, fake_acs)
    await post_callback(answers, key, "CallConnected", connection_id, signing_key)
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    db.rpush(f"parley:early:{key}", "not json", '{"event": "not an object"}')
    db.close()
    headers = {"x-ms-call-connection-id": connection_id} | bearer(signing_key, lifetime_s=3600)
    stream = await MediaStream.open(f"ws://127.0.0.1:{streams.port}{media_path}", headers)
    await stream.close()
    assert acs_events(streams, connection_id) == ["CallConnected"]
    assert sum("a held callback that is not one" in record.getMessage() for record in caplog.records) == 2


async def test_a_killed_instance_leaves_no_call_up_at_acs(
    acs_pair: list[BackgroundServer],
    fake_acs: FakeAcs,
    signing_key: rsa.RSAPrivateKey,
    jwks_file: Path,
    redis_url: str,
) -> None:
    """The instance holding an ACS call's media dies: a survivor hangs the phone call up (the caller
    would wait on a silent line) and the call is over for every instance."""
    answers, _streams = acs_pair
    _key, connection_id, media_path = await answer_on(answers, fake_acs)
    env = {
        "PARLEY_ACS_CONNECTION_STRING": f"endpoint=https://{fake_acs.host}/;accesskey={acs_tests.ACCESS_KEY}",
        "PARLEY_ACS_CALLBACK_URL": acs_tests.PUBLIC_BASE,
        "PARLEY_ACS_RESOURCE_ID": acs_tests.AUDIENCE,
        "PARLEY_ACS_AUTH_JWKS_FILE": str(jwks_file),
    }
    headers = {"x-ms-call-connection-id": connection_id} | bearer(signing_key, lifetime_s=3600)
    victim = f"acs-victim-{uuid.uuid4().hex[:6]}"
    with cluster_tests.parley_process(redis_url, victim, **env) as (process, port):
        stream = await MediaStream.open(f"ws://127.0.0.1:{port}{media_path}", headers)
        process.send_signal(signal.SIGKILL)
        (terminate,) = await asyncio.to_thread(fake_acs.wait_for, ":terminate", 1, 15)
    await stream.close()
    assert terminate.path == f"/calling/callConnections/{connection_id}:terminate" and terminate.signature_ok
    for server in acs_pair:  # released: no instance opens a media socket for it any more
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{server.port}{media_path}", additional_headers=headers)
        assert refused.value.response.status_code == 403
    assert len(fake_acs.named(":terminate")) == 1
