"""Placing one simulated call: dial, converse, measure, and build the report."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
import uuid
from typing import Any, Final
from urllib.parse import urlsplit

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from parley.caller.events import _valid_events, fetch_events
from parley.caller.live import CallState, ClipProgress, Sender, SendLog, _receive
from parley.caller.metrics import (
    _ms,
    decision_to_stop_ms,
    leaked_audio_ms,
    media_after_clear,
    voice_to_voice_ms,
)
from parley.caller.options import CallOptions, ClipFrames, Utterance, caller_audio, with_agent, with_query
from parley.caller.playout import PlayoutEmulator
from parley.caller.recording import uplink_track, write_stereo_wav
from parley.caller.report import CallReport, _build_timeline
from parley.caller.script import AtOnceTrigger, BargeInTrigger, GreetingOverTrigger, Script, SpeakTrigger
from parley.caller.uplink import UplinkMix
from parley.caller.wire import PROTOCOLS, TWILIO_CALL_RATE, AcsCallerWire, CallerWire, TwilioCallerWire, twilio_sid
from parley.transports.acs import AudioFormat, dtmf_message

CLOSE_TIMEOUT_S: Final = 2.0
"""How long to wait for the receive task to finish after the socket is closed."""

OPEN_TIMEOUT_S: Final = 10.0
"""How long the TCP connect and WebSocket handshake may take."""


class DialError(ConnectionError):
    """The call could not be placed (nothing listening, no such endpoint, handshake refused);
    the message is one line naming the URL. The underlying error is the `__cause__`."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


def _first_line(body: bytes | bytearray | None, limit: int = 160) -> str:
    """The server's reason (parley answers a refusal with one text line, e.g. `unknown_agent: ...`)."""
    text = (body or b"").decode("utf-8", errors="replace").strip()
    return text.splitlines()[0][:limit] if text else ""


