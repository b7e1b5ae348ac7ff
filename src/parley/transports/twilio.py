"""Sans-I/O codec for Twilio Media Streams (`<Connect><Stream>`), both directions.

Like `parley.transports.acs`, this module only turns WebSocket text frames into typed values and
back: the server's wire (`parley.transports.twilio_wire`), the simulated caller and the tests share
it. Twilio is the WebSocket client; its messages are JSON objects named by ``event``::

    {"event":"media","sequenceNumber":"3","streamSid":"MZ...",
     "media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"<base64 mu-law>"}}

Audio is G.711 mu-law, 8 kHz, mono; Twilio sends 20 ms (160 byte) chunks. `sequenceNumber`,
`chunk` and `timestamp` are strings on the wire; they come back as ints here. The app answers
with `media` (audio to play), `mark` (echoed back as a `mark` once everything sent before it has
played) and `clear` (drop what is queued: the barge-in).

mu-law conversion is here too, vectorised with numpy tables (`audioop` is gone in Python 3.13).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np
import orjson
import pybase64

from parley.transports.acs import AcsProtocolError

__all__ = [
    "FRAME_BYTES",
    "MAX_MEDIA_BYTES",
    "MAX_MESSAGE_CHARS",
    "SAMPLE_RATE",
    "Connected",
    "DtmfEvent",
    "Mark",
    "Media",
    "OutboundClear",
    "OutboundMark",
    "OutboundMedia",
    "Start",
    "Stop",
    "TwilioProtocolError",
    "UnknownEvent",
    "clear_message",
    "connected_message",
    "dtmf_message",
    "inbound_media_message",
    "mark_echo_message",
    "mark_message",
    "media_message",
    "mulaw_decode",
    "mulaw_encode",
    "parse_inbound",
    "parse_outbound",
    "start_message",
    "stop_message",
]

SAMPLE_RATE: Final = 8000
"""Twilio Media Streams audio is always 8 kHz mono mu-law."""

FRAME_BYTES: Final = 160
"""One 20 ms chunk of 8 kHz mu-law (one byte per sample)."""

MAX_MEDIA_BYTES: Final = SAMPLE_RATE
"""Largest payload accepted in one `media` message: one second. Twilio sends 20 ms; this bounds
what a broken or hostile peer can make us decode and buffer per message."""

MAX_MESSAGE_CHARS: Final = 65536
"""Upper bound on one frame's size (a 20 ms `media` message is about 330 characters)."""

ENCODING: Final = "audio/x-mulaw"

_DTMF_SYMBOLS: Final = frozenset("0123456789*#ABCD")
_PREVIEW_CHARS: Final = 40


class TwilioProtocolError(AcsProtocolError):
    """Anything the Twilio peer got wrong; the message names the event and the field."""


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------
# G.711 mu-law
# --------------------------------------------------------------------------------------------

_BIAS: Final = 0x84
_CLIP: Final = 32635


def _build_encode_table() -> np.ndarray:
    """The mu-law byte of every 16-bit sample, indexed by the sample's bits as uint16.

    G.711's segment coding: add the bias to the clipped magnitude, the segment is the position of
    its highest set bit above bit 7, the mantissa the four bits after that one; the byte is the
    complement of sign | segment | mantissa. Negative samples take their ones' complement (-x - 1)
    as magnitude, as ITU-T G.191's reference `ulaw_compress` does (audioop and Sun's g711.c round
    some negative samples to the neighbouring step instead).
    """
    samples = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(samples < 0, 0x80, 0x00)
    magnitude = np.minimum(np.where(samples < 0, ~samples, samples), _CLIP) + _BIAS
    segment = np.floor(np.log2(magnitude >> 7)).astype(np.int32)  # magnitude >> 7 is in 1..255
    mantissa = (magnitude >> (segment + 3)) & 0x0F
    codes = ~(sign | (segment << 4) | mantissa) & 0xFF
    table = np.empty(65536, dtype=np.uint8)
    table[samples.astype(np.uint16)] = codes  # index by the sample's two's-complement bits
    return table


def _build_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    segment = (codes >> 4) & 0x07
    magnitude = ((((codes & 0x0F) << 3) + _BIAS) << segment) - _BIAS
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


