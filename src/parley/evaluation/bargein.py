"""`parley eval bargein`: does the agent stop when it should, and only then?

Each trial is one call to a real parley server by the simulated ACS caller. Once the agent's
greeting has played 1.0-1.8 s (jittered by seed, so stimuli land on different words and frame
phases), the caller plays the scenario's stimulus, then listens for OBSERVE_S more. What the
server did is read from its per-call event log:

- stopped: the agent's turn was cancelled by a barge-in (`barge_in_decided`, or `turn_cancelled`
  before the caller hung up);
- paused: playback paused pending confirmation (`barge_in_paused`; `barge_in_pending` when the
  server keeps talking while it waits is counted as pending);
- resumed: a paused reply carried on (`barge_in_resumed`: the server judged it a false interruption).
- brief pauses: pauses on a speech onset alone that resumed because no speech followed
  (`onset_lost`, `onset_not_sustained`), with how long the agent was silent. In the scenarios where
  the caller says nothing they are counted apart from false stops: the target is at most
  `MAX_BRIEF_PAUSES_PER_MIN` per minute of agent speech, each resumed within `MAX_BRIEF_PAUSE_MS`.

Scenarios:

- interrupt: a LibriVox sentence; MISSED when the turn was not cancelled.
- interrupt_echo: the same on a speakerphone (echo of the agent at -20 dB); must not be missed.
- noise10 / noise_bed: the caller says nothing; a white, pink or babble noise bed under the whole
  call, 10 / 20 dB below the clips' speech level. Any pause or stop, at any time, is FALSE.
- echo: the caller says nothing on a speakerphone (echo at -20 dB). Any pause or stop is FALSE.
- backchannel: "uh-huh", "mm-hmm", "yeah", "okay" or "right" (TTS voice, at speech level). A stop
  is a failure (target: at most 5 % of trials); a pause that resumes is acceptable.
- cough: a synthetic cough; counted like backchannel.
- answer: a short real answer ("yes", "no", "stop", "two", "wait", TTS voice, at speech level); MISSED
  when the turn was not cancelled (taken for a backchannel, echo or noise).

In every scenario a pause or stop *before* the stimulus began (the agent reacting to nothing, its
echo or the noise) also counts as FALSE.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from parley.benchmarks.common import Clip, default_clips, machine_info
from parley.caller import CallOptions, CallReport, run_call
from parley.caller.metrics import brief_pauses
from parley.evaluation import variants
from parley.stats import percentiles

SAMPLE_RATE: Final = 16000
Expect = Literal["stop", "nothing", "carry_on"]

SCENARIOS: Final[dict[str, Expect]] = {
    "interrupt": "stop",
    "interrupt_echo": "stop",
    "noise10": "nothing",
    "noise_bed": "nothing",
    "echo": "nothing",
    "backchannel": "carry_on",
    "cough": "carry_on",
    "answer": "stop",
}
DEFAULT_SCENARIOS: Final = ("interrupt", "interrupt_echo", "noise10", "echo", "backchannel", "cough")
DEFAULT_TRIALS: Final = 4

TRIGGER_RANGE_S: Final = (1.0, 1.8)
"""How long the agent has been talking when the stimulus starts."""
OBSERVE_S: Final = 2.5
"""Listening after the stimulus: longer than the server's default resume_after_ms (2 s), so a pause
with no words has resumed (or turned into a stop) before the caller hangs up."""
SILENT_STIMULUS_S: Final = 2.5
"""How long a caller who says nothing 'speaks' (silence under the noise or echo)."""
ECHO_DB: Final = -20.0
CARRY_ON_MAX_STOP_RATE: Final = 0.05
MAX_BRIEF_PAUSES_PER_MIN: Final = 1.0
MAX_BRIEF_PAUSE_MS: Final = 300.0

LONG_GREETING: Final = (
    "Hi, thanks for calling Tony's Pizza. This week every large pizza comes with a free garlic "
    "bread, and on Tuesdays the second pizza is half price. We deliver within three miles of the "
    "shop, usually in about forty five minutes. How can I help you today?"
)
"""The greeting of a server this evaluation starts: long enough to outlast trigger + stimulus."""

_BARGE_IN_EVENTS: Final = frozenset(
    {
        "barge_in_decided",
        "barge_in_paused",
        "barge_in_pending",
        "barge_in_resumed",
        "barge_in_confirmed",
        "barge_in_ignored",
        "turn_cancelled",
        "stop_audio_sent",
        "echo_suppressed",
        "speech_onset",
        "speech_started",
        "final",
        "turn_started",
    }
)


# --------------------------------------------------------------------------------------------
# Stimuli
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stimulus:
    name: str
    pcm: np.ndarray  # the caller's own audio (zeros when the caller says nothing)
    echo_db: float | None = None
    background: np.ndarray | None = None


class Stimuli:
    """Builds each scenario's stimulus for a trial, deterministically from the trial number.

    Levels follow the LibriVox clips: their mean active speech level is "the caller's voice", the
    noise beds sit 10 or 20 dB below it and backchannels are spoken at it.
    """

    def __init__(self, clips: list[Clip] | None = None) -> None:
        # Shortest first: a run with few trials stays quick (the stop comes in the first second).
        self.clips = sorted(clips or default_clips(SAMPLE_RATE), key=lambda clip: clip.pcm.size)
        levels = [variants.active_level_dbfs(clip.pcm) for clip in self.clips]
        self.speech_dbfs = float(10 * np.log10(np.mean([10 ** (level / 10) for level in levels])))
        self._voice: variants.BlockingSynthesizer | None = None
        self._backchannels: dict[str, np.ndarray] = {}  # and short answers: spoken words by the TTS voice

    def for_trial(self, scenario: str, trial: int) -> Stimulus:
        silence = np.zeros(round(SILENT_STIMULUS_S * SAMPLE_RATE), dtype=np.int16)
        match scenario:
            case "interrupt" | "interrupt_echo":
                clip = self.clips[trial % len(self.clips)]
                return Stimulus(clip.name, clip.pcm, ECHO_DB if scenario == "interrupt_echo" else None)
            case "noise10" | "noise_bed":
                kind = variants.NOISE_KINDS[trial % len(variants.NOISE_KINDS)]
                level = self.speech_dbfs - (10.0 if scenario == "noise10" else 20.0)
                bed = variants.noise_bed(8.0, kind, level, seed=trial)
                return Stimulus(f"{kind} {level:.0f} dBFS", silence, background=bed)
            case "echo":
                return Stimulus(f"echo {ECHO_DB:.0f} dB", silence, echo_db=ECHO_DB)
            case "backchannel":
                word = variants.BACKCHANNELS[trial % len(variants.BACKCHANNELS)]
                return Stimulus(word, self._backchannel(word))
            case "cough":
                return Stimulus(f"cough seed {trial}", variants.cough(seed=trial))
            case "answer":
                word = variants.SHORT_ANSWERS[trial % len(variants.SHORT_ANSWERS)]
                return Stimulus(word, self._backchannel(word))
        raise ValueError(f"unknown scenario {scenario!r}; use {', '.join(SCENARIOS)}")

    def _backchannel(self, word: str) -> np.ndarray:
        if word not in self._backchannels:
            if self._voice is None:
                self._voice = variants.default_voice()
            self._backchannels[word] = variants.backchannel(word, self._voice, self.speech_dbfs)
        return self._backchannels[word]

    @property
    def voice_name(self) -> str | None:
        return None if self._voice is None else type(self._voice).__name__


# --------------------------------------------------------------------------------------------
# Scoring one call
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What the server did in one trial, read from its events."""

    stopped: bool = False
    paused: bool = False
    pending: bool = False
    resumed: bool = False
    confirmed: bool = False
    early: bool = False  # paused or stopped before the stimulus began
    echo_suppressed: int = 0
    onset_to_decided_ms: float | None = None
    brief_pause_ms: list[float] = field(default_factory=list)  # onset pauses resumed with no speech
    events: list[dict[str, Any]] = field(default_factory=list)


