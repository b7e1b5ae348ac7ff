"""An LLM agent behind a real parley server: when the caller cuts a reply, the agent's history
keeps only what the caller heard (the real openai client against the local fake server)."""

from __future__ import annotations

from parley.agents.llm import LlmConfig, llm_agent_factory
from parley.audio import read_wav
from parley.caller import CallOptions, run_call
from parley.engines import build_engines
from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.testing.fake_llm import FakeLlm, Plan, deltas, tool_call

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
    config = LlmConfig(
        provider="compatible", base_url=f"{fake_server.url}/v1", model="fake", api_key="k", system_prompt="Be brief."
    )
    engines.agent_factory = llm_agent_factory(config)
    fake_server.reset()
    fake_server.queue(Plan(deltas(*LONG_REPLY, gap=0.05)), Plan(deltas("You pressed one.")))
    with BackgroundServer(settings, engines) as server:
        pcm = read_wav(speech_dir / "hours_16000.wav", 16000)
        # The caller asks, the agent answers at length, the caller presses 1 while it talks.
        report = await run_call(
            CallOptions(
                url=server.url,
                pcm=pcm,
                greeting_wait_s=0.3,
                dtmf=[(5.0, "1")],
                max_wait_s=8.0,
            )
        )
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


async def test_a_yaml_handoff_on_a_real_call(fake_server: FakeLlm, speech_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`--agent <scenario.yaml>` with PARLEY_LLM_* settings: the caller's question makes the first
    agent hand off (announced) to the second, which answers; both speak on the same call."""
    scenario = tmp_path / "desk.yaml"
    scenario.write_text(
        "name: Desk\n"
        "agents:\n"
        "  - name: desk\n"
        "    prompt: You route calls.\n"
        "    handoffs: [{to: hours, announce: Let me get our hours expert.}]\n"
        "  - name: hours\n"
        "    prompt: You know the opening hours of {{ facts.shop }}.\n"
        "facts: {shop: Tony's}\n"
    )
    settings = load_settings(
        host="127.0.0.1",
        port=0,
        event_log=False,
        greeting="",
        agent=str(scenario),
        llm_provider="compatible",
        llm_base_url=f"{fake_server.url}/v1",
        llm_api_key="k",
    )
    fake_server.reset()
    fake_server.queue(
        Plan(tool_call("transfer_to_hours", {"reason": "hours"})), Plan(deltas("We open at nine ", "every morning."))
    )
    with BackgroundServer(settings) as server:
        pcm = read_wav(speech_dir / "hours_16000.wav", 16000)
        report = await run_call(CallOptions(url=server.url, pcm=pcm, greeting_wait_s=0.3, max_wait_s=8.0))
    assert report.errors == []
    spoken = [e["text"] for e in report.events if e["event"] == "agent_text"]
    assert spoken == ["Let me get our hours expert.", "We open at nine every morning."]
    assert report.agent_audio_ms > 1000  # both were synthesized and played
    first, second = fake_server.requests[:2]
    assert first.body["messages"][0] == {"role": "system", "content": "You route calls."}
    assert second.body["messages"][0] == {"role": "system", "content": "You know the opening hours of Tony's."}
    assert second.body["messages"][-1]["role"] == "user"
