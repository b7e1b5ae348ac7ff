"""A simulated caller: dials a parley server the way Azure Communication Services (or Twilio) does.

`run_call` connects to a media-streaming WebSocket with the ACS upgrade headers, sends
AudioMetadata and then one 20 ms AudioData frame every 20 ms on an absolute real-time schedule
(silence when not speaking, as ACS does), speaks a clip at a chosen moment, and records the
agent's audio. ACS queues the audio an app sends and plays it in real time, flushing the queue on
StopAudio; `PlayoutEmulator` models that with a virtual playout clock, so the report and the `out`
WAV reflect what a real caller would have heard, not merely what arrived on the socket. A caller
on a speakerphone (`echo_db`) or in a noisy room (`background`) also sends the agent's own audio
and the room noise back up the line (`UplinkMix`).

Every timestamp is `time.monotonic()` seconds. The server logs its events on the same clock (same
machine), so caller-side times (speech onset, StopAudio received) and server-side events
(barge-in decided, StopAudio sent) can be subtracted directly.

With `proto="twilio"` it speaks Twilio Media Streams instead (`wire`: connected/start, mu-law
media at 8 kHz, marks echoed once played, `clear` flushing the playout like StopAudio).
`say` replaces the one clip with a timeline of utterances; `out` is a stereo WAV (caller left,
agent right, as heard).

The package, by concern: `options` (CallOptions, the clip or timeline in frames), `wire` (ACS or
Twilio, behind `CallerWire`), `recording` (the stereo WAV), `playout` (the ACS playout
emulation), `script` (when to speak and hang up), `uplink` (echo and room noise), `live` (sender
and receiver), `events` (the server's event log), `metrics` (barge-in and latency figures),
`report` (CallReport, timeline, printing) and `run` (run_call). Import from `parley.caller`.
"""

from parley.caller.events import events_url, fetch_events
from parley.caller.live import CallState, ClipProgress, Sender, SendLog
from parley.caller.metrics import (
    decision_to_stop_ms,
    leaked_audio_ms,
    media_after_clear,
    onset_to_stop_ms,
    voice_to_voice_ms,
)
from parley.caller.options import CallOptions, ClipFrames, Utterance, caller_audio, media_url, with_agent
from parley.caller.playout import PlayoutEmulator, Stretch
from parley.caller.report import CallReport, Timeline, print_report
from parley.caller.run import DialError, run_call
from parley.caller.script import (
    SILENCE,
    AnswerWatcher,
    AtOnceTrigger,
    BargeInTrigger,
    GreetingOverTrigger,
    Phase,
    Script,
    SpeakTrigger,
)
from parley.caller.uplink import UplinkMix
from parley.caller.wire import (
    DEFAULT_PATHS,
    PROTOCOLS,
    AcsCallerWire,
    AgentAudio,
    AgentMark,
    AgentStop,
    CallerWire,
    Ignored,
    TwilioCallerWire,
)

__all__ = [
    "DEFAULT_PATHS",
    "PROTOCOLS",
    "SILENCE",
    "AcsCallerWire",
    "AgentAudio",
    "AgentMark",
    "AgentStop",
    "AnswerWatcher",
    "AtOnceTrigger",
    "BargeInTrigger",
    "CallOptions",
    "CallReport",
    "CallState",
    "CallerWire",
    "ClipFrames",
    "ClipProgress",
    "DialError",
    "GreetingOverTrigger",
    "Ignored",
    "Phase",
    "PlayoutEmulator",
    "Script",
    "SendLog",
    "Sender",
    "SpeakTrigger",
    "Stretch",
    "Timeline",
    "TwilioCallerWire",
    "UplinkMix",
    "Utterance",
    "caller_audio",
    "decision_to_stop_ms",
    "events_url",
    "fetch_events",
    "leaked_audio_ms",
    "media_after_clear",
    "media_url",
    "onset_to_stop_ms",
    "print_report",
    "run_call",
    "voice_to_voice_ms",
    "with_agent",
]
