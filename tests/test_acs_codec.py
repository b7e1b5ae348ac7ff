"""Tests for the sans-I/O ACS media-streaming codec (parley.transports.acs)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from parley.transports import acs
from parley.transports.acs import (
    FRAME_MS,
    MAX_MESSAGE_CHARS,
    SUPPORTED_SAMPLE_RATES,
    AcsProtocolError,
    AudioFormat,
    AudioFrame,
    AudioMetadata,
    Dtmf,
    FrameLengthError,
    InvalidAudio,
    MalformedMessage,
    OutboundAudio,
    OutboundStop,
    TranscriptionData,
    TranscriptionMetadata,
    UnknownMessage,
    UnsupportedFormat,
    audio_data_message,
    audio_metadata_message,
    dtmf_message,
    frame_bytes,
    inbound_audio_message,
    infer_format,
    parse_inbound,
    parse_outbound,
    stop_audio_message,
)

FMT16 = AudioFormat(16000)
FMT24 = AudioFormat(24000)
SUB_ID = "89e8cb59-b991-48b0-b154-1db84f16a077"
PARTICIPANT = "8:acs:3d20e1de-0f28-41c5-84c0-5b6b9c4e8d0e_00000024-4fbc-6c76-7c4b-a43a0d0062ff"
TIMESTAMP = "2024-11-15T19:16:12.925Z"


def pcm(n: int) -> bytes:
    """Deterministic, non-silent test audio of `n` bytes (distinct bytes catch reordering)."""
    return bytes(i % 251 for i in range(n))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dumps(obj: Any) -> str:
    return json.dumps(obj)


def raises(exc: type[Exception], *fragments: str) -> Any:
    """pytest.raises that also demands the message mention every fragment (case-insensitive)."""
    pattern = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    return pytest.raises(exc, match=re.compile(pattern, re.IGNORECASE | re.DOTALL))


def audio_data(data: str, **extra: Any) -> str:
    return dumps({"kind": "AudioData", "audioData": {"data": data, **extra}})


def metadata(**fields: Any) -> str:
    body = {
        "subscriptionId": SUB_ID,
        "encoding": "PCM",
        "sampleRate": 16000,
        "channels": 1,
        "length": 640,
    }
    body.update(fields)
    # `...` marks a field to leave out entirely (None would send JSON null).
    present = {key: value for key, value in body.items() if value is not ...}
    return dumps({"kind": "AudioMetadata", "audioMetadata": present})


# ------------------------------------------------------------------------------------------
# Format helpers
# ------------------------------------------------------------------------------------------


class TestFormat:
    def test_constants(self) -> None:
        assert SUPPORTED_SAMPLE_RATES == (16000, 24000)
        assert FRAME_MS == 20
        assert MAX_MESSAGE_CHARS == 65536

    @pytest.mark.parametrize(("rate", "nbytes", "samples"), [(16000, 640, 320), (24000, 960, 480)])
    def test_frame_sizes(self, rate: int, nbytes: int, samples: int) -> None:
        assert frame_bytes(rate) == nbytes
        fmt = AudioFormat.for_rate(rate)
        assert fmt == AudioFormat(rate, 1, "PCM", "")
        assert fmt.frame_bytes == nbytes
        assert fmt.frame_samples == samples

    @pytest.mark.parametrize("rate", [8000, 44100, 48000, 0, -16000, True])
    def test_frame_bytes_unsupported_rate(self, rate: int) -> None:
        with raises(UnsupportedFormat, "sampleRate", repr(rate)):
            frame_bytes(rate)

    @pytest.mark.parametrize(
        ("kwargs", "fragments"),
        [
            ({"sample_rate": 8000}, ("sampleRate", "8000")),
            ({"sample_rate": 44100}, ("sampleRate", "44100")),
            ({"sample_rate": 16000, "channels": 2}, ("channels", "2")),
            ({"sample_rate": 16000, "encoding": "opus"}, ("encoding", "opus")),
        ],
    )
    def test_audio_format_validates(self, kwargs: dict[str, Any], fragments: tuple[str, ...]) -> None:
        with raises(UnsupportedFormat, *fragments):
            AudioFormat(**kwargs)

    def test_encoding_is_normalised(self) -> None:
        assert AudioFormat(16000, encoding="pcm") == FMT16
        assert AudioFormat(16000, encoding="pcm").encoding == "PCM"

    def test_audio_format_is_frozen(self) -> None:
        with pytest.raises(AttributeError):
            FMT16.sample_rate = 24000  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("length", "expected"),
        [(640, FMT16), (960, FMT24), (0, None), (700, None), (1280, None), (641, None)],
    )
    def test_infer_format(self, length: int, expected: AudioFormat | None) -> None:
        assert infer_format(length) == expected

    def test_error_hierarchy(self) -> None:
        for exc in (MalformedMessage, InvalidAudio, FrameLengthError, UnsupportedFormat):
            assert issubclass(exc, AcsProtocolError)
        assert issubclass(AcsProtocolError, ValueError)
        assert issubclass(FrameLengthError, InvalidAudio)


# ------------------------------------------------------------------------------------------
# Inbound: documented messages, in every casing
# ------------------------------------------------------------------------------------------


def _pascal(kind: str) -> str:
    return kind


def _camel(kind: str) -> str:
    return kind[0].lower() + kind[1:]


def _upper(kind: str) -> str:
    return kind.upper()


def _lower(kind: str) -> str:
    return kind.lower()


def recase(obj: dict[str, Any], key_case: Any, kind_case: Any, payload_key_case: Any = None) -> dict[str, Any]:
    """Re-case the top-level keys, the kind value and the payload's keys (never deeper)."""
    payload_key_case = payload_key_case or key_case
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "kind":
            out[key_case("kind")] = kind_case(value)
        elif isinstance(value, dict):
            out[key_case(key)] = {payload_key_case(k): v for k, v in value.items()}
        else:
            out[key_case(key)] = value
    return out