def outcome(report: CallReport, whole_call: bool = False) -> Outcome:
    """Read the trial's outcome from the server's events.

    stopped/paused/resumed count from the stimulus on, or over the whole call with `whole_call`
    (a noise bed or echo is there from the first frame). Events after the caller hung up are
    ignored: the server cancels whatever turn is playing when a call ends, and that is no barge-in.
    """
    start = report.clip_started_t
    hung_up = report.t0 + report.duration_ms / 1000
    events = [e for e in report.events if e["t"] < hung_up]
    since = report.t0 if whole_call else start
    brief = brief_pauses(events)
    of_brief = {id(event) for pause in brief for event in (pause.pause, pause.resume)}  # not interruptions
    after = [e for e in events if since is not None and e["t"] >= since and id(e) not in of_brief]
    names_after = {e["event"] for e in after}
    result = Outcome(
        stopped="barge_in_decided" in names_after or any(_cancelled(e) for e in after),
        paused="barge_in_paused" in names_after,
        pending="barge_in_pending" in names_after,
        resumed="barge_in_resumed" in names_after,
        confirmed="barge_in_confirmed" in names_after,
        early=any(_interrupts(e) and (start is None or e["t"] < start) and id(e) not in of_brief for e in events),
        brief_pause_ms=[pause.ms for pause in brief if since is not None and pause.pause["t"] >= since],
        echo_suppressed=sum(e["event"] == "echo_suppressed" for e in events),
        events=[_brief(e) for e in events if e["event"] in _BARGE_IN_EVENTS],
    )
    decided = next((e["t"] for e in after if e["event"] == "barge_in_decided"), None)
    if decided is not None and report.speech_onset_t is not None:
        result.onset_to_decided_ms = round((decided - report.speech_onset_t) * 1000, 1)
    return result


