"""The Twilio Media Streams codec: every message both ways, bad input, and G.711 mu-law."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from parley.transports import twilio as tw
from parley.transports.acs import AcsProtocolError


def _ulaw_compress_g191(x: int) -> int:
    """ITU-T G.191's reference `ulaw_compress` for one 16-bit sample, transcribed as a scalar loop
    (left-justified 14-bit input; negatives by ones' complement)."""
    absno = ((~x) >> 2) + 33 if x < 0 else (x >> 2) + 33
    absno = min(absno, 0x1FFF)
    i, segno = absno >> 6, 1
    while i:
        segno += 1
        i >>= 1
    high = 0x0008 - segno
    low = 0x000F - ((absno >> segno) & 0x000F)
    out = (high << 4) | low
    return out | 0x80 if x >= 0 else out


def _ulaw_expand_g191(code: int) -> int:
    """G.191's `ulaw_expand`, scaled to 16 bits."""
    sign = code < 0x80
    mantissa = ~code
    exponent = (mantissa >> 4) & 0x07
    segment = exponent + 1
    mantissa &= 0x0F
    step = 4 << segment
    value = (0x80 << exponent) + step * mantissa + step // 2 - 4 * 33
    return -value if sign else value


# --------------------------------------------------------------------------------------------
# mu-law
# --------------------------------------------------------------------------------------------


def test_mulaw_encode_matches_the_g191_reference_for_every_16_bit_sample() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    expected = bytes(_ulaw_compress_g191(int(v)) for v in samples)
    assert tw.mulaw_encode(samples) == expected
    assert tw.mulaw_encode(samples.astype("<i2").tobytes()) == expected  # bytes in, too


def test_mulaw_decode_matches_the_g191_reference_for_every_code() -> None:
    decoded = tw.mulaw_decode(bytes(range(256)))
    assert decoded.dtype == np.int16
    assert [int(v) for v in decoded] == [_ulaw_expand_g191(c) for c in range(256)]


def test_mulaw_known_values() -> None:
    # The G.711 table's landmarks: zero, the loudest step each way, a segment boundary.
    assert tw.mulaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16)) == bytes([0xFF, 0x7F, 0x80, 0x00])
    assert list(tw.mulaw_decode(bytes([0xFF, 0x7F, 0x80, 0x00, 0x8F, 0xEF]))) == [0, 0, 32124, -32124, 16764, 132]


