"""The first LLM request of a fresh process against the later ones, with and without the warm-up.

    PYTHONPATH=src .venv/bin/python bench/llm_first_request.py --processes 9 --requests 4 [--agent bank-llm]

A fake OpenAI-compatible server (parley.testing.fake_llm, real HTTP and SSE) runs in its own
process on loopback and answers at once. Each trial is a fresh Python process that loads a packaged
scenario as the server does at startup (clients built, prompts compiled), optionally runs
`Scenario.warm()` (what `Engines.warm()` does at server start), then answers a few calls in a row:
each is a new call's agent answering "hello", timed from `respond()` to its first Say (request
built and sent, first streamed delta received and cut into a clause). Prints, per request index,
the median over the processes, and how many modules the first request imported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

FAKE_SERVER = """
import time
from parley.testing.fake_llm import FakeLlm, ServerThread
app = FakeLlm()
server = ServerThread(app)
print(server.start(), flush=True)
while True:
    time.sleep(3600)
"""


def child(url: str, agent: str, warm: bool, requests: int) -> dict[str, object]:
    started = time.perf_counter()
    from parley.agents.llm import LlmConfig
    from parley.agents.scenario import Scenario, load_scenario, resolve_agent_path
    from parley.protocols import CallContext, Say, UserInput

    config = LlmConfig(provider="compatible", base_url=f"{url}/v1", api_key="bench", model="fake-model")
    scenario = Scenario(load_scenario(resolve_agent_path(agent)), config)
    loaded = time.perf_counter()
    if warm:
        scenario.warm()
    warmed = time.perf_counter()

    async def calls() -> tuple[list[float], list[int]]:
        times, imported = [], []
        for index in range(requests):
            call = scenario.agent(CallContext(f"bench-{index}"))
            modules = len(sys.modules)
            begun = time.perf_counter()
            async for output in call.respond(UserInput("speech", "hello")):
                if isinstance(output, Say):
                    times.append((time.perf_counter() - begun) * 1000)
                    break
            imported.append(len(sys.modules) - modules)
        return times, imported

    times, imported = asyncio.run(calls())
    return {
        "startup_ms": (loaded - started) * 1000,
        "warm_ms": (warmed - loaded) * 1000,
        "request_ms": times,
        "imported": imported,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=7, help="fresh processes per variant")
    parser.add_argument("--requests", type=int, default=4, help="calls per process")
    parser.add_argument("--agent", default="openai", help="a packaged scenario with LLM agents")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm-up variant (older sources)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.agent, args.warm, args.requests)))
        return
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().strip()
        for warm in (False,) if args.cold_only else (False, True):
            runs = []
            for _ in range(args.processes):
                command = [sys.executable, __file__, "--child", url, "--agent", args.agent]
                command += ["--requests", str(args.requests)] + (["--warm"] if warm else [])
                runs.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
            medians = [statistics.median(run["request_ms"][i] for run in runs) for i in range(args.requests)]
            print(
                f"{'warm-up   ' if warm else 'no warm-up'}: first-Say ms per request (median of {args.processes}):"
                f" {' '.join(f'{m:.1f}' for m in medians)}"
                f" | warm-up {statistics.median(run['warm_ms'] for run in runs):.0f} ms"
                f" | modules imported by request 1: {sorted({run['imported'][0] for run in runs})}"
            )
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