def _cancelled(event: dict[str, Any]) -> bool:
    """A turn cancelled for a reason other than an error (an error is no barge-in)."""
    return event["event"] == "turn_cancelled" and "error" not in event


def _interrupts(event: dict[str, Any]) -> bool:
    """Did this event interrupt the agent's audio (what the caller would notice)?"""
    return event["event"] in ("barge_in_decided", "barge_in_paused") or _cancelled(event)


def _brief(event: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "event",
        "t_ms",
        "turn_id",
        "cue",
        "trigger",
        "reason",
        "utterance_id",
        "text",
        "voiced_ms",
        "avg_logprob",
        "no_speech_prob",
    )
    return {key: event[key] for key in keep if key in event}


# --------------------------------------------------------------------------------------------
# Running trials
# --------------------------------------------------------------------------------------------


def call_options(url: str, stimulus: Stimulus, barge_in_at: float) -> CallOptions:
    return CallOptions(
        url=url,
        pcm=stimulus.pcm,
        barge_in_at=barge_in_at,
        max_wait_s=OBSERVE_S,
        quiet_after_s=1.0,  # a reply that started and ended: no need to wait the whole window
        greeting_wait_s=5.0,
        echo_db=stimulus.echo_db,
        background=stimulus.background,
    )


def trigger_time(seed: int, scenario: str, trial: int) -> float:
    # A string seed is hashed with SHA-512 by `random`: the same on every run and platform.
    return round(random.Random(f"{seed}:{scenario}:{trial}").uniform(*TRIGGER_RANGE_S), 3)


async def run_trial(url: str, stimuli: Stimuli, scenario: str, trial: int, seed: int) -> dict[str, Any]:
    stimulus = stimuli.for_trial(scenario, trial)
    barge_in_at = trigger_time(seed, scenario, trial)
    report = await run_call(call_options(url, stimulus, barge_in_at))
    result = outcome(report, whole_call=SCENARIOS[scenario] == "nothing")
    return _trial_record(scenario, trial, stimulus, barge_in_at, report, result)


def _trial_record(
    scenario: str, trial: int, stimulus: Stimulus, barge_in_at: float, report: CallReport, result: Outcome
) -> dict[str, Any]:
    expect = SCENARIOS[scenario]
    false = result.early or (expect == "nothing" and (result.stopped or result.paused))
    return {
        "scenario": scenario,
        "trial": trial,
        "stimulus": stimulus.name,
        "barge_in_at_s": barge_in_at,
        "stopped": result.stopped,
        "paused": result.paused,
        "pending": result.pending,
        "resumed": result.resumed,
        "confirmed": result.confirmed,
        "false": false,
        "early": result.early,
        "missed": expect == "stop" and not result.stopped,
        "echo_suppressed": result.echo_suppressed,
        "stop_audio_count": report.stop_audio_count,
        "onset_to_stop_ms": _first_in_time(report.onset_to_stop_ms) if expect == "stop" else None,
        "onset_to_decided_ms": result.onset_to_decided_ms if expect == "stop" else None,
        "agent_audio_ms": report.agent_audio_ms,
        "brief_pause_ms": result.brief_pause_ms,
        "call_id": report.call_id,
        "errors": report.errors,
        "events": result.events,
    }


def _first_in_time(values: Sequence[float], limit_ms: float = 2000.0) -> float | None:
    """The first StopAudio that answers the stimulus (later ones belong to later turns)."""
    return next((ms for ms in values if ms <= limit_ms), None)


