"""Property-based tests (hypothesis) of what a peer can send: the ACS codec and the media handler.

1. The codec: any str/bytes frame parses to a typed message or raises an `AcsProtocolError`
   subclass, never anything else; every builder round-trips through its parser; valid messages
   mutated at random (dropped keys, wrong types, re-cased keys and kinds, broken base64, odd frame
   lengths, huge strings and numbers, raw text damage) still only ever do one of those two things.
2. The handler, on the in-memory harness (a real MediaHandler over a FakeSocket): random scripts of
   inbound traffic (speech, noise, odd and malformed frames, keys, binary frames, waits, hang-ups).
   The call ends only with the hang-up and leaves no task behind, no audio of a cancelled turn is
   written after its cancellation, and no final is lost.

Profiles: `ci` (default; a few thousand examples in all, well under a minute) and `bench` (set
PARLEY_PROPERTIES_PROFILE=bench; `bench/fuzz_handler.py` runs the same checks at scale).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from parley.transports import acs
from parley.transports.acs import (
    MAX_MESSAGE_CHARS,
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
)

# ------------------------------------------------------------------------------- profiles
_COMMON = settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the tree; failures print a reproducible blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", _COMMON, max_examples=500)
settings.register_profile("bench", _COMMON, max_examples=100_000, phases=[Phase.generate])
PROFILE = os.environ.get("PARLEY_PROPERTIES_PROFILE", "ci")
_BASE = settings.get_profile(PROFILE)
CODEC = settings(_BASE, max_examples=_BASE.max_examples)
# A handler example runs a real call for ~0.1-0.5 s of wall time.
HANDLER = settings(_BASE, max_examples=60 if PROFILE == "ci" else 2000)

FMT16 = AudioFormat(16000)
FMT24 = AudioFormat(24000)
FORMATS = st.sampled_from([None, FMT16, FMT24])
INBOUND_TYPES = (AudioMetadata, AudioFrame, Dtmf, TranscriptionMetadata, TranscriptionData, UnknownMessage)
OUTBOUND_TYPES = (OutboundAudio, OutboundStop, UnknownMessage)


# ------------------------------------------------------------------------------- codec checks
def check_inbound(data: str | bytes, fmt: AudioFormat | None) -> object:
    """The codec's contract for one frame: a typed message, or an AcsProtocolError subclass."""
    try:
        message = acs.parse_inbound(data, fmt)
    except AcsProtocolError as exc:
        assert str(exc), "an error must say what was wrong"
        return exc
    assert isinstance(message, INBOUND_TYPES), message
    if isinstance(message, AudioFrame):
        length = len(message.pcm)
        assert length == fmt.frame_bytes if fmt is not None else acs.infer_format(length) is not None
    return message


def check_outbound(data: str | bytes) -> object:
    try:
        message = acs.parse_outbound(data)
    except AcsProtocolError as exc:
        assert str(exc)
        return exc
    assert isinstance(message, OUTBOUND_TYPES), message
    if isinstance(message, OutboundAudio):
        assert len(message.pcm) % 2 == 0
    return message


def check_both(data: str | bytes, fmt: AudioFormat | None) -> None:
    check_inbound(data, fmt)
    check_outbound(data)


# ------------------------------------------------------------------------------- codec strategies
KINDS = [
    "AudioMetadata",
    "AudioData",
    "DtmfData",
    "TranscriptionMetadata",
    "TranscriptionData",
    "StopAudio",
    "MarkData",
]
DTMF_SYMBOLS = "0123456789*#ABCDabcd"

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "PCM", "pcm", "AAAA", "=", "16000", "true", "0"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def recased(text: str) -> st.SearchStrategy[str]:
    """`text` with the case of each character flipped at random (hypothesis shrinks to no change)."""
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda flips: "".join(c.swapcase() if f else c for c, f in zip(text, flips, strict=True))
    )


@st.composite
def pcm_bytes(draw: st.DrawFn, lengths: st.SearchStrategy[int] | None = None) -> bytes:
    n = draw(lengths if lengths is not None else st.sampled_from([640, 960]))
    seed = draw(st.integers(0, 255))
    return bytes((seed + i * 7) % 256 for i in range(n))


formats = st.builds(AudioFormat, st.sampled_from([16000, 24000]), subscription_id=st.text(max_size=40))
ids = st.none() | st.text(max_size=60)