CASINGS = pytest.mark.parametrize(
    ("key_case", "kind_case"),
    [
        pytest.param(_camel, _pascal, id="as-ACS-sends"),
        pytest.param(_camel, _camel, id="js-sdk-camel-kind"),
        pytest.param(lambda k: k[0].upper() + k[1:], _pascal, id="pascal-keys"),
        pytest.param(_upper, _upper, id="ALLCAPS"),
        pytest.param(_lower, _lower, id="lowercase"),
    ],
)

AUDIO_METADATA = {
    "kind": "AudioMetadata",
    "audioMetadata": {
        "subscriptionId": SUB_ID,
        "encoding": "PCM",
        "sampleRate": 24000,
        "channels": 1,
        "length": 960,
    },
}
AUDIO_DATA = {
    "kind": "AudioData",
    "audioData": {
        "timestamp": TIMESTAMP,
        "participantRawID": PARTICIPANT,
        "data": b64(pcm(640)),
        "silent": False,
    },
}
DTMF_DATA = {"kind": "DtmfData", "dtmfData": {"data": "3"}}
TRANSCRIPTION_METADATA = {
    "kind": "TranscriptionMetadata",
    "transcriptionMetadata": {
        "subscriptionId": SUB_ID,
        "locale": "en-us",
        "callConnectionId": "6d09449c-6677-4f91-8cb7-012c338e6ec1",
        "correlationId": "6d09449c-6677-4f91-8cb7-012c338e6ec1",
    },
}
TRANSCRIPTION_DATA = {
    "kind": "TranscriptionData",
    "transcriptionData": {
        "text": "Hello",
        "format": "display",
        "confidence": 0.98,
        "offset": 49876484,
        "duration": 9200000,
        "words": [{"text": "Hello", "offset": 49876484, "duration": 9200000}],
        "participantRawID": "4:+15551234567",
        "resultStatus": "Final",
    },
}


