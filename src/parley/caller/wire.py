"""The caller's protocol, behind one small interface: ACS media streaming or Twilio Media Streams.

Everything else in the caller (the 20 ms schedule, the playout clock, the script, the report) is
the same for both: a `CallerWire` says what to send on connecting (`hello`), for each 20 ms frame
(`frame`), for key presses (`dtmf`), when queued audio before a mark has played (`mark_played`)
and at the end (`bye`), and turns each server message into one of four caller-side values:
`AgentAudio` (PCM16 at the call's rate), `AgentStop` (StopAudio / clear), `AgentMark`, `Ignored`.
A wire never touches the socket; one instance serves one call (the Twilio one keeps resampler
state and chunk counters).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol, TypeAlias

import numpy as np

from parley.security.twilio_auth import SIGNATURE_HEADER, signature
from parley.transports import acs, twilio
from parley.transports.twilio_resample import Downsampler, Upsampler

PROTOCOLS: Final = ("acs", "twilio")
"""What `CallOptions.proto` (and `parley call --proto`) accept."""

DEFAULT_PATHS: Final = {"acs": "/ws/acs", "twilio": "/ws/twilio"}
"""The media path parley serves for each protocol."""

TWILIO_CALL_RATE: Final = 16000
"""A Twilio call is 8 kHz on the wire and 16 kHz on both sides of it (the 2:1 resamplers)."""


@dataclass(frozen=True, slots=True)
class AgentAudio:
    """Agent audio to play, PCM16 at the call's rate (may be empty: a resampler still filling)."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class AgentStop:
    """Drop the queued agent audio: ACS StopAudio, Twilio clear."""


@dataclass(frozen=True, slots=True)
class AgentMark:
    """Tell the server when the audio queued before this point has played (Twilio mark)."""

    name: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message kind the protocol does not define for apps; recorded as an error, not fatal."""

    kind: str


AgentMessage: TypeAlias = AgentAudio | AgentStop | AgentMark | Ignored


class CallerWire(Protocol):
    """One call's protocol as the far end (ACS, Twilio) speaks it. `parse` raises ValueError for a
    message it cannot read."""

    name: str
    stop_name: str  # how the protocol calls a stop, for the report: "StopAudio", "clear"
    call_id: str  # the id the server files the call under (its events API)

    def headers(self, url: str) -> dict[str, str]:
        """Headers for the WebSocket upgrade to `url` (the final one, query included)."""
        ...

    def url_params(self) -> dict[str, str]:
        """Query parameters for the media URL."""
        ...

    def hello(self) -> list[str]: ...

    def frame(self, pcm: bytes, silent: bool) -> str:
        """One 20 ms frame of the caller's PCM16 at the call's rate."""
        ...

    def dtmf(self, digits: str) -> list[str]: ...

    def mark_played(self, name: str) -> str | None: ...

    def bye(self) -> list[str]: ...

    def parse(self, message: str | bytes) -> AgentMessage: ...


class AcsCallerWire:
    """ACS bidirectional media streaming (`parley.transports.acs`)."""

    name = "acs"
    stop_name = "StopAudio"

    def __init__(self, fmt: acs.AudioFormat, call_id: str, correlation_id: str) -> None:
        self._fmt = fmt
        self.call_id = call_id
        self._correlation_id = correlation_id

    def headers(self, url: str) -> dict[str, str]:
        return {"x-ms-call-connection-id": self.call_id, "x-ms-call-correlation-id": self._correlation_id}

    def url_params(self) -> dict[str, str]:
        return {}  # ACS names the call in a header

    def hello(self) -> list[str]:
        return [acs.audio_metadata_message(self._fmt)]

    def frame(self, pcm: bytes, silent: bool) -> str:
        return acs.inbound_audio_message(pcm, timestamp=_acs_timestamp(), silent=silent)

    def dtmf(self, digits: str) -> list[str]:
        return [acs.dtmf_message(digits)]

    def mark_played(self, name: str) -> str | None:
        return None  # ACS has no marks

    def bye(self) -> list[str]:
        return []  # ACS ends a stream by closing the socket

    def parse(self, message: str | bytes) -> AgentMessage:
        parsed = acs.parse_outbound(message)
        if isinstance(parsed, acs.OutboundAudio):
            return AgentAudio(parsed.pcm)
        if isinstance(parsed, acs.OutboundStop):
            return AgentStop()
        return Ignored(parsed.kind)


def _acs_timestamp() -> str:
    """Wall-clock time in ACS's format, e.g. 2024-11-15T19:16:12.925Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def twilio_sid(prefix: str) -> str:
    """An id shaped like Twilio's: two letters and 32 hex digits (CA... a call, MZ... a stream)."""
    return prefix + secrets.token_hex(16)


