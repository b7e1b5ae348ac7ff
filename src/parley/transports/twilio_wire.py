"""TwilioWire: one Twilio Media Streams call as the handler's `MediaWire`.

The handler works in PCM16 at 16 kHz, 20 ms frames; Twilio speaks mu-law at 8 kHz. Inbound
`media` is decoded, upsampled and cut into exact 20 ms frames (a shorter chunk is held until a
frame is whole); outbound frames are downsampled and encoded into `media` messages for the
stream. The stream's id (`streamSid`) is learnt from `start` and addresses everything sent after.
It marks playout (`MarksPlayout`): a `mark` is echoed back as `Played` once heard.

Stateful (the stream id, the resamplers' filter histories, the partial frame): one per call.
"""

from __future__ import annotations

import logging

import numpy as np

from parley.transports import acs, twilio
from parley.transports.twilio_resample import Downsampler, Upsampler
from parley.transports.wire import Inbound, Outbound, Played, StreamEnded, StreamStarted

log = logging.getLogger(__name__)

RATE = 16000
"""The rate the handler (VAD, recognition, voices) sees a Twilio call at."""

FORMAT = acs.AudioFormat.for_rate(RATE)

NOT_STARTED: Outbound = ""
"""What the wire gives for a message it cannot address yet (before `start`): the handler's sender
sends nothing for an empty message."""


class TwilioWire:
    name = "twilio"

    def __init__(self, max_chars: int = twilio.MAX_MESSAGE_CHARS) -> None:
        self._max_chars = max_chars
        self.stream_sid: str | None = None
        self.call_sid = ""
        self._up = Upsampler()
        self._down = Downsampler()
        self._partial = bytearray()  # caller audio at 16 kHz, less than one frame
        self._unaddressed = 0  # outbound messages dropped before `start`

    # ------------------------------------------------------------------ Twilio -> handler
    def parse(self, data: str | bytes, fmt: acs.AudioFormat | None) -> Inbound:
        event = twilio.parse_inbound(data, max_chars=self._max_chars)
        if isinstance(event, twilio.Media):
            return self._media(event)
        if isinstance(event, twilio.Start):
            return self._start(event)
        if isinstance(event, twilio.Mark):
            return Played(event.name)
        if isinstance(event, twilio.DtmfEvent):
            return acs.Dtmf(event.digit)
        if isinstance(event, twilio.Stop):
            return StreamEnded("stop")
        if isinstance(event, twilio.Connected):
            return acs.UnknownMessage("connected")
        return acs.UnknownMessage(event.event)

    def _start(self, start: twilio.Start) -> StreamStarted:
        if self.stream_sid is not None:
            raise twilio.TwilioProtocolError(f"a second start message (stream {start.stream_sid!r}) on one stream")
        self.stream_sid = start.stream_sid
        self.call_sid = start.call_sid
        return StreamStarted(format=FORMAT, call_id=start.call_sid, parameters=dict(start.custom_parameters))

    def _media(self, media: twilio.Media) -> Inbound:
        if self.stream_sid is None:
            raise twilio.TwilioProtocolError("media before the start message")
        if media.stream_sid != self.stream_sid:
            raise twilio.TwilioProtocolError(f"media for stream {media.stream_sid!r} on stream {self.stream_sid!r}")
        if media.track != "inbound":  # with <Stream track="both_tracks">: our own audio, not the caller
            return acs.UnknownMessage(f"media ({media.track} track)")
        if len(media.payload) > twilio.FRAME_BYTES:
            # One message is one handler frame at most: more would queue up behind the line forever.
            raise twilio.TwilioProtocolError(
                f"media payload is {len(media.payload)} bytes; at most one 20 ms chunk "
                f"({twilio.FRAME_BYTES} bytes) is accepted per message"
            )
        pcm = self._up.process(twilio.mulaw_decode(media.payload))
        self._partial += pcm.astype("<i2").tobytes()
        if len(self._partial) < FORMAT.frame_bytes:
            return acs.UnknownMessage("media (less than 20 ms so far)")
        frame = bytes(self._partial[: FORMAT.frame_bytes])
        del self._partial[: FORMAT.frame_bytes]
        timestamp = None if media.timestamp_ms is None else str(media.timestamp_ms)
        return acs.AudioFrame(frame, timestamp=timestamp, silent=False)

    # ------------------------------------------------------------------ handler -> Twilio
    def audio(self, pcm: bytes) -> Outbound:
        if self.stream_sid is None:
            return self._not_started("media")
        samples = self._down.process(np.frombuffer(pcm, dtype="<i2"))
        if samples.size == 0:  # (one odd sample: nothing whole at 8 kHz yet)
            return NOT_STARTED
        return twilio.media_message(self.stream_sid, twilio.mulaw_encode(samples))

    def stop(self) -> Outbound:
        """`clear`: Twilio drops what it has queued (and echoes the marks among it at once)."""
        self._down.reset()  # the flushed reply's tail must not bleed into the next one
        if self.stream_sid is None:
            return self._not_started("clear")
        return twilio.clear_message(self.stream_sid)

    def mark(self, name: str) -> Outbound:
        if self.stream_sid is None:
            return self._not_started("mark")
        return twilio.mark_message(self.stream_sid, name)

    def _not_started(self, what: str) -> Outbound:
        self._unaddressed += 1
        if self._unaddressed == 1 or self._unaddressed % 100 == 0:
            log.warning("twilio: %s before the stream's start message: not sent (%d so far)", what, self._unaddressed)
        return NOT_STARTED