class TestInboundDocumented:
    @CASINGS
    def test_audio_metadata(self, key_case: Any, kind_case: Any) -> None:
        msg = parse_inbound(dumps(recase(AUDIO_METADATA, key_case, kind_case)), None)
        assert msg == AudioMetadata(AudioFormat(24000, 1, "PCM", SUB_ID))

    @CASINGS
    def test_audio_data(self, key_case: Any, kind_case: Any) -> None:
        msg = parse_inbound(dumps(recase(AUDIO_DATA, key_case, kind_case)), FMT16)
        assert msg == AudioFrame(pcm=pcm(640), timestamp=TIMESTAMP, participant_id=PARTICIPANT, silent=False)

    @CASINGS
    def test_dtmf(self, key_case: Any, kind_case: Any) -> None:
        assert parse_inbound(dumps(recase(DTMF_DATA, key_case, kind_case)), FMT16) == Dtmf("3")

    @CASINGS
    def test_transcription_metadata(self, key_case: Any, kind_case: Any) -> None:
        msg = parse_inbound(dumps(recase(TRANSCRIPTION_METADATA, key_case, kind_case)), None)
        assert isinstance(msg, TranscriptionMetadata)
        assert msg.fields["locale"] == "en-us"
        assert msg.fields["subscriptionid"] == SUB_ID

    @CASINGS
    def test_transcription_data(self, key_case: Any, kind_case: Any) -> None:
        msg = parse_inbound(dumps(recase(TRANSCRIPTION_DATA, key_case, kind_case)), FMT16)
        assert msg == TranscriptionData(
            text="Hello",
            result_status="Final",
            confidence=0.98,
            offset_ticks=49876484,
            duration_ticks=9200000,
            participant_id="4:+15551234567",
        )

    def test_brief_example_allcaps_kind_pascal_keys(self) -> None:
        message = dumps({"Kind": "AUDIODATA", "AudioData": {"Data": b64(pcm(640))}})
        assert parse_inbound(message, None) == AudioFrame(pcm(640))

    def test_mixed_casing_within_one_message(self) -> None:
        payload = {"DATA": b64(pcm(960)), "Silent": True, "PARTICIPANTRAWID": "x"}
        message = dumps({"KIND": "audioData", "AudioDATA": payload})
        assert parse_inbound(message, FMT24) == AudioFrame(pcm(960), None, "x", True)

    def test_bytes_frame(self) -> None:
        message = dumps(DTMF_DATA).encode("utf-8")
        assert parse_inbound(message, None) == Dtmf("3")

    def test_extra_top_level_keys_ignored(self) -> None:
        message = dumps({**DTMF_DATA, "stopAudio": None, "audioData": None})
        assert parse_inbound(message, None) == Dtmf("3")


# ------------------------------------------------------------------------------------------
# Inbound: audio details
# ------------------------------------------------------------------------------------------


class TestInboundAudio:
    @pytest.mark.parametrize(
        "fmt", [FMT16, FMT24, AudioFormat(24000, subscription_id=SUB_ID)], ids=["16k", "24k", "24k-sub"]
    )
    def test_metadata_round_trip(self, fmt: AudioFormat) -> None:
        message = audio_metadata_message(fmt)
        assert parse_inbound(message, None) == AudioMetadata(fmt)
        body = json.loads(message)
        assert body["kind"] == "AudioMetadata"
        assert body["audioMetadata"]["length"] == fmt.frame_bytes
        assert body["audioMetadata"]["sampleRate"] == fmt.sample_rate

    @pytest.mark.parametrize("fmt", [FMT16, FMT24], ids=["16k", "24k"])
    @pytest.mark.parametrize("silent", [True, False])
    def test_audio_round_trip(self, fmt: AudioFormat, silent: bool) -> None:
        audio = pcm(fmt.frame_bytes)
        message = inbound_audio_message(audio, timestamp=TIMESTAMP, participant_id=PARTICIPANT, silent=silent)
        assert parse_inbound(message, fmt) == AudioFrame(audio, TIMESTAMP, PARTICIPANT, silent)

    def test_builder_omits_absent_fields_like_mixed_mode(self) -> None:
        body = json.loads(inbound_audio_message(pcm(640)))
        assert body == {"kind": "AudioData", "audioData": {"data": b64(pcm(640)), "silent": False}}

    def test_silent_missing_means_silent(self) -> None:
        frame = parse_inbound(audio_data(b64(pcm(640))), FMT16)
        assert isinstance(frame, AudioFrame)
        assert frame.silent is True

    def test_silent_null_means_silent(self) -> None:
        frame = parse_inbound(audio_data(b64(pcm(640)), silent=None), FMT16)
        assert isinstance(frame, AudioFrame) and frame.silent is True

    def test_participant_absent_mixed_mode(self) -> None:
        frame = parse_inbound(audio_data(b64(pcm(640)), timestamp=TIMESTAMP, silent=False), FMT16)
        assert frame == AudioFrame(pcm(640), TIMESTAMP, None, False)

    @pytest.mark.parametrize(("length", "inferred"), [(640, FMT16), (960, FMT24)])
    def test_frame_before_metadata_accepted(self, length: int, inferred: AudioFormat) -> None:
        frame = parse_inbound(inbound_audio_message(pcm(length)), None)
        assert isinstance(frame, AudioFrame)
        assert infer_format(len(frame.pcm)) == inferred

    @pytest.mark.parametrize("length", [700, 0, 2, 639, 1280])
    def test_frame_before_metadata_rejected(self, length: int) -> None:
        with raises(FrameLengthError, f"{length} bytes", "before AudioMetadata", "640", "960"):
            parse_inbound(inbound_audio_message(pcm(length)), None)

    @pytest.mark.parametrize(
        ("fmt", "length"),
        [(FMT16, 960), (FMT16, 639), (FMT16, 641), (FMT16, 0), (FMT24, 640), (FMT24, 961), (FMT24, 1920)],
    )
    def test_wrong_length_for_call_format(self, fmt: AudioFormat, length: int) -> None:
        with raises(FrameLengthError, f"{length} bytes", str(fmt.sample_rate), str(fmt.frame_bytes)):
            parse_inbound(inbound_audio_message(pcm(length)), fmt)

    def test_frame_length_error_is_invalid_audio(self) -> None:
        with pytest.raises(InvalidAudio):
            parse_inbound(inbound_audio_message(pcm(641)), FMT16)

    @pytest.mark.parametrize(
        "data",
        [
            "not base64!",
            "AAA",  # missing padding
            "AA=A",  # padding in the middle
            "AAAA\nAAAA",  # whitespace is not tolerated with validate=True
            "A===",  # one data character cannot encode a byte
            "=AAA",  # leading padding
            "ÄÄÄÄ",  # non-ASCII
        ],
    )
    def test_bad_base64(self, data: str) -> None:
        with raises(InvalidAudio, "base64", "'data'"):
            parse_inbound(audio_data(data), FMT16)

    def test_bad_base64_error_is_not_frame_length_error(self) -> None:
        with pytest.raises(InvalidAudio) as info:
            parse_inbound(audio_data("@@@@"), FMT16)
        assert not isinstance(info.value, FrameLengthError)


