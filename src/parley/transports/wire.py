"""How one call's media are spoken on its socket: a small sans-I/O object per call.

The MediaHandler (barge-in, echo gate, turns) is the same for every channel; what differs is the
wire: ACS's JSON with base64 PCM16, Twilio's JSON with base64 mu-law at 8 kHz, a browser's own
flavour. A wire turns one received WebSocket message into the typed values of the ACS codec
(`AudioMetadata`, `AudioFrame`, `Dtmf`, ...) plus the few this module adds, and turns the
handler's PCM16 frames and stops into messages. It never touches a socket, so each wire is tested
with plain function calls, like the ACS codec.

A wire may keep state (a streaming resampler, the stream's id): one instance serves one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, runtime_checkable

from parley.transports import acs

Outbound: TypeAlias = str | bytes
"""A message for the socket: text frames as str, binary frames as bytes."""


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """The channel's handshake (Twilio's `start`): the media format the handler sees (after the
    wire's conversion), the channel's own call id, and parameters the caller's side passed along
    (Twilio's `<Parameter>`s: the agent, the called number...)."""

    format: acs.AudioFormat
    call_id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Played:
    """The far end has played everything sent before the mark called `name` (Twilio's `mark`)."""

    name: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The far end ended the stream by message (Twilio's `stop`), not by closing the socket."""

    reason: str = ""


Inbound: TypeAlias = acs.InboundMessage | StreamStarted | Played | StreamEnded


class MediaWire(Protocol):
    """One call's channel codec. `parse` raises `acs.AcsProtocolError` (or a subclass) on bad input,
    with a message fit for the call's log."""

    name: str

    def parse(self, data: str | bytes, fmt: acs.AudioFormat | None) -> Inbound: ...

    def audio(self, pcm: bytes) -> Outbound:
        """One 20 ms frame of the agent's PCM16 at the handler's rate, as a message."""
        ...

    def stop(self) -> Outbound:
        """Flush what the far end has queued and not played (ACS StopAudio, Twilio clear)."""
        ...


@runtime_checkable
class MarksPlayout(Protocol):
    """A wire whose far end reports what it has played (echoes named marks back as `Played`)."""

    def mark(self, name: str) -> Outbound: ...


class AcsWire:
    """The ACS bidirectional media-streaming protocol (`parley.transports.acs`)."""

    name = "acs"

    def __init__(self, max_chars: int = acs.MAX_MESSAGE_CHARS) -> None:
        self._max_chars = max_chars

    def parse(self, data: str | bytes, fmt: acs.AudioFormat | None) -> Inbound:
        return acs.parse_inbound(data, fmt, max_chars=self._max_chars)

    def audio(self, pcm: bytes) -> Outbound:
        return acs.audio_data_message(pcm)

    def stop(self) -> Outbound:
        return acs.stop_audio_message()
