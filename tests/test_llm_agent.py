"""LlmAgent and speakable text, against a local fake OpenAI-compatible server
(parley.testing.fake_llm: real HTTP, real SSE, the real openai SDK on the client side)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from parley.agents.llm import (
    DEFAULT_FALLBACK,
    LlmAgent,
    LlmConfig,
    build_client,
    entra_token_provider,
    llm_agent_factory,
)
from parley.agents.speakable import SpeakableStream, clean_inline, to_speakable
from parley.protocols import Agent, CallContext, Say, UserInput
from parley.testing.fake_llm import Chunk, FakeLlm, Plan, deltas
from parley.voice.clauses import split_clauses

# --------------------------------------------------------------------------------------------
# Speakable text (pure)


@pytest.mark.parametrize(
    ("markdown", "spoken"),
    [
        ("**Sure!** We open at *nine*.", "Sure! We open at nine."),
        ("Use the `menu` command, or __press__ _one_.", "Use the menu command, or press one."),
        ("~~Closed~~ Open today", "Closed Open today"),
        ("## Opening hours\nWe open at nine.", "Opening hours. We open at nine."),
        ("# Menu", "Menu."),
        ("Options:\n1. Pepperoni\n2. Margherita\n3. Hawaiian", "Options: Pepperoni, Margherita, Hawaiian."),
        ("We have\n- Pepperoni\n- Cheese\n\nWhich one?", "We have: Pepperoni, Cheese. Which one?"),
        ("* One\n+ Two\n• Three", "One, Two, Three."),
        ("1) Call us\n2) Visit us", "Call us, Visit us."),
        (
            "1. Preheat the oven to two hundred degrees first\n2. Bake it for twelve minutes",
            "Preheat the oven to two hundred degrees first. Bake it for twelve minutes.",
        ),
        ("- Open at nine.\n- Closed on Sundays!", "Open at nine. Closed on Sundays!"),
        ("See [our menu](https://example.com/menu).", "See our menu."),
        ("Photo: ![a pizza](https://x.y/p.png)", "Photo: a pizza"),
        ("[](https://example.com) here", "the link here"),
        ("Go to https://example.com/a?b=c. Thanks", "Go to the link. Thanks"),
        ("Visit www.example.com, or <https://x.org>", "Visit the link, or the link"),
        ("(see https://x.org/a)", "(see the link)"),
        ("Great 👍🏽 pizza 🍕! Family 👨‍👩‍👧 flag 🇺🇸 key 1️⃣", "Great pizza! Family flag key 1"),
        ("It's 20°C ☀️ and sunny ✅", "It's 20°C and sunny"),
        ("🎉 Welcome!", "Welcome!"),
        ("  lots   of\t\tspace \n\n here  ", "lots of space. here"),
        ("> A quote\n---\nDone.", "A quote. Done."),
        ("```python\nprint(1)\n```\nThat prints one.", "print(1). That prints one."),
        ("2 * 3 is six; snake_case stays", "2 times 3 is six; snake_case stays"),
        ("-5 degrees\n1.5 million\n2023 was good", "-5 degrees. 1.5 million. 2023 was good"),
        ("#1 choice, C# code", "#1 choice, C# code"),
        ("Line one<br>line two", "Line one line two"),
        ("Plain text stays as it is.", "Plain text stays as it is."),
        ("", ""),
    ],
)
def test_to_speakable(markdown: str, spoken: str) -> None:
    assert to_speakable(markdown) == spoken


@pytest.mark.parametrize(
    ("clause", "spoken"),
    [
        ("**Sure, we open", "Sure, we open"),  # bold split across clauses by the clause cutter
        ("at nine.** Then", "at nine. Then"),
        ("See [our menu,", "See our menu,"),
        ("the new one](https://x.com/m).", "the new one."),
        ("🍕🍕", ""),
        ("🍕: Pizza", "Pizza"),
    ],
)
def test_clean_inline_tolerates_markup_cut_across_clauses(clause: str, spoken: str) -> None:
    assert clean_inline(clause) == spoken


STREAM_SAMPLES = [
    "**Sure!** Here are the options:\n1. Pepperoni\n2. Margherita 🍕\n\nSee [menu](https://x.com).",
    "## Hours\r\nWe open at nine.\r\n\r\n> Note: closed Sundays\n>> nested\n***\nBye",
    "```\ncode here\n```\n12) twelve\n123 numbers\n-5 and --- dashes\n  - nested item\n- item",
    "Just one plain sentence, no markup at all.",
    "#hashtag\n####### seven\n1.\n#\n-\n",
]


@pytest.mark.parametrize("text", STREAM_SAMPLES)
def test_speakable_stream_matches_whole_text_in_any_pieces(text: str) -> None:
    rng = random.Random(7)
    for _ in range(20):
        stream = SpeakableStream()
        out, i = [], 0
        while i < len(text):
            size = rng.randint(1, 6)
            out.append(stream.push(text[i : i + size]))
            i += size
        assert clean_inline("".join(out) + stream.flush()) == to_speakable(text)


def test_speakable_stream_passes_text_on_at_once() -> None:
    stream = SpeakableStream()
    assert stream.push("We open at ") == "We open at "  # nothing held back mid-line
    assert stream.push("nine\n- Mon") == "nine:\nMon"  # a line start waits only for its marker
    assert stream.push("day\n") == "day"  # the separator waits for the next line's kind
    assert stream.push("- Tuesday") == ", Tuesday"
    assert stream.flush() == "."
    assert stream.push("1") == ""  # reset: "1" may be a list number
    assert stream.push("0 people") == "10 people"


@pytest.fixture
def fake(fake_server: FakeLlm) -> FakeLlm:
    fake_server.reset()
    return fake_server


MakeAgent = Callable[..., LlmAgent]


@pytest.fixture
async def make_agent(fake: FakeLlm, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeAgent]:
    """Agents on the fake server (compatible provider unless overridden); clients closed after."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_AD_TOKEN",
        "AZURE_OPENAI_ENDPOINT",
        "OPENAI_API_VERSION",
    ):
        monkeypatch.delenv(name, raising=False)
    agents: list[LlmAgent] = []

    def make(**overrides: Any) -> LlmAgent:
        fields: dict[str, Any] = {
            "provider": "compatible",
            "base_url": f"{fake.url}/v1",
            "model": "fake-model",
            "api_key": "test-key",
            "system_prompt": "Be brief.",
            "retry_backoff_s": 0.02,
        }
        fields.update(overrides)
        agent = LlmAgent(LlmConfig(**fields), context=CallContext(call_id="test"))
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.client.close()


