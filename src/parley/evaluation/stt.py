"""`parley eval stt`: word error rate of the recognizers on the LibriVox clips, clean and degraded.

For every clip x variant (clean, noise at a given SNR, telephone line), offline and in-process:

- pocketsphinx (the first pass: live partials) is fed 20 ms frames as a call would feed it; its
  final text is scored and the audio time of its first partial recorded;
- Whisper (the second pass: the final text) transcribes the whole clip; its compute time is
  recorded (one model for the whole run, warmed up before timing).

`--stt two-pass` runs both and scores Whisper as the final text (as the server does);
`pocketsphinx` or `whisper` runs only that engine.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from parley.audio import to_frames
from parley.benchmarks.common import Clip, default_clips, machine_info
from parley.evaluation import variants
from parley.evaluation.wer import WordErrors, aggregate, normalize, word_errors
from parley.stats import percentiles

SAMPLE_RATE: Final = 16000
FRAME_SAMPLES: Final = SAMPLE_RATE // 50
MODES: Final = ("two-pass", "pocketsphinx", "whisper")
DEFAULT_VARIANTS: Final = ("clean", "noise10", "noise5", "telephone")
_NOISE_RE: Final = re.compile(r"noise(?P<snr>-?\d+(?:\.\d+)?)(?:-(?P<kind>white|pink|babble))?")


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    description: str
    apply: Callable[[np.ndarray, int], np.ndarray]  # (clip, seed) -> degraded clip


def parse_variant(name: str) -> Variant:
    """ "clean", "telephone", or "noise<SNR dB>[-white|-pink|-babble]" (pink by default)."""
    if name == "clean":
        return Variant(name, "as recorded", lambda pcm, _seed: pcm)
    if name == "telephone":
        return Variant(name, "300-3400 Hz, 8 kHz G.711 mu-law", lambda pcm, _seed: variants.telephone(pcm))
    match = _NOISE_RE.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown variant {name!r}: use clean, telephone or noise<SNR>[-white|-pink|-babble] (e.g. noise10)"
        )
    snr = float(match["snr"])
    kind = cast("variants.NoiseKind", match["kind"] or "pink")  # _NOISE_RE admits only the NOISE_KINDS
    return Variant(name, f"{kind} noise at {snr:g} dB SNR", lambda pcm, seed: variants.add_noise(pcm, snr, kind, seed))


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PocketsphinxResult:
    text: str
    first_partial_ms: float | None  # audio time at which the first partial came out
    compute_ms: float


@dataclass(frozen=True, slots=True)
class WhisperResult:
    text: str
    compute_ms: float


class Engines:
    """The recognizers of one run, loaded once."""

    def __init__(self, mode: str, model: Path | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"--stt must be one of {', '.join(MODES)}")
        self.mode = mode
        self.pocketsphinx = None
        self.whisper = None
        if mode in ("two-pass", "pocketsphinx"):
            from parley.speech.pocketsphinx import PocketsphinxRecognizer

            self.pocketsphinx = PocketsphinxRecognizer()
        if mode in ("two-pass", "whisper"):
            from parley.speech.whisper import WhisperTranscriber

            self.whisper = WhisperTranscriber(model)
            self._warm_up()

    def _warm_up(self) -> None:
        """The first pass allocates buffers and autotunes; keep it out of the timed figures."""
        rng = np.random.default_rng(0)
        self.transcribe(rng.normal(0, 300, 2 * SAMPLE_RATE).astype(np.int16))

    @property
    def whisper_model(self) -> str | None:
        return None if self.whisper is None else str(self.whisper.model_dir)

    def recognize(self, pcm: np.ndarray) -> PocketsphinxResult:
        assert self.pocketsphinx is not None
        recognizer = self.pocketsphinx
        frames = to_frames(pcm, FRAME_SAMPLES)  # the last one zero-padded, like a call's
        first_partial_ms = None
        started = time.perf_counter()
        recognizer.begin()
        for index, frame in enumerate(frames):
            partial = recognizer.feed(frame.tobytes())
            if partial and first_partial_ms is None:
                first_partial_ms = (index + 1) * 20.0
        text = recognizer.end()
        return PocketsphinxResult(text, first_partial_ms, _elapsed_ms(started))

    def transcribe(self, pcm: np.ndarray) -> WhisperResult:
        assert self.whisper is not None
        # `transcribe_detailed` returns a Transcript; older builds' `transcribe` did too, newer
        # ones return the text. Accept both.
        method = getattr(self.whisper, "transcribe_detailed", self.whisper.transcribe)
        started = time.perf_counter()
        result = method(pcm.astype("<i2").tobytes())
        compute_ms = _elapsed_ms(started)
        text = result if isinstance(result, str) else result.text
        return WhisperResult(text, compute_ms)

    def close(self) -> None:
        if self.pocketsphinx is not None:
            self.pocketsphinx.close()


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(
    mode: str = "two-pass",
    variant_names: Sequence[str] = DEFAULT_VARIANTS,
    model: Path | None = None,
    limit: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every clip under every variant; returns the JSON-able result."""
    chosen = [parse_variant(name) for name in variant_names]
    clips = default_clips(SAMPLE_RATE)[:limit] if limit else default_clips(SAMPLE_RATE)
    engines = Engines(mode, model)
    try:
        results = {variant.name: _run_variant(engines, variant, clips, progress) for variant in chosen}
    finally:
        engines.close()
    return {
        "evaluation": "stt",
        "mode": mode,
        "final_engine": "pocketsphinx" if mode == "pocketsphinx" else "whisper",
        "whisper_model": engines.whisper_model,
        "clips": [clip.name for clip in clips],
        "variants": results,
        "machine": machine_info(),
    }