_ENCODE: Final = _build_encode_table()
_DECODE: Final = _build_decode_table()


def mulaw_encode(pcm: np.ndarray | bytes) -> bytes:
    """PCM16 (an int16 array, or little-endian bytes) to G.711 mu-law, one byte per sample."""
    samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
    if samples.dtype != np.int16:
        samples = samples.astype(np.int16)
    encoded: np.ndarray = _ENCODE[samples.view(np.uint16)]
    return encoded.tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes to an int16 array (one sample per byte)."""
    decoded: np.ndarray = _DECODE[np.frombuffer(data, dtype=np.uint8)]
    return decoded


# --------------------------------------------------------------------------------------------
# Message types (Twilio -> app)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The first message on a stream; carries nothing the app needs."""

    protocol: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True)
class Start:
    """The stream's metadata: which call, which tracks, the TwiML `<Parameter>`s."""

    stream_sid: str
    call_sid: str
    account_sid: str = ""
    tracks: tuple[str, ...] = ("inbound",)
    custom_parameters: dict[str, str] = field(default_factory=dict)
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Media:
    """One chunk of call audio (mu-law bytes). `track` is "inbound" (the caller) or "outbound"."""

    stream_sid: str
    payload: bytes
    track: str = "inbound"
    chunk: int | None = None
    timestamp_ms: int | None = None
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class DtmfEvent:
    """One keypad digit the caller pressed (upper-cased)."""

    stream_sid: str
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """Twilio has played everything the app sent before its mark called `name`."""

    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended (the call hung up, or the stream was stopped)."""

    stream_sid: str
    call_sid: str = ""
    account_sid: str = ""


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event this codec does not model; callers log and ignore it."""

    event: str


InboundEvent: TypeAlias = Connected | Start | Media | DtmfEvent | Mark | Stop | UnknownEvent


@dataclass(frozen=True, slots=True)
class OutboundMedia:
    """Audio the app asked Twilio to play (mu-law bytes)."""

    stream_sid: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboundMark:
    """A mark the app asked Twilio to echo back once what precedes it has played."""

    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class OutboundClear:
    """The app asked Twilio to drop the audio it has queued."""

    stream_sid: str


OutboundEvent: TypeAlias = OutboundMedia | OutboundMark | OutboundClear | UnknownEvent


# --------------------------------------------------------------------------------------------
# Decoding helpers
# --------------------------------------------------------------------------------------------


def _json_type(value: object) -> str:
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
    return "an object" if isinstance(value, dict) else type(value).__name__