async def run(
    url: str,
    scenarios: Sequence[str] = DEFAULT_SCENARIOS,
    trials: int = DEFAULT_TRIALS,
    seed: int = 11,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every scenario's trials, one call at a time (concurrent calls would compete for CPU)."""
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; use {', '.join(SCENARIOS)}")
    stimuli = Stimuli()
    results: dict[str, Any] = {}
    for scenario in scenarios:
        records = []
        for trial in range(trials):
            if progress is not None:
                progress(f"{scenario} {trial + 1}/{trials}")
            records.append(await run_trial(url, stimuli, scenario, trial, seed))
        results[scenario] = summarize(scenario, records)
    return {
        "evaluation": "bargein",
        "url": url,
        "seed": seed,
        "trials_per_scenario": trials,
        "speech_level_dbfs": round(stimuli.speech_dbfs, 1),
        "backchannel_voice": stimuli.voice_name,
        "scenarios": results,
        "machine": machine_info(),
    }


def summarize(scenario: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    expect = SCENARIOS[scenario]

    def count(key: str) -> int:
        return sum(bool(r[key]) for r in records)

    summary: dict[str, Any] = {
        "expect": expect,
        "trials": len(records),
        **{key: count(key) for key in ("stopped", "paused", "pending", "resumed", "false", "missed")},
        "echo_suppressed": sum(r["echo_suppressed"] for r in records),
        "errors": sum(len(r["errors"]) for r in records),
        # How the recognizer spelled what the caller said, and what the policy made of it.
        "finals": _tally(e.get("text", "") for r in records for e in r.get("events", []) if e["event"] == "final"),
        "resume_reasons": _tally(
            e.get("reason", "") for r in records for e in r.get("events", []) if e["event"] == "barge_in_resumed"
        ),
    }
    brief = [ms for r in records for ms in r["brief_pause_ms"]]
    agent_min = sum(r["agent_audio_ms"] or 0.0 for r in records) / 60000
    summary["brief_pauses"] = len(brief)
    summary["brief_pauses_per_min"] = round(len(brief) / agent_min, 2) if agent_min else None
    summary["brief_pause_ms"] = percentiles(brief) if brief else None
    if expect == "stop":
        summary["onset_to_stop_ms"] = percentiles(
            [r["onset_to_stop_ms"] for r in records if r["onset_to_stop_ms"] is not None]
        )
        summary["onset_to_decided_ms"] = percentiles(
            [r["onset_to_decided_ms"] for r in records if r["onset_to_decided_ms"] is not None]
        )
    summary["target"], summary["passed"] = _verdict(expect, summary)
    summary["per_trial"] = records
    return summary


def _tally(values: Iterable[str]) -> dict[str, int]:
    return dict(Counter(values).most_common())


def _verdict(expect: Expect, summary: dict[str, Any]) -> tuple[str, bool]:
    if expect == "stop":
        return "missed=0 false=0", summary["missed"] == 0 and summary["false"] == 0
    if expect == "nothing":
        per_min, pause_ms = summary["brief_pauses_per_min"] or 0.0, summary["brief_pause_ms"]
        brief_ok = per_min <= MAX_BRIEF_PAUSES_PER_MIN and (pause_ms is None or pause_ms["max"] <= MAX_BRIEF_PAUSE_MS)
        return (
            f"false=0 brief<={MAX_BRIEF_PAUSES_PER_MIN:g}/min",
            summary["false"] == 0 and brief_ok,
        )
    allowed = CARRY_ON_MAX_STOP_RATE * summary["trials"]
    return "stopped<=5% false=0", summary["stopped"] <= allowed and summary["false"] == 0


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"parley eval bargein ({result['trials_per_scenario']} trials per scenario)")
    table.add_column("scenario", no_wrap=True)
    for column in (
        "trials",
        "stopped",
        "paused",
        "resumed",
        "false",
        "brief pauses (/min, max ms)",
        "missed",
        "onset->StopAudio p50/p95 ms",
    ):
        table.add_column(column, justify="right")
    table.add_column("target")
    table.add_column("ok")
    for name, summary in result["scenarios"].items():
        latency = summary.get("onset_to_stop_ms")
        table.add_row(
            name,
            *(str(summary[key]) for key in ("trials", "stopped", "paused", "resumed", "false")),
            _brief_cell(summary),
            str(summary["missed"]) if summary["expect"] == "stop" else "-",
            _latency(latency),
            summary["target"],
            "[green]yes[/green]" if summary["passed"] else "[red]no[/red]",
        )
    console.print(table)
    machine = result["machine"]
    console.print(
        f"[dim]caller speech {result['speech_level_dbfs']} dBFS, backchannel voice "
        f"{result['backchannel_voice'] or '-'}; {machine['cores']} cores ({machine['cpu']}), "
        f"Python {machine['python']}[/dim]"
    )


def _brief_cell(summary: dict[str, Any]) -> str:
    count, per_min, pause_ms = summary["brief_pauses"], summary["brief_pauses_per_min"], summary["brief_pause_ms"]
    if not count:
        return "0"
    return f"{count} ({per_min:g}, {pause_ms['max']:.0f})"


def _latency(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("p50") is None:
        return "-"
    return f"{stats['p50']:.0f} / {stats['p95']:.0f}"