def _run_variant(
    engines: Engines, variant: Variant, clips: list[Clip], progress: Callable[[str], None] | None
) -> dict[str, Any]:
    per_clip = []
    for seed, clip in enumerate(clips):
        if progress is not None:
            progress(f"{variant.name}: {clip.name}")
        audio = variant.apply(clip.pcm, seed)
        per_clip.append(_run_clip(engines, clip, audio))
    return _variant_summary(engines, variant, per_clip)


def _run_clip(engines: Engines, clip: Clip, audio: np.ndarray) -> dict[str, Any]:
    entry: dict[str, Any] = {"clip": clip.name, "reference": normalize(clip.text)}
    if engines.pocketsphinx is not None:
        result = engines.recognize(audio)
        entry["pocketsphinx"] = {
            "text": result.text,
            "first_partial_ms": result.first_partial_ms,
            "compute_ms": result.compute_ms,
            **word_errors(clip.text, result.text).to_dict(),
        }
    if engines.whisper is not None:
        whisper = engines.transcribe(audio)
        entry["whisper"] = {
            "text": whisper.text,
            "compute_ms": whisper.compute_ms,
            **word_errors(clip.text, whisper.text).to_dict(),
        }
    entry["audio_s"] = round(audio.size / SAMPLE_RATE, 3)
    return entry


def _variant_summary(engines: Engines, variant: Variant, per_clip: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"description": variant.description}
    for engine in ("pocketsphinx", "whisper"):
        if per_clip and engine in per_clip[0]:
            summary[engine] = _engine_summary(engine, per_clip)
    final = "pocketsphinx" if engines.mode == "pocketsphinx" else "whisper"
    summary["final_wer"] = summary[final]["wer"]
    summary["per_clip"] = per_clip
    return summary


def _engine_summary(engine: str, per_clip: list[dict[str, Any]]) -> dict[str, Any]:
    total: WordErrors = aggregate((entry["reference"], entry[engine]["text"]) for entry in per_clip)
    summary: dict[str, Any] = total.to_dict()
    summary["compute_ms"] = percentiles([entry[engine]["compute_ms"] for entry in per_clip])
    audio_s = sum(entry["audio_s"] for entry in per_clip)
    compute_s = sum(entry[engine]["compute_ms"] for entry in per_clip) / 1000
    summary["real_time_factor"] = round(compute_s / audio_s, 4) if audio_s else None
    if engine == "pocketsphinx":
        firsts = [e[engine]["first_partial_ms"] for e in per_clip if e[engine]["first_partial_ms"] is not None]
        summary["first_partial_ms"] = percentiles(firsts)
        summary["no_partial"] = len(per_clip) - len(firsts)
    return summary


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _ms(stats: dict[str, Any] | None, key: str) -> str:
    if not stats or stats.get(key) is None:
        return "-"
    return f"{stats[key]:.0f}"


def print_result(result: dict[str, Any], console: Console | None = None, hypotheses: bool = False) -> None:
    console = console or Console()
    table = Table(title=f"parley eval stt ({result['mode']}, {len(result['clips'])} clips)")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("variant", "left"),
        ("final WER", "right"),
        ("sphinx WER", "right"),
        ("S/D/I", "right"),
        ("whisper WER", "right"),
        ("S/D/I", "right"),
        ("whisper ms p50/p95", "right"),
        ("1st partial ms", "right"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for name, summary in result["variants"].items():
        sphinx, whisper = summary.get("pocketsphinx"), summary.get("whisper")
        table.add_row(
            name,
            _pct(summary["final_wer"]),
            _pct(sphinx["wer"]) if sphinx else "-",
            _sdi(sphinx),
            _pct(whisper["wer"]) if whisper else "-",
            _sdi(whisper),
            f"{_ms(whisper and whisper['compute_ms'], 'p50')} / {_ms(whisper and whisper['compute_ms'], 'p95')}",
            _ms(sphinx and sphinx["first_partial_ms"], "p50"),
        )
    console.print(table)
    if hypotheses:
        _print_hypotheses(result, console)
    machine = result["machine"]
    console.print(
        f"[dim]{machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"whisper model {result['whisper_model']}[/dim]"
    )


def _sdi(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['substitutions']}/{summary['deletions']}/{summary['insertions']}"


def _print_hypotheses(result: dict[str, Any], console: Console) -> None:
    table = Table(title="hypotheses (normalised reference first)", show_lines=True)
    for column in ("variant", "clip", "texts"):
        table.add_column(column)
    for name, summary in result["variants"].items():
        for entry in summary["per_clip"]:
            lines = [f"ref:     {entry['reference']}"]
            for engine in ("pocketsphinx", "whisper"):
                if engine in entry:
                    lines.append(f"{engine[:7]}: {entry[engine]['text']}  ({100 * entry[engine]['wer']:.0f} %)")
            table.add_row(name, entry["clip"], Text("\n".join(lines)))
    console.print(table)
