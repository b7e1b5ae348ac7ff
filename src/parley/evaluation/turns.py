"""`parley eval turns`: does the agent answer a finished question quickly, and wait through a pause?

Two kinds of caller turns, spoken by the TTS voice (Piper when installed) and cached on disk:

- complete: a whole question ("What time do you close tonight?"). Measured: voice-to-voice, from
  the caller's last speech to the agent's first audio (at the caller, as `parley bench latency`).
- hesitant: a sentence with a 0.5-1 s pause in the middle ("I'd like to order a ... large
  pepperoni pizza"). Half pause after a filler ("I'd like to order a, uh ..."), half after a bare
  fragment. CUT when the server declared the end of the caller's speech (`speech_ended`) during
  the pause: the agent would answer half a sentence.

Each turn is one call to a real parley server started for each turn-detection mode (`silence`
and `smart-turn` by default), one call at a time. The Smart Turn model's own cost per decision is
measured on the same audio in this process (with the verdicts it gives at the end of each
question and in each pause), so its figures do not depend on the calls' timing.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from rich.console import Console
from rich.table import Table

from parley.benchmarks.common import machine_info
from parley.benchmarks.latency import breakdown
from parley.caller import CallOptions, CallReport, run_call
from parley.evaluation import variants
from parley.stats import percentiles

SAMPLE_RATE: Final = 16000
MODES: Final = ("silence", "smart-turn")
PAUSE_RANGE_S: Final = (0.5, 1.0)
TARGET_V2V_P50_MS: Final = 450.0
TARGET_CUT_RATE: Final = 0.05

COMPLETE: Final = (
    "What time do you close tonight?",
    "How much is a large pepperoni pizza?",
    "Do you deliver to Main Street?",
    "Can I pay with a credit card?",
    "Is the garlic bread vegetarian?",
    "How long will the delivery take?",
    "What is the balance on my checking account?",
    "Can you send me a new debit card?",
    "Are you open on Sunday?",
    "Which pizzas come without cheese?",
    "Could you cancel my last order?",
    "Where is my nearest branch?",
)
HESITANT: Final = (
    ("I'd like to order a", "large pepperoni pizza."),
    ("My account number is", "four five six seven."),
    ("Can I get a", "medium margherita with extra cheese?"),
    ("I want to change my", "delivery address."),
    ("The address is", "twelve Main Street."),
    ("I need to book a table for", "four people tonight."),
    ("Could you tell me", "when my card will arrive?"),
    ("I was wondering if", "you have gluten free pizza."),
    ("My card number ends in", "three three one."),
    ("Yes, I would like the", "vegetarian one please."),
    ("Can I pay with", "cash on delivery?"),
    ("I'd like to transfer", "two hundred dollars to savings."),
)
FILLERS: Final = ("uh", "um")


@dataclass(frozen=True, slots=True)
class Turn:
    kind: str  # "complete" or "hesitant"
    text: str
    pcm: np.ndarray
    pause_at_s: float | None = None  # hesitant: where the pause starts in `pcm`
    pause_s: float | None = None
    filler: str | None = None

    def first_part(self) -> np.ndarray:
        """The audio up to the pause (the whole turn for a complete one)."""
        if self.pause_at_s is None:
            return self.pcm
        return self.pcm[: round(self.pause_at_s * SAMPLE_RATE)]


class TurnSet:
    """Builds the turns once; the TTS audio is cached in a directory (a temp dir by default)."""

    def __init__(self, cache_dir: Path | None = None, seed: int = 7) -> None:
        self._cache = cache_dir or Path(tempfile.gettempdir()) / "parley-eval-turns"
        self._seed = seed
        self._voice: variants.BlockingSynthesizer | None = None

    def turns(self, per_kind: int | None = None) -> list[Turn]:
        complete = [Turn("complete", text, self._say(text)) for text in COMPLETE[:per_kind]]
        hesitant = [self._hesitant(index, *parts) for index, parts in enumerate(HESITANT[:per_kind])]
        return complete + hesitant

    def _hesitant(self, index: int, first: str, rest: str) -> Turn:
        # A string seed is hashed with SHA-512 by `random`: the same pause on every run and platform.
        pause_s = round(random.Random(f"{self._seed}:{index}").uniform(*PAUSE_RANGE_S), 2)
        filler = FILLERS[index // 2 % len(FILLERS)] if index % 2 == 0 else None
        spoken_first = f"{first}, {filler}" if filler else first
        head, tail = self._say(spoken_first), self._say(rest)
        pause = np.zeros(round(pause_s * SAMPLE_RATE), dtype=np.int16)
        text = f"{spoken_first} ... {rest}"
        return Turn("hesitant", text, np.concatenate([head, pause, tail]), head.size / SAMPLE_RATE, pause_s, filler)

    def _say(self, text: str) -> np.ndarray:
        if self._voice is None:
            self._voice = variants.default_voice()
        key = hashlib.sha256(f"{type(self._voice).__name__}:{text}".encode()).hexdigest()[:20]
        path = self._cache / f"{key}.pcm"
        if path.is_file():
            return np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.int16)
        pcm = np.frombuffer(self._voice.synthesize_blocking(text, SAMPLE_RATE), dtype="<i2").astype(np.int16)
        if pcm.size == 0:
            raise ValueError(f"the voice produced no audio for {text!r}")
        pcm = variants.trim_silence(pcm)
        self._cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pcm.astype("<i2").tobytes())
        return pcm

    @property
    def voice_name(self) -> str | None:
        return None if self._voice is None else type(self._voice).__name__


# --------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------


def call_options(url: str, turn: Turn) -> CallOptions:
    return CallOptions(url=url, pcm=turn.pcm, greeting_wait_s=0.5, end_after_answer_s=0.3, max_wait_s=6.0)


def cut_in_pause(report: CallReport, turn: Turn) -> bool:
    """Did the server end the caller's speech during the turn's pause (before the words after it)?"""
    if turn.pause_at_s is None or turn.pause_s is None or report.clip_started_t is None:
        return False
    resumed_t = report.clip_started_t + turn.pause_at_s + turn.pause_s
    return any(e["event"] == "speech_ended" and e["t"] < resumed_t for e in report.events)


def turn_record(turn: Turn, report: CallReport) -> dict[str, Any]:
    stages = breakdown(report)  # when the server saw the end of speech, the final, the first audio
    return {
        "kind": turn.kind,
        "text": turn.text,
        "filler": turn.filler,
        "pause_s": turn.pause_s,
        "voice_to_voice_ms": report.voice_to_voice_ms,
        "end_of_speech_detected_ms": stages.get("end_of_speech_detected_ms"),
        "final_text_ms": stages.get("final_text_ms"),
        "first_audio_sent_ms": stages.get("first_audio_sent_ms"),
        "cut": cut_in_pause(report, turn),
        "utterances": sum(e["event"] == "speech_ended" for e in report.events),
        "finals": [e.get("text", "") for e in report.events if e["event"] == "final"],
        "call_id": report.call_id,
        "errors": report.errors,
    }


async def run_mode(
    url: str, turns: Sequence[Turn], progress: Callable[[str], None] | None = None, label: str = ""
) -> list[dict[str, Any]]:
    """Every turn as one call, one call at a time (concurrent calls would compete for CPU)."""
    records = []
    for index, turn in enumerate(turns):
        if progress is not None:
            progress(f"{label} {index + 1}/{len(turns)}: {turn.text}")
        records.append(turn_record(turn, await run_call(call_options(url, turn))))
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    complete = [r for r in records if r["kind"] == "complete"]
    hesitant = [r for r in records if r["kind"] == "hesitant"]
    v2v = percentiles([r["voice_to_voice_ms"] for r in complete if r["voice_to_voice_ms"] is not None])
    cuts = sum(r["cut"] for r in hesitant)
    cut_rate = cuts / len(hesitant) if hesitant else 0.0
    filled = [r for r in hesitant if r["filler"]]
    bare = [r for r in hesitant if not r["filler"]]
    p50 = v2v["p50"]
    passed = p50 is not None and p50 <= TARGET_V2V_P50_MS and cut_rate <= TARGET_CUT_RATE
    return {
        "complete": len(complete),
        "hesitant": len(hesitant),
        "voice_to_voice_ms": v2v,
        "server_breakdown_ms": {
            key: percentiles([r[key] for r in complete if r[key] is not None])
            for key in ("end_of_speech_detected_ms", "final_text_ms", "first_audio_sent_ms")
        },
        "no_answer": sum(r["voice_to_voice_ms"] is None for r in complete),
        "cuts": cuts,
        "cut_rate": round(cut_rate, 3),
        "cut_rate_filled_pause": round(sum(r["cut"] for r in filled) / len(filled), 3) if filled else None,
        "cut_rate_bare_pause": round(sum(r["cut"] for r in bare) / len(bare), 3) if bare else None,
        "errors": sum(len(r["errors"]) for r in records),
        "passed": passed,
        "per_turn": records,
    }


# --------------------------------------------------------------------------------------------
# The model alone
# --------------------------------------------------------------------------------------------


def model_figures(turns: Sequence[Turn], models_dir: Path, silence_ms: int, repeats: int = 3) -> dict[str, Any]:
    """Smart Turn's cost per decision (features + inference, one thread) and its verdicts on the
    audio it would hear: each question's end, and each hesitant turn up to its pause (both with
    `silence_ms`, the turn_short_silence_ms, of silence after them). The model alone: without
    the early Whisper text that the server also weighs."""
    from parley.speech.turn import SmartTurn

    model = SmartTurn(models_dir)
    silence = np.zeros(silence_ms * SAMPLE_RATE // 1000, dtype=np.int16)
    model.complete_probability(silence.tobytes())  # onnxruntime plans its buffers on the first run
    costs: list[float] = []
    verdicts = []
    for turn in turns:
        audio = np.concatenate([turn.first_part(), silence]).tobytes()
        for _ in range(repeats):
            start = time.perf_counter()
            probability = model.complete_probability(audio)
            costs.append((time.perf_counter() - start) * 1000)
        expected = turn.kind == "complete"
        verdicts.append(
            {
                "text": turn.text,
                "kind": turn.kind,
                "probability": round(probability, 3),
                "right": (probability > 0.5) == expected,
            }
        )
    complete = [v for v in verdicts if v["kind"] == "complete"]
    hesitant = [v for v in verdicts if v["kind"] == "hesitant"]
    return {
        "decision_ms": percentiles(costs),
        "decisions": len(costs),
        "complete_judged_complete": sum(v["right"] for v in complete),
        "pauses_judged_incomplete": sum(v["right"] for v in hesitant),
        "verdicts": verdicts,
    }


def result(
    modes: dict[str, list[dict[str, Any]]], turn_set: TurnSet, model: dict[str, Any] | None, settings: dict[str, Any]
) -> dict[str, Any]:
    return {
        "evaluation": "turns",
        "voice": turn_set.voice_name,
        "settings": settings,
        "targets": {"voice_to_voice_p50_ms": TARGET_V2V_P50_MS, "cut_rate": TARGET_CUT_RATE},
        "modes": {mode: summarize(records) for mode, records in modes.items()},
        "model": model,
        "machine": machine_info(),
    }


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="parley eval turns")
    table.add_column("turn detection", no_wrap=True)
    for column in ("complete", "v2v p50 / p95 ms", "no answer", "hesitant", "cut", "cut filled / bare"):
        table.add_column(column, justify="right")
    table.add_column("targets met")
    for name, summary in result["modes"].items():
        v2v = summary["voice_to_voice_ms"]
        table.add_row(
            name,
            str(summary["complete"]),
            "-" if v2v.get("p50") is None else f"{v2v['p50']:.0f} / {v2v['p95']:.0f}",
            str(summary["no_answer"]),
            str(summary["hesitant"]),
            f"{summary['cuts']} ({100 * summary['cut_rate']:.0f} %)",
            f"{_percent(summary['cut_rate_filled_pause'])} / {_percent(summary['cut_rate_bare_pause'])}",
            "[green]yes[/green]" if summary["passed"] else "[red]no[/red]",
        )
    console.print(table)
    model = result.get("model")
    if model:
        cost = model["decision_ms"]
        console.print(
            f"Smart Turn per decision: p50 {cost['p50']:.0f} ms, p95 {cost['p95']:.0f} ms ({model['decisions']} runs);"
            f" questions judged complete {model['complete_judged_complete']}, pauses judged incomplete"
            f" {model['pauses_judged_incomplete']}"
        )
    machine = result["machine"]
    console.print(
        f"[dim]targets: v2v p50 <= {TARGET_V2V_P50_MS:.0f} ms, cuts <= {100 * TARGET_CUT_RATE:.0f} %; voice"
        f" {result['voice'] or '-'}; {machine['cores']} cores ({machine['cpu']}), Python {machine['python']}[/dim]"
    )


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f} %"