# ------------------------------------------------------------------------------------------
# Inbound: AudioMetadata validation
# ------------------------------------------------------------------------------------------


class TestInboundMetadataErrors:
    @pytest.mark.parametrize(
        ("fields", "fragments"),
        [
            ({"sampleRate": 8000, "length": 320}, ("sampleRate", "8000")),
            ({"sampleRate": 44100, "length": 1764}, ("sampleRate", "44100")),
            ({"sampleRate": 48000, "length": 1920}, ("sampleRate", "48000")),
            ({"channels": 2}, ("channels", "2")),
            ({"encoding": "opus"}, ("encoding", "opus")),
            ({"encoding": "mulaw"}, ("encoding", "mulaw")),
            ({"length": 960}, ("length", "960", "640", "16000")),
            ({"length": 641}, ("length", "641")),
            ({"sampleRate": 24000, "length": 640}, ("length", "640", "960", "24000")),
        ],
    )
    def test_unsupported_format(self, fields: dict[str, Any], fragments: tuple[str, ...]) -> None:
        with raises(UnsupportedFormat, *fragments):
            parse_inbound(metadata(**fields), None)

    @pytest.mark.parametrize("encoding", ["pcm", "Pcm", "PCM"])
    def test_encoding_case_insensitive(self, encoding: str) -> None:
        expected = AudioMetadata(AudioFormat(16000, subscription_id=SUB_ID))
        assert parse_inbound(metadata(encoding=encoding), None) == expected

    def test_optional_fields_default(self) -> None:
        message = dumps({"kind": "AudioMetadata", "audioMetadata": {"sampleRate": 16000}})
        assert parse_inbound(message, None) == AudioMetadata(FMT16)

    @pytest.mark.parametrize(
        ("fields", "fragments"),
        [
            ({"sampleRate": ...}, ("sampleRate", "missing")),
            ({"sampleRate": None}, ("sampleRate", "missing")),
            ({"sampleRate": "16000"}, ("sampleRate", "integer", "'16000'")),
            ({"sampleRate": 16000.0}, ("sampleRate", "integer")),
            ({"sampleRate": True}, ("sampleRate", "integer", "boolean")),
            ({"channels": "1"}, ("channels", "integer")),
            ({"length": "640"}, ("length", "integer")),
            ({"encoding": 1}, ("encoding", "string")),
            ({"subscriptionId": 42}, ("subscriptionId", "string", "42")),
        ],
    )
    def test_ill_typed_fields(self, fields: dict[str, Any], fragments: tuple[str, ...]) -> None:
        with raises(MalformedMessage, *fragments):
            parse_inbound(metadata(**fields), None)