@st.composite
def valid_inbound(draw: st.DrawFn) -> tuple[str, AudioFormat | None]:
    """A message as ACS sends it (from the builders, or a transcription), and the call's format."""
    which = draw(st.sampled_from(["metadata", "audio", "dtmf", "transcription", "transcription_meta", "unknown"]))
    fmt = draw(FORMATS)
    if which == "metadata":
        return acs.audio_metadata_message(draw(formats)), fmt
    if which == "audio":
        lengths = st.just(fmt.frame_bytes) if fmt is not None else st.sampled_from([640, 960])
        pcm = draw(pcm_bytes(lengths))
        message = acs.inbound_audio_message(
            pcm, timestamp=draw(ids), participant_id=draw(ids), silent=draw(st.booleans())
        )
        return message, fmt
    if which == "dtmf":
        return acs.dtmf_message(draw(st.text(DTMF_SYMBOLS, min_size=1, max_size=12))), fmt
    if which == "transcription":
        body = {
            "text": draw(st.text(max_size=40)),
            "resultStatus": draw(st.sampled_from(["Final", "Intermediate"])),
            "confidence": draw(st.floats(0, 1)),
            "offset": draw(st.integers(0, 10**12)),
            "duration": draw(st.integers(0, 10**9)),
            "participantRawID": draw(st.text(max_size=20)),
        }
        return json.dumps({"kind": "TranscriptionData", "transcriptionData": body}), fmt
    if which == "transcription_meta":
        body = {"subscriptionId": draw(st.text(max_size=20)), "locale": "en-US"}
        return json.dumps({"kind": "TranscriptionMetadata", "transcriptionMetadata": body}), fmt
    return json.dumps({"kind": draw(st.sampled_from(["MarkData", "Hello", "audio"])), "x": 1}), fmt