def test_mulaw_round_trip_error_is_within_one_step() -> None:
    samples = np.random.default_rng(1).integers(-32000, 32000, 20000).astype(np.int16)
    back = tw.mulaw_decode(tw.mulaw_encode(samples)).astype(np.int32)
    error = np.abs(back - samples)
    # A step is 1/16 of its segment: the error is at most half a step plus the bias rounding.
    assert np.all(error <= np.maximum(np.abs(samples.astype(np.int32)) // 16, 8) + 4)


# --------------------------------------------------------------------------------------------
# Inbound (Twilio -> app)
# --------------------------------------------------------------------------------------------


def test_connected() -> None:
    assert tw.parse_inbound(tw.connected_message()) == tw.Connected("Call", "1.0.0")


def test_start_with_parameters() -> None:
    msg = tw.start_message(
        "MZ1", "CA1", account_sid="AC1", custom_parameters={"agent": "echo", "to": "+1555"}, tracks=["inbound"]
    )
    start = tw.parse_inbound(msg)
    assert start == tw.Start(
        stream_sid="MZ1",
        call_sid="CA1",
        account_sid="AC1",
        tracks=("inbound",),
        custom_parameters={"agent": "echo", "to": "+1555"},
        sequence_number=1,
    )


def test_start_as_twilio_documents_it() -> None:
    doc = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "ACXXX",
            "streamSid": "MZXXX",
            "callSid": "CAXXX",
            "tracks": ["inbound", "outbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"FirstName": "Jane"},
        },
        "streamSid": "MZXXX",
    }
    start = tw.parse_inbound(json.dumps(doc))
    assert isinstance(start, tw.Start)
    assert start.tracks == ("inbound", "outbound") and start.custom_parameters == {"FirstName": "Jane"}


def test_media_strings_become_ints() -> None:
    audio = bytes(range(160))
    media = tw.parse_inbound(tw.inbound_media_message("MZ1", audio, 3, 40))
    assert media == tw.Media("MZ1", audio, "inbound", chunk=3, timestamp_ms=40, sequence_number=4)
    assert json.loads(tw.inbound_media_message("MZ1", audio, 3, 40))["media"]["chunk"] == "3"


def test_dtmf_mark_stop() -> None:
    assert tw.parse_inbound(tw.dtmf_message("MZ1", "#")) == tw.DtmfEvent("MZ1", "#")
    assert tw.parse_inbound(tw.dtmf_message("MZ1", "a")) == tw.DtmfEvent("MZ1", "A")
    assert tw.parse_inbound(tw.mark_echo_message("MZ1", "t1:5")) == tw.Mark("MZ1", "t1:5")
    assert tw.parse_inbound(tw.stop_message("MZ1", "CA1")) == tw.Stop("MZ1", "CA1", "")


def test_unknown_event_is_returned_not_raised() -> None:
    assert tw.parse_inbound('{"event":"someday","streamSid":"MZ1"}') == tw.UnknownEvent("someday")


def _media(payload: object, **extra: object) -> str:
    media = {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": payload, **extra}
    return json.dumps({"event": "media", "streamSid": "MZ1", "media": media})


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"streamSid":"MZ1"}', "no 'event'"),
        ('{"event":7}', "no 'event'"),
        ('{"event":"media","streamSid":"MZ1"}', "needs a 'media' object"),
        ('{"event":"media","media":{"payload":"AAAA"}}', "'streamSid' must be a string"),
        (_media("%%%%"), "not valid base64"),
        (_media(""), "'payload' is empty"),
        (_media(7), "'payload' must be a string"),
        (_media(base64.b64encode(bytes(tw.MAX_MEDIA_BYTES + 3)).decode()), "one second"),
        (_media("AAAA", chunk="one"), "'chunk' must be a non-negative integer string"),
        (_media("AAAA", timestamp="-5"), "'timestamp' must be a non-negative integer string"),
        ('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"x"}}', "not one DTMF symbol"),
        ('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"12"}}', "not one DTMF symbol"),
        ('{"event":"mark","streamSid":"MZ1","mark":{}}', "'name' must be a string"),
        ('{"event":"start","start":{"streamSid":"MZ1"}}', "'callSid' must be a string"),
        (
            '{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","mediaFormat":'
            '{"encoding":"audio/x-alaw","sampleRate":8000,"channels":1}}}',
            "unsupported mediaFormat",
        ),
        ('{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","customParameters":{"a":1}}}', "strings"),
        ('{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","tracks":"inbound"}}', "'tracks'"),
        ('{"event":"stop","streamSid":"MZ1","stop":[]}', "'stop' must be an object"),
        ("x" * (tw.MAX_MESSAGE_CHARS + 1), "more than"),
    ],
)
def test_bad_inbound_messages_raise_a_protocol_error(message: str, words: str) -> None:
    with pytest.raises(tw.TwilioProtocolError, match=words):
        tw.parse_inbound(message)
    assert issubclass(tw.TwilioProtocolError, AcsProtocolError)


# --------------------------------------------------------------------------------------------
# Outbound (app -> Twilio)
# --------------------------------------------------------------------------------------------


def test_outbound_builders_match_the_documented_shape_and_parse_back() -> None:
    audio = bytes([0xFF] * 160)
    media = json.loads(tw.media_message("MZ1", audio))
    assert media == {"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(audio).decode()}}
    assert json.loads(tw.mark_message("MZ1", "t1:10")) == {
        "event": "mark",
        "streamSid": "MZ1",
        "mark": {"name": "t1:10"},
    }
    assert json.loads(tw.clear_message("MZ1")) == {"event": "clear", "streamSid": "MZ1"}
    assert tw.parse_outbound(tw.media_message("MZ1", audio)) == tw.OutboundMedia("MZ1", audio)
    assert tw.parse_outbound(tw.mark_message("MZ1", "n")) == tw.OutboundMark("MZ1", "n")
    assert tw.parse_outbound(tw.clear_message("MZ1")) == tw.OutboundClear("MZ1")
    assert tw.parse_outbound('{"event":"other","streamSid":"MZ1"}') == tw.UnknownEvent("other")


def test_outbound_builders_refuse_empty_values() -> None:
    with pytest.raises(tw.TwilioProtocolError, match="no audio"):
        tw.media_message("MZ1", b"")
    with pytest.raises(tw.TwilioProtocolError, match="name"):
        tw.mark_message("MZ1", "")
    with pytest.raises(tw.TwilioProtocolError, match="DTMF"):
        tw.dtmf_message("MZ1", "Z")


def test_bad_outbound_messages_raise() -> None:
    with pytest.raises(tw.TwilioProtocolError, match="not valid base64"):
        tw.parse_outbound('{"event":"media","streamSid":"MZ1","media":{"payload":"!!"}}')
    with pytest.raises(tw.TwilioProtocolError, match="'streamSid'"):
        tw.parse_outbound('{"event":"clear"}')