# ------------------------------------------------------------------------------------------
# Inbound: DTMF
# ------------------------------------------------------------------------------------------


class TestDtmf:
    @pytest.mark.parametrize(
        ("data", "digits"),
        [("3", "3"), ("0123456789", "0123456789"), ("*#", "*#"), ("abcd", "ABCD"), ("A", "A")],
    )
    def test_valid(self, data: str, digits: str) -> None:
        assert parse_inbound(dumps({"kind": "DtmfData", "dtmfData": {"data": data}}), None) == Dtmf(digits)

    @pytest.mark.parametrize("digits", ["5", "*", "#", "1A*#", "d"])
    def test_round_trip(self, digits: str) -> None:
        assert parse_inbound(dtmf_message(digits), None) == Dtmf(digits.upper())

    @pytest.mark.parametrize(
        ("data", "exc", "fragments"),
        [
            ("", MalformedMessage, ("'data'", "empty")),
            ("E", MalformedMessage, ("'data'", "'E'", "DTMF")),
            ("12x", MalformedMessage, ("'data'", "'X'", "DTMF")),
            ("1 2", MalformedMessage, ("'data'", "DTMF")),
            ("five", MalformedMessage, ("'data'", "'five'")),
            (3, MalformedMessage, ("'data'", "string", "3")),
            (None, MalformedMessage, ("'data'", "missing")),
        ],
    )
    def test_invalid(self, data: Any, exc: type[Exception], fragments: tuple[str, ...]) -> None:
        with raises(exc, *fragments):
            parse_inbound(dumps({"kind": "DtmfData", "dtmfData": {"data": data}}), None)

    @pytest.mark.parametrize("digits", ["", "E", "1-2"])
    def test_builder_rejects_invalid(self, digits: str) -> None:
        with raises(MalformedMessage, "DtmfData", "'data'"):
            dtmf_message(digits)


# ------------------------------------------------------------------------------------------
# Inbound: transcription
# ------------------------------------------------------------------------------------------


class TestTranscription:
    def test_minimal_intermediate(self) -> None:
        body = {"text": "Hel", "resultStatus": "Intermediate"}
        message = dumps({"kind": "TranscriptionData", "transcriptionData": body})
        expected = TranscriptionData("Hel", "Intermediate", None, None, None, None)
        assert parse_inbound(message, None) == expected

    def test_integer_confidence_becomes_float(self) -> None:
        body = {"text": "", "resultStatus": "Final", "confidence": 1}
        message = dumps({"kind": "TranscriptionData", "transcriptionData": body})
        msg = parse_inbound(message, None)
        assert isinstance(msg, TranscriptionData)
        assert msg.confidence == 1.0 and isinstance(msg.confidence, float)

    @pytest.mark.parametrize(
        ("override", "fragments"),
        [
            ({"text": None}, ("TranscriptionData", "'text'", "missing")),
            ({"text": 5}, ("'text'", "string")),
            ({"resultStatus": None}, ("'resultStatus'", "missing")),
            ({"confidence": "high"}, ("'confidence'", "number", "'high'")),
            ({"confidence": True}, ("'confidence'", "number", "boolean")),
            ({"offset": 1.5}, ("'offset'", "integer", "1.5")),
            ({"duration": "9200000"}, ("'duration'", "integer")),
            ({"participantRawID": 7}, ("'participantRawID'", "string")),
        ],
    )
    def test_ill_typed(self, override: dict[str, Any], fragments: tuple[str, ...]) -> None:
        body = {**TRANSCRIPTION_DATA["transcriptionData"], **override}
        body = {k: v for k, v in body.items() if v is not None}
        with raises(MalformedMessage, *fragments):
            parse_inbound(dumps({"kind": "TranscriptionData", "transcriptionData": body}), None)


# ------------------------------------------------------------------------------------------
# Inbound: unknown kinds and malformed envelopes
# ------------------------------------------------------------------------------------------