@st.composite
def valid_outbound(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return acs.stop_audio_message()
    return acs.audio_data_message(draw(pcm_bytes(st.integers(1, 600).map(lambda n: 2 * n))))


def _payload_key(obj: dict[str, Any]) -> str | None:
    return next((k for k, v in obj.items() if isinstance(v, dict)), None)


def _pick_path(draw: st.DrawFn, obj: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """A (container, key) in the top level or the payload object."""
    containers = [obj] + [v for v in obj.values() if isinstance(v, dict)]
    containers = [c for c in containers if c]
    if not containers:
        return None
    container = draw(st.sampled_from(containers))
    return container, draw(st.sampled_from(sorted(container)))


def _mutate_b64(draw: st.DrawFn, data: str) -> str:
    how = draw(st.sampled_from(["truncate", "bad_char", "strip_padding", "pad", "space", "newline", "other_length"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "bad_char":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from(list("!@$%^&*-_.~é\x00 \t"))) + data[at:]
    if how == "strip_padding":
        return data.rstrip("=")
    if how == "pad":
        return data + "=" * draw(st.integers(1, 3))
    if how == "space":
        return " " + data
    if how == "newline":
        at = draw(st.integers(0, len(data)))
        return data[:at] + "\n" + data[at:]
    length = draw(st.sampled_from([0, 1, 2, 3, 638, 639, 641, 642, 959, 961, 1280, 1920, 4000]))
    return base64.b64encode(bytes(length)).decode()


def _mutate_object(draw: st.DrawFn, obj: dict[str, Any]) -> None:
    """One structural mutation, in place."""
    how = draw(
        st.sampled_from(
            ["drop", "retype", "recase_key", "recase_kind", "collide", "b64", "huge", "nest", "kind", "payload_type"]
        )
    )
    picked = _pick_path(draw, obj)
    if picked is None:
        obj[draw(st.sampled_from(["kind", "Kind", "audioData"]))] = draw(json_values)
        return
    container, key = picked
    if how == "drop":
        del container[key]
    elif how == "retype":
        container[key] = draw(json_values)
    elif how == "recase_key":
        new = draw(recased(key))
        container[new] = container.pop(key)
    elif how == "recase_kind":
        kind_key = next((k for k in obj if k.lower() == "kind"), None)
        if kind_key is not None and isinstance(obj[kind_key], str):
            obj[kind_key] = draw(recased(obj[kind_key]))
    elif how == "collide":
        container[draw(recased(key)) if key.lower() != key.upper() else key + "x"] = draw(json_values)
    elif how == "b64":
        data_key = next((k for k in container if k.lower() == "data"), None)
        if data_key is not None and isinstance(container[data_key], str):
            container[data_key] = _mutate_b64(draw, container[data_key])
    elif how == "huge":
        size = draw(st.sampled_from([1000, 30_000, MAX_MESSAGE_CHARS - 200, MAX_MESSAGE_CHARS + 10]))
        container[key] = draw(st.sampled_from(["A", "9", "é", "\\", '"', "\u2028"])) * size
    elif how == "nest":
        container[key] = draw(st.sampled_from([[container[key]], {"value": container[key]}, {key: container[key]}]))
    elif how == "kind":
        kind_key = next((k for k in obj if k.lower() == "kind"), "kind")
        obj[kind_key] = draw(st.sampled_from(KINDS) | st.text(max_size=15))
    else:  # the payload itself becomes another type
        payload = _payload_key(obj)
        if payload is not None:
            obj[payload] = draw(json_values)


def _mutate_text(draw: st.DrawFn, text: str) -> str | bytes:
    """One mutation of the serialized frame."""
    how = draw(
        st.sampled_from(["truncate", "insert", "delete", "big_int", "utf16", "bad_utf8", "bytes", "nan", "repeat"])
    )
    if how == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if how == "insert":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.text(min_size=1, max_size=3)) + text[at:]
    if how == "delete":
        at = draw(st.integers(0, max(0, len(text) - 1)))
        return text[:at] + text[at + 1 :]
    if how == "big_int":  # Python refuses to parse integers of more than 4300 digits
        number = "9" * draw(st.sampled_from([4299, 4300, 4301, 5000, 20_000]))
        for target in ("16000", "640", "960", "null", "true", "false", '""'):
            if target in text:
                return text.replace(target, number, 1)
        return text[:-1] + ',"n":' + number + "}" if text.endswith("}") else number
    if how == "utf16":
        return text.encode("utf-16")
    if how == "bad_utf8":
        at = draw(st.integers(0, len(text)))
        raw = text.encode("utf-8", "surrogatepass")
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + raw[at:]
    if how == "bytes":
        return text.encode("utf-8", "surrogatepass")
    if how == "nan":
        return text.replace("1", "NaN", 1).replace("false", "Infinity", 1)
    return text * draw(st.integers(2, 40))


@st.composite
def mutated_messages(draw: st.DrawFn) -> tuple[str | bytes, AudioFormat | None]:
    """A valid inbound or outbound message, damaged by a few structural and textual mutations."""
    if draw(st.integers(0, 3)) == 0:
        text, fmt = draw(valid_outbound()), draw(FORMATS)
    else:
        text, fmt = draw(valid_inbound())
    obj = json.loads(text)
    for _ in range(draw(st.integers(0, 4))):
        _mutate_object(draw, obj)
    try:
        frame: str | bytes = json.dumps(obj, allow_nan=True)
    except (ValueError, RecursionError):  # nothing a peer could send as JSON
        frame = text
    for _ in range(draw(st.integers(0, 2))):
        frame = _mutate_text(draw, frame if isinstance(frame, str) else frame.decode("utf-8", "replace"))
    return frame, fmt


any_frame = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["kind", "Kind", "KIND", *[k[0].lower() + k[1:] for k in KINDS]]), json_values).map(
        json.dumps
    ),
)


# ------------------------------------------------------------------------------- codec properties
@CODEC
@given(any_frame, FORMATS)
@example("[" * 100_000, None)
@example('{"kind":"AudioData","n":' + "1" * 5000 + "}", None)
def test_any_frame_parses_or_raises_a_protocol_error(frame: str | bytes, fmt: AudioFormat | None) -> None:
    check_both(frame, fmt)


@CODEC
@given(mutated_messages())
def test_mutated_messages_parse_or_raise_a_protocol_error(case: tuple[str | bytes, AudioFormat | None]) -> None:
    frame, fmt = case
    note(f"frame={frame[:300]!r} fmt={fmt}")
    check_both(frame, fmt)


