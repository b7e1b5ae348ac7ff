"""Every agent and synthesizer parley ships meets the Protocols it implements (parley.protocols),
and only those: the handler and the scenario find optional capabilities with isinstance."""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor

import pytest

from parley.agents.llm import LlmAgent, LlmConfig
from parley.agents.scenario import scenario_agent_factory
from parley.agents.scripted import ScriptedAgent, load_script, resolve_script_path
from parley.engines import plumbing_engines
from parley.protocols import (
    Agent,
    CallContext,
    KeepsHistory,
    MultiVoiceSynthesizer,
    ReportsEvents,
    SpeakingPreferences,
    Synthesizer,
    TruncatesReplies,
)
from parley.settings import load_settings
from parley.voice.azure import AzureSynthesizer
from parley.voice.espeak import EspeakSynthesizer
from parley.voice.piper import PiperSynthesizer

CONTEXT = CallContext("contract-test")
OPTIONAL = (SpeakingPreferences, TruncatesReplies, KeepsHistory, ReportsEvents)


def capabilities(agent: object) -> set[type]:
    return {protocol for protocol in OPTIONAL if isinstance(agent, protocol)}


def assert_agent(agent: object) -> None:
    assert isinstance(agent, Agent)
    # respond must be an async generator: the handler closes it (aclose) on barge-in.
    assert inspect.isasyncgenfunction(type(agent).respond)


def test_scripted_agent() -> None:
    agent = ScriptedAgent(load_script(resolve_script_path("pizza")), CONTEXT)
    assert_agent(agent)
    assert capabilities(agent) == {SpeakingPreferences, TruncatesReplies, KeepsHistory}


async def test_llm_agent() -> None:
    config = LlmConfig(provider="compatible", base_url="http://127.0.0.1:9/v1", api_key="unused", model="m")
    agent = LlmAgent(config, context=CONTEXT)
    try:
        assert_agent(agent)
        assert capabilities(agent) == {SpeakingPreferences, TruncatesReplies, KeepsHistory}
    finally:
        await agent.client.close()


def test_scenario_agent() -> None:
    """It passes truncation on to whichever member spoke, but has no history of its own."""
    agent = scenario_agent_factory("bank-desk")(CONTEXT)
    assert_agent(agent)
    assert capabilities(agent) == {SpeakingPreferences, TruncatesReplies, ReportsEvents}
    assert capabilities(agent.member(agent.active)) == {SpeakingPreferences, TruncatesReplies, KeepsHistory}


def test_plumbing_doubles() -> None:
    engines = plumbing_engines(load_settings(engines="plumbing"))
    agent = engines.agent_factory(CONTEXT)
    assert_agent(agent)
    assert capabilities(agent) == {SpeakingPreferences}
    synthesizer = engines.synthesizer_for(None)
    assert isinstance(synthesizer, Synthesizer)
    assert not isinstance(synthesizer, MultiVoiceSynthesizer)  # every voice is the one tone


@pytest.mark.parametrize("synthesizer", [EspeakSynthesizer, PiperSynthesizer, AzureSynthesizer])
def test_engine_synthesizers_speak_in_several_voices(synthesizer: type) -> None:
    assert issubclass(synthesizer, MultiVoiceSynthesizer)  # method-only Protocols check classes


def test_espeak_with_voice_returns_a_synthesizer() -> None:
    espeak = EspeakSynthesizer(ThreadPoolExecutor(1), "en-us")
    assert espeak.with_voice(None) is espeak
    other = espeak.with_voice("en-029")
    assert isinstance(other, Synthesizer) and other.voice == "en-029"