class TestInboundEnvelope:
    @pytest.mark.parametrize("kind", ["MarkData", "DtmfMetadata", "markData", "SomethingNew", "StopAudio"])
    def test_unknown_kind(self, kind: str) -> None:
        assert parse_inbound(dumps({"kind": kind, "whatever": {"x": 1}}), FMT16) == UnknownMessage(kind)

    def test_unknown_kind_needs_no_payload(self) -> None:
        assert parse_inbound('{"kind":"MarkData"}', None) == UnknownMessage("MarkData")

    @pytest.mark.parametrize(
        ("message", "fragments"),
        [
            ("", ("not valid JSON",)),
            ("{", ("not valid JSON",)),
            ("{'kind': 'AudioData'}", ("not valid JSON",)),
            ('{"kind":"AudioData",}', ("not valid JSON",)),
            ("[1, 2]", ("JSON object", "array")),
            ('[{"kind":"AudioData"}]', ("JSON object", "array")),
            ("42", ("JSON object", "number")),
            ('"AudioData"', ("JSON object", "string")),
            ("null", ("JSON object", "null")),
            ("true", ("JSON object", "boolean")),
            ("{}", ("'kind'",)),
            ('{"audioData":{"data":"AAAA"}}', ("'kind'",)),
            ('{"kind":null}', ("'kind'",)),
            ('{"kind":5}', ("'kind'", "string", "5")),
            ('{"kind":["AudioData"]}', ("'kind'", "string", "array")),
            ('{"kind":""}', ("'kind'", "empty")),
            ('{"kind":"AudioData"}', ("AudioData", "'audioData'")),
            ('{"kind":"AudioData","audioData":null}', ("'audioData'",)),
            ('{"kind":"AudioData","audioData":"AAAA"}', ("'audioData'", "object", "string")),
            ('{"kind":"DtmfData","dtmfData":[]}', ("'dtmfData'", "object", "array")),
            ('{"kind":"AudioMetadata"}', ("'audioMetadata'",)),
            ('{"kind":"TranscriptionData","data":{}}', ("'transcriptionData'",)),
            ('{"kind":"AudioData","audioData":{}}', ("AudioData", "'data'", "missing")),
            ('{"kind":"AudioData","audioData":{"silent":false}}', ("'data'", "missing")),
            ('{"kind":"AudioData","audioData":{"data":123}}', ("'data'", "string", "123")),
            ('{"kind":"AudioData","kind":"DtmfData"}', ("'dtmfData'",)),  # JSON last-wins
            ('{"kind":"DtmfData","Kind":"AudioData","dtmfData":{"data":"1"}}', ("'kind'", "'Kind'", "case")),
            ('{"kind":"DtmfData","dtmfData":{"data":"1","DATA":"2"}}', ("'data'", "'DATA'", "case")),
        ],
    )
    def test_malformed(self, message: str, fragments: tuple[str, ...]) -> None:
        with raises(MalformedMessage, *fragments):
            parse_inbound(message, FMT16)

    @pytest.mark.parametrize(
        ("field", "value", "fragments"),
        [
            ("timestamp", 12, ("'timestamp'", "string")),
            ("participantRawID", {"id": "x"}, ("'participantRawID'", "string", "object")),
            ("silent", "false", ("'silent'", "true or false", "'false'")),
            ("silent", 0, ("'silent'", "true or false")),
        ],
    )
    def test_ill_typed_audio_fields(self, field: str, value: Any, fragments: tuple[str, ...]) -> None:
        with raises(MalformedMessage, *fragments):
            parse_inbound(audio_data(b64(pcm(640)), **{field: value}), FMT16)

    @pytest.mark.parametrize(
        "message",
        [b"\xff\xfe{}", b'{"kind":"DtmfData","dtmfData":{"data":"\xc3"}}', b"\x80"],
    )
    def test_binary_not_utf8(self, message: bytes) -> None:
        with raises(MalformedMessage, "UTF-8"):
            parse_inbound(message, None)

    def test_binary_not_json(self) -> None:
        with raises(MalformedMessage, "not valid JSON"):
            parse_inbound(b"\x00\x01\x02", None)

    def test_binary_utf16_rejected(self) -> None:
        # json.loads(bytes) would auto-detect UTF-16; the protocol is UTF-8 only.
        with raises(MalformedMessage, "UTF-8"):
            parse_inbound(dumps(DTMF_DATA).encode("utf-16"), None)

    def test_deep_nesting(self) -> None:
        message = "[" * 50000 + "]" * 50000
        with raises(MalformedMessage, "characters"):  # too long: rejected before parsing
            parse_inbound(message, None)
        with raises(MalformedMessage, "JSON"):
            parse_inbound("[" * 30000 + "]" * 30000, None, max_chars=10**6)

    @pytest.mark.parametrize("as_bytes", [False, True])
    def test_oversize(self, as_bytes: bool) -> None:
        padding = "x" * MAX_MESSAGE_CHARS
        message: str | bytes = dumps({"kind": "MarkData", "markData": {"padding": padding}})
        if as_bytes:
            message = message.encode()
        with raises(MalformedMessage, str(len(message)), str(MAX_MESSAGE_CHARS)):
            parse_inbound(message, None)

    def test_exactly_at_limit_is_accepted(self) -> None:
        skeleton = '{"kind":"MarkData","p":""}'
        message = skeleton[:-2] + "x" * (MAX_MESSAGE_CHARS - len(skeleton)) + '"}'
        assert len(message) == MAX_MESSAGE_CHARS
        assert parse_inbound(message, None) == UnknownMessage("MarkData")
        with raises(MalformedMessage, str(MAX_MESSAGE_CHARS + 1)):
            parse_inbound(message[:-2] + 'x"}', None)

    def test_custom_limit(self) -> None:
        with raises(MalformedMessage, "10 allowed"):
            parse_inbound(dumps(DTMF_DATA), None, max_chars=10)