@CODEC
@given(valid_inbound())
def test_inbound_builders_round_trip(case: tuple[str, AudioFormat | None]) -> None:
    text, fmt = case
    message = acs.parse_inbound(text, fmt)
    assert isinstance(message, INBOUND_TYPES)
    # the same frame as bytes, and every message rebuilt from its parse, parse the same
    assert acs.parse_inbound(text.encode(), fmt) == message
    if isinstance(message, AudioMetadata):
        assert acs.parse_inbound(acs.audio_metadata_message(message.format), fmt) == message
        assert message.format.frame_bytes == acs.frame_bytes(message.format.sample_rate)
    elif isinstance(message, AudioFrame):
        rebuilt = acs.inbound_audio_message(
            message.pcm, timestamp=message.timestamp, participant_id=message.participant_id, silent=message.silent
        )
        assert acs.parse_inbound(rebuilt, fmt) == message
    elif isinstance(message, Dtmf):
        assert message.digits == message.digits.upper()
        assert acs.parse_inbound(acs.dtmf_message(message.digits), fmt) == message


@CODEC
@given(formats, pcm_bytes(), ids, ids, st.booleans(), st.text(DTMF_SYMBOLS, min_size=1, max_size=20))
def test_builders_round_trip_exactly(
    fmt: AudioFormat, pcm: bytes, timestamp: str | None, participant: str | None, silent: bool, digits: str
) -> None:
    assert acs.parse_inbound(acs.audio_metadata_message(fmt), None) == AudioMetadata(fmt)
    frame = acs.inbound_audio_message(pcm, timestamp=timestamp, participant_id=participant, silent=silent)
    assert acs.parse_inbound(frame, None) == AudioFrame(pcm, timestamp, participant, silent)
    assert acs.parse_inbound(acs.dtmf_message(digits), fmt) == Dtmf(digits.upper())
    assert acs.parse_outbound(acs.audio_data_message(pcm)) == OutboundAudio(pcm)
    assert acs.parse_outbound(acs.stop_audio_message()) == OutboundStop()


@CODEC
@given(st.binary(max_size=3000))
def test_outbound_audio_builder_round_trips_or_refuses(pcm: bytes) -> None:
    try:
        message = acs.audio_data_message(pcm)
    except InvalidAudio as exc:
        assert not pcm or len(pcm) % 2, exc
        assert isinstance(exc, FrameLengthError) == bool(pcm)
        return
    assert acs.parse_outbound(message) == OutboundAudio(pcm)


@st.composite
def recased_messages(draw: st.DrawFn) -> tuple[str, str, AudioFormat | None]:
    """A valid message and the same message with its kind, top-level and payload keys re-cased."""
    text, fmt = draw(valid_inbound())
    obj = json.loads(text)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "kind" and isinstance(value, str):
            value = draw(recased(value))
        elif isinstance(value, dict):
            value = {draw(recased(k)): v for k, v in value.items()}
        out[draw(recased(key))] = value
    return text, json.dumps(out), fmt


@CODEC
@given(recased_messages())
def test_case_of_keys_and_kinds_does_not_matter(case: tuple[str, str, AudioFormat | None]) -> None:
    original, recased_text, fmt = case
    expected = check_inbound(original, fmt)
    got = check_inbound(recased_text, fmt)
    if isinstance(expected, UnknownMessage):
        assert isinstance(got, UnknownMessage) and got.kind.lower() == expected.kind.lower()
    elif isinstance(expected, TranscriptionMetadata):
        assert got == expected  # its keys come back lower-cased whatever the sender's casing
    else:
        assert got == expected


@CODEC
@given(valid_outbound(), st.data())
def test_outbound_parse_is_case_insensitive_too(text: str, data: st.DataObject) -> None:
    obj = json.loads(text)
    out = {}
    for key, value in obj.items():
        if key == "Kind":
            value = data.draw(recased(value))
        elif isinstance(value, dict):
            value = {data.draw(recased(k)): v for k, v in value.items()}
        out[data.draw(recased(key))] = value
    assert acs.parse_outbound(json.dumps(out)) == acs.parse_outbound(text)


def test_a_number_too_long_for_python_is_a_malformed_message() -> None:
    """Defect found by the properties: a JSON integer of more than 4300 digits made json.loads raise
    a plain ValueError (CPython's int-conversion limit), which escaped the handler's
    `except AcsProtocolError` and ended the call with an error."""
    frame = '{"kind":"AudioMetadata","audioMetadata":{"sampleRate":' + "1" * 5000 + "}}"
    for message in (frame, frame.encode()):
        with pytest.raises(MalformedMessage, match="not valid JSON"):
            acs.parse_inbound(message, None)
        with pytest.raises(MalformedMessage, match="not valid JSON"):
            acs.parse_outbound(message)
