"""`parley bench bargein`: speech onset -> StopAudio, measured from the caller's side.

Each trial is one call: the caller waits until the agent has talked about 1 s (0.9-1.3 s, varied
so the speech does not always land on the same point of the 20 ms / 32 ms grids), then speaks a
real speech clip. With `--noise` it "speaks" noise beds instead and every StopAudio is a false stop.

`--line-noise DBFS` puts a pink noise bed at that level under the whole call (a phone line's
background), so speech rises from a noise floor rather than from digital silence.

`--proto twilio` calls as Twilio Media Streams does (mu-law 8 kHz, to /ws/twilio): the stop is then
Twilio's `clear`, reported under the same keys (`onset_to_stop_ms` is onset -> clear), and
`media_after_clear` counts media of the cleared turn that still arrived after it (must be 0).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from parley.benchmarks.common import Clip, load_clips, machine_info
from parley.caller import DEFAULT_PATHS, CallOptions, CallReport, run_call
from parley.caller.metrics import brief_pauses
from parley.stats import percentiles

MISSED_AFTER_S = 2.0


def _at_level(signal: np.ndarray, dbfs: float) -> np.ndarray:
    signal = signal / np.sqrt(np.mean(signal**2)) * 10 ** (dbfs / 20)
    return np.clip(signal * 32767, -32768, 32767).astype(np.int16)


def pink_noise(n: int, dbfs: float, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of pink (1/f power) noise at an RMS of `dbfs`, int16. Periodic (made by an
    inverse FFT), so it loops without a seam."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
    return _at_level(np.fft.irfft(spectrum, n), dbfs)


def noise_beds(sample_rate: int = 16000, seconds: float = 2.5, seed: int = 3) -> list[Clip]:
    """White and pink noise at -20 dBFS and a 440+480 Hz ringback tone (2 s on, 4 s off cadence)."""
    rng = np.random.default_rng(seed)
    n = int(sample_rate * seconds)
    white = rng.normal(size=n)
    pink = pink_noise(n, -20.0, rng)
    t = np.arange(n) / sample_rate
    ringback = (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 480 * t)) * (t < 2.0)
    return [
        Clip("white-20dBFS", _at_level(white, -20.0)),
        Clip("pink-20dBFS", pink),
        Clip("ringback-440+480Hz", _at_level(ringback[: int(2.0 * sample_rate)], -20.0)),
    ]


def line_noise(dbfs: float, sample_rate: int = 16000, seed: int = 5) -> np.ndarray:
    """A phone line's background for `--line-noise`: 10 s of pink noise, looped under the whole call,
    so the caller's speech rises from a noise floor instead of from digital silence."""
    return pink_noise(10 * sample_rate, dbfs, np.random.default_rng(seed))


def proto_url(url: str, proto: str) -> str:
    """The media URL of `proto` on the server of `url` (ws://host:port/ws/acs -> .../ws/twilio);
    an ACS URL is used as given."""
    if proto == "acs":
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, DEFAULT_PATHS[proto], parts.query, ""))


async def run(
    url: str,
    trials: int,
    clips: list[Path] | None,
    noise: bool,
    seed: int = 7,
    proto: str = "acs",
    line_noise_dbfs: float | None = None,
) -> dict[str, Any]:
    beds = noise_beds() if noise else load_clips(clips)
    background = line_noise(line_noise_dbfs) if line_noise_dbfs is not None else None
    rng = random.Random(seed)
    results = []
    for index in range(trials):
        clip = beds[index % len(beds)]
        barge_in_at = round(rng.uniform(0.9, 1.3), 3)
        report = await run_call(
            CallOptions(
                url=url,
                proto=proto,
                pcm=clip.pcm,
                barge_in_at=barge_in_at,
                end_after_stop_s=0.6,
                max_wait_s=1.0,
                quiet_after_s=0.5,
                background=background,
            )
        )
        results.append(_trial(index, clip, barge_in_at, report))
    summary = _summary(results, noise, proto)
    summary["line_noise_dbfs"] = line_noise_dbfs
    return summary


