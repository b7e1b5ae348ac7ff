"""Scenarios, tools and handoffs: YAML agents against the local fake OpenAI-compatible server
(real HTTP, the real openai client), scripted agents, webhooks against a real local HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from parley.agents.llm import LlmConfig
from parley.agents.scenario import (
    Scenario,
    ScenarioAgent,
    ScenarioError,
    load_scenario,
    scenario_agent_factory,
)
from parley.agents.scripted import packaged_script_names
from parley.agents.tools import ToolContext
from parley.protocols import AgentOutput, CallContext, Hangup, Say, Transfer, UserInput
from parley.testing.fake_llm import FakeLlm, Plan, ServerThread, deltas, read_body, tool_call

# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def fake(fake_server: FakeLlm) -> FakeLlm:
    fake_server.reset()
    return fake_server


@pytest.fixture
def llm_defaults(fake: FakeLlm, monkeypatch: pytest.MonkeyPatch) -> LlmConfig:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return LlmConfig(
        provider="compatible", base_url=f"{fake.url}/v1", model="fake-model", api_key="k", retry_backoff_s=0.01
    )


MakeScenario = Callable[..., ScenarioAgent]


@pytest.fixture
async def make_call(tmp_path: Path, llm_defaults: LlmConfig) -> AsyncIterator[MakeScenario]:
    """Write a scenario YAML, load it like the server does and start one call of it."""
    scenarios: list[Scenario] = []

    def make(yaml_text: str, *, caller_id: str = "+15551230000") -> ScenarioAgent:
        path = tmp_path / f"scenario{len(scenarios)}.yaml"
        path.write_text(textwrap.dedent(yaml_text))
        scenario = Scenario(load_scenario(path), llm_defaults)
        scenarios.append(scenario)
        return scenario.agent(CallContext("call-1", caller_id=caller_id))

    yield make
    for scenario in scenarios:
        for member in scenario.members.values():
            if member.client is not None:
                with contextlib.suppress(Exception):
                    await member.client.close()


async def run(agent: ScenarioAgent, user: UserInput) -> list[AgentOutput]:
    return [output async for output in agent.respond(user)]


def said(outputs: list[AgentOutput]) -> list[str]:
    return [o.text for o in outputs if isinstance(o, Say)]


def speech(text: str) -> UserInput:
    return UserInput("speech", text=text)


def request_messages(fake: FakeLlm, index: int) -> list[dict[str, Any]]:
    return fake.requests[index].body["messages"]


def write_yaml(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------------------------
# Loading and validation


@pytest.mark.parametrize("name", packaged_script_names())
def test_every_packaged_example_loads_and_connects(name: str, llm_defaults: LlmConfig) -> None:
    factory = scenario_agent_factory(name, llm_defaults)
    agent = factory(CallContext("c"))
    assert agent.greeting()


def test_packaged_examples_include_the_scenarios() -> None:
    assert {"pizza", "bank", "bank-desk", "openai", "pizza-llm", "bank-llm"} <= set(packaged_script_names())
    bank = load_scenario(Path(__file__).parents[1] / "src/parley/agents/examples/bank-llm.yaml")
    assert bank.start_agent == "auth" and [a.kind for a in bank.agents] == ["llm", "llm", "llm"]


def test_single_llm_agent_file_is_a_scenario(tmp_path: Path) -> None:
    spec = load_scenario(write_yaml(tmp_path, "name: Solo\nprompt: Be brief.\n"))
    assert spec.start_agent == "Solo" and spec.agents[0].kind == "llm"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            """\
         name: S
         start: nobody
         agents: [{name: a, prompt: hi}]
         """,
            "start agent 'nobody' is not one of the agents (a)",
        ),
        (
            """\
         name: S
         agents: [{name: a, prompt: hi}, {name: a, prompt: again}]
         """,
            "agent names must be unique: a",
        ),
        (
            """\
         name: S
         agents: [{name: a, prompt: hi, handoffs: [{to: ghost}]}]
         """,
            "agent 'a' hands off to unknown agent 'ghost'",
        ),
        (
            """\
         name: S
         agents: [{name: a, prompt: "Hello {{ caller_id"}]
         """,
            "agents[0] (a).prompt: prompt: template error at line 1",
        ),
        (
            """\
         name: S
         agents:
           - name: a
             prompt: hi
             tools: [{name: lookup, python: "x:y", webhook: {url: "http://x"}}]
         """,
            "agents[0] (a).tools[0] (lookup): a tool needs exactly one of python, webhook or builtin",
        ),
        (
            """\
         name: S
         agents:
           - name: a
             prompt: hi
             tools: [{name: lookup, builtin: end_call, colour: red}]
         """,
            "agents[0] (a).tools[0] (lookup): unknown key 'colour' (allowed keys: name, description",
        ),
        (
            """\
         name: S
         agents:
           - name: desk
             intents: [{name: card, keywords: [card], reply: Ok., handoff: cards}]
             fallback: F.
         """,
            "hands off to 'cards', which is not in this agent's handoffs",
        ),
        (
            """\
         name: S
         agents: [{name: a, prompt: hi, modle: {temperature: 1}}]
         """,
            "agents[0] (a): unknown key 'modle' (allowed keys: kind, name",
        ),
        (
            """\
         name: S
         timezone: Mars/Olympus
         agents: [{name: a, prompt: hi}]
         """,
            "unknown timezone 'Mars/Olympus'",
        ),
    ],
)
def test_scenario_mistakes_are_explained(tmp_path: Path, body: str, message: str) -> None:
    path = write_yaml(tmp_path, body)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_tool_import_errors_fail_at_startup(tmp_path: Path, llm_defaults: LlmConfig) -> None:
    path = write_yaml(
        tmp_path,
        """\
        name: S
        agents:
          - name: a
            prompt: hi
            tools: [{name: t, python: "parley.no_such_module:f"}]
        """,
    )
    # The file and the place, like every other scenario error (docs/agents.md).
    with pytest.raises(ScenarioError) as caught:
        Scenario(load_scenario(path), llm_defaults)
    assert str(caught.value).startswith(f"{path}: agents[0] (a).tools[0] (t).python: cannot import")
    assert "cannot import 'parley.no_such_module'" in str(caught.value)
    path.write_text(path.read_text().replace("parley.no_such_module:f", "parley.agents.demo_tools:no_such_tool"))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(f"{path}: agents[0] (a).tools[0] (t).python: ")
    assert "has no callable 'no_such_tool'" in str(caught.value)


def test_missing_llm_credentials_fail_at_startup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = write_yaml(tmp_path, "name: S\nagents: [{name: a, prompt: hi}]\n")
    with pytest.raises(ScenarioError, match="agent 'a': provider 'openai' needs api_key"):
        Scenario(load_scenario(path), LlmConfig())


def test_agent_model_settings_override_the_server_defaults(tmp_path: Path, llm_defaults: LlmConfig) -> None:
    path = write_yaml(
        tmp_path,
        """\
        name: S
        agents:
          - {name: a, prompt: hi, model: {model: big, temperature: 0.2, first_token_timeout_s: 1.5}}
          - {name: b, prompt: hi, model: {provider: openai}}
        """,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", "sk-env")
        scenario = Scenario(load_scenario(path), llm_defaults)
    a, b = scenario.members["a"].config, scenario.members["b"].config
    assert a is not None and b is not None
    assert (a.model, a.temperature, a.first_token_timeout_s, a.base_url) == ("big", 0.2, 1.5, llm_defaults.base_url)
    # Another provider does not inherit the server's URL or key.
    assert b.provider == "openai" and b.base_url is None and b.api_key is None
    assert scenario.members["a"].client is not scenario.members["b"].client


# --------------------------------------------------------------------------------------------
# Scripted scenarios


async def test_scripted_handoff_announced_then_the_specialist_answers() -> None:
    agent = scenario_agent_factory("bank-desk")(CallContext("c"))
    assert agent.greeting().startswith("Welcome to Riverside Bank")
    outputs = await run(agent, speech("i lost my card"))
    assert said(outputs)[:3] == ["Certainly.", "I'm putting you through to our card team.", "This is the card team."]
    assert agent.active == "cards"
    cards = agent.member("cards")
    # Shared history: the card team knows the greeting; it answered the caller's words itself.
    assert cards.messages[0]["content"].startswith("Welcome to Riverside Bank")  # type: ignore[attr-defined]
    assert cards.messages[1] == {"role": "user", "content": "i lost my card"}  # type: ignore[attr-defined]
    # The card team passes account questions straight to the accounts team (no reception hop).
    assert said(await run(agent, speech("i want to check my account")))[:2] == [
        "Sure.",
        "I'll pass you to our accounts team.",
    ]
    assert agent.active == "accounts"


async def test_scripted_handoff_then_greet() -> None:
    agent = scenario_agent_factory("bank-desk")(CallContext("c"))
    outputs = await run(agent, UserInput("dtmf", digits="2"))
    assert said(outputs) == [
        "Of course.",
        "I'm putting you through to our accounts team.",
        "Accounts team here. You can ask about fees or statements.",
    ]
    assert agent.active == "accounts"
    outputs = await run(agent, UserInput("dtmf", digits="9"))
    assert isinstance(outputs[-1], Hangup)


async def test_each_agent_speaks_in_its_own_voice(make_call: MakeScenario) -> None:
    agent = make_call("""\
        name: Voices
        agents:
          - name: desk
            voice: en-gb
            intents: [{name: card, keywords: [card], reply: Sure., handoff: cards}]
            fallback: F.
            handoffs: [{to: cards, announce: Transferring.}]
          - name: cards
            intents: [{name: card, keywords: [card], reply: Cards here.}]
            fallback: F.
        """)
    outputs = await run(agent, speech("card"))
    assert [(o.text, o.voice) for o in outputs if isinstance(o, Say)] == [
        ("Sure.", "en-gb"),
        ("Transferring.", "en-gb"),
        ("Cards here.", ""),
    ]  # "" = server default
    assert agent.voice is None


# --------------------------------------------------------------------------------------------
# LLM agents: prompts, tools


async def test_prompt_template_sees_the_call(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call("""\
        name: S
        timezone: Europe/London
        facts: {hours: nine to five}
        agents:
          - name: a
            prompt: "Caller {{ caller_id }} on {{ call_id }} pressed '{{ dtmf }}' at {{ time }}; hours {{ facts.hours }}; customer {{ state.customer.name }}."
        """)
    fake.queue(Plan(deltas("Okay.")), Plan(deltas("Sure.")))
    await run(agent, UserInput("dtmf", digits="12"))
    agent.session.state["customer"] = {"name": "Alex"}
    await run(agent, speech("hello"))
    first = request_messages(fake, 0)[0]["content"]
    second = request_messages(fake, 1)[0]["content"]
    assert first.startswith("Caller +15551230000 on call-1 pressed '12' at ")
    assert first.endswith("; hours nine to five; customer .")  # unset state renders as nothing
    assert second.endswith("customer Alex.")


TOOLS_YAML = """\
    name: Shop
    agents:
      - name: orders
        prompt: Take orders.
        max_tool_rounds: {rounds}
        tools:
          - name: add_to_order
            description: Add an item.
            python: parley.agents.demo_tools:add_to_order
            parameters:
              type: object
              properties: {{item: {{type: string}}, size: {{type: string}}}}
              required: [item]
          - name: slow
            python: tests.test_scenario:slow_tool
            timeout_s: 0.2
            say: One moment please.
          - {{name: end_call, builtin: end_call}}
          - {{name: to_human, builtin: transfer, target: "+15550100"}}
    """


async def slow_tool() -> str:
    await asyncio.sleep(5)
    return "too late"


async def test_python_tool_runs_and_the_model_continues(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=3))
    fake.queue(
        Plan([*deltas("Sure, adding that. "), *tool_call("add_to_order", {"item": "pepperoni", "size": "large"})]),
        Plan(deltas("That's one large pepperoni, ", "sixteen ninety nine.")),
    )
    outputs = await run(agent, speech("a large pepperoni please"))
    assert said(outputs) == ["Sure, adding that.", "That's one large pepperoni,", "sixteen ninety nine."]
    first, second = fake.requests
    assert [t["function"]["name"] for t in first.body["tools"]] == ["add_to_order", "slow", "end_call", "to_human"]
    assert first.body["tool_choice"] == "auto"
    messages = second.body["messages"]
    assert messages[-2]["role"] == "assistant" and messages[-2]["content"] == "Sure, adding that. "
    assert messages[-2]["tool_calls"][0]["function"] == {
        "name": "add_to_order",
        "arguments": json.dumps({"item": "pepperoni", "size": "large"}),
    }
    result = json.loads(messages[-1]["content"])
    assert messages[-1]["tool_call_id"] == messages[-2]["tool_calls"][0]["id"]
    assert result["total_dollars"] == 16.99
    assert agent.session.state["order"][0]["item"] == "pepperoni"


async def test_tool_timeout_is_an_error_result_and_the_filler_is_spoken(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=3))
    fake.queue(Plan(tool_call("slow", {})), Plan(deltas("Sorry, that did not work.")))
    started = time.monotonic()
    outputs = await run(agent, speech("check it"))
    assert said(outputs) == ["One moment please.", "Sorry, that did not work."]
    assert time.monotonic() - started < 2.0
    tool_message = request_messages(fake, 1)[-1]
    assert tool_message["role"] == "tool" and "did not answer within 0.2 seconds" in tool_message["content"]


async def test_bad_arguments_and_unknown_tools_answer_the_model(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=3))
    fake.queue(
        Plan([*tool_call("add_to_order", "{not json", index=0), *tool_call("nope", {}, index=1)]),
        Plan(deltas("Let me try again.")),
    )
    assert said(await run(agent, speech("x"))) == ["Let me try again."]
    results = [m["content"] for m in request_messages(fake, 1) if m["role"] == "tool"]
    assert "not valid JSON" in results[0] and "no tool named 'nope'" in results[1]


async def test_tool_loop_is_bounded(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=2))
    looping = Plan(tool_call("add_to_order", {"item": "salad"}))
    fake.queue(looping, looping, Plan(deltas("Your order has three salads.")))
    assert said(await run(agent, speech("salad"))) == ["Your order has three salads."]
    assert [r.body["tool_choice"] for r in fake.requests] == ["auto", "auto", "none"]


async def test_end_call_and_transfer_tools(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=3))
    fake.queue(Plan([*deltas("Goodbye!"), *tool_call("end_call", {"reason": "done"})]))
    outputs = await run(agent, speech("bye"))
    assert said(outputs) == ["Goodbye!"] and isinstance(outputs[-1], Hangup)
    fake.queue(Plan(tool_call("to_human", {})))
    outputs = await run(agent, speech("a human please"))
    assert said(outputs) == ["Please hold while I transfer your call."]  # the default filler
    assert outputs[-1] == Transfer("+15550100", reason="tool:to_human")


class Webhook:
    """A real local HTTP endpoint answering tool webhooks (raw ASGI), recording each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.url = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "body": json.loads(body or b"{}")})
        payload = json.dumps({"status": "shipped", "eta": "tomorrow"}).encode()
        await send(
            {"type": "http.response.start", "status": self.status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def webhook() -> Any:
    app = Webhook()
    server = ServerThread(app)
    app.url = server.start()
    yield app
    server.stop()


async def test_webhook_tool(
    make_call: MakeScenario, fake: FakeLlm, webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_TOKEN", "s3cret")
    agent = make_call(f"""\
        name: S
        agents:
          - name: a
            prompt: hi
            tools:
              - name: order_status
                webhook: {{url: "{webhook.url}/status", headers: {{Authorization: "Bearer ${{SHOP_TOKEN}}"}}}}
                parameters: {{type: object, properties: {{order: {{type: string}}}}}}
        """)
    webhook.requests.clear()
    webhook.status = 200
    fake.queue(Plan(tool_call("order_status", {"order": "T1234"})), Plan(deltas("It ships tomorrow.")))
    assert said(await run(agent, speech("where is my order"))) == ["It ships tomorrow."]
    (request,) = webhook.requests
    assert request["path"] == "/status" and request["headers"]["authorization"] == "Bearer s3cret"
    assert request["body"] == {
        "tool": "order_status",
        "arguments": {"order": "T1234"},
        "call": {"call_id": "call-1", "caller_id": "+15551230000", "agent": "a"},
    }
    assert json.loads(request_messages(fake, 1)[-1]["content"]) == {"status": "shipped", "eta": "tomorrow"}
    webhook.status = 503
    fake.queue(Plan(tool_call("order_status", {"order": "T1"})), Plan(deltas("Sorry.")))
    await run(agent, speech("again"))
    assert "HTTP 503" in request_messages(fake, 3)[-1]["content"]


# --------------------------------------------------------------------------------------------
# LLM handoffs


HANDOFF_YAML = """\
    name: Bank
    facts: {{fees: five dollars}}
    agents:
      - name: auth
        prompt: You verify callers.
        tools:
          - name: verify_customer
            python: parley.agents.demo_tools:verify_customer
            parameters: {{type: object, properties: {{account_number: {{type: string}}, pin: {{type: string}}}}}}
        handoffs:
          - to: cards
            description: Card problems.
            announce: "Passing you to the card team."
            history: {history}
      - name: cards
        description: Lost and stolen cards.
        prompt: "Card team speaking with {{{{ state.customer.name }}}}."
    """


@pytest.mark.parametrize("history", ["shared", "fresh"])
async def test_llm_handoff_between_two_yaml_agents(make_call: MakeScenario, fake: FakeLlm, history: str) -> None:
    agent = make_call(HANDOFF_YAML.format(history=history))
    fake.queue(
        Plan(deltas("Your account number and PIN, please?")),
        Plan(tool_call("verify_customer", {"account_number": "12345678", "pin": "4321"})),
        Plan(tool_call("transfer_to_cards", {"reason": "lost card"})),
        Plan(deltas("I can block that card for you, Alex.")),
    )
    await run(agent, speech("i lost my card"))
    outputs = await run(agent, speech("one two three four five six seven eight, pin four three two one"))
    assert said(outputs) == ["Passing you to the card team.", "I can block that card for you,", "Alex."]
    assert agent.active == "cards"
    tools = [t["function"]["name"] for t in fake.requests[0].body["tools"]]
    assert tools == ["verify_customer", "transfer_to_cards"]
    assert "Card problems." in fake.requests[0].body["tools"][1]["function"]["description"]
    cards_request = request_messages(fake, 3)
    assert cards_request[0] == {"role": "system", "content": "Card team speaking with Alex Morgan."}
    assert "tools" not in fake.requests[3].body
    last_input = {"role": "user", "content": "one two three four five six seven eight, pin four three two one"}
    if history == "shared":
        assert cards_request[1:] == [
            {"role": "user", "content": "i lost my card"},
            {"role": "assistant", "content": "Your account number and PIN, please?"},
            last_input,
        ]
    else:
        assert cards_request[1:] == [last_input]


async def test_truncation_after_a_handoff_goes_to_the_new_agent(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(HANDOFF_YAML.format(history="shared"))
    fake.queue(
        Plan(tool_call("transfer_to_cards", {})), Plan(deltas("I can block that card, ", "and order a new one today."))
    )
    await run(agent, speech("lost card"))
    # The caller heard the announcement and the first clause of the card team's answer.
    agent.truncate_last_reply("Passing you to the card team. I can block that card,")
    cards = agent.member("cards")
    assert cards.messages[-1] == {"role": "assistant", "content": "I can block that card,"}  # type: ignore[attr-defined]


async def test_handoff_loops_are_cut(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call("""\
        name: Loop
        agents:
          - {name: a, prompt: A, handoffs: [{to: b}]}
          - {name: b, prompt: B, handoffs: [{to: a}]}
        """)
    ping, pong = Plan(tool_call("transfer_to_b", {})), Plan(tool_call("transfer_to_a", {}))
    fake.queue(ping, pong, ping, pong, Plan(deltas("never")))
    outputs = await run(agent, speech("hi"))
    assert said(outputs) == []
    assert len(fake.requests) == 4


async def test_truncation_spans_tool_rounds(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=3))
    fake.queue(
        Plan([*deltas("Adding it now. "), *tool_call("add_to_order", {"item": "salad"})]),
        Plan(deltas("Your salad is six dollars, ", "anything else?")),
    )
    await run(agent, speech("a salad"))
    agent.truncate_last_reply("Adding it now. Your salad is")
    orders = agent.member("orders")
    assistant = [m for m in orders.messages if m["role"] == "assistant"]  # type: ignore[attr-defined]
    assert assistant[0]["content"] == "Adding it now." and assistant[0]["tool_calls"]
    assert assistant[1]["content"] == "Your salad is"


async def test_barge_in_during_a_tool_leaves_a_valid_history(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=3))
    fake.queue(Plan(tool_call("slow", {})), Plan(deltas("Next answer.")))
    filler = asyncio.Event()

    async def consume() -> None:
        async for output in agent.respond(speech("check")):
            if isinstance(output, Say):
                filler.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(filler.wait(), 5)
    await asyncio.sleep(0.05)  # the tool is running
    task.cancel()
    agent.truncate_last_reply("One moment please.")
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await run(agent, speech("never mind"))
    messages = request_messages(fake, 1)
    # No tool call without its result (the API would reject the request).
    assert not any(m.get("tool_calls") for m in messages)
    assert messages[-2:] == [
        {"role": "assistant", "content": "One moment please."},
        {"role": "user", "content": "never mind"},
    ]


def test_demo_tools_keep_each_call_apart() -> None:
    from parley.agents import demo_tools

    one, two = ToolContext(CallContext("a"), "orders"), ToolContext(CallContext("b"), "orders")
    demo_tools.add_to_order("pepperoni", "large", context=one)
    assert demo_tools.read_order(context=two) == {"items": [], "total_dollars": 0}
    assert "size" in demo_tools.add_to_order("pepperoni", context=one)["error"]
    assert demo_tools.verify_customer("1234 5678", "4321", context=two)["verified"] is True
    assert two.state["customer"]["name"] == "Alex Morgan"


# --------------------------------------------------------------------------------------------
# Server settings -> agents


async def test_agent_openai_on_azure_settings(fake: FakeLlm, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--agent openai` with PARLEY_LLM_PROVIDER=azure: the request goes to the deployment's URL
    with the api-version and the api-key header, as Azure OpenAI expects."""
    from parley.settings import load_settings

    monkeypatch.setenv("PARLEY_LLM_PROVIDER", "azure")
    monkeypatch.setenv("PARLEY_LLM_AZURE_ENDPOINT", fake.url)
    monkeypatch.setenv("PARLEY_LLM_API_VERSION", "2024-10-21")
    monkeypatch.setenv("PARLEY_LLM_API_KEY", "azure-key")
    monkeypatch.setenv("PARLEY_LLM_MODEL", "my-gpt4o")
    monkeypatch.setenv("PARLEY_LLM_TEMPERATURE", "0.4")
    settings = load_settings(agent="openai")
    agent = scenario_agent_factory(settings.agent, settings.llm_config())(CallContext("c"))
    assert agent.greeting() == "Hello! How can I help you today?"
    fake.queue(Plan(deltas("Hi!")))
    assert said(await run(agent, speech("hello"))) == ["Hi!"]
    (request,) = fake.requests
    assert request.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == "azure-key" and "authorization" not in request.headers
    assert request.body["temperature"] == 0.4
    assert request.body["messages"][1] == {"role": "assistant", "content": "Hello! How can I help you today?"}
    assert [t["function"]["name"] for t in request.body["tools"]] == ["end_call"]
    await agent.member("Assistant").client.close()  # type: ignore[attr-defined]


def test_llm_settings_for_ollama() -> None:
    from parley.settings import load_settings

    config = load_settings(
        llm_provider="compatible", llm_base_url="http://localhost:11434/v1", llm_model="qwen2.5:0.5b"
    ).llm_config()
    assert (config.provider, config.base_url, config.model, config.api_key) == (
        "compatible",
        "http://localhost:11434/v1",
        "qwen2.5:0.5b",
        None,
    )


# --------------------------------------------------------------------------------------------
# Mistakes that must not surface in the middle of a call


@pytest.mark.parametrize(
    ("agents", "message"),
    [
        ('[{name: a, prompt: "Total {{ state.total + 1 }}"}]', "prompt fails to render at the start of a call"),
        (
            "[{name: a, prompt: hi, handoffs: [{to: card team}]}, {name: card team, prompt: hi}]",
            "cannot be a handoff target of an LLM agent",
        ),
        (
            '[{name: a, prompt: hi, tools: [{name: t, builtin: transfer, target: "555-1234"}]}]',
            "neither an E.164 phone number",
        ),
    ],
)
def test_mid_call_failures_are_caught_at_startup(tmp_path: Path, agents: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        load_scenario(write_yaml(tmp_path, f"name: S\nagents: {agents}\n"))


def test_webhook_header_needs_its_variable(
    tmp_path: Path, llm_defaults: LlmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    path = write_yaml(
        tmp_path,
        """\
        name: S
        agents:
          - name: a
            prompt: hi
            tools: [{name: t, webhook: {url: "https://x.example/t", headers: {Authorization: "Bearer ${NO_SUCH_TOKEN}"}}}]
        """,
    )
    with pytest.raises(ScenarioError, match=r"uses \$\{NO_SUCH_TOKEN\}, which is not set"):
        Scenario(load_scenario(path), llm_defaults)


async def test_a_template_failing_later_keeps_the_last_good_prompt(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call("""\
        name: S
        agents:
          - {name: a, prompt: "Hello{% if state.n %} {{ state.n + 1 }}{% endif %}."}
        """)
    fake.queue(Plan(deltas("One.")), Plan(deltas("Two.")))
    assert said(await run(agent, speech("hi"))) == ["One."]
    agent.session.state["n"] = "not a number"
    assert said(await run(agent, speech("again"))) == ["Two."]
    assert request_messages(fake, 1)[0]["content"] == "Hello."


async def test_tool_calls_in_the_last_round_are_not_run(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call(TOOLS_YAML.format(rounds=1))
    looping = Plan(tool_call("add_to_order", {"item": "salad"}))
    fake.queue(looping, looping)  # the server ignores tool_choice "none"
    outputs = await run(agent, speech("salad"))
    assert said(outputs) == ["Sorry, I'm having trouble answering right now. Could you say that again?"]
    assert len(agent.session.state["order"]) == 1


async def test_truncating_a_greeting_after_a_handoff(make_call: MakeScenario) -> None:
    agent = make_call("""\
        name: S
        agents:
          - name: desk
            intents: [{name: card, keywords: [card], reply: Sure thing., handoff: cards}]
            fallback: F.
            handoffs: [{to: cards, announce: Putting you through., then: greet}]
          - name: cards
            greeting: Hello, card team here, how can I help?
            intents: [{name: x, keywords: [x], reply: X.}]
            fallback: F.
        """)
    await run(agent, speech("card"))
    agent.truncate_last_reply("Sure thing. Putting you through. Hello, card")
    cards = agent.member("cards")
    assert cards.messages[-1] == {"role": "assistant", "content": "Hello, card"}  # type: ignore[attr-defined]


async def test_keys_are_noted_once_when_an_input_is_answered_again(make_call: MakeScenario, fake: FakeLlm) -> None:
    agent = make_call('name: S\nagents: [{name: a, prompt: "keys {{ dtmf }}"}]\n')
    fake.queue(Plan(deltas("A.")), Plan(deltas("B.")))
    press = UserInput("dtmf", digits="12")
    await run(agent, press)
    await run(agent, press)  # the same input again: the handler re-asks it when nothing was heard
    assert request_messages(fake, 1)[0]["content"] == "keys 12"


def test_history_sent_is_bounded_and_starts_at_a_caller_message() -> None:
    from parley.agents.llm import _recent

    system = {"role": "system", "content": "s"}
    turn = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "a"},
    ]
    messages = [system, *turn * 5]
    kept = _recent(messages, 6)
    assert kept[0] == system and kept[1]["role"] == "user" and len(kept) == 5
    assert _recent(messages[:5], 60) == messages[:5]


def test_agents_with_different_keys_get_their_own_client(llm_defaults: LlmConfig) -> None:
    from parley.agents.scenario import _shared_client

    clients: dict[tuple[object, ...], object] = {}
    first = _shared_client(llm_defaults, clients)
    assert _shared_client(llm_defaults.model_copy(update={"model": "other"}), clients) is first
    other_key = llm_defaults.model_copy(update={"api_key": SecretStr("another-key")})
    assert _shared_client(other_key, clients) is not first  # SecretStr reprs are all alike
