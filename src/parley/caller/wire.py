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

from parley.audio import StreamResampler
from parley.caller import twilio_wire as twilio
from parley.transports import acs

PROTOCOLS: Final = ("acs", "twilio")
"""What `CallOptions.proto` (and `parley call --proto`) accept."""

DEFAULT_PATHS: Final = {"acs": "/ws/acs", "twilio": "/ws/twilio"}
"""The media path parley serves for each protocol."""


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

    def headers(self) -> dict[str, str]: ...

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

    def headers(self) -> dict[str, str]:
        return {"x-ms-call-connection-id": self.call_id, "x-ms-call-correlation-id": self._correlation_id}

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
    """Twilio Media Streams: mu-law at 8 kHz on the wire, the call's rate (16 kHz) on both sides of it.

    Uplink frames are resampled with a streaming resampler and re-cut into 160-byte chunks (the
    resampler's start-up delay is covered with silence on the first chunk, so one frame in is
    always one chunk out); downlink media is decoded and resampled back, and the resampler is
    reset on `clear` so no audio of a cleared turn leaks into the next one.
    """

    name = "twilio"
    stop_name = "clear"

    def __init__(
        self,
        sample_rate: int,
        call_sid: str,
        *,
        stream_sid: str | None = None,
        account_sid: str = "",
        custom_parameters: dict[str, str] | None = None,
    ) -> None:
        self.call_id = call_sid
        self.stream_sid = stream_sid or twilio_sid("MZ")
        self._rate = sample_rate
        self._account_sid = account_sid
        self._parameters = dict(custom_parameters or {})
        self._up = StreamResampler(sample_rate, twilio.SAMPLE_RATE)
        self._up_buffer = np.zeros(0, dtype=np.int16)
        self._down = StreamResampler(twilio.SAMPLE_RATE, sample_rate)
        self._chunk = 0

    def headers(self) -> dict[str, str]:
        return {}

    def hello(self) -> list[str]:
        start = twilio.start_message(
            self.stream_sid, self.call_id, account_sid=self._account_sid, custom_parameters=self._parameters
        )
        return [twilio.connected_message(), start]

    def frame(self, pcm: bytes, silent: bool) -> str:
        resampled = np.frombuffer(self._up.process(pcm), dtype="<i2")
        buffered = np.concatenate([self._up_buffer, resampled])
        if buffered.size < twilio.FRAME_BYTES:  # only while the resampler fills, at the start
            buffered = np.concatenate([np.zeros(twilio.FRAME_BYTES - buffered.size, np.int16), buffered])
        chunk, self._up_buffer = buffered[: twilio.FRAME_BYTES], buffered[twilio.FRAME_BYTES :]
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
        return [twilio.stop_message(self.stream_sid, self.call_id, self._account_sid)]

    def parse(self, message: str | bytes) -> AgentMessage:
        parsed = twilio.parse_outbound(message)
        if isinstance(parsed, twilio.OutboundMedia):
            pcm = twilio.mulaw_decode(parsed.payload).astype("<i2").tobytes()
            return AgentAudio(self._down.process(pcm))
        if isinstance(parsed, twilio.OutboundClear):
            self._down = StreamResampler(twilio.SAMPLE_RATE, self._rate)
            return AgentStop()
        if isinstance(parsed, twilio.OutboundMark):
            return AgentMark(parsed.name)
        return Ignored(parsed.event)