def _trial(index: int, clip: Clip, barge_in_at: float, report: CallReport) -> dict[str, Any]:
    stops = report.onset_to_stop_ms
    in_time = [ms for ms in stops if ms <= MISSED_AFTER_S * 1000]
    brief = [pause.ms for pause in brief_pauses(report.events)]
    return {
        "trial": index,
        "clip": clip.name,
        "barge_in_at_s": barge_in_at,
        "onset_to_stop_ms": in_time[0] if in_time else None,
        "decision_to_stop_ms": report.decision_to_stop_ms[0] if report.decision_to_stop_ms else None,
        "leaked_audio_ms": report.leaked_audio_ms,
        "media_after_clear": report.media_after_clear,
        "stop_audio_count": report.stop_audio_count,
        "brief_pause_ms": brief,
        "missed": not in_time,
        "errors": report.errors,
        "send_lateness_ms_max": report.send_lateness_ms_max,
    }


def _summary(results: list[dict[str, Any]], noise: bool, proto: str = "acs") -> dict[str, Any]:
    onset = [r["onset_to_stop_ms"] for r in results if r["onset_to_stop_ms"] is not None]
    decision = [r["decision_to_stop_ms"] for r in results if r["decision_to_stop_ms"] is not None]
    summary: dict[str, Any] = {
        "benchmark": "bargein",
        "mode": "noise" if noise else "speech",
        "proto": proto,
        "trials": len(results),
        "machine": machine_info(),
    }
    if noise:
        # A StopAudio of a brief pause (an onset the VAD then rejected; the reply resumed where it
        # stopped) is counted apart: the agent went on, it was not stopped.
        def false_stops(r: dict[str, Any]) -> int:
            return r["stop_audio_count"] - len(r["brief_pause_ms"])

        beds = sorted({r["clip"] for r in results})
        brief = [ms for r in results for ms in r["brief_pause_ms"]]
        summary["false_stops"] = sum(false_stops(r) for r in results)
        summary["false_stops_by_bed"] = {
            name: sum(false_stops(r) for r in results if r["clip"] == name) for name in beds
        }
        summary["brief_pauses"] = len(brief)
        summary["brief_pauses_by_bed"] = {
            name: sum(len(r["brief_pause_ms"]) for r in results if r["clip"] == name) for name in beds
        }
        summary["brief_pause_ms"] = percentiles(brief) if brief else None
    else:
        summary.update(
            onset_to_stop_ms=percentiles(onset),
            decision_to_stop_ms=percentiles(decision),
            leaked_audio_ms=round(sum(r["leaked_audio_ms"] for r in results), 1),
            media_after_clear=sum(r["media_after_clear"] for r in results),
            missed=sum(r["missed"] for r in results),
        )
    summary["errors"] = sum(len(r["errors"]) for r in results)
    summary["per_trial"] = results
    return summary


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    if result["mode"] == "noise":
        return [
            ("trials", result["trials"]),
            ("false_stops", result["false_stops"]),
            ("by bed", result["false_stops_by_bed"]),
            ("brief pauses (resumed)", result.get("brief_pauses", 0)),
            ("by bed", result.get("brief_pauses_by_bed", {})),
            ("brief pause ms", result.get("brief_pause_ms")),
            ("errors", result["errors"]),
        ]
    stop = "clear" if result.get("proto") == "twilio" else "StopAudio"
    return [
        ("proto", result.get("proto", "acs")),
        ("line noise (dBFS)", result.get("line_noise_dbfs") or "-"),
        ("trials", result["trials"]),
        (f"onset -> {stop}", result["onset_to_stop_ms"]),
        (f"decision -> {stop}", result["decision_to_stop_ms"]),
        ("leaked audio (ms, total)", result["leaked_audio_ms"]),
        (f"media after {stop}", result.get("media_after_clear", 0)),
        ("missed", result["missed"]),
        ("errors", result["errors"]),
    ]