class TwilioCallerWire:
    """Twilio Media Streams: mu-law at 8 kHz on the wire, 16 kHz on both sides of it.

    The exact 2:1 half-band resamplers the server's Twilio wire uses (`twilio_resample`) turn each
    20 ms frame into one 160-byte chunk at once, with a 2 ms delay; soxr's streaming resampler
    would hold the first 100 ms back and then release it in a burst, delaying every onset the
    benchmark measures. The downlink resampler is reset on `clear`, as the server's is, so no audio
    of a cleared turn bleeds into the next one.
    """

    name = "twilio"
    stop_name = "clear"

    def __init__(
        self,
        call_sid: str,
        *,
        stream_sid: str | None = None,
        custom_parameters: dict[str, str] | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.call_id = call_sid
        self._auth_token = auth_token
        self.stream_sid = stream_sid or twilio_sid("MZ")
        self._parameters = dict(custom_parameters or {})
        self._up = Downsampler()  # the caller's 16 kHz -> the wire's 8 kHz
        self._down = Upsampler()  # the wire's 8 kHz -> 16 kHz for the playout and the recording
        self._chunk = 0

    def headers(self, url: str) -> dict[str, str]:
        # Twilio signs the upgrade (HMAC-SHA1 of the URL with the account's auth token); a server
        # with PARLEY_TWILIO_AUTH_TOKEN refuses an unsigned one.
        if self._auth_token is None:
            return {}
        return {SIGNATURE_HEADER: signature(self._auth_token, url)}

    def url_params(self) -> dict[str, str]:
        # Twilio names the call only in `start`, after the server has filed it: `callId` on the URL
        # (as a TwiML <Stream url> may carry) files it under the CallSid, so its events can be fetched.
        return {"callId": self.call_id}

    def hello(self) -> list[str]:
        start = twilio.start_message(self.stream_sid, self.call_id, custom_parameters=self._parameters)
        return [twilio.connected_message(), start]

    def frame(self, pcm: bytes, silent: bool) -> str:
        chunk = self._up.process(np.frombuffer(pcm, dtype="<i2"))
        self._chunk += 1
        # Twilio numbers chunks from 1 and stamps them in ms since the stream started.
        return twilio.inbound_media_message(
            self.stream_sid, twilio.mulaw_encode(chunk), self._chunk, (self._chunk - 1) * 20
        )

    def dtmf(self, digits: str) -> list[str]:
        return [twilio.dtmf_message(self.stream_sid, digit) for digit in digits]  # one event per key

    def mark_played(self, name: str) -> str | None:
        return twilio.mark_echo_message(self.stream_sid, name)

    def bye(self) -> list[str]:
        return [twilio.stop_message(self.stream_sid, self.call_id)]

    def parse(self, message: str | bytes) -> AgentMessage:
        parsed = twilio.parse_outbound(message)
        if isinstance(parsed, twilio.OutboundMedia):
            return AgentAudio(self._down.process(twilio.mulaw_decode(parsed.payload)).astype("<i2").tobytes())
        if isinstance(parsed, twilio.OutboundClear):
            self._down.reset()
            return AgentStop()
        if isinstance(parsed, twilio.OutboundMark):
            return AgentMark(parsed.name)
        return Ignored(parsed.event)
