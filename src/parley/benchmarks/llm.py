"""`parley bench llm`: the LLM agent's share of latency and of barge-in, against a local fake model.

Each trial is one call to a parley server running the packaged `openai` agent, pointed at a fake
OpenAI-compatible server (parley.testing.fake_llm: real HTTP and SSE, the real openai client) that
streams a long answer at about 12 deltas per second, first delta after 150 ms, completing a clause.
The caller presses 1 (the turn's input; no speech recognition involved, so the figure is the agent
path alone) and, while the answer is still streaming, presses 2: a barge-in.

- first_clause_to_audio_ms: the fake server wrote the delta that completes the first clause ->
  the caller received the first agent audio (LLM client, clause cutter, TTS of the clause, playout,
  WebSocket). Also to the server's first_audio_sent event (without the socket).
- cancel_to_stream_closed_ms: the server decided the barge-in -> the agent's HTTP stream was closed
  (server event agent_stream_closed), and -> the fake server saw the client disconnect.
All on one machine's monotonic clock (CLOCK_MONOTONIC is system-wide, also across processes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from parley.benchmarks.common import machine_info
from parley.caller import CallOptions, CallReport, run_call
from parley.stats import percentiles
from parley.testing.fake_llm import FakeLlm, Plan, ServerThread, deltas

FIRST_CLAUSE = "Sure, we're open every day from eleven in the morning. "
REST = (
    "On weekdays the kitchen stays open until ten at night, and on Fridays and Saturdays we stay "
    "open until midnight. Delivery runs until half an hour before closing, and you can pick up "
    "your order at the counter whenever we are open. On public holidays we open at noon, and we "
    "close early on Christmas Eve. We also take orders online, and our phone line is open all day, "
    "so you can call ahead and have your pizza ready when you arrive. Large parties of more than "
    "ten people should book a table a day in advance, and we are happy to cater for birthdays, "
    "office lunches and school events. Is there anything else I can help you with today?"
).split(" ")
PRESS_ANSWER_AT_S = 0.3  # the caller presses 1 this long into the call
BARGE_IN_AFTER_S = 2.0  # and 2 this long after that, while the answer is still streaming


def answer_plan() -> Plan:
    words = [" ".join(REST[i : i + 3]) + " " for i in range(0, len(REST), 3)]
    return Plan(deltas(FIRST_CLAUSE, *words, gap=0.08, first_delay=0.15))


@contextmanager
def fake_llm() -> Iterator[FakeLlm]:
    app = FakeLlm()
    server = ServerThread(app)
    app.url = server.start()
    try:
        yield app
    finally:
        server.stop()


def server_settings(fake: FakeLlm) -> dict[str, object]:
    return {
        "agent": "openai",
        "greeting": "",
        "llm_provider": "compatible",
        "llm_base_url": f"{fake.url}/v1",
        "llm_api_key": "bench",
    }


async def run(url: str, trials: int, fake: FakeLlm) -> dict[str, Any]:
    results = []
    for index in range(trials):
        fake.reset()
        fake.queue(answer_plan(), Plan(deltas("Okay.")))
        report = await run_call(
            CallOptions(
                url=url,
                pcm=np.zeros(16000 * 6, dtype=np.int16),
                greeting_wait_s=0.0,
                dtmf=[(PRESS_ANSWER_AT_S, "1"), (PRESS_ANSWER_AT_S + BARGE_IN_AFTER_S, "2")],
                max_wait_s=4.0,
                end_after_stop_s=0.8,
            )
        )
        results.append({"trial": index, **measure(report, fake)})
    return _summary(results)


def measure(report: CallReport, fake: FakeLlm) -> dict[str, Any]:
    row: dict[str, Any] = {"errors": report.errors}
    if not fake.requests or not fake.requests[0].sent_t:
        row["errors"] = [*report.errors, "the agent never asked the model"]
        return row
    answer = fake.requests[0]
    clause_t = answer.sent_t[0]
    events = report.events
    first_turn = next((e["turn_id"] for e in events if e["event"] == "turn_started"), None)
    if report.stretches:
        row["first_clause_to_audio_ms"] = _ms(report.t0 + report.stretches[0][0] / 1000 - clause_t)
    text = _first(events, "agent_text", first_turn)
    if text is not None:  # the clause cutter's share (the rest is synthesis and playout)
        row["first_clause_to_agent_text_ms"] = _ms(text["t"] - clause_t)
    ready = _first(events, "first_audio_ready", first_turn)
    if ready is not None:
        row["first_clause_to_audio_synthesized_ms"] = _ms(ready["t"] - clause_t)
    sent = _first(events, "first_audio_sent", first_turn)
    if sent is not None:
        row["first_clause_to_audio_sent_ms"] = _ms(sent["t"] - clause_t)
    decided = _first(events, "barge_in_decided", first_turn)
    closed = _first(events, "agent_stream_closed", first_turn)
    if decided is not None and closed is not None:
        row["cancel_to_stream_closed_ms"] = _ms(closed["t"] - decided["t"])
    if decided is not None and answer.disconnected_t is not None:
        row["cancel_to_server_saw_close_ms"] = _ms(answer.disconnected_t - decided["t"])
    row["stream_was_open"] = answer.finished_t is None or (decided is not None and answer.finished_t > decided["t"])
    return row


def _first(events: list[dict[str, Any]], name: str, turn_id: int | None) -> dict[str, Any] | None:
    return next((e for e in events if e["event"] == name and e.get("turn_id") == turn_id), None)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


KEYS = (
    "first_clause_to_audio_ms",
    "first_clause_to_agent_text_ms",
    "first_clause_to_audio_synthesized_ms",
    "first_clause_to_audio_sent_ms",
    "cancel_to_stream_closed_ms",
    "cancel_to_server_saw_close_ms",
)


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"benchmark": "llm", "trials": len(results), "machine": machine_info()}
    for key in KEYS:
        summary[key] = percentiles([r[key] for r in results if r.get(key) is not None])
    summary["targets"] = {
        "first_clause_to_audio_ms_p50_max": 150,
        "cancel_to_stream_closed_ms_max": 10,
    }
    summary["stream_open_at_barge_in"] = sum(bool(r.get("stream_was_open")) for r in results)
    summary["errors"] = sum(len(r["errors"]) for r in results)
    summary["per_trial"] = results
    return summary


def summary_rows(result: dict[str, Any]) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [("trials", result["trials"])]
    rows += [(key, result[key]) for key in KEYS]
    rows += [("stream open at barge-in", result["stream_open_at_barge_in"]), ("errors", result["errors"])]
    return rows
