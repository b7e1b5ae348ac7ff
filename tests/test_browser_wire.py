"""The browser channel's codec (parley.transports.browser), what of a call's events reaches the
page, the writer's non-audio messages, and the browser socket's access rules: plain calls."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.websockets import WebSocket

from parley.media.events import EventLog
from parley.media.writer import MAX_INFO_PENDING, OutboundWriter
from parley.security.access import browser_media_refusal, same_origin, subprotocol_token
from parley.settings import load_settings
from parley.transports import acs
from parley.transports.browser import PAGE_FIELDS, STOP_AUDIO, BrowserWire, figure_message, page_event
from parley.transports.wire import StreamEnded, StreamStarted

FMT = acs.AudioFormat.for_rate(16000)


# --- the wire ----------------------------------------------------------------------------------------


def test_start_dtmf_and_stop_are_parsed():
    wire = BrowserWire()
    started = wire.parse('{"type":"start","sampleRate":16000}', None)
    assert started == StreamStarted(FMT)
    assert wire.parse('{"type":"start","sampleRate":24000}', None) == StreamStarted(acs.AudioFormat.for_rate(24000))
    assert wire.parse('{"type":"dtmf","digits":"1a#"}', FMT) == acs.Dtmf("1A#")
    assert wire.parse('{"type":"stop"}', FMT) == StreamEnded("stop")
    assert wire.parse('{"type":"ping","x":1}', FMT) == acs.UnknownMessage("ping")  # a newer page's: ignored


def test_binary_frames_are_pcm_as_they_are():
    wire = BrowserWire()
    pcm = bytes(range(256)) * 2 + bytes(128)
    frame = wire.parse(pcm, FMT)
    assert isinstance(frame, acs.AudioFrame) and frame.pcm == pcm and frame.silent is False
    assert wire.parse(bytearray(640), None) == acs.AudioFrame(bytes(640), silent=False)  # before start: 16 kHz
    assert wire.audio(pcm) is pcm
    assert wire.stop() == STOP_AUDIO and json.loads(STOP_AUDIO) == {"type": "stop_audio"}


@pytest.mark.parametrize(
    ("message", "fmt", "error", "says"),
    [
        (bytes(100), None, acs.FrameLengthError, "before start"),
        (bytes(960), FMT, acs.FrameLengthError, "640 bytes"),
        (bytes(641), FMT, acs.FrameLengthError, "641 bytes"),
        ("not json", None, acs.MalformedMessage, "not JSON"),
        ("[1,2]", None, acs.MalformedMessage, '"type"'),
        ('{"type":5}', None, acs.MalformedMessage, '"type"'),
        ('{"type":"start"}', None, acs.MalformedMessage, "sampleRate"),
        ('{"type":"start","sampleRate":true}', None, acs.MalformedMessage, "sampleRate"),
        ('{"type":"start","sampleRate":48000}', None, acs.UnsupportedFormat, "48000"),
        ('{"type":"dtmf"}', FMT, acs.MalformedMessage, "digits"),
        ('{"type":"dtmf","digits":""}', FMT, acs.MalformedMessage, "digits"),
        ('{"type":"dtmf","digits":"12x"}', FMT, acs.MalformedMessage, "0-9"),
        ('{"type":"dtmf","digits":"' + "1" * 33 + '"}', FMT, acs.MalformedMessage, "digits"),
        ('{"type":"stop","pad":"' + "x" * 1100 + '"}', FMT, acs.MalformedMessage, "1024"),
    ],
)
def test_bad_input_is_a_protocol_error_that_says_what(message: Any, fmt: Any, error: type, says: str):
    with pytest.raises(error) as raised:
        BrowserWire().parse(message, fmt)
    assert isinstance(raised.value, acs.AcsProtocolError)
    assert says in str(raised.value)


# --- what the page sees ----------------------------------------------------------------------------------


def test_the_page_sees_chosen_fields_with_times_from_the_call_start():
    events = EventLog("call-1", to_log=False, mask_dtmf=True)
    records = [
        events.emit("call_started", t=100.0, correlation_id="corr-secret"),
        events.emit("partial", t=101.0, utterance_id=1, text="what are"),
        events.emit("final", t=101.5, utterance_id=1, text="what are your hours", speech_end_t=101.2, voiced_ms=900),
        events.emit("dtmf_input", t=102.0, digits="4321#"),
        events.emit("turn_started", t=102.1, turn_id=2, kind="speech", input="what are your hours"),
        events.emit("tool_called", t=102.2, turn_id=2, name="lookup", arguments={"pin": "4321"}),
        events.emit("turn_failed", t=102.3, turn_id=2, stage="agent", error="KeyError: secret internals"),
        events.emit("input_error", t=102.4, error="bad frame"),
        events.emit("barge_in_paused", t=103.0, turn_id=2, utterance_id=3, heard_ms=240),
    ]
    shown = [page_event(record, 100.0) for record in records]
    assert [json.loads(s)["event"] if s else None for s in shown] == [
        {"name": "call_started", "t": 0.0},
        {"name": "partial", "t": 1.0, "utterance_id": 1, "text": "what are"},
        {"name": "final", "t": 1.5, "utterance_id": 1, "text": "what are your hours"},
        {"name": "dtmf_input", "t": 2.0, "digits": "••••#"},  # masked, as the records hold it
        {"name": "turn_started", "t": 2.1, "turn_id": 2, "kind": "speech"},
        None,  # tool calls never reach the page
        {"name": "turn_failed", "t": 2.3, "turn_id": 2, "stage": "agent"},  # not the error's text
        None,
        {"name": "barge_in_paused", "t": 3.0, "turn_id": 2, "heard_ms": 240},
    ]
    assert all(json.loads(s)["type"] == "event" and "call_id" not in s for s in shown if s)


def test_every_page_event_is_a_known_event():
    from parley.media.events import EVENT_NAMES

    assert set(PAGE_FIELDS) <= EVENT_NAMES


def test_figures_are_messages_of_their_own():
    assert json.loads(figure_message("voice_to_voice", 0.612345, 2)) == {
        "type": "figure",
        "name": "voice_to_voice",
        "seconds": 0.6123,
        "turn_id": 2,
    }


# --- the writer's messages that are not audio --------------------------------------------------------------


class Socket:
    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    async def send(self, message: str | bytes) -> None:
        self.sent.append(message)


async def test_info_messages_go_in_order_and_survive_a_stop_and_a_pause():
    socket = Socket()
    events = EventLog("t", to_log=False)
    writer = OutboundWriter(socket.send, events, STOP_AUDIO)
    writer.send_audio(1, b"a1")
    assert writer.send_info("caption-1")
    writer.send_audio(1, b"a2")
    writer.pause_audio(1)  # drops turn 1's queued audio, not the captions
    writer.send_info("caption-2")
    writer.stop_audio(1, send_stop=False)
    writer.send_audio(1, b"a3")  # a cancelled turn's: dropped
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.01)
    task.cancel()
    assert socket.sent == [STOP_AUDIO, "caption-1", "caption-2"]
    assert writer.frames_sent == 0 and writer.info_sent == 2  # captions are not frames
    assert [e["event"] for e in events.snapshot()] == ["stop_audio_sent"]  # and no first_audio_sent


async def test_info_messages_are_bounded_and_dropped_once_closed():
    socket = Socket()
    writer = OutboundWriter(socket.send, EventLog("t", to_log=False), STOP_AUDIO)
    accepted = [writer.send_info(f"m{i}") for i in range(MAX_INFO_PENDING + 5)]
    assert accepted.count(True) == MAX_INFO_PENDING and writer.info_dropped == 5
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.01)
    assert len(socket.sent) == MAX_INFO_PENDING
    assert writer.send_info("after the queue drained")  # room again
    writer.closed = True
    assert not writer.send_info("after close")
    task.cancel()


async def test_a_failing_socket_closes_the_writer_on_an_info_message():
    async def broken(_message: str | bytes) -> None:
        raise ConnectionError("gone")

    writer = OutboundWriter(broken, EventLog("t", to_log=False), STOP_AUDIO)
    writer.send_info("caption")
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.01)
    task.cancel()
    assert writer.closed and writer.info_sent == 0


# --- who may open a browser socket (the refusals themselves, over HTTP: test_browser_channel.py) ----------


def socket(headers: dict[str, str], protocols: tuple[str, ...] = ("parley.browser",)) -> WebSocket:
    scope = {
        "type": "websocket",
        "path": "/ws/browser",
        "headers": [(key.lower().encode(), value.encode()) for key, value in headers.items()],
        "subprotocols": list(protocols),
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
    }

    async def nothing() -> Any:
        return None

    return WebSocket(scope, nothing, nothing)  # type: ignore[arg-type]


def rules(**overrides: Any) -> Any:
    return load_settings(**({"host": "127.0.0.1", "port": 8000, "event_log": False} | overrides))


def test_on_loopback_the_servers_own_page_may_connect():
    settings = rules()
    assert (
        browser_media_refusal(socket({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}), settings) is None
    )
    assert (
        browser_media_refusal(socket({"host": "localhost:8000", "origin": "http://localhost:8000"}), settings) is None
    )
    assert browser_media_refusal(socket({"host": "127.0.0.1:8000"}), settings) is None  # not a browser
    for headers in (
        {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:9999"},  # another local page
        {"host": "127.0.0.1:8000", "origin": "https://evil.example"},
        {"host": "evil.example:8000", "origin": "http://evil.example:8000"},  # DNS rebinding
        {"host": "127.0.0.1:8000", "origin": "null"},
    ):
        reason = browser_media_refusal(socket(headers), settings)
        assert reason is not None and "Origin" in reason, headers
    allowed = rules(allowed_origins=["https://app.example.org"])
    assert (
        browser_media_refusal(socket({"host": "127.0.0.1:8000", "origin": "https://app.example.org"}), allowed) is None
    )


def test_elsewhere_a_token_and_an_allowed_origin_are_both_needed():
    page = {"host": "parley.example.org", "origin": "https://parley.example.org"}
    token = ("parley.browser", "bearer.t0ken")
    assert "PARLEY_API_TOKEN" in (browser_media_refusal(socket(page, token), rules(host="0.0.0.0")) or "")
    settings = rules(host="0.0.0.0", api_token="t0ken", allowed_origins=["https://parley.example.org"])
    assert browser_media_refusal(socket(page, token), settings) is None
    assert "missing token" in (browser_media_refusal(socket(page), settings) or "")
    assert browser_media_refusal(socket(page, ("parley.browser", "bearer.wrong")), settings) == "wrong token"
    same_origin_only = rules(host="0.0.0.0", api_token="t0ken")  # its own page, but not in the list
    assert "not in PARLEY_ALLOWED_ORIGINS" in (browser_media_refusal(socket(page, token), same_origin_only) or "")
    assert browser_media_refusal(socket({"host": "x"}, token), same_origin_only) is None  # no browser: the token
    # A wrong token is refused on loopback too (a right one is not needed there).
    loopback = rules(api_token="t0ken")
    local_page = {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}
    assert browser_media_refusal(socket(local_page, ("bearer.nope",)), loopback) == "wrong token"
    assert browser_media_refusal(socket(local_page), loopback) is None


def test_helpers():
    assert subprotocol_token(socket({}, ("parley.browser", "bearer.abc"))) == "abc"
    assert subprotocol_token(socket({}, ("parley.browser",))) is None
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("HTTP://LocalHost:8000/", "localhost:8000")
    assert not same_origin("http://127.0.0.1:8000", "127.0.0.1:8001")
    assert not same_origin("file://x", "x") and not same_origin("http://[::1", "x") and not same_origin("null", "")
