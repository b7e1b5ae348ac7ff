"""`parley bench latency`: voice-to-voice, from the end of the caller's speech to the agent's first audio.

The caller speaks a clip after the greeting (if any) and waits. `voice_to_voice_ms` is measured at
the caller (last frame above -40 dBFS sent -> first agent AudioData received); the server's event log
breaks it down: end of speech detected (VAD silence long enough), final text, the agent's first
text, the first synthesized audio, the first frame written to the socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parley.benchmarks.common import load_clips, machine_info
from parley.caller import CallOptions, CallReport, run_call
from parley.stats import percentiles

STAGES = ("speech_ended", "final", "agent_text", "first_audio_ready", "first_audio_sent")
STAGE_KEYS = {
    "speech_ended": "end_of_speech_detected_ms",
    "final": "final_text_ms",
    "agent_text": "agent_first_text_ms",
    "first_audio_ready": "first_audio_synthesized_ms",
    "first_audio_sent": "first_audio_sent_ms",
}


async def run(url: str, trials: int, clips: list[Path] | None) -> dict[str, Any]:
    sources = load_clips(clips)
    results = []
    for index in range(trials):
        clip = sources[index % len(sources)]
        report = await run_call(
            CallOptions(url=url, pcm=clip.pcm, greeting_wait_s=0.5, end_after_answer_s=0.3, max_wait_s=6.0)
        )
        results.append({"trial": index, "clip": clip.name, **breakdown(report)})
    return _summary(results)


def breakdown(report: CallReport) -> dict[str, Any]:
    """Stage times in ms after the caller's speech ended (same monotonic clock on one machine)."""
    row: dict[str, Any] = {"voice_to_voice_ms": report.voice_to_voice_ms, "errors": report.errors}
    end = report.speech_end_t
    finals = [e for e in report.events if e["event"] == "final" and e.get("text", "").strip()]
    if end is None or not finals:
        return row
    final = finals[-1]
    turns = [e for e in report.events if e["event"] == "turn_started" and e["t"] >= final["t"]]
    turn_id = turns[0]["turn_id"] if turns else None
    for stage in STAGES:
        row[STAGE_KEYS[stage]] = _stage_ms(report.events, stage, end, final, turn_id)
    row["final_text"] = final["text"]
    synthesized = row.get(STAGE_KEYS["first_audio_ready"])
    if synthesized is not None:  # the TTS share, per trial (a difference of medians would not be)
        row["final_to_first_audio_ms"] = round(synthesized - row[STAGE_KEYS["final"]], 1)
    return row


def _stage_ms(
    events: list[dict[str, Any]], stage: str, end: float, final: dict[str, Any], turn_id: int | None
) -> float | None:
    if stage == "final":
        return round((final["t"] - end) * 1000, 1)
    if stage == "speech_ended":
        match = [e for e in events if e["event"] == stage and e.get("utterance_id") == final["utterance_id"]]
    else:
        match = [e for e in events if e["event"] == stage and e.get("turn_id") == turn_id]
    return round((match[0]["t"] - end) * 1000, 1) if match else None


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"benchmark": "latency", "trials": len(results), "machine": machine_info()}
    summary["voice_to_voice_ms"] = percentiles([r["voice_to_voice_ms"] for r in results if r["voice_to_voice_ms"]])
    summary["server_breakdown_ms"] = {
        key: percentiles([r[key] for r in results if r.get(key) is not None])
        for key in (*STAGE_KEYS.values(), "final_to_first_audio_ms")
    }
    summary["no_answer"] = sum(r["voice_to_voice_ms"] is None for r in results)
    summary["errors"] = sum(len(r["errors"]) for r in results)
    summary["per_trial"] = results
    return summary


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [("trials", result["trials"]), ("voice-to-voice", result["voice_to_voice_ms"])]
    rows += [(f"  {key}", value) for key, value in result["server_breakdown_ms"].items()]
    rows += [("no answer", result["no_answer"]), ("errors", result["errors"])]
    return rows
