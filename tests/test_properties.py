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

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from parley.media.writer import OutboundWriter
from parley.testing.harness import FRAME_S, LOUD, SAMPLE_RATE, CallHarness, ScriptedAgent, ScriptedSynthesizer
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
HANDLER = settings(_BASE, max_examples=120 if PROFILE == "ci" else 2000)

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
    if len(text) > 64:  # a huge string: re-case it whole
        return st.sampled_from([text, text.lower(), text.upper(), text.swapcase()])
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


# ------------------------------------------------------------------------------- the handler
def _frame_message(loud: bool, *, silent_flag: bool = False) -> str:
    samples = round(FRAME_S * SAMPLE_RATE)
    t = np.arange(samples) / SAMPLE_RATE
    pcm = ((LOUD if loud else 0.0) * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()
    return acs.inbound_audio_message(pcm, silent=silent_flag)


LOUD_FRAME = _frame_message(True)
LOUD_FRAME_FLAGGED_SILENT = _frame_message(True, silent_flag=True)
SILENT_FRAME = _frame_message(False, silent_flag=True)
TRAILING_SILENCE_FRAMES = 25  # 0.5 s: more than endpoint_silence_ms (200 ms) ends any utterance

REQUESTS = ["what time do you open", "book a table", "I want a pizza", "cancel my order", "where are you"]
NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
NOT_REQUESTS = ["uh-huh", "okay", "mhm", "hmm", "sure", "the", "", "   ", "yes", "stop", "F."]
spoken_texts = st.one_of(
    st.tuples(st.sampled_from(REQUESTS), st.sampled_from(NAMES)).map(" ".join),
    st.sampled_from(NOT_REQUESTS),
    st.none(),  # noise the recognizer makes nothing of
)

Op = tuple[Any, ...]
ops = st.one_of(
    st.tuples(st.just("speech"), spoken_texts, st.integers(1, 25), st.integers(0, 20)),
    st.tuples(st.just("frames"), st.sampled_from(["loud", "silent", "loud_flagged_silent"]), st.integers(1, 15)),
    st.tuples(st.just("odd_audio"), st.sampled_from([0, 1, 2, 320, 639, 641, 960, 1280])),
    st.tuples(st.just("dtmf"), st.text(DTMF_SYMBOLS, min_size=1, max_size=4)),
    st.tuples(st.just("raw"), st.one_of(mutated_messages().map(lambda case: case[0]), any_frame)),
    st.tuples(st.just("binary"), st.one_of(st.binary(max_size=50), st.just(LOUD_FRAME.encode()))),
    st.tuples(st.just("empty")),
    st.tuples(st.just("metadata"), st.sampled_from([16000, 24000])),
    st.tuples(st.just("wait"), st.sampled_from([0, 5, 20, 50, 100, 150])),
    st.tuples(st.just("disconnect")),
)


@dataclass(frozen=True)
class CallScript:
    reply: str
    ms_per_char: int
    greeting: str
    bargein_speaking: str
    ops: tuple[Op, ...]


def call_scripts(modes: tuple[str, ...] = ("pause", "confirm", "stop")) -> st.SearchStrategy[CallScript]:
    return st.builds(
        CallScript,
        reply=st.sampled_from(["Sure.", "Sure, we open at eleven.", "We open at eleven, and we close late tonight."]),
        ms_per_char=st.sampled_from([1, 4, 8]),
        greeting=st.sampled_from(["", "Hello."]),
        bargein_speaking=st.sampled_from(modes),
        ops=st.lists(ops, min_size=1, max_size=20).map(tuple),
    )


class SpyPolicy:
    """The handler's barge-in policy, recording what it decided about each final."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.finals: list[tuple[int, str, Any]] = []

    @property
    def pauses_on_onset(self) -> bool:
        return bool(self.inner.pauses_on_onset)

    def decide(self, signal: Any, turn: Any) -> Any:
        decision = self.inner.decide(signal, turn)
        if signal.trigger == "final":
            self.finals.append((signal.utterance_id, signal.text, decision))
        return decision


@contextmanager
def tapped_writer(tap: list[tuple[str, int]]) -> Iterator[None]:
    """Record, in order, each turn's cancellation and every message the writer writes, by turn."""
    stop_audio, write = OutboundWriter.stop_audio, OutboundWriter._write

    def tapped_stop_audio(self: OutboundWriter, turn_id: int, *, send_stop: bool = True) -> None:
        tap.append(("cancel", turn_id))
        stop_audio(self, turn_id, send_stop=send_stop)

    async def tapped_write(self: OutboundWriter, turn_id: int, message: str, is_stop: bool) -> None:
        tap.append(("stop" if is_stop else "audio", turn_id))
        await write(self, turn_id, message, is_stop)

    with (
        mock.patch.object(OutboundWriter, "stop_audio", tapped_stop_audio),
        mock.patch.object(OutboundWriter, "_write", tapped_write),
    ):
        yield


@dataclass
class CallReport:
    problems: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _send(call: CallHarness, op: Op) -> None:
    kind = op[0]
    if kind == "speech":
        _, text, loud, silence = op
        if text is not None:
            call.recognizer.finals.append(text)
        for _ in range(loud):
            call.send(LOUD_FRAME)
        for _ in range(silence):
            call.send(SILENT_FRAME)
    elif kind == "frames":
        frame = {"loud": LOUD_FRAME, "silent": SILENT_FRAME, "loud_flagged_silent": LOUD_FRAME_FLAGGED_SILENT}[op[1]]
        for _ in range(op[2]):
            call.send(frame)
    elif kind == "odd_audio":
        call.send(acs.inbound_audio_message(bytes(op[1]), silent=False))
    elif kind == "dtmf":
        call.send(acs.dtmf_message(op[1]))
    elif kind in ("raw", "binary"):
        frame = op[1]
        key = "bytes" if isinstance(frame, bytes) else "text"
        call.socket.inbound.put_nowait({"type": "websocket.receive", key: frame})
    elif kind == "empty":
        call.socket.inbound.put_nowait({"type": "websocket.receive"})
    elif kind == "metadata":
        call.send(acs.audio_metadata_message(AudioFormat(op[1])))
    else:  # pragma: no cover - every op kind is handled above
        raise AssertionError(op)


def _quiet(call: CallHarness, recognized: list[str]) -> bool:
    """Nothing left to happen: recognition caught up, every utterance finalised, no turn waiting or playing."""
    handler = call.handler
    events = call.events
    finals = sum(e["event"] == "final" for e in events)
    started = sum(e["event"] == "speech_started" for e in events)
    return (
        (handler.recognition is None or handler.recognition.backlog == 0)
        and len(recognized) == finals == started
        and len(handler.inbox) == 0
        and not handler.inbox._held
        and handler.route.current is None
    )


async def _settle(call: CallHarness, recognized: list[str], idle_s: float = 2.0) -> bool:
    """Wait until the call is quiet; False if it stops making progress (no new event for `idle_s`)."""
    deadline = time.monotonic() + idle_s
    calm = seen = 0
    while time.monotonic() < deadline:
        if len(call.handler.events.snapshot()) != seen:
            seen = len(call.handler.events.snapshot())
            deadline = time.monotonic() + idle_s
        calm = calm + 1 if _quiet(call, recognized) else 0
        if calm >= 4:  # ~40 ms without change: the recognition thread is idle too
            return True
        await asyncio.sleep(0.01)
    return False


async def run_call_script(script: CallScript) -> CallReport:
    """Play `script` to a real MediaHandler on the harness; report every broken promise."""
    report = CallReport()
    problems = report.problems
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(
        lambda _, context: problems.append(f"loop error: {context.get('message')} {context.get('exception')!r}")
    )
    started = time.monotonic()
    tap: list[tuple[str, int]] = []
    harness = CallHarness(
        agent=ScriptedAgent(reply=script.reply),
        synthesizer=ScriptedSynthesizer(ms_per_char=script.ms_per_char),
        call_id="props-call",
        greeting=script.greeting,
        bargein_speaking=script.bargein_speaking,
        resume_after_ms=200,
    )
    spy = SpyPolicy(harness.handler.policy)
    harness.handler.policy = spy  # type: ignore[assignment]
    recognized: list[str] = []
    scripted_end = harness.recognizer.end

    def end() -> str:
        text = scripted_end()
        recognized.append(text)
        return text

    harness.recognizer.end = end  # type: ignore[method-assign]
    hung_up_early = False
    with tapped_writer(tap):
        async with harness as call:
            for op in script.ops:
                if op[0] == "wait":
                    await asyncio.sleep(op[1] / 1000)
                elif op[0] == "disconnect":
                    hung_up_early = True
                    break
                else:
                    _send(call, op)
                await asyncio.sleep(0)
            if not hung_up_early:
                for _ in range(TRAILING_SILENCE_FRAMES):
                    call.send(SILENT_FRAME)
                if not await _settle(call, recognized):
                    problems.append(
                        f"the call never settled: backlog={call.handler.recognition and call.handler.recognition.backlog}"
                        f" recognized={len(recognized)} inbox={len(call.handler.inbox)} held={call.handler.inbox._held}"
                        f" current={call.handler.route.current}{_stack_of(call.handler.route.current)}"
                    )
            assert call._task is not None
            if call._task.done():
                problems.append("the call ended before the hang-up")
            try:
                await call.hang_up()
            except Exception as exc:
                problems.append(f"the handler raised out: {exc!r}")
            leftover = call.call_tasks()
            if leftover:
                problems.append(f"tasks of the call left after it ended: {leftover}")
    report.seconds = time.monotonic() - started
    report.events = events = call.events
    _judge_call(call, events, tap, spy, recognized, check_finals=not hung_up_early, problems=problems)
    return report


def _stack_of(turn: Any) -> str:
    """Where a turn's task is stuck (for the report of a call that never settled)."""
    task = getattr(turn, "task", None)
    if task is None or task.done():
        return ""
    where = []
    coroutine = task.get_coro()
    while coroutine is not None and len(where) < 20:  # follow the chain of awaits down
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
        if frame is None:
            break
        where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
    return " stuck at " + " -> ".join(where)


def _judge_call(
    call: CallHarness,
    events: list[dict[str, Any]],
    tap: list[tuple[str, int]],
    spy: SpyPolicy,
    recognized: list[str],
    *,
    check_finals: bool,
    problems: list[str],
) -> None:
    ended = [e for e in events if e["event"] == "call_ended"]
    if len(ended) != 1 or not ended[0]["reason"].startswith("caller_hangup"):
        problems.append(f"call_ended events: {ended}")
    # No audio of a cancelled turn is written after its cancellation (which queues its StopAudio).
    cancelled: set[int] = set()
    for what, turn_id in tap:
        if what == "cancel":
            cancelled.add(turn_id)
        elif what == "audio" and turn_id in cancelled:
            problems.append(f"audio of turn {turn_id} written after the turn was cancelled: {tap}")
            break
    decided = {e["turn_id"] for e in events if e["event"] == "barge_in_decided"}
    if decided - cancelled:
        problems.append(f"barge-ins without a cancellation in the writer: {decided - cancelled}")
    stops = {turn_id for what, turn_id in tap if what == "stop"}
    if check_finals and decided - stops:  # (a hang-up right after a barge-in may beat its StopAudio)
        problems.append(f"barge-ins with no StopAudio sent: {decided - stops}")
    # What the tap saw is what went out on the socket, in the same order.
    kinds = ["stop" if isinstance(m, OutboundStop) else "audio" for _, m in call.socket.sent]
    if kinds != [what for what, _ in tap if what != "cancel"]:
        problems.append("the socket's messages differ from the writer's")
    audio_turns = {turn_id for what, turn_id in tap if what == "audio"}
    first_audio = {e["turn_id"] for e in events if e["event"] == "first_audio_sent"}
    if audio_turns != first_audio:
        problems.append(f"first_audio_sent for {first_audio}, audio written for {audio_turns}")
    if not check_finals:
        return
    # Every utterance the recognizer finalised is a final event, in order.
    final_events = [e for e in events if e["event"] == "final"]
    if [e["text"] for e in final_events] != recognized:
        problems.append(f"finals lost: recognized {recognized}, final events {[e['text'] for e in final_events]}")
    # ...and every one judged a request is the input of a later turn (merged inputs join texts).
    position = {id(e): i for i, e in enumerate(events)}
    for utterance_id, text, decision in spy.finals:
        if not text.strip() or decision.said_over_agent:
            continue
        final_at = next(
            (position[id(e)] for e in final_events if e["utterance_id"] == utterance_id and e["text"] == text), None
        )
        answered = [
            e
            for e in events[final_at or 0 :]
            if e["event"] == "turn_started" and e["kind"] == "speech" and text in (e["input"] or "")
        ]
        if final_at is None or not answered:
            problems.append(f"final {text!r} (utterance {utterance_id}, {decision}) never became a turn's input")
    # Every turn that started ended, once.
    for start in (e for e in events if e["event"] == "turn_started"):
        ends = [
            e for e in events if e["event"] in ("turn_completed", "turn_cancelled") and e["turn_id"] == start["turn_id"]
        ]
        if len(ends) != 1:
            problems.append(f"turn {start['turn_id']} ended {len(ends)} times")


def _story(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (e["event"], e.get("turn_id"), e.get("utterance_id"), e.get("text") or e.get("input") or e.get("reason"))
        for e in events
    ]


def check_call_script(script: CallScript) -> CallReport:
    return asyncio.run(run_call_script(script))


# Found by the property below (pause mode): a pause and the cancelling barge-in that land in one
# loop iteration leave the cancelled turn waiting, paused, forever. asyncio.wait_for on Python 3.11
# returns the inner result when the inner wait (track.changed, just set by the pause) finished
# before the cancellation is delivered, swallowing it: Player._pump then waits for a resume that
# never comes (the turn is cancelled), and the call answers nothing more until the caller hangs up.
# With frames arriving faster than real time (a backlog, or this harness) the onset and the final
# are delivered together; each round of the script below hits it about half the time.
# Found by this property (and by the fault harness): Player._pump's asyncio.wait_for (Python 3.11)
# swallowed the turn's cancellation when the pause and the barge-in landed in one loop iteration,
# and the cancelled turn waited paused forever. Fixed (asyncio.timeout); kept as an example.
STUCK_AFTER_PAUSE = CallScript(
    reply="We open at eleven, and we close late tonight.",
    ms_per_char=8,
    greeting="",
    bargein_speaking="pause",
    ops=(("dtmf", "1"),) + (("wait", 150), ("speech", "I want a pizza alpha", 5, 12)) * 8,
)


def _report(script: CallScript) -> None:
    report = check_call_script(script)
    if report.problems:
        note(f"events: {_story(report.events)}")
    assert report.problems == []


@HANDLER
@given(call_scripts(modes=("confirm", "stop")))
def test_the_handler_survives_any_inbound_traffic_and_keeps_its_promises(script: CallScript) -> None:
    _report(script)


@HANDLER
@given(call_scripts(modes=("pause",)))
@example(STUCK_AFTER_PAUSE)
def test_the_handler_keeps_its_promises_when_barge_ins_pause_the_reply(script: CallScript) -> None:
    _report(script)


def test_a_turn_paused_and_cancelled_in_one_loop_iteration_ends() -> None:
    """The defect above without the handler: the pause (speech onset) and the cancel (its final)
    run in one callback, as they do when the recognition thread delivers both at once."""
    stuck = asyncio.run(_pause_and_cancel_in_one_iteration())
    assert stuck == 0, f"{stuck} of 10 cancelled turns were still running 0.3 s later"


async def _pause_and_cancel_in_one_iteration() -> int:
    from parley.media.events import EventLog
    from parley.media.player import Player

    async def nothing(message: str) -> None:
        pass

    loop = asyncio.get_running_loop()
    stuck = 0
    for attempt in range(10):
        player = Player(OutboundWriter(nothing, EventLog("props", to_log=False)), 640, lead_ms=60)
        track = player.begin(attempt)
        task = asyncio.create_task(player.play(track, bytes(640 * 50)))  # 1 s: the pump sleeps between frames
        await asyncio.sleep(0.1 + attempt * 0.003)

        def barge_in(track: Any = track, task: asyncio.Task[None] = task, player: Player = player) -> None:
            player.pause(track, time.monotonic())
            task.cancel()

        loop.call_soon(barge_in)
        done, _ = await asyncio.wait([task], timeout=0.3)
        if not done:
            stuck += 1
            task.cancel()
            await asyncio.wait([task])
    return stuck