def _decode_envelope(message: str | bytes, max_chars: int) -> tuple[str, dict[str, Any]]:
    """(event, top-level object) of one frame; everything wrong with the envelope raises."""
    if len(message) > max_chars:
        raise TwilioProtocolError(f"message is {len(message)} characters long, more than the {max_chars} allowed")
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        try:  # json's wording of the error (and it accepts a little orjson refuses)
            obj = json.loads(message)
        except (ValueError, RecursionError) as exc:
            raise TwilioProtocolError(f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise TwilioProtocolError(f"message must be a JSON object, got {_json_type(obj)}")
    event = obj.get("event")
    if not isinstance(event, str) or not event:
        raise TwilioProtocolError(f"message has no 'event' string (got {_json_type(event)} {_preview(event)})")
    return event, obj


def _object(top: dict[str, Any], name: str, event: str) -> dict[str, Any]:
    value = top.get(name)
    if not isinstance(value, dict):
        raise TwilioProtocolError(f"{event} message needs a '{name}' object, got {_json_type(value)}")
    return value


def _str(obj: dict[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = obj.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise TwilioProtocolError(f"{where} field '{name}' must be a string, got {_json_type(value)} {_preview(value)}")
    if required and not value:
        raise TwilioProtocolError(f"{where} field '{name}' is empty")
    return value


def _counter(obj: dict[str, Any], name: str, where: str) -> int | None:
    """Twilio's numeric strings ("1", "20"); absent is None. A JSON integer is read as well."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    raise TwilioProtocolError(
        f"{where} field '{name}' must be a non-negative integer string, got {_json_type(value)} {_preview(value)}"
    )


def _payload(obj: dict[str, Any], where: str) -> bytes:
    text = _str(obj, "payload", where)
    # 4 base64 characters per 3 bytes: refuse oversized payloads before decoding them.
    if len(text) > (MAX_MEDIA_BYTES + 2) // 3 * 4:
        raise TwilioProtocolError(f"{where} payload is more than {MAX_MEDIA_BYTES} bytes (one second of audio)")
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # for base64's wording of what is wrong
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TwilioProtocolError(f"{where} payload is not valid base64 ({exc}): {_preview(text)}") from None
    if not data:
        raise TwilioProtocolError(f"{where} payload is empty")
    return data


def _stream_sid(top: dict[str, Any], event: str) -> str:
    return _str(top, "streamSid", f"{event} message")


# --------------------------------------------------------------------------------------------
# Inbound parsing (Twilio -> app)
# --------------------------------------------------------------------------------------------


def _parse_connected(top: dict[str, Any]) -> Connected:
    where = "connected message"
    return Connected(_str(top, "protocol", where, required=False), _str(top, "version", where, required=False))


def _parse_start(top: dict[str, Any]) -> Start:
    start = _object(top, "start", "start")
    where = "start"
    stream_sid = _str(start, "streamSid", where) if "streamSid" in start else _stream_sid(top, "start")
    fmt = start.get("mediaFormat")
    if fmt is not None:
        _check_media_format(fmt)
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise TwilioProtocolError(f"start field 'tracks' must be an array of strings, got {_preview(tracks)}")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict):
        raise TwilioProtocolError(f"start field 'customParameters' must be an object, got {_json_type(params)}")
    bad = [k for k, v in params.items() if not isinstance(v, str)]
    if bad:
        raise TwilioProtocolError(f"start customParameters must be strings; {bad[0]!r} is not")
    return Start(
        stream_sid=stream_sid,
        call_sid=_str(start, "callSid", where),
        account_sid=_str(start, "accountSid", where, required=False),
        tracks=tuple(tracks),
        custom_parameters=dict(params),
        sequence_number=_counter(top, "sequenceNumber", "start message"),
    )


def _check_media_format(fmt: object) -> None:
    """Twilio documents one format; anything else would be decoded into noise, so refuse it."""
    if not isinstance(fmt, dict):
        raise TwilioProtocolError(f"start field 'mediaFormat' must be an object, got {_json_type(fmt)}")
    encoding, rate, channels = fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels", 1)
    if encoding != ENCODING or rate != SAMPLE_RATE or channels != 1:
        raise TwilioProtocolError(
            f"unsupported mediaFormat {_preview(fmt)}: only {ENCODING} at {SAMPLE_RATE} Hz mono is supported"
        )


def _parse_media(top: dict[str, Any]) -> Media:
    media = _object(top, "media", "media")
    where = "media"
    return Media(
        stream_sid=_stream_sid(top, "media"),
        payload=_payload(media, where),
        track=_str(media, "track", where, required=False) or "inbound",
        chunk=_counter(media, "chunk", where),
        timestamp_ms=_counter(media, "timestamp", where),
        sequence_number=_counter(top, "sequenceNumber", "media message"),
    )


def _parse_dtmf(top: dict[str, Any]) -> DtmfEvent:
    digit = _str(_object(top, "dtmf", "dtmf"), "digit", "dtmf").upper()
    if len(digit) != 1 or digit not in _DTMF_SYMBOLS:
        raise TwilioProtocolError(f"dtmf field 'digit' {_preview(digit)} is not one DTMF symbol (0-9 * # A-D)")
    return DtmfEvent(_stream_sid(top, "dtmf"), digit)


def _parse_mark(top: dict[str, Any]) -> Mark:
    return Mark(_stream_sid(top, "mark"), _str(_object(top, "mark", "mark"), "name", "mark"))


def _parse_stop(top: dict[str, Any]) -> Stop:
    stop = top.get("stop")
    stop = {} if stop is None else stop
    if not isinstance(stop, dict):
        raise TwilioProtocolError(f"stop message field 'stop' must be an object, got {_json_type(stop)}")
    return Stop(
        _stream_sid(top, "stop"),
        _str(stop, "callSid", "stop", required=False),
        _str(stop, "accountSid", "stop", required=False),
    )


_INBOUND: Final[Mapping[str, Callable[[dict[str, Any]], InboundEvent]]] = {
    "connected": _parse_connected,
    "start": _parse_start,
    "media": _parse_media,
    "dtmf": _parse_dtmf,
    "mark": _parse_mark,
    "stop": _parse_stop,
}


def parse_inbound(message: str | bytes, *, max_chars: int = MAX_MESSAGE_CHARS) -> InboundEvent:
    """Parse one Twilio -> app frame. Unknown events come back as UnknownEvent; anything else
    wrong raises TwilioProtocolError naming the event and field."""
    event, top = _decode_envelope(message, max_chars)
    parse = _INBOUND.get(event)
    return UnknownEvent(event) if parse is None else parse(top)


# --------------------------------------------------------------------------------------------
# Outbound parsing (app -> Twilio), for the simulated caller
# --------------------------------------------------------------------------------------------


def parse_outbound(message: str | bytes, *, max_chars: int = MAX_MESSAGE_CHARS) -> OutboundEvent:
    """Parse one app -> Twilio frame: media, mark or clear; other events are UnknownEvent."""
    event, top = _decode_envelope(message, max_chars)
    if event == "media":
        return OutboundMedia(_stream_sid(top, "media"), _payload(_object(top, "media", "media"), "media"))
    if event == "mark":
        return OutboundMark(_stream_sid(top, "mark"), _str(_object(top, "mark", "mark"), "name", "mark"))
    if event == "clear":
        return OutboundClear(_stream_sid(top, "clear"))
    return UnknownEvent(event)


# --------------------------------------------------------------------------------------------
# Outbound builders (app -> Twilio)
# --------------------------------------------------------------------------------------------


def _dumps(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode("utf-8")


def media_message(stream_sid: str, mulaw: bytes) -> str:
    """Audio for Twilio to play: mu-law bytes at 8 kHz."""
    if not mulaw:
        raise TwilioProtocolError("refusing to build a media message with no audio")
    return _dumps(
        {"event": "media", "streamSid": stream_sid, "media": {"payload": pybase64.b64encode(mulaw).decode("ascii")}}
    )


def mark_message(stream_sid: str, name: str) -> str:
    """Ask Twilio to echo `name` back once everything sent before it has played."""
    if not name:
        raise TwilioProtocolError("a mark needs a name")
    return _dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """Ask Twilio to drop the audio it has queued (barge-in); pending marks come back at once."""
    return _dumps({"event": "clear", "streamSid": stream_sid})


# --------------------------------------------------------------------------------------------
# Inbound builders (what Twilio sends), for the simulated caller and tests
# --------------------------------------------------------------------------------------------


def connected_message() -> str:
    return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start_message(
    stream_sid: str,
    call_sid: str,
    *,
    account_sid: str = "",
    custom_parameters: Mapping[str, str] | None = None,
    tracks: Iterable[str] = ("inbound",),
) -> str:
    return _dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": account_sid,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": list(tracks),
                "customParameters": dict(custom_parameters or {}),
                "mediaFormat": {"encoding": ENCODING, "sampleRate": SAMPLE_RATE, "channels": 1},
            },
            "streamSid": stream_sid,
        }
    )


def inbound_media_message(stream_sid: str, mulaw: bytes, chunk: int, timestamp_ms: int) -> str:
    """A caller `media` message; `chunk` counts from 1, `timestamp_ms` from the stream's start."""
    return _dumps(
        {
            "event": "media",
            "sequenceNumber": str(chunk + 1),  # after the start message
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(timestamp_ms),
                "payload": pybase64.b64encode(mulaw).decode("ascii"),
            },
            "streamSid": stream_sid,
        }
    )


def dtmf_message(stream_sid: str, digit: str) -> str:
    if len(digit) != 1 or digit.upper() not in _DTMF_SYMBOLS:
        raise TwilioProtocolError(f"{digit!r} is not one DTMF symbol (0-9 * # A-D)")
    return _dumps({"event": "dtmf", "streamSid": stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}})


def mark_echo_message(stream_sid: str, name: str) -> str:
    """Twilio's echo of a mark the app sent, once the audio before it has played."""
    return _dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def stop_message(stream_sid: str, call_sid: str) -> str:
    return _dumps({"event": "stop", "streamSid": stream_sid, "stop": {"accountSid": "", "callSid": call_sid}})