async def _dial(url: str, headers: dict[str, str]) -> ClientConnection:
    """Open the media WebSocket, turning every way that can fail into a DialError."""
    parts = urlsplit(url)
    where = parts.netloc or url
    try:
        # ACS sends plain text frames (no permessage-deflate); compressing would only cost CPU.
        return await websockets.connect(
            url, additional_headers=headers, max_size=2**20, compression=None, open_timeout=OPEN_TIMEOUT_S
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 404:
            raise DialError(f"no such endpoint: {url} (HTTP 404)", status) from exc
        why = _first_line(exc.response.body)
        raise DialError(
            f"the server refused the media WebSocket: {url} (HTTP {status}{': ' + why if why else ''})", status
        ) from exc
    except InvalidURI as exc:
        raise DialError(f"not a WebSocket URL: {url} (expected ws://host:port/ws/acs)") from exc
    except InvalidHandshake as exc:
        raise DialError(f"{where} did not answer as a WebSocket server ({exc})") from exc
    except ConnectionRefusedError as exc:
        raise DialError(f"cannot connect to {where}: connection refused (is the parley server running?)") from exc
    except socket.gaierror as exc:
        raise DialError(f"cannot connect to {where}: unknown host ({exc.strerror})") from exc
    except TimeoutError as exc:
        raise DialError(f"cannot connect to {where}: no answer within {OPEN_TIMEOUT_S:.0f} s") from exc
    except OSError as exc:
        # One refusal per address (localhost: ::1 and 127.0.0.1) comes as "Multiple exceptions".
        if f"[Errno {errno.ECONNREFUSED}]" in str(exc):
            raise DialError(f"cannot connect to {where}: connection refused (is the parley server running?)") from exc
        raise DialError(f"cannot connect to {where}: {exc.strerror or exc}") from exc


def _trigger(options: CallOptions, t0: float) -> SpeakTrigger:
    if options.say:
        return AtOnceTrigger()  # the timeline starts with the call; each utterance at its time
    if options.barge_in_at is not None:
        return BargeInTrigger(options.barge_in_at)
    return GreetingOverTrigger(t0, options.greeting_wait_s)


def _wire(options: CallOptions, fmt: AudioFormat, correlation_id: str) -> CallerWire:
    """The far end this call plays: ACS media streaming or Twilio Media Streams (call id: a CallSid)."""
    if options.proto == "twilio":
        parameters = {"agent": options.agent} if options.agent is not None else {}
        return TwilioCallerWire(
            options.call_id or twilio_sid("CA"), custom_parameters=parameters, auth_token=options.twilio_auth_token
        )
    return AcsCallerWire(fmt, options.call_id or str(uuid.uuid4()), correlation_id)


async def _converse(
    ws: ClientConnection, options: CallOptions, clip: ClipFrames, wire: CallerWire, fmt: AudioFormat
) -> tuple[CallState, Script, SendLog, float]:
    """Run the live part of the call; returns the state, script, send log and end time."""
    t0 = time.monotonic()
    state = CallState(t0=t0, playout=PlayoutEmulator(t0, fmt.sample_rate), wire=wire)
    give_up_at = t0 + options.greeting_wait_s + options.max_wait_s
    script = Script(len(clip), _trigger(options, t0), state.playout, options, give_up_at)
    receiver = asyncio.create_task(_receive(ws, state))
    with ClipProgress(len(clip), options.progress) as progress:
        mix = UplinkMix.for_options(options, state.playout, clip.frames.shape[1])
        sender = Sender(ws, state, clip, script, options.dtmf, progress, mix, record=options.out is not None)
        server_closed_first = False
        try:
            for message in wire.hello():
                await ws.send(message)
            await sender.run()
            for message in wire.bye():  # Twilio's stop: the call is over
                await ws.send(message)
        except ConnectionClosed:
            # The server closed while we were sending; the receiver records when.
            server_closed_first = True
    end = time.monotonic()
    if not server_closed_first and not state.server_closed.is_set():
        state.closing = True  # from here on the close is ours, not a hang-up
    await ws.close()
    with contextlib.suppress(TimeoutError):
        # A receiver bug re-raises here rather than vanishing with the task.
        await asyncio.wait_for(receiver, CLOSE_TIMEOUT_S)
    if state.closed_at is not None:
        end = state.closed_at
    state.errors.extend(script.notes)
    return state, script, sender.log, end


async def run_call(options: CallOptions) -> CallReport:
    """Place one simulated call (ACS or Twilio, `options.proto`) and measure it. Connection failures
    raise DialError; anything the server gets wrong during the call is recorded in the report's
    `errors` instead."""
    _check_options(options)
    fmt = AudioFormat.for_rate(options.sample_rate)
    samples_per_frame = fmt.frame_bytes // 2
    pcm, utterances = caller_audio(options)
    clip = ClipFrames.from_pcm(pcm, samples_per_frame)
    correlation_id = options.correlation_id or str(uuid.uuid4())
    wire = _wire(options, fmt, correlation_id)
    url = with_query(with_agent(options.url, options.agent), wire.url_params())
    headers = wire.headers(url)
    if options.api_token:
        headers["Authorization"] = f"Bearer {options.api_token}"
    async with await _dial(url, headers) as ws:
        state, script, log, end = await _converse(ws, options, clip, wire, fmt)
        close_code, close_reason = ws.close_code, ws.close_reason
    state.playout.finish(end)
    if options.out is not None:
        heard = state.playout.render(end)
        write_stereo_wav(options.out, uplink_track(log.uplink, samples_per_frame, heard.size), heard, fmt.sample_rate)
    raw_events, events_error = await _events(options, wire.call_id)
    events = _valid_events(raw_events, state.t0, state.errors)
    if events_error is not None:
        state.errors.append(f"events fetch failed: {events_error}")
    spoken = _utterances(utterances, clip, log, state, samples_per_frame)
    return CallReport(
        call_id=wire.call_id,
        correlation_id=correlation_id,
        url=url,
        sample_rate=fmt.sample_rate,
        proto=wire.name,
        t0=state.t0,
        duration_ms=_ms(end - state.t0),
        frames_sent=log.frames_sent,
        frames_received=len(state.received),
        send_lateness_ms_max=_ms(log.lateness_max_s),
        clip_started_t=script.clip_start,
        clip_ended_t=script.clip_end,
        speech_onset_t=log.onset,
        speech_end_t=log.speech_end,
        stop_audio_count=len(state.stops),
        stops=[_ms(s - state.t0) for s in state.stops],
        stop_flushed_ms=[_ms(f) for f in state.stop_flushed_s],
        agent_audio_ms=_ms(state.playout.played_s),
        stretches=[[_ms(s.start - state.t0), _ms(s.end - state.t0)] for s in state.playout.stretches],
        onset_to_stop_ms=[ms for utterance in spoken for ms in utterance["onset_to_stop_ms"]],
        decision_to_stop_ms=decision_to_stop_ms(events),
        leaked_audio_ms=leaked_audio_ms(state.stops, state.received, events, fmt.sample_rate),
        media_after_clear=media_after_clear(state.stops, state.received, events),
        voice_to_voice_ms=voice_to_voice_ms(log.speech_end, state.received),
        hung_up_by_server=state.closed_at is not None,
        close_code=close_code,
        close_reason=close_reason,
        dtmf_sent=[[_ms(at - state.t0), digits] for at, digits in log.dtmf],
        marks_echoed=state.marks_echoed,
        utterances=spoken,
        events=events,
        events_error=events_error,
        errors=state.errors,
        timeline=_build_timeline(state.t0, script, log, state, events, end, spoken),
    )


def _utterances(
    utterances: list[Utterance], clip: ClipFrames, log: SendLog, state: CallState, samples_per_frame: int
) -> list[dict[str, Any]]:
    """Per utterance that went out: when, its speech (first to last frame above the onset level),
    each stop between its start and the next utterance's (onset -> stop, negative when the server
    stopped on sound before the first loud frame) and its voice-to-voice."""
    sent = log.clip_sent
    spans = []
    for utterance in utterances:
        first = utterance.start // samples_per_frame
        last = min((utterance.start + utterance.length - 1) // samples_per_frame, len(sent) - 1)
        if first > last:
            continue  # the call ended before it was said
        loud = [sent[f] for f in range(first, last + 1) if clip.loud[f]]
        spans.append((sent[first], loud[0] if loud else None, loud[-1] if loud else None))
    figures = []
    for k, (start, onset, speech_end) in enumerate(spans):
        until = spans[k + 1][0] if k + 1 < len(spans) else float("inf")
        since = start if onset is None else min(start, onset)
        stops = [] if onset is None else [_ms(s - onset) for s in state.stops if since <= s < until]
        figures.append(
            {
                "at_ms": _ms(start - state.t0),
                "onset_ms": None if onset is None else _ms(onset - state.t0),
                "end_ms": None if speech_end is None else _ms(speech_end - state.t0),
                "onset_to_stop_ms": stops,
                "voice_to_voice_ms": voice_to_voice_ms(speech_end, state.received),
            }
        )
    return figures


def _check_options(options: CallOptions) -> None:
    """Fail before dialling, not in the middle of a timed call."""
    if options.proto not in PROTOCOLS:
        raise ValueError(f"proto {options.proto!r}: expected {' or '.join(PROTOCOLS)}")
    if options.proto == "twilio" and options.sample_rate != TWILIO_CALL_RATE:
        raise ValueError(f"a Twilio call runs at {TWILIO_CALL_RATE} Hz (8 kHz on the wire), not {options.sample_rate}")
    if options.barge_in_at is not None and options.barge_in_at < 0:
        raise ValueError("barge_in_at must be >= 0 seconds")
    if options.echo_delay_ms < 0:
        raise ValueError("echo_delay_ms must be >= 0")
    if options.background is not None:
        background = np.asarray(options.background)
        if background.dtype != np.int16 or background.ndim != 1 or background.size == 0:
            raise ValueError("CallOptions.background must be a non-empty 1-D int16 array at the call's rate")
    for at, digits in options.dtmf:
        if at < 0:
            raise ValueError(f"DTMF time {at} is negative")
        dtmf_message(digits)  # raises on symbols that are not DTMF tones


async def _events(options: CallOptions, call_id: str) -> tuple[list[dict[str, Any]], str | None]:
    if not options.fetch_events:
        return [], None
    try:
        return await fetch_events(options.url, call_id, api_token=options.api_token), None
    except Exception as exc:  # noqa: BLE001 -- any failure (refused, 404, bad JSON) must not lose the report
        return [], f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
