"""Sans-I/O codec for the Azure Communication Services (ACS) bidirectional media-streaming protocol.

This module only turns WebSocket text frames into typed values and back; it never touches a
socket or an event loop, so the transport, the simulated caller and the tests can all share it
and it can be tested exhaustively with plain function calls.

Inbound (ACS -> app) messages are JSON objects such as::

    {"kind":"AudioData","audioData":{"data":"<base64 PCM16LE>","silent":false}}

ACS itself reads JSON case-insensitively and the official JS SDK emits camelCase kinds
(``audioData``), so every key and every kind value is matched case-insensitively here.
Outbound (app -> ACS) messages are produced in exactly the documented PascalCase form.

Audio is always signed 16-bit little-endian mono PCM at 16 kHz or 24 kHz in 20 ms frames.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson
import pybase64

__all__ = [
    "FRAME_MS",
    "MAX_MESSAGE_CHARS",
    "STOP_AUDIO_MESSAGE",
    "SUPPORTED_SAMPLE_RATES",
    "AcsProtocolError",
    "AudioFormat",
    "AudioFrame",
    "AudioMetadata",
    "Dtmf",
    "FrameLengthError",
    "InboundMessage",
    "InvalidAudio",
    "MalformedMessage",
    "OutboundAudio",
    "OutboundMessage",
    "OutboundStop",
    "TranscriptionData",
    "TranscriptionMetadata",
    "UnknownMessage",
    "UnsupportedFormat",
    "audio_data_message",
    "audio_metadata_message",
    "dtmf_message",
    "frame_bytes",
    "inbound_audio_message",
    "infer_format",
    "parse_inbound",
    "parse_outbound",
    "stop_audio_message",
]

SUPPORTED_SAMPLE_RATES: tuple[int, ...] = (16000, 24000)
"""Sample rates ACS bidirectional streaming offers for PCM audio."""

FRAME_MS: Final = 20
"""ACS sends one frame every 20 ms."""

BYTES_PER_SAMPLE: Final = 2
"""PCM16: two bytes per (mono) sample."""

MAX_MESSAGE_CHARS: Final = 65536
"""Upper bound on one frame's size. A 20 ms 24 kHz AudioData message is about 1.4 kB, so this
leaves ample room for transcripts while stopping a peer from making us parse megabytes."""

# Characters legal in a DTMF string: the 16 tones of a telephone keypad (A-D included).
_DTMF_SYMBOLS: Final = frozenset("0123456789*#ABCD")

# Longest repr of an offending value we put into an error message, so a bad 1 kB base64 blob
# does not flood the logs.
_PREVIEW_CHARS: Final = 40


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class AcsProtocolError(ValueError):
    """Base for everything the peer can get wrong; the message names the offending field/value."""


class MalformedMessage(AcsProtocolError):
    """Not a well-formed ACS message: bad JSON, wrong shape, missing fields, or too large."""


class InvalidAudio(AcsProtocolError):
    """An audio payload could not be decoded (e.g. not valid base64)."""


class FrameLengthError(InvalidAudio):
    """Decoded audio has the wrong length for one 20 ms frame (or is not whole 16-bit samples)."""


class UnsupportedFormat(AcsProtocolError):
    """The call's audio format is one this server cannot handle."""


def _preview(value: object) -> str:
    """repr() of a value, shortened so error messages stay readable."""
    text = repr(value)
    if len(text) > _PREVIEW_CHARS:
        text = text[: _PREVIEW_CHARS - 3] + "..."
    return text


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages aimed at protocol authors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json.loads yields only the types above


# --------------------------------------------------------------------------------------------
# Audio format
# --------------------------------------------------------------------------------------------


def frame_bytes(sample_rate: int) -> int:
    """Bytes in one 20 ms mono PCM16 frame at `sample_rate` (640 at 16 kHz, 960 at 24 kHz)."""
    _check_sample_rate(sample_rate)
    return sample_rate * FRAME_MS // 1000 * BYTES_PER_SAMPLE


def _check_sample_rate(sample_rate: int) -> None:
    # bool is an int subclass; True must not sneak through as "1 Hz".
    if isinstance(sample_rate, bool) or sample_rate not in SUPPORTED_SAMPLE_RATES:
        rates = " or ".join(str(r) for r in SUPPORTED_SAMPLE_RATES)
        raise UnsupportedFormat(
            f"unsupported sampleRate {_preview(sample_rate)}: ACS media streaming audio must be {rates} Hz"
        )


