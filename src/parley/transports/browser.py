"""The browser channel's wire (`/ws/browser`, the talk page): binary audio, JSON control.

Audio both ways is raw PCM16 little-endian mono in binary WebSocket messages, one 20 ms frame per
message, at the rate the page announced (16 kHz: 640 bytes). Binary frames cost the page and the
server no base64 and no JSON: measured here (timeit, docs/web.md), a frame in costs 2.6 µs to parse
against 11.6 µs for ACS's base64 JSON, a frame out 0.05 µs against 0.6 µs, and 640 bytes on the
wire against about 915.

Control is text JSON, one object per message, keyed by `type`:

- in: `{"type":"start","sampleRate":16000}` (the stream's format: first), `{"type":"dtmf","digits":"1"}`,
  `{"type":"stop"}` (the caller hangs up); any other type is ignored (a newer page may send more);
- out: `{"type":"stop_audio"}` (flush what is queued and not played: a barge-in), and the call's
  events as the page shows them (`page_event`): `{"type":"event","event":{...}}` and per-turn
  figures `{"type":"figure","name":"voice_to_voice","seconds":0.61,"turn_id":2}`.

What reaches the page is chosen field by field (`PAGE_FIELDS`): captions, the agent's text, barge-in
markers, turn boundaries. Nothing the events API does not show, and less: no errors' texts, no tool
calls, no call ids; DTMF digits as the call's records hold them (masked unless PARLEY_LOG_DTMF).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from parley.transports import acs
from parley.transports.wire import Inbound, Outbound, StreamEnded, StreamStarted

SUBPROTOCOL: Final = "parley.browser"  # the page offers it; a browser insists the server picks one it offered
MAX_CONTROL_CHARS: Final = 1024  # a control message is a few dozen characters
DTMF_KEYS: Final = frozenset("0123456789*#ABCD")
MAX_DTMF_DIGITS: Final = 32

# The fields of each event the page sees (others are not sent at all). `t` is made relative to the call's start.
PAGE_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "call_started": (),
    "speech_started": ("utterance_id",),
    "speech_ended": ("utterance_id",),
    "partial": ("utterance_id", "text"),
    "final": ("utterance_id", "text"),
    "dtmf_input": ("digits",),  # as recorded: masked unless PARLEY_LOG_DTMF
    "turn_started": ("turn_id", "kind"),
    "agent_text": ("turn_id", "text"),
    "first_audio_sent": ("turn_id",),
    "barge_in_paused": ("turn_id", "heard_ms"),
    "barge_in_pending": ("turn_id", "heard_ms"),
    "barge_in_resumed": ("turn_id", "reason", "from_ms"),
    "barge_in_confirmed": ("turn_id", "reason"),
    "barge_in_decided": ("turn_id", "trigger"),
    "stop_audio_sent": ("turn_id",),
    "turn_completed": ("turn_id", "audio_ms"),
    "turn_cancelled": ("turn_id", "audio_ms"),
    "turn_failed": ("turn_id", "stage"),
    "call_ended": ("reason",),
}


class BrowserWire:
    """One browser call's codec (see the module docstring)."""

    name = "browser"

    def parse(self, data: str | bytes, fmt: acs.AudioFormat | None) -> Inbound:
        if isinstance(data, bytes | bytearray | memoryview):
            return _audio(bytes(data), fmt)
        return _control(data)

    def audio(self, pcm: bytes) -> Outbound:
        return pcm  # already PCM16 20 ms at the stream's rate: a binary message as it is

    def stop(self) -> Outbound:
        return STOP_AUDIO


STOP_AUDIO: Final = '{"type":"stop_audio"}'


def _audio(pcm: bytes, fmt: acs.AudioFormat | None) -> acs.AudioFrame:
    expected = fmt.frame_bytes if fmt is not None else None
    if expected is None and acs.infer_format(len(pcm)) is None:
        raise acs.FrameLengthError(
            f"binary frame of {len(pcm)} bytes before start; send start first, then 20 ms PCM16 frames"
        )
    if expected is not None and len(pcm) != expected:
        raise acs.FrameLengthError(
            f"binary frame of {len(pcm)} bytes; one 20 ms PCM16 frame at {fmt.sample_rate if fmt else 0} Hz"
            f" is {expected} bytes"
        )
    return acs.AudioFrame(pcm, silent=False)  # the page sends what its microphone hears


def _control(text: str) -> Inbound:
    if len(text) > MAX_CONTROL_CHARS:
        raise acs.MalformedMessage(f"control message of {len(text)} characters (at most {MAX_CONTROL_CHARS})")
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise acs.MalformedMessage(f"control message is not JSON ({exc}): {text[:60]!r}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise acs.MalformedMessage(f'control message must be an object with a string "type": {text[:60]!r}')
    kind = message["type"]
    if kind == "start":
        return _start(message)
    if kind == "dtmf":
        return acs.Dtmf(_digits(message.get("digits")))
    if kind == "stop":
        return StreamEnded("stop")
    return acs.UnknownMessage(kind[:40])


def _start(message: dict[str, Any]) -> StreamStarted:
    rate = message.get("sampleRate")
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise acs.MalformedMessage(f'start needs an integer "sampleRate" (16000 or 24000), got {str(rate)[:20]!r}')
    return StreamStarted(acs.AudioFormat.for_rate(rate))  # raises UnsupportedFormat for other rates


def _digits(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_DTMF_DIGITS:
        raise acs.MalformedMessage(f'dtmf needs "digits": 1 to {MAX_DTMF_DIGITS} keys of 0-9 * # A-D')
    digits = value.upper()
    if not set(digits) <= DTMF_KEYS:
        raise acs.MalformedMessage(f"dtmf digits must be 0-9 * # A-D, got {value[:MAX_DTMF_DIGITS]!r}")
    return digits


def page_event(record: dict[str, Any], start_t: float) -> str | None:
    """The message the page gets for one event record (None: the page does not see this event)."""
    fields = PAGE_FIELDS.get(record.get("event", ""))
    if fields is None:
        return None
    shown: dict[str, Any] = {"name": record["event"], "t": round(float(record["t"]) - start_t, 3)}
    shown.update((key, record[key]) for key in fields if key in record)
    return orjson.dumps({"type": "event", "event": shown}).decode()


def figure_message(name: str, seconds: float, turn_id: int | None) -> str:
    """A turn's latency figure (parley.figures), as the page shows it."""
    return orjson.dumps({"type": "figure", "name": name, "seconds": round(seconds, 4), "turn_id": turn_id}).decode()


__all__ = ["PAGE_FIELDS", "STOP_AUDIO", "SUBPROTOCOL", "BrowserWire", "figure_message", "page_event"]
