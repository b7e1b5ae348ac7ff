"""The caller's side of Twilio Media Streams: what Twilio sends, and what it reads from the app.

A minimal codec for the simulated caller only, written while the shared codec
(`parley.transports.twilio`) was being built in parallel. The names and signatures follow that
codec's plan (`connected_message`, `start_message`, `inbound_media_message`, `dtmf_message`,
`mark_echo_message`, `stop_message`, `parse_outbound`, `mulaw_encode`, `mulaw_decode`), so the
caller can switch to it by changing one import in `parley.caller.wire`.

Twilio's bidirectional stream: Twilio sends `connected`, `start` (stream and call ids, custom
parameters, the media format: mu-law at 8 kHz, mono), one `media` message per 20 ms (160 bytes of
mu-law, base64), `dtmf` per key, `mark` when audio the app sent before a mark has played (or the
app cleared the buffer), `stop` at the end. The app sends `media` (mu-law to play), `mark` (tell me
when you reach this point) and `clear` (drop what is queued: barge-in).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np

SAMPLE_RATE: Final = 8000
"""Twilio Media Streams carry mu-law at 8 kHz, mono."""

FRAME_BYTES: Final = 160
"""One 20 ms media chunk: 160 mu-law bytes at 8 kHz."""

DTMF_KEYS: Final = frozenset("0123456789*#ABCD")


class TwilioWireError(ValueError):
    """A server message the caller cannot read (not JSON, no event, a bad payload)."""


@dataclass(frozen=True, slots=True)
class OutboundMedia:
    """Audio the app asked Twilio to play: mu-law bytes at 8 kHz."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class OutboundMark:
    """The app asks to be told (by an echoed mark) when the audio sent before it has played."""

    name: str


@dataclass(frozen=True, slots=True)
class OutboundClear:
    """The app asks Twilio to drop the audio it has queued (barge-in)."""


@dataclass(frozen=True, slots=True)
class OutboundUnknown:
    """An event Twilio does not define for apps; the caller records and ignores it."""

    event: str


OutboundMessage: TypeAlias = OutboundMedia | OutboundMark | OutboundClear | OutboundUnknown


# --------------------------------------------------------------------------------------------
# G.711 mu-law
# --------------------------------------------------------------------------------------------

_BIAS: Final = 0x84
_CLIP: Final = 32635
# Exponent (segment) of a biased magnitude, looked up by its top 8 bits: the bit length minus one.
_EXPONENT: Final = np.array([max(0, i.bit_length() - 1) for i in range(256)], dtype=np.int32)


def _decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


_DECODE: Final = _decode_table()


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples as G.711 mu-law bytes (one byte per sample)."""
    samples = np.asarray(pcm, dtype=np.int32)
    sign = np.where(samples < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(samples), _CLIP) + _BIAS
    exponent = _EXPONENT[(magnitude >> 7) & 0xFF]
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes as int16 samples."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


# --------------------------------------------------------------------------------------------
# What Twilio sends (the caller's messages)
# --------------------------------------------------------------------------------------------


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


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
            "start": {
                "accountSid": account_sid,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": list(tracks),
                "customParameters": dict(custom_parameters or {}),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
            },
            "streamSid": stream_sid,
        }
    )


def inbound_media_message(stream_sid: str, mulaw: bytes, chunk: int, timestamp_ms: int) -> str:
    return _dumps(
        {
            "event": "media",
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(mulaw).decode("ascii"),
            },
            "streamSid": stream_sid,
        }
    )


def dtmf_message(stream_sid: str, digit: str) -> str:
    """One key press (Twilio sends one `dtmf` event per key); raises ValueError for a non-key."""
    if len(digit) != 1 or digit.upper() not in DTMF_KEYS:
        raise ValueError(f"{digit!r} is not one DTMF key (0-9 * # A-D)")
    return _dumps({"event": "dtmf", "streamSid": stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}})


def mark_echo_message(stream_sid: str, name: str) -> str:
    return _dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def stop_message(stream_sid: str, call_sid: str, account_sid: str = "") -> str:
    return _dumps({"event": "stop", "streamSid": stream_sid, "stop": {"accountSid": account_sid, "callSid": call_sid}})


# --------------------------------------------------------------------------------------------
# What the app sends (parsed by the caller)
# --------------------------------------------------------------------------------------------


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TwilioWireError(f"{where} is not a JSON object")
    return value


def parse_outbound(text: str | bytes) -> OutboundMessage:
    """One app -> Twilio message; raises TwilioWireError when it cannot be read."""
    if isinstance(text, bytes):
        raise TwilioWireError(f"binary frame of {len(text)} bytes (Twilio reads text frames only)")
    try:
        message = _object(json.loads(text), "the message")
    except json.JSONDecodeError as exc:
        raise TwilioWireError(f"not JSON ({exc.msg})") from None
    event = message.get("event")
    if not isinstance(event, str):
        raise TwilioWireError("the message has no event name")
    if event == "clear":
        return OutboundClear()
    if event == "mark":
        name = _object(message.get("mark"), "mark").get("name")
        if not isinstance(name, str):
            raise TwilioWireError("mark has no name")
        return OutboundMark(name)
    if event == "media":
        payload = _object(message.get("media"), "media").get("payload")
        if not isinstance(payload, str):
            raise TwilioWireError("media has no payload")
        try:
            return OutboundMedia(base64.b64decode(payload, validate=True))
        except binascii.Error:
            raise TwilioWireError("media payload is not base64") from None
    return OutboundUnknown(event)
