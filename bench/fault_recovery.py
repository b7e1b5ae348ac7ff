"""Time to recover from each engine fault, on the in-memory harness (real MediaHandler, scripted engines).

    python bench/fault_recovery.py [--trials 5] [--json out.json]

For each fault: the caller's input -> the first audio the caller gets back (the apology, or the same
words in the fallback voice), with the server's default timeouts scaled down where a fault is a
timeout (the figure is then that timeout plus the measured overhead). Median and max over trials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import AsyncIterator, Callable
from typing import Any

from parley.protocols import AgentOutput, Say, UserInput
from parley.testing.harness import CallHarness, ScriptedAgent, ScriptedSynthesizer


def agent_that(kind: str) -> ScriptedAgent:
    agent = ScriptedAgent()

    async def behaviour(user: UserInput) -> AsyncIterator[AgentOutput]:
        if kind == "raises":
            raise RuntimeError("model error")
        await asyncio.Event().wait()  # hangs
        yield Say("never")

    agent.behaviour = behaviour
    return agent


FAULTS: dict[str, Callable[[], dict[str, Any]]] = {
    "agent raises": lambda: {"agent": agent_that("raises")},
    "agent hangs (agent_timeout_s=1.0)": lambda: {"agent": agent_that("hangs"), "agent_timeout_s": 1.0},
    "tts raises": lambda: {"synthesizer": ScriptedSynthesizer(fault="raise"), "fallback": ScriptedSynthesizer()},
    "tts hangs (tts_first_audio_timeout_s=1.0)": lambda: {
        "synthesizer": ScriptedSynthesizer(fault="hang"),
        "fallback": ScriptedSynthesizer(),
        "tts_first_audio_timeout_s": 1.0,
    },
    "tts returns no audio": lambda: {
        "synthesizer": ScriptedSynthesizer(fault="silent"),
        "fallback": ScriptedSynthesizer(),
    },
    "no fault": dict,
}


async def one_trial(options: dict[str, Any]) -> float:
    async with CallHarness(**options) as call:
        await call.say("hello")
        final = await call.wait_for("final")
        first = await call.wait_for("first_audio_sent", timeout=30)
        return (first["t"] - final["t"]) * 1000


async def measure(trials: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, make in FAULTS.items():
        times = [await one_trial(make()) for _ in range(trials)]
        results[name] = {
            "final_to_first_audio_ms": {"median": round(statistics.median(times), 1), "max": round(max(times), 1)}
        }
        print(f"{name:45s} median {statistics.median(times):7.1f} ms   max {max(times):7.1f} ms")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    results = asyncio.run(measure(args.trials))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"benchmark": "fault_recovery", "trials": args.trials, "faults": results}, out, indent=1)


if __name__ == "__main__":
    main()
