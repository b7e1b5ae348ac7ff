"""The LLM agents' warm-up at startup (parley.agents.llm.warm_up, Scenario.warm, Engines.warm):
after it the first request imports nothing new, and the warm-up itself sends nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parley.agents.llm import LlmAgent, LlmConfig, build_client, warm_up
from parley.agents.scenario import Scenario, load_scenario, resolve_agent_path
from parley.protocols import CallContext, Say, UserInput
from parley.testing.fake_llm import FakeLlm, Plan, ServerThread, deltas
from tests.conftest import make_server

SRC = Path(__file__).resolve().parents[1] / "src"

# A fresh interpreter (this one has imported the SDK's lazy modules long ago): load the packaged
# bank scenario as the server does, warm it or not, then answer one call; report which modules
# that first request imported.
FIRST_REQUEST = """
import asyncio, json, sys
from parley.agents.llm import LlmConfig
from parley.agents.scenario import Scenario, load_scenario, resolve_agent_path
from parley.protocols import CallContext, Say, UserInput

url, warm = sys.argv[1], sys.argv[2] == "warm"
config = LlmConfig(provider="compatible", base_url=url + "/v1", api_key="k", model="fake")
scenario = Scenario(load_scenario(resolve_agent_path("bank-llm")), config)
if warm:
    scenario.warm()

async def first_call():
    said = []
    async for output in scenario.agent(CallContext("first")).respond(UserInput("speech", "hello")):
        if isinstance(output, Say):
            said.append(output.text)
    return said

before = set(sys.modules)
said = asyncio.run(first_call())
print(json.dumps({"said": said, "imported": sorted(set(sys.modules) - before)}))
"""


def first_request(url: str, *, warm: bool) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_REQUEST, url, "warm" if warm else "cold"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    result: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture
def fake(fake_server: FakeLlm) -> FakeLlm:
    fake_server.reset()
    return fake_server


def compatible(url: str) -> LlmConfig:
    return LlmConfig(provider="compatible", base_url=f"{url}/v1", api_key="k", model="fake")


def test_after_the_warm_up_the_first_request_imports_nothing(fake: FakeLlm) -> None:
    cold = first_request(fake.url, warm=False)
    warm = first_request(fake.url, warm=True)
    # Without it the first request imports the SDK's chat resources (and anyio's backend).
    assert "openai.resources.chat.completions.completions" in cold["imported"]
    assert warm["imported"] == []
    assert cold["said"] == warm["said"] == ["Hello there."]  # the fake's default answer
    assert len(fake.requests) == 2  # the two calls: the warm-up sent nothing


async def test_the_warm_up_sends_nothing_and_the_calls_go_on(fake: FakeLlm, caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on the discard port: a warm-up that went on the network would fail.
    offline = Scenario(load_scenario(resolve_agent_path("bank-llm")), compatible("http://127.0.0.1:9"))
    with caplog.at_level(logging.INFO):
        await asyncio.to_thread(offline.warm)
    assert not [r for r in caplog.records if r.name.startswith("httpx")]  # no "HTTP Request: POST" lines
    rehearsed = [r.getMessage().split(":")[0] for r in caplog.records if "first request rehearsed" in r.getMessage()]
    llm_agents = [f"agent {name}" for name, member in offline.members.items() if member.config is not None]
    assert rehearsed == llm_agents and len(llm_agents) >= 2  # each LLM agent, with its prompt and tools
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)

    scenario = Scenario(load_scenario(resolve_agent_path("bank-llm")), compatible(fake.url))
    await asyncio.to_thread(scenario.warm)
    assert fake.requests == []
    fake.queue(Plan(deltas("Good morning, ", "how can I help?")))
    call = scenario.agent(CallContext("c1"))
    said = [o.text async for o in call.respond(UserInput("speech", "hi")) if isinstance(o, Say)]
    assert said == ["Good morning,", "how can I help?"]
    request = fake.requests[0].body
    assert "verify_customer" in [tool["function"]["name"] for tool in request["tools"]]
    assert [m["role"] for m in request["messages"]] == ["system", "user"]  # nothing of the rehearsal
    assert request["messages"][-1]["content"] == "hi"


def test_a_failing_warm_up_is_logged_and_does_not_raise(fake: FakeLlm, caplog: pytest.LogCaptureFixture) -> None:
    scenario = Scenario(load_scenario(resolve_agent_path("openai")), compatible(fake.url))
    client = next(member.client for member in scenario.members.values() if member.client is not None)

    def broken(client: object) -> object:
        raise RuntimeError("no agent today")

    with caplog.at_level(logging.WARNING, logger="parley.agents.llm"):
        assert warm_up(client, broken) is False  # type: ignore[arg-type]
    assert "LLM warm-up failed" in caplog.text and "no agent today" in caplog.text
    assert warm_up(object(), broken) is False  # not an OpenAI client (llama-cpp): nothing to do
    assert fake.requests == []


def test_the_server_warms_its_llm_agents_at_startup(fake: FakeLlm, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="parley.agents.scenario"):
        server = make_server(agent="openai", greeting="", **_llm_settings(fake))
        server.stop()
    assert any("first request rehearsed" in record.getMessage() for record in caplog.records)
    assert fake.requests == []


def _llm_settings(fake: FakeLlm) -> dict[str, object]:
    return {"llm_provider": "compatible", "llm_base_url": f"{fake.url}/v1", "llm_api_key": "k"}


async def test_a_turn_after_a_pause_reuses_the_connection() -> None:
    """httpx's default keep-alive (5 s) closed the connection between most turns of a call, so
    each turn paid DNS, TCP and TLS again; the clients keep it KEEPALIVE_S."""
    app = FakeLlm()
    thread = ServerThread(app)
    thread.server.config.timeout_keep_alive = 30  # like a real API's, unlike uvicorn's 5 s
    app.url = thread.start()
    try:
        config = compatible(app.url)
        agent = LlmAgent(config, build_client(config))
        connections = []
        for pause in (6.0, 0.0):  # longer than httpx's default keep-alive
            said = [o.text async for o in agent.respond(UserInput("speech", "hi")) if isinstance(o, Say)]
            assert said == ["Hello there."]
            connections.append({id(c) for c in thread.server.server_state.connections})
            await asyncio.sleep(pause)
        assert len(connections[0]) == 1 and connections[1] == connections[0]
    finally:
        thread.stop()