def _check_format(sample_rate: int, channels: int, encoding: str) -> None:
    """Reject formats we cannot stream; messages use the ACS field names so they map to the wire."""
    _check_sample_rate(sample_rate)
    if isinstance(channels, bool) or channels != 1:
        raise UnsupportedFormat(f"unsupported channels {_preview(channels)}: only mono (channels=1) audio is supported")
    if not isinstance(encoding, str) or encoding.upper() != "PCM":
        raise UnsupportedFormat(f"unsupported encoding {_preview(encoding)}: only 16-bit PCM ('PCM') is supported")


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """A call's audio format. Construction validates it, so every instance is one we can stream."""

    sample_rate: int
    channels: int = 1
    encoding: str = "PCM"
    subscription_id: str = ""

    def __post_init__(self) -> None:
        _check_format(self.sample_rate, self.channels, self.encoding)
        # Normalise so AudioFormat(16000, encoding="pcm") == AudioFormat(16000).
        object.__setattr__(self, "encoding", "PCM")

    @property
    def frame_samples(self) -> int:
        """Samples per 20 ms frame (320 at 16 kHz, 480 at 24 kHz)."""
        return self.sample_rate * FRAME_MS // 1000

    @property
    def frame_bytes(self) -> int:
        """Bytes per 20 ms frame (640 at 16 kHz, 960 at 24 kHz)."""
        return self.frame_samples * BYTES_PER_SAMPLE * self.channels

    @classmethod
    def for_rate(cls, rate: int) -> AudioFormat:
        """The mono PCM format at `rate`; raises UnsupportedFormat for rates ACS does not offer."""
        return cls(sample_rate=rate)


# Built once: AudioData before AudioMetadata is identified by its frame length alone.
_FORMAT_BY_FRAME_LENGTH: Final[Mapping[int, AudioFormat]] = {
    frame_bytes(rate): AudioFormat(rate) for rate in SUPPORTED_SAMPLE_RATES
}


def infer_format(frame_length: int) -> AudioFormat | None:
    """Guess the format from one frame's byte length (640 -> 16 kHz, 960 -> 24 kHz), else None."""
    return _FORMAT_BY_FRAME_LENGTH.get(frame_length)