async def collect(agent: Agent, user: UserInput) -> list[tuple[float, Say]]:
    """Every output with the time it arrived."""
    out = []
    async for output in agent.respond(user):
        assert isinstance(output, Say)
        out.append((time.monotonic(), output))
    return out


def speech(text: str) -> UserInput:
    return UserInput("speech", text=text)


def texts(outputs: list[tuple[float, Say]]) -> list[str]:
    return [say.text for _, say in outputs]


# --------------------------------------------------------------------------------------------
# Streaming, speakable, history


async def test_clauses_are_spoken_in_order_before_the_stream_ends(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(
        Plan(
            deltas(
                "Sure, I can ",
                "help with that. ",
                "We open at nine ",
                "in the morning, ",
                "and we close at ten at night. ",
                "Anything else?",
                gap=0.12,
            )
        )
    )
    agent = make_agent()
    assert isinstance(agent, Agent)
    started = time.monotonic()
    outputs = await collect(agent, speech("when are you open"))
    full = "Sure, I can help with that. We open at nine in the morning, and we close at ten at night. Anything else?"
    assert texts(outputs) == split_clauses(full)
    assert len(outputs) >= 3
    finished_t = fake.requests[0].finished_t
    assert finished_t is not None
    # The first clause is complete after the 2nd delta (~0.12 s): it must not wait for the end.
    first_t = outputs[0][0]
    assert first_t - started < 0.6
    assert first_t < finished_t - 0.3
    assert agent.last_outcome == "completed"


async def test_markdown_is_made_speakable(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(
        Plan(
            deltas(
                "**Sure!** Here ",
                "are our pizzas:\n",
                "1. Pepper",
                "oni\n2. Margherita 🍕",
                "\n3. Hawaiian\n\n",
                "See [our ",
                "menu](https://example.com/menu) or https://example.com. 😀",
            )
        )
    )
    outputs = await collect(make_agent(), speech("what pizzas do you have"))
    spoken = " ".join(texts(outputs))
    assert spoken == "Sure! Here are our pizzas: Pepperoni, Margherita, Hawaiian. See our menu or the link."
    assert not any(mark in spoken for mark in "*#[]()🍕😀")


async def test_history_holds_the_conversation(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(Plan(deltas("We open ", "at **nine**.")), Plan(deltas("Yes, ", "every day.")))
    agent = make_agent(greeting="Hi, Mario's pizza!", temperature=0.3, max_tokens=120)
    assert agent.greeting() == "Hi, Mario's pizza!"
    await collect(agent, speech("when do you open"))
    await collect(agent, UserInput("dtmf", digits="12#"))
    assert agent.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hi, Mario's pizza!"},
        {"role": "user", "content": "when do you open"},
        {"role": "assistant", "content": "We open at **nine**."},  # the full text generated
        {"role": "user", "content": "The caller pressed: 1 2 #"},
        {"role": "assistant", "content": "Yes, every day."},
    ]
    first, second = fake.requests
    assert first.path == "/v1/chat/completions"
    assert first.headers["authorization"] == "Bearer test-key"
    assert first.body["stream"] is True and first.body["model"] == "fake-model"
    assert first.body["temperature"] == 0.3 and first.body["max_tokens"] == 120
    assert first.body["messages"] == agent.messages[:3]
    assert second.body["messages"] == agent.messages[:5]


async def test_tool_call_deltas_are_ignored(fake: FakeLlm, make_agent: MakeAgent) -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    more = {"index": 0, "function": {"arguments": '{"q": "hours"}'}}
    fake.queue(Plan([Chunk(tool_call=call), Chunk(tool_call=more), *deltas("One moment, please.")]))
    agent = make_agent()
    outputs = await collect(agent, speech("hours"))
    assert texts(outputs) == ["One moment, please."]


async def test_empty_answer_says_the_fallback(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(Plan(deltas("🍕")))
    agent = make_agent()
    assert texts(await collect(agent, speech("hi"))) == [DEFAULT_FALLBACK]
    assert agent.messages[-1] == {"role": "assistant", "content": DEFAULT_FALLBACK}


# --------------------------------------------------------------------------------------------
# Timeouts, retries, failures


@pytest.mark.parametrize("where", ["headers", "first_chunk"])
async def test_slow_first_token_says_the_fallback_in_time(fake: FakeLlm, make_agent: MakeAgent, where: str) -> None:
    if where == "headers":
        fake.queue(Plan(deltas("Too late."), header_delay=3.0))
    else:
        fake.queue(Plan(deltas("Too late.", first_delay=3.0)))
    agent = make_agent(first_token_timeout_s=0.3, fallback_text="Sorry, say that again?")
    started = time.monotonic()
    outputs = await collect(agent, speech("hello"))
    assert texts(outputs) == ["Sorry, say that again?"]
    assert outputs[0][0] - started < 0.3 + 0.15
    assert agent.last_outcome == "first_token_timeout"
    assert fake.requests[0].disconnected.wait(1.0)  # the abandoned request was closed
    assert agent.messages[-1] == {"role": "assistant", "content": "Sorry, say that again?"}


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retryable_status_then_success(fake: FakeLlm, make_agent: MakeAgent, status: int) -> None:
    fake.queue(Plan(status=status), Plan(deltas("Here you go.")))
    agent = make_agent()
    assert texts(await collect(agent, speech("hi"))) == ["Here you go."]
    assert len(fake.requests) == 2
    assert fake.requests[1].body == fake.requests[0].body


async def test_disconnect_before_the_first_token_is_retried(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(Plan([], end="disconnect"), Plan(deltas("Second try.")))
    assert texts(await collect(make_agent(), speech("hi"))) == ["Second try."]
    assert len(fake.requests) == 2


async def test_retries_are_bounded_then_fallback(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(*[Plan(status=500)] * 3, Plan(deltas("Never asked for.")))
    agent = make_agent(max_retries=2)
    assert texts(await collect(agent, speech("hi"))) == [DEFAULT_FALLBACK]
    assert len(fake.requests) == 3
    assert agent.last_outcome == "failed"


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_client_errors_are_not_retried(fake: FakeLlm, make_agent: MakeAgent, status: int) -> None:
    fake.queue(Plan(status=status), Plan(deltas("Never asked for.")))
    assert texts(await collect(make_agent(), speech("hi"))) == [DEFAULT_FALLBACK]
    assert len(fake.requests) == 1


async def test_server_error_after_the_first_token_ends_with_what_was_said(fake: FakeLlm, make_agent: MakeAgent) -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": 500}}
    fake.queue(
        Plan([*deltas("We open at nine. ", "And we clo"), Chunk(raw=error)]),
        Plan(deltas("A retry would start over.")),
    )
    agent = make_agent()
    outputs = await collect(agent, speech("hours"))
    assert texts(outputs) == ["We open at nine."]  # the unfinished clause is not spoken
    assert len(fake.requests) == 1  # no retry after the first token
    assert agent.last_outcome == "failed"
    assert agent.messages[-1] == {"role": "assistant", "content": "We open at nine."}


async def test_disconnect_mid_stream_ends_cleanly(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(Plan(deltas("Hello there, how are you ", "doing today? I am ", "fine and"), end="disconnect"))
    agent = make_agent()
    outputs = await collect(agent, speech("hi"))  # no exception reaches the caller
    assert texts(outputs) == split_clauses("Hello there, how are you doing today?")
    assert len(fake.requests) == 1
    assert agent.last_outcome == "failed"


async def test_total_timeout_stops_the_reply(fake: FakeLlm, make_agent: MakeAgent) -> None:
    words = [f"word{i}, and " if i % 5 == 4 else f"word{i} " for i in range(200)]
    fake.queue(Plan(deltas("This is a long answer. ", *words, gap=0.02), end="hang"))
    agent = make_agent(total_timeout_s=0.5)
    started = time.monotonic()
    outputs = await collect(agent, speech("tell me everything"))
    assert 0.45 < time.monotonic() - started < 0.8
    assert texts(outputs)[0] == "This is a long answer."
    assert agent.last_outcome == "total_timeout"
    assert fake.requests[0].disconnected.wait(1.0)
    assert agent.messages[-1]["content"] == " ".join(texts(outputs))


# --------------------------------------------------------------------------------------------
# Cancellation (barge-in)


async def _cancel_after_first_say(agent: LlmAgent, *, busy_consumer: bool) -> tuple[float, list[str]]:
    """Start a reply on a never-ending stream, cancel the consumer after its first Say.

    busy_consumer=False: the consumer is waiting for the next Say (inside the agent) when it is
    cancelled. True: it is busy elsewhere (synthesising the clause) with the agent suspended at a
    yield; `aclosing` then closes the agent's generator. Returns the cancel time and the Says.
    """
    first = asyncio.Event()
    said: list[str] = []

    async def consume() -> None:
        async with contextlib.aclosing(agent.respond(speech("hi"))) as outputs:
            async for output in outputs:
                assert isinstance(output, Say)
                said.append(output.text)
                first.set()
                if busy_consumer:
                    await asyncio.sleep(30)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    await asyncio.sleep(0.02)  # the consumer is now parked where the test wants it
    cancelled_t = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return cancelled_t, said


@pytest.mark.parametrize("busy_consumer", [False, True])
async def test_cancel_closes_the_stream_at_once(fake: FakeLlm, make_agent: MakeAgent, busy_consumer: bool) -> None:
    fake.queue(Plan(deltas("Hello, I can help you. ", "Let me"), end="hang"))
    agent = make_agent()
    cancelled_t, said = await _cancel_after_first_say(agent, busy_consumer=busy_consumer)
    assert said == ["Hello, I can help you."]
    assert agent.last_stream_closed_t is not None
    assert agent.last_stream_closed_t - cancelled_t < 0.2
    assert agent.last_outcome == "cancelled"
    record = fake.requests[0]
    assert await asyncio.to_thread(record.disconnected.wait, 2.0), "the server never saw the disconnect"
    assert record.disconnected_t is not None and record.disconnected_t - cancelled_t < 0.2
    # Not truncated yet: the history holds everything received (the handler truncates next). A
    # busy consumer never asked for the second delta, so it was never read.
    received = "Hello, I can help you. " if busy_consumer else "Hello, I can help you. Let me"
    assert agent.messages[-1] == {"role": "assistant", "content": received}


async def test_cancel_latency_benchmark(fake: FakeLlm, make_agent: MakeAgent) -> None:
    """Cancel -> HTTP stream closed, over repeated runs (printed: run with -s to see it)."""
    agent = make_agent()
    results: dict[str, list[float]] = {
        "stream closed, consumer waiting": [],
        "stream closed, consumer busy": [],
        "server saw the disconnect": [],
    }
    for run in range(40):
        busy = run % 2 == 1
        fake.queue(Plan(deltas("Hello, I can help you. ", "Let me"), end="hang"))
        cancelled_t, _ = await _cancel_after_first_say(agent, busy_consumer=busy)
        assert agent.last_stream_closed_t is not None
        results[f"stream closed, consumer {'busy' if busy else 'waiting'}"].append(
            agent.last_stream_closed_t - cancelled_t
        )
        record = fake.requests[-1]
        assert await asyncio.to_thread(record.disconnected.wait, 2.0)
        assert record.disconnected_t is not None
        results["server saw the disconnect"].append(record.disconnected_t - cancelled_t)
    for name, values in results.items():
        values.sort()
        median, p95 = statistics.median(values), values[int(0.95 * (len(values) - 1))]
        print(
            f"\ncancel -> {name} (n={len(values)}): "
            f"median {median * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms, max {values[-1] * 1000:.2f} ms"
        )
        assert median < 0.05


async def test_truncate_last_reply(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(Plan(deltas("We open at nine, ", "and close at ten.")), Plan(deltas("Sure thing.")))
    agent = make_agent()
    await collect(agent, speech("hours"))
    agent.truncate_last_reply("We open at nine,")
    assert agent.messages[-1] == {"role": "assistant", "content": "We open at nine,"}
    await collect(agent, speech("and pizza"))
    agent.on_interrupted("  ")  # nothing heard: the entry goes, nothing is added
    assert agent.messages[-1] == {"role": "user", "content": "and pizza"}
    assert agent.messages[-2] == {"role": "assistant", "content": "We open at nine,"}


async def test_truncate_right_after_cancel_wins_over_cleanup(fake: FakeLlm, make_agent: MakeAgent) -> None:
    """The handler cancels the turn task and truncates at once, before the agent's cleanup ran."""
    fake.queue(Plan(deltas("Hello, I can help you. ", "Let me"), end="hang"))
    agent = make_agent()
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in agent.respond(speech("hi")):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    await asyncio.sleep(0.02)
    task.cancel()
    agent.truncate_last_reply("Hello, I can")  # synchronous, like MediaHandler._barge_in
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert agent.messages[-1] == {"role": "assistant", "content": "Hello, I can"}


async def test_truncate_before_any_text_leaves_earlier_replies(fake: FakeLlm, make_agent: MakeAgent) -> None:
    fake.queue(Plan(deltas("First answer.")), Plan(deltas("Late.", first_delay=5.0)))
    agent = make_agent()
    await collect(agent, speech("one"))
    task = asyncio.create_task(collect(agent, speech("two")))
    await asyncio.sleep(0.1)  # waiting for the first token
    task.cancel()
    agent.truncate_last_reply("", forget_input=True)  # nothing heard; the input will be re-asked
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert agent.messages[1:] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "First answer."},
    ]


# --------------------------------------------------------------------------------------------
# Providers and configuration


async def test_azure_api_key(fake: FakeLlm, make_agent: MakeAgent) -> None:
    agent = make_agent(
        provider="azure",
        base_url=None,
        azure_endpoint=fake.url,
        model="my-gpt",
        api_version="2024-10-21",
        api_key="azure-key",
    )
    assert texts(await collect(agent, speech("hi"))) == ["Hello there."]
    (request,) = fake.requests
    assert request.path == "/openai/deployments/my-gpt/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == "azure-key"
    assert "authorization" not in request.headers


@pytest.mark.parametrize("kind", ["sync_provider", "async_provider", "token"])
async def test_azure_entra_token(fake: FakeLlm, make_agent: MakeAgent, kind: str) -> None:
    async def async_provider() -> str:
        return "entra-token"

    credentials: dict[str, dict[str, Any]] = {
        "sync_provider": {"azure_ad_token_provider": lambda: "entra-token"},
        "async_provider": {"azure_ad_token_provider": async_provider},
        "token": {"azure_ad_token": "entra-token"},
    }
    credential = credentials[kind]
    agent = make_agent(
        provider="azure",
        base_url=None,
        azure_endpoint=fake.url,
        model="dep",
        api_version="2024-10-21",
        api_key=None,
        **credential,
    )
    assert texts(await collect(agent, speech("hi"))) == ["Hello there."]
    (request,) = fake.requests
    assert request.path == "/openai/deployments/dep/chat/completions"
    assert request.headers["authorization"] == "Bearer entra-token"
    assert "api-key" not in request.headers


async def test_compatible_server_needs_no_api_key(fake: FakeLlm, make_agent: MakeAgent) -> None:
    agent = make_agent(api_key=None)
    assert texts(await collect(agent, speech("hi"))) == ["Hello there."]
    assert fake.requests[0].headers["authorization"].startswith("Bearer ")


async def test_factory_shares_one_client(fake: FakeLlm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = LlmConfig(provider="compatible", base_url=f"{fake.url}/v1", greeting="Hello!")
    factory = llm_agent_factory(config)
    one, two = factory(CallContext("a")), factory(CallContext("b"))
    assert isinstance(one, LlmAgent) and isinstance(two, LlmAgent)
    assert one.client is two.client
    assert one.greeting() == "Hello!" and one.messages is not two.messages
    await one.client.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"provider": "compatible"}, "needs base_url"),
        ({"provider": "openai", "azure_endpoint": "https://x"}, "only apply to provider 'azure'"),
        ({"provider": "azure", "base_url": "http://x"}, "not base_url"),
        ({"provider": "azure", "api_key": "k", "azure_ad_token": "t"}, "only one of"),
        ({"first_token_timeout_s": 0}, "greater than 0"),
        ({"bogus": 1}, "Extra inputs"),
    ],
)
def test_config_rejects_mistakes(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LlmConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"provider": "openai"}, "OPENAI_API_KEY"),
        ({"provider": "azure", "api_version": "v", "api_key": "k"}, "azure_endpoint"),
        ({"provider": "azure", "azure_endpoint": "https://x", "api_key": "k"}, "api_version"),
        ({"provider": "azure", "azure_endpoint": "https://x", "api_version": "v"}, "needs api_key"),
    ],
)
def test_build_client_explains_missing_settings(
    fields: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "OPENAI_API_KEY",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_AD_TOKEN",
        "AZURE_OPENAI_ENDPOINT",
        "OPENAI_API_VERSION",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        build_client(LlmConfig(**fields))


def test_config_hides_secrets() -> None:
    config = LlmConfig(provider="azure", azure_endpoint="https://x", api_key="s3cret")
    assert "s3cret" not in repr(config)


def test_entra_token_provider_without_azure_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    with pytest.raises(ValueError, match="azure-identity"):
        entra_token_provider()
