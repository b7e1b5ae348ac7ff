"""An LLM agent behind a real parley server: when the caller cuts a reply, the agent's history
keeps only what the caller heard (the real openai client against the local fake server)."""

from __future__ import annotations

from parley.agents.llm import LlmConfig, llm_agent_factory
from parley.audio import read_wav
from parley.caller import CallOptions, run_call
from parley.engines import build_engines
from parley.server import BackgroundServer
from parley.settings import load_settings
from tests.test_llm_agent import FakeLlm, Plan, deltas
from tests.test_llm_agent import fake_server  # noqa: F401 (the fake server fixture, one per module)

LONG_REPLY = [
    "We're open every day from eleven in the morning, ",
    "and on weekdays the kitchen stays open until ten at night. ",
    "On Fridays and Saturdays we stay open until midnight, ",
    "and on public holidays we open at noon. ",
    "Delivery runs until half an hour before closing, ",
    "and pickup orders can be placed until closing time.",
]


async def test_a_cut_reply_is_remembered_as_heard(fake_server: FakeLlm, speech_dir) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(host="127.0.0.1", port=0, event_log=False, greeting="")
    engines = build_engines(settings)
    config = LlmConfig(provider="compatible", base_url=f"{fake_server.url}/v1", model="fake", api_key="k",
                       system_prompt="Be brief.")
    engines.agent_factory = llm_agent_factory(config)
    fake_server.queue(Plan(deltas(*LONG_REPLY, gap=0.05)), Plan(deltas("You pressed one.")))
    with BackgroundServer(settings, engines) as server:
        pcm = read_wav(speech_dir / "hours_16000.wav", 16000)
        # The caller asks, the agent answers at length, the caller presses 1 while it talks.
        report = await run_call(CallOptions(
            url=server.url, pcm=pcm, greeting_wait_s=0.3, dtmf=[(5.0, "1")], max_wait_s=8.0,
        ))
    assert report.errors == []
    cancelled = [e for e in report.events if e["event"] == "turn_cancelled" and "heard_text" in e]
    assert cancelled, [e["event"] for e in report.events]
    heard = cancelled[0]["heard_text"]
    assert heard and heard != " ".join(part.strip() for part in LONG_REPLY)
    # The request that answers the key press carries the history: the cut reply as heard.
    assert len(fake_server.requests) >= 2
    history = fake_server.requests[1].body["messages"]
    assistant = [m["content"] for m in history if m["role"] == "assistant"]
    assert assistant[-1] == heard
    assert history[-1] == {"role": "user", "content": history[-1]["content"]}
    assert "1" in history[-1]["content"]