# ------------------------------------------------------------------------------------------
# Outbound (app -> ACS)
# ------------------------------------------------------------------------------------------


class TestOutboundBuilders:
    def test_audio_data_exact(self) -> None:
        audio = pcm(640)
        expected = '{"Kind":"AudioData","AudioData":{"Data":"' + b64(audio) + '"},"StopAudio":null}'
        assert audio_data_message(audio) == expected

    def test_audio_data_literal(self) -> None:
        expected = '{"Kind":"AudioData","AudioData":{"Data":"AAH/fw=="},"StopAudio":null}'
        assert audio_data_message(b"\x00\x01\xff\x7f") == expected

    def test_audio_data_matches_json_dumps(self) -> None:
        audio = pcm(960)
        expected = json.dumps(
            {"Kind": "AudioData", "AudioData": {"Data": b64(audio)}, "StopAudio": None}, separators=(",", ":")
        )
        assert audio_data_message(audio) == expected

    def test_stop_audio_exact(self) -> None:
        assert stop_audio_message() == '{"Kind":"StopAudio","AudioData":null,"StopAudio":{}}'
        assert stop_audio_message() == acs.STOP_AUDIO_MESSAGE

    @pytest.mark.parametrize(
        ("audio", "exc", "fragments"),
        [
            (b"", InvalidAudio, ("no audio",)),
            (b"\x00" * 641, FrameLengthError, ("641", "16-bit")),
        ],
    )
    def test_audio_data_rejects(self, audio: bytes, exc: type[Exception], fragments: tuple[str, ...]) -> None:
        with raises(exc, *fragments):
            audio_data_message(audio)


