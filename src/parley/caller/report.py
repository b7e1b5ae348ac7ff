"""The call report: what was measured, the merged timeline, and how it is printed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from rich.console import Console
from rich.table import Table
from rich.text import Text

from parley.audio import SPEECH_ONSET_DBFS as ONSET_DBFS
from parley.caller.live import CallState, SendLog
from parley.caller.metrics import _ms
from parley.caller.script import Script

_SERVER_EVENTS_IN_TIMELINE: Final = frozenset(
    {
        "speech_started",
        "partial",
        "final",
        "turn_started",
        "agent_text",
        "agent_handoff",
        "tool_called",
        "transfer_requested",
        "barge_in_paused",
        "barge_in_resumed",
        "barge_in_decided",
        "stop_audio_sent",
        "turn_cancelled",
        "call_ended",
    }
)


@dataclass(slots=True)
class CallReport:
    """Everything measured in one call. Times named `*_t` are monotonic seconds; `*_ms` lists
    and timeline entries are milliseconds relative to call start (`t0`) unless named as deltas."""

    call_id: str
    correlation_id: str
    url: str
    sample_rate: int
    proto: str  # "acs" or "twilio": StopAudio figures are clear's for twilio
    t0: float
    duration_ms: float
    frames_sent: int
    frames_received: int
    send_lateness_ms_max: float
    clip_started_t: float | None
    clip_ended_t: float | None
    speech_onset_t: float | None
    speech_end_t: float | None
    stop_audio_count: int
    stops: list[float]
    stop_flushed_ms: list[float]
    agent_audio_ms: float
    stretches: list[list[float]]
    onset_to_stop_ms: list[float]
    decision_to_stop_ms: list[float]
    leaked_audio_ms: float
    media_after_clear: int  # agent media of a cut turn received after its StopAudio / clear (must be 0)
    voice_to_voice_ms: float | None
    hung_up_by_server: bool
    close_code: int | None
    close_reason: str | None
    dtmf_sent: list[list[Any]]
    marks_echoed: int  # Twilio marks echoed back once their audio had played (or was cleared)
    # Per utterance: at_ms (when its first frame went out), onset_ms and end_ms (its speech),
    # onset_to_stop_ms (stops before the next utterance), voice_to_voice_ms.
    utterances: list[dict[str, Any]]
    events: list[dict[str, Any]]
    events_error: str | None
    errors: list[str]
    timeline: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rel_ms(self, t: float | None) -> float | None:
        return None if t is None else _ms(t - self.t0)

    @property
    def stop_name(self) -> str:
        return "clear" if self.proto == "twilio" else "StopAudio"


class Timeline:
    """Collects (time, who, what) entries and renders them sorted, relative to call start."""

    def __init__(self, t0: float) -> None:
        self._t0 = t0
        self._items: list[tuple[float, str, str]] = []

    def add(self, t: float | None, who: str, what: str) -> None:
        if t is not None:
            self._items.append((t, who, what))

    def entries(self) -> list[dict[str, Any]]:
        ordered = sorted(self._items, key=lambda item: item[0])
        return [{"t_ms": _ms(t - self._t0), "who": who, "what": what} for t, who, what in ordered]


def _describe_event(event: dict[str, Any]) -> str:
    name = event["event"]
    turn = event.get("turn_id")
    match name:
        case "partial" | "final":
            return f"{name} {event.get('text', '')!r}"
        case "turn_started":
            return f"turn {turn} started ({event.get('kind', '?')})"
        case "agent_text":
            return f"says {event.get('text', '')!r}"
        case "agent_handoff":
            mode = "announced" if event.get("announced") else "silent"
            return f"handoff {event.get('source')} -> {event.get('target')} ({mode}, {event.get('history')} history)"
        case "tool_called":
            return f"tool {event.get('tool')} ({event.get('ms')} ms{'' if event.get('ok') else ', failed'})"
        case "transfer_requested":
            return f"transfer to {event.get('target')} requested"
        case "barge_in_paused":
            return f"barge-in: turn {turn} paused"
        case "barge_in_resumed":
            return f"turn {turn} resumed ({event.get('reason', '?')})"
        case "barge_in_decided":
            return f"barge-in decided, turn {turn} (trigger {event.get('trigger', '?')})"
        case "stop_audio_sent":
            return f"StopAudio sent, turn {turn}"
        case "turn_cancelled":
            return f"turn {turn} cancelled"
        case _:
            return str(name).replace("_", " ")


def _build_timeline(
    t0: float,
    script: Script,
    log: SendLog,
    state: CallState,
    events: Sequence[dict[str, Any]],
    end: float,
    utterances: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    timeline = Timeline(t0)
    stop_name = state.wire.stop_name
    timeline.add(script.clip_start, "caller", "starts sending the clip")
    if len(utterances) > 1:
        for number, utterance in enumerate(utterances, 1):
            timeline.add(t0 + utterance["at_ms"] / 1000, "caller", f"utterance {number} starts")
    timeline.add(log.onset, "caller", f"speech onset (> {ONSET_DBFS:.0f} dBFS)")
    timeline.add(log.speech_end, "caller", "speech end (last frame above threshold)")
    timeline.add(script.clip_end, "caller", "clip finished")
    for at, digits in log.dtmf:
        timeline.add(at, "caller", f"DTMF {digits!r}")
    for stretch in state.playout.stretches:
        timeline.add(stretch.start, "agent", "audio starts playing")
        how = f"audio cut by {stop_name}" if stretch.cut else "audio stops"
        timeline.add(stretch.end, "agent", how)
    for at, flushed in zip(state.stops, state.stop_flushed_s, strict=True):
        timeline.add(at, "server", f"{stop_name} received ({_ms(flushed):.0f} ms queued audio flushed)")
    for event in events:
        if event["event"] in _SERVER_EVENTS_IN_TIMELINE:
            timeline.add(event["t"], "server", _describe_event(event))
    timeline.add(end, "server" if state.closed_at is not None else "caller", "hangs up")
    return timeline.entries()


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _fmt_list(values: Sequence[float], unit: str = "ms") -> str:
    return ", ".join(f"{v:.0f} {unit}" for v in values) if values else "none"


def _summary_lines(report: CallReport) -> list[str]:
    rel = report.rel_ms
    lines = [
        f"call {report.call_id} at {report.sample_rate} Hz, {report.duration_ms / 1000:.2f} s, "
        f"{report.frames_sent} frames sent, {report.frames_received} received, "
        f"max send lateness {report.send_lateness_ms_max:.1f} ms",
    ]
    if report.clip_started_t is None:
        lines.append("caller never spoke")
    elif report.speech_onset_t is None:
        lines.append(f"caller's clip: {rel(report.clip_started_t)}-{rel(report.clip_ended_t)} ms, no speech in it")
    else:
        lines.append(
            f"caller spoke: clip {rel(report.clip_started_t)}-{rel(report.clip_ended_t)} ms, "
            f"speech {rel(report.speech_onset_t)}-{rel(report.speech_end_t)} ms"
        )
    if len(report.utterances) > 1:
        lines.extend(_utterance_lines(report))
    if report.dtmf_sent:
        lines.append("DTMF sent: " + ", ".join(f"{digits!r} at {at:.0f} ms" for at, digits in report.dtmf_sent))
    spans = ", ".join(f"{a:.0f}-{b:.0f}" for a, b in report.stretches) or "none"
    lines.append(f"agent audio played: {report.agent_audio_ms:.0f} ms in stretches {spans} ms")
    stops = ", ".join(
        f"{s:.0f} ms (flushed {f:.0f} ms)" for s, f in zip(report.stops, report.stop_flushed_ms, strict=True)
    )
    stop = report.stop_name
    lines.append(f"{stop} received: {stops or 'none'}")
    lines.append(f"speech onset -> {stop}: {_fmt_list(report.onset_to_stop_ms)}")
    # In the default pause mode the server stops the audio when it pauses the turn, before it
    # decides on the barge-in: the figure is then the pause's, not the decision's.
    paused = any(event["event"] == "barge_in_paused" for event in report.events)
    lines.append(
        f"server, barge-in {'pause' if paused else 'decision'} -> {stop} sent: {_fmt_list(report.decision_to_stop_ms)}"
    )
    lines.append(
        f"leaked audio after {stop}: {report.leaked_audio_ms:.0f} ms ({report.media_after_clear} media messages)"
    )
    if report.voice_to_voice_ms is not None:
        lines.append(f"voice-to-voice (caller's speech end -> agent's reply): {report.voice_to_voice_ms:.0f} ms")
    elif report.speech_end_t is not None:
        lines.append("voice-to-voice: none (no agent reply began after the caller's speech ended)")
    ended = "the server hung up" if report.hung_up_by_server else "the caller hung up"
    lines.append(f"{ended} (close code {report.close_code})")
    return lines


def _utterance_lines(report: CallReport) -> list[str]:
    lines = []
    for number, utterance in enumerate(report.utterances, 1):
        speech = (
            f"speech {utterance['onset_ms']:.0f}-{utterance['end_ms']:.0f} ms"
            if utterance["onset_ms"] is not None
            else "no speech in it"
        )
        v2v = utterance["voice_to_voice_ms"]
        reply = f", reply after {v2v:.0f} ms" if v2v is not None else ""
        lines.append(f"  utterance {number} at {utterance['at_ms']:.0f} ms: {speech}{reply}")
    return lines


def print_report(report: CallReport, console: Console | None = None, *, timeline: bool = True) -> None:
    """Print the call's timeline as a table (unless `timeline` is False), a summary and any errors."""
    console = console or Console()
    if timeline:
        _print_timeline(report, console)
    for line in _summary_lines(report):
        console.print(line, markup=False, highlight=False)
    for error in report.errors:
        console.print(f"error: {error}", style="red", markup=False)


def _print_timeline(report: CallReport, console: Console) -> None:
    table = Table(title=f"call {report.call_id}")
    table.add_column("t (ms)", justify="right")
    table.add_column("who")
    table.add_column("what")
    styles = {"caller": "cyan", "agent": "green", "server": "magenta"}
    for item in report.timeline:
        who = item["who"]
        # Text, not markup: recognised speech may contain [brackets].
        table.add_row(f"{item['t_ms']:.0f}", Text(who, style=styles.get(who, "")), Text(item["what"]))
    console.print(table)