# --------------------------------------------------------------------------------------------
# Message types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioMetadata:
    """First message of a stream: the format every following AudioData frame uses."""

    format: AudioFormat


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One 20 ms frame of caller audio.

    `silent` defaults to True because Microsoft's samples treat a missing flag as silence.
    `participant_id` is None in mixed mode, where ACS does not say who is speaking.
    """

    pcm: bytes
    timestamp: str | None = None
    participant_id: str | None = None
    silent: bool = True


@dataclass(frozen=True, slots=True)
class Dtmf:
    """Keypad digits the caller pressed, upper-cased (0-9, *, #, A-D)."""

    digits: str


@dataclass(frozen=True, slots=True)
class TranscriptionMetadata:
    """ACS-side transcription session details, informational only.

    Keys are lower-cased (e.g. ``subscriptionid``, ``locale``) so lookups do not depend on the
    sender's casing; values are kept as sent.
    """

    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TranscriptionData:
    """One ACS transcription result; offsets and durations are in 100 ns ticks."""

    text: str
    result_status: str
    confidence: float | None
    offset_ticks: int | None
    duration_ticks: int | None
    participant_id: str | None


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message of a kind this codec does not model (e.g. MarkData); callers log and ignore it."""

    kind: str


InboundMessage: TypeAlias = (
    AudioMetadata | AudioFrame | Dtmf | TranscriptionMetadata | TranscriptionData | UnknownMessage
)


@dataclass(frozen=True, slots=True)
class OutboundAudio:
    """Audio the app asked ACS to play to the caller."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class OutboundStop:
    """The app asked ACS to drop any audio it has queued (barge-in)."""


OutboundMessage: TypeAlias = OutboundAudio | OutboundStop | UnknownMessage


# --------------------------------------------------------------------------------------------
# Envelope decoding (shared by both directions)
# --------------------------------------------------------------------------------------------


def _lower_keys(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Copy one object level with lower-cased keys, refusing keys that differ only in case.

    Only the top level and the payload are normalised (never deeper), which keeps the hot path
    cheap. Two keys that collide once lower-cased would make the message ambiguous, so reject it.
    """
    lowered = {key.lower(): value for key, value in obj.items()}
    if len(lowered) != len(obj):
        seen: dict[str, str] = {}
        for key in obj:
            if key.lower() in seen:
                raise MalformedMessage(f"{where} has keys {seen[key.lower()]!r} and {key!r} that differ only in case")
            seen[key.lower()] = key
    return lowered


def _decode_envelope(message: str | bytes, max_chars: int) -> tuple[str, dict[str, Any]]:
    """Decode a frame into (kind as sent, top-level object with lower-cased keys)."""
    # Measured before decoding: for bytes this counts bytes, which is never fewer than the
    # characters they encode, so the check is conservative and we never decode a huge frame.
    if len(message) > max_chars:
        raise MalformedMessage(f"message is {len(message)} characters long, more than the {max_chars} allowed")
    if isinstance(message, (bytes, bytearray, memoryview)):
        try:
            message = bytes(message).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage(f"binary message is not valid UTF-8 ({exc.reason})") from None
    try:
        obj = _loads(message)
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"message is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise MalformedMessage("message is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise MalformedMessage(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"message must be a JSON object, got {_json_type(obj)}")
    top = _lower_keys(obj, "message")
    kind = top.get("kind")
    if kind is None:
        raise MalformedMessage("message has no 'kind' field")
    if not isinstance(kind, str):
        raise MalformedMessage(f"'kind' must be a string, got {_json_type(kind)} {_preview(kind)}")
    if not kind:
        raise MalformedMessage("'kind' is an empty string")
    return kind, top


def _loads(message: str) -> Any:
    """orjson for the 50 frames a second of every call, json.loads for the rest: orjson refuses a
    little that json accepts (NaN, lone surrogates; json also words the errors) and reads integers
    beyond 64 bits as floats, so a message with any float is read again (ACS sends few floats)."""
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        return json.loads(message)
    return json.loads(message) if _has_float(obj) else obj


def _has_float(obj: Any) -> bool:
    pending = [obj]
    while pending:
        value = pending.pop()
        if isinstance(value, float):
            return True
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def _payload(top: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    """The lower-cased payload object of a known kind (ACS names it after the kind, camelCased)."""
    payload = top.get(kind.lower())
    if payload is None:
        raise MalformedMessage(f"{kind} message has no '{name}' object")
    if not isinstance(payload, dict):
        raise MalformedMessage(f"'{name}' must be a JSON object, got {_json_type(payload)}")
    return _lower_keys(payload, f"'{name}'")


# --------------------------------------------------------------------------------------------
# Typed field access. `name` is the documented camelCase spelling (used in messages);
# payload keys are already lower-cased, so lookups use name.lower().
# --------------------------------------------------------------------------------------------


def _ill_typed(where: str, name: str, expected: str, value: object) -> MalformedMessage:
    return MalformedMessage(f"{where} field '{name}' must be {expected}, got {_json_type(value)} {_preview(value)}")


def _required_str(payload: dict[str, Any], name: str, where: str) -> str:
    value = payload.get(name.lower())
    if value is None:
        raise MalformedMessage(f"{where} is missing required field '{name}'")
    if not isinstance(value, str):
        raise _ill_typed(where, name, "a string", value)
    return value


def _optional_str(payload: dict[str, Any], name: str, where: str) -> str | None:
    value = payload.get(name.lower())
    if value is None or isinstance(value, str):
        return value
    raise _ill_typed(where, name, "a string", value)


def _optional_int(payload: dict[str, Any], name: str, where: str) -> int | None:
    value = payload.get(name.lower())
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _ill_typed(where, name, "an integer", value)


def _optional_float(payload: dict[str, Any], name: str, where: str) -> float | None:
    value = payload.get(name.lower())
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise _ill_typed(where, name, "a number", value)


def _optional_bool(payload: dict[str, Any], name: str, where: str, default: bool) -> bool:
    value = payload.get(name.lower())
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise _ill_typed(where, name, "true or false", value)


def _decode_base64(data: str, where: str) -> bytes:
    # validate=True rejects stray characters instead of silently skipping them, which would
    # otherwise turn corruption into a plausible-looking but wrong frame.
    try:
        return pybase64.b64decode(data, validate=True)  # SIMD; the same alphabet and padding rules
    except (binascii.Error, ValueError):
        pass
    try:  # for base64's wording of what is wrong
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidAudio(f"{where} field 'data' is not valid base64 ({exc}): {_preview(data)}") from None


def _check_dtmf(digits: str) -> str:
    """Validate DTMF symbols; returns them upper-cased so 'a' and 'A' mean the same tone."""
    if not digits:
        raise MalformedMessage("DtmfData field 'data' is empty; expected DTMF symbols 0-9 * # A-D")
    upper = digits.upper()
    bad = sorted(set(upper) - _DTMF_SYMBOLS)
    if bad:
        raise MalformedMessage(
            f"DtmfData field 'data' {_preview(digits)} has characters that are not DTMF "
            f"symbols (0-9 * # A-D): {''.join(bad)!r}"
        )
    return upper


# --------------------------------------------------------------------------------------------
# Inbound parsing (ACS -> app)
# --------------------------------------------------------------------------------------------


def _parse_audio_metadata(payload: dict[str, Any], _fmt: AudioFormat | None) -> AudioMetadata:
    where = "AudioMetadata"
    rate = payload.get("samplerate")
    if rate is None:
        raise MalformedMessage(f"{where} is missing required field 'sampleRate'")
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise _ill_typed(where, "sampleRate", "an integer", rate)
    # Encoding and channels have only one legal value, so tolerate their absence.
    encoding = _optional_str(payload, "encoding", where) or "PCM"
    channels = _optional_int(payload, "channels", where)
    channels = 1 if channels is None else channels
    length = _optional_int(payload, "length", where)
    subscription_id = _optional_str(payload, "subscriptionId", where) or ""
    fmt = AudioFormat(rate, channels, encoding, subscription_id)
    if length is not None and length != fmt.frame_bytes:
        raise UnsupportedFormat(
            f"AudioMetadata length {length} does not match 20 ms frames at {rate} Hz (expected {fmt.frame_bytes} bytes)"
        )
    return AudioMetadata(fmt)


def _check_frame_length(pcm: bytes, fmt: AudioFormat | None) -> None:
    size = len(pcm)
    if fmt is not None:
        if size != fmt.frame_bytes:
            raise FrameLengthError(
                f"AudioData frame is {size} bytes but one 20 ms frame at {fmt.sample_rate} Hz "
                f"is {fmt.frame_bytes} bytes"
            )
    elif size not in _FORMAT_BY_FRAME_LENGTH:
        options = " or ".join(f"{length} bytes at {f.sample_rate} Hz" for length, f in _FORMAT_BY_FRAME_LENGTH.items())
        raise FrameLengthError(
            f"AudioData frame is {size} bytes and arrived before AudioMetadata; it must be one 20 ms frame ({options})"
        )


def _parse_audio_data(payload: dict[str, Any], fmt: AudioFormat | None) -> AudioFrame:
    where = "AudioData"
    pcm = _decode_base64(_required_str(payload, "data", where), where)
    _check_frame_length(pcm, fmt)
    return AudioFrame(
        pcm=pcm,
        timestamp=_optional_str(payload, "timestamp", where),
        participant_id=_optional_str(payload, "participantRawID", where),
        silent=_optional_bool(payload, "silent", where, default=True),
    )


def _parse_dtmf(payload: dict[str, Any], _fmt: AudioFormat | None) -> Dtmf:
    return Dtmf(_check_dtmf(_required_str(payload, "data", "DtmfData")))


def _parse_transcription_metadata(payload: dict[str, Any], _fmt: AudioFormat | None) -> TranscriptionMetadata:
    # Informational only (logging); _payload already made a fresh lower-cased copy.
    return TranscriptionMetadata(dict(payload))


def _parse_transcription_data(payload: dict[str, Any], _fmt: AudioFormat | None) -> TranscriptionData:
    where = "TranscriptionData"
    return TranscriptionData(
        text=_required_str(payload, "text", where),
        result_status=_required_str(payload, "resultStatus", where),
        confidence=_optional_float(payload, "confidence", where),
        offset_ticks=_optional_int(payload, "offset", where),
        duration_ticks=_optional_int(payload, "duration", where),
        participant_id=_optional_str(payload, "participantRawID", where),
    )


_InboundParser: TypeAlias = Callable[[dict[str, Any], AudioFormat | None], InboundMessage]

# lower-cased kind -> (documented payload key, parser)
_INBOUND: Final[Mapping[str, tuple[str, _InboundParser]]] = {
    "audiometadata": ("audioMetadata", _parse_audio_metadata),
    "audiodata": ("audioData", _parse_audio_data),
    "dtmfdata": ("dtmfData", _parse_dtmf),
    "transcriptionmetadata": ("transcriptionMetadata", _parse_transcription_metadata),
    "transcriptiondata": ("transcriptionData", _parse_transcription_data),
}


def parse_inbound(
    message: str | bytes,
    audio_format: AudioFormat | None,
    *,
    max_chars: int = MAX_MESSAGE_CHARS,
) -> InboundMessage:
    """Parse one ACS -> app frame.

    `audio_format` is the call's format from its AudioMetadata; AudioData frames must be exactly
    one 20 ms frame of it. Without one (audio before metadata) a frame must be one 20 ms frame at
    some supported rate. Unknown kinds come back as UnknownMessage; any other problem raises an
    AcsProtocolError subclass whose message names the offending field.
    """
    kind, top = _decode_envelope(message, max_chars)
    entry = _INBOUND.get(kind.lower())
    if entry is None:
        return UnknownMessage(kind)
    name, parse = entry
    return parse(_payload(top, kind, name), audio_format)


# --------------------------------------------------------------------------------------------
# Outbound parsing (app -> ACS), for the simulated caller
# --------------------------------------------------------------------------------------------


def parse_outbound(message: str | bytes, *, max_chars: int = MAX_MESSAGE_CHARS) -> OutboundMessage:
    """Parse one app -> ACS frame, in the documented PascalCase form or the JS SDK camelCase one.

    Outbound audio may be any whole number of samples (apps need not send 20 ms frames), but an
    odd byte count would misalign every later sample, so it raises FrameLengthError.
    """
    kind, top = _decode_envelope(message, max_chars)
    lowered_kind = kind.lower()
    if lowered_kind == "stopaudio":
        # The payload is always empty; the kind alone carries the meaning.
        return OutboundStop()
    if lowered_kind != "audiodata":
        return UnknownMessage(kind)
    payload = _payload(top, kind, "AudioData")
    pcm = _decode_base64(_required_str(payload, "data", "AudioData"), "AudioData")
    if len(pcm) % BYTES_PER_SAMPLE:
        raise FrameLengthError(f"outbound AudioData is {len(pcm)} bytes, not a whole number of 16-bit samples")
    return OutboundAudio(pcm)


# --------------------------------------------------------------------------------------------
# Outbound builders (app -> ACS): the exact documented form
# --------------------------------------------------------------------------------------------

STOP_AUDIO_MESSAGE: Final = json.dumps({"Kind": "StopAudio", "AudioData": None, "StopAudio": {}}, separators=(",", ":"))

# Base64 never contains characters JSON must escape, so splicing it between these halves is
# byte-identical to json.dumps and avoids building a dict per frame on the hot path.
_AUDIO_PREFIX: Final = '{"Kind":"AudioData","AudioData":{"Data":"'
_AUDIO_SUFFIX: Final = '"},"StopAudio":null}'


def audio_data_message(pcm: bytes) -> str:
    """The documented message asking ACS to play `pcm` (PCM16LE mono at the call's rate)."""
    if not pcm:
        raise InvalidAudio("refusing to build an AudioData message with no audio")
    if len(pcm) % BYTES_PER_SAMPLE:
        raise FrameLengthError(f"outbound audio is {len(pcm)} bytes, not a whole number of 16-bit samples")
    return _AUDIO_PREFIX + pybase64.b64encode(pcm).decode("ascii") + _AUDIO_SUFFIX


def stop_audio_message() -> str:
    """The documented message telling ACS to drop queued playback (used for barge-in)."""
    return STOP_AUDIO_MESSAGE


# --------------------------------------------------------------------------------------------
# Inbound builders (what ACS sends), for the simulated caller and tests
# --------------------------------------------------------------------------------------------


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def audio_metadata_message(fmt: AudioFormat) -> str:
    """An AudioMetadata message as ACS sends it for `fmt`."""
    return _dumps(
        {
            "kind": "AudioMetadata",
            "audioMetadata": {
                "subscriptionId": fmt.subscription_id,
                "encoding": fmt.encoding,
                "sampleRate": fmt.sample_rate,
                "channels": fmt.channels,
                "length": fmt.frame_bytes,
            },
        }
    )


def inbound_audio_message(
    pcm: bytes,
    *,
    timestamp: str | None = None,
    participant_id: str | None = None,
    silent: bool = False,
) -> str:
    """An AudioData message as ACS sends it; None fields are omitted, as in mixed mode."""
    body: dict[str, Any] = {}
    if timestamp is not None:
        body["timestamp"] = timestamp
    if participant_id is not None:
        body["participantRawID"] = participant_id
    body["data"] = base64.b64encode(pcm).decode("ascii")
    body["silent"] = silent
    return _dumps({"kind": "AudioData", "audioData": body})


def dtmf_message(digits: str) -> str:
    """A DtmfData message as ACS sends it; raises MalformedMessage for non-DTMF symbols."""
    _check_dtmf(digits)
    return _dumps({"kind": "DtmfData", "dtmfData": {"data": digits}})