class TestParseOutbound:
    @pytest.mark.parametrize("length", [2, 640, 960, 4800])
    def test_documented_audio(self, length: int) -> None:
        audio = pcm(length)
        assert parse_outbound(audio_data_message(audio)) == OutboundAudio(audio)

    def test_documented_stop(self) -> None:
        assert parse_outbound(stop_audio_message()) == OutboundStop()

    def test_js_sdk_audio(self) -> None:
        audio = pcm(640)
        payload = {"data": b64(audio), "isSilent": False}
        message = dumps({"kind": "audioData", "audioData": payload, "stopAudio": {}})
        assert parse_outbound(message) == OutboundAudio(audio)

    def test_js_sdk_stop(self) -> None:
        assert parse_outbound('{"kind":"stopAudio","stopAudio":{}}') == OutboundStop()

    @pytest.mark.parametrize(
        "message",
        [
            '{"KIND":"STOPAUDIO"}',
            '{"kind":"stopaudio","stopAudio":null}',
            b'{"Kind":"StopAudio","AudioData":null,"StopAudio":{}}',
        ],
    )
    def test_stop_variants(self, message: str | bytes) -> None:
        assert parse_outbound(message) == OutboundStop()

    def test_allcaps_audio(self) -> None:
        message = dumps({"KIND": "AUDIODATA", "AUDIODATA": {"DATA": b64(pcm(4))}})
        assert parse_outbound(message) == OutboundAudio(pcm(4))

    @pytest.mark.parametrize("kind", ["MarkData", "Mark", "audioMetadata"])
    def test_unknown(self, kind: str) -> None:
        assert parse_outbound(dumps({"kind": kind})) == UnknownMessage(kind)

    @pytest.mark.parametrize(
        ("message", "exc", "fragments"),
        [
            ("nope", MalformedMessage, ("not valid JSON",)),
            ("[]", MalformedMessage, ("JSON object", "array")),
            ("7", MalformedMessage, ("JSON object", "number")),
            ('{"AudioData":{"Data":"AAAA"}}', MalformedMessage, ("'kind'",)),
            ('{"Kind":"AudioData","AudioData":null,"StopAudio":null}', MalformedMessage, ("'AudioData'",)),
            ('{"Kind":"AudioData","AudioData":{}}', MalformedMessage, ("'data'", "missing")),
            ('{"Kind":"AudioData","AudioData":{"Data":false}}', MalformedMessage, ("'data'", "string")),
            ('{"Kind":"AudioData","AudioData":{"Data":"%%%%"}}', InvalidAudio, ("base64", "'%%%%'")),
            ('{"Kind":"AudioData","AudioData":{"Data":"AAAA"}}', FrameLengthError, ("3 bytes", "16-bit")),
            (b"\xff", MalformedMessage, ("UTF-8",)),
        ],
    )
    def test_errors(self, message: str | bytes, exc: type[Exception], fragments: tuple[str, ...]) -> None:
        with raises(exc, *fragments):
            parse_outbound(message)

    def test_oversize(self) -> None:
        message = audio_data_message(pcm(60000))
        assert len(message) > MAX_MESSAGE_CHARS
        with raises(MalformedMessage, str(MAX_MESSAGE_CHARS)):
            parse_outbound(message)
        assert parse_outbound(message, max_chars=len(message)) == OutboundAudio(pcm(60000))


# ------------------------------------------------------------------------------------------
# Whole-call flow through the builders
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", SUPPORTED_SAMPLE_RATES)
def test_simulated_call_flow(rate: int) -> None:
    """Metadata, then frames validated against it, as the media handler will drive the codec."""
    fmt: AudioFormat | None = None
    frames: list[bytes] = []
    stream = [audio_metadata_message(AudioFormat.for_rate(rate)), dtmf_message("1")]
    stream += [inbound_audio_message(pcm(frame_bytes(rate)), silent=i % 2 == 0) for i in range(5)]
    stream.append('{"kind":"MarkData","markData":{"id":"m1"}}')
    for raw in stream:
        msg = parse_inbound(raw, fmt)
        if isinstance(msg, AudioMetadata):
            fmt = msg.format
        elif isinstance(msg, AudioFrame):
            frames.append(msg.pcm)
    assert fmt == AudioFormat.for_rate(rate)
    assert b"".join(frames) == pcm(frame_bytes(rate)) * 5


# --- the fast JSON path (orjson) reads every message as json.loads did ------------------------------
def test_an_integer_beyond_64_bits_stays_an_integer() -> None:
    """orjson would read it as a float; the codec reads such a message again with json.loads, so
    the error names the integer the peer sent."""
    big = 2**64 + 1
    message = f'{{"kind":"AudioMetadata","audioMetadata":{{"sampleRate":{big},"channels":1}}}}'
    with pytest.raises(acs.UnsupportedFormat, match=str(big)[:20]):
        acs.parse_inbound(message, None)


def test_what_orjson_refuses_json_still_reads() -> None:
    message = '{"kind":"TranscriptionData","transcriptionData":{"text":"hi","resultStatus":"Final","confidence":NaN}}'
    parsed = acs.parse_inbound(message, None)
    assert isinstance(parsed, acs.TranscriptionData) and parsed.confidence != parsed.confidence  # NaN


def test_audio_data_decodes_as_before() -> None:
    pcm = bytes(range(256)) * 2 + bytes(128)
    frame = acs.parse_inbound(acs.inbound_audio_message(pcm), None)
    assert isinstance(frame, acs.AudioFrame) and frame.pcm == pcm and frame.silent is False
    assert acs.audio_data_message(pcm) == json.dumps(
        {"Kind": "AudioData", "AudioData": {"Data": base64.b64encode(pcm).decode()}, "StopAudio": None},
        separators=(",", ":"),
    )
