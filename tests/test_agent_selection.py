"""Per-call agents: `?agent=NAME` on a media URL (only agents the server loaded), the agent named
in a channel's handshake (Twilio's `start` parameters), ACS incoming calls by the called number."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from parley.acs.config import media_url
from parley.agents.scenario import Scenario, load_scenario, resolve_agent_path
from parley.engines import Engines, recognizer_pool, vad_pool
from parley.media.handler import MediaHandler
from parley.server import BackgroundServer, describe_agent
from parley.settings import Settings, SettingsError, load_settings
from parley.speech.vad import SileroVad
from parley.testing.doubles import RecognizerDouble, SynthesizerDouble
from parley.transports import acs
from parley.transports.wire import StreamStarted

BANK_GREETING = "Welcome to Riverside Bank"
PIZZA_GREETING = "Tony's Pizza"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"port": 0, "event_log": False, "engine_pool_warm": 0, "agents": ["bank"]}
    return load_settings(**(values | overrides))


def scripted_engines(config: Settings) -> Engines:
    """The real scripted agents of the packaged scenarios, with recognizer and voice doubles."""
    scenarios = {name: Scenario(load_scenario(resolve_agent_path(name)), None) for name in config.agent_names}
    synthesizer = SynthesizerDouble()
    return Engines(
        vads=vad_pool(SileroVad, max_idle=2),
        recognizers=recognizer_pool(RecognizerDouble, max_idle=2),
        synthesizer_for=lambda _voice: synthesizer,
        agent_factory=scenarios[config.agent].agent,
        agent_factories={name: scenario.agent for name, scenario in scenarios.items()},
    )


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    config = settings()
    running = BackgroundServer(config, scripted_engines(config)).start()
    yield running
    running.stop()


async def greeting_of(server: BackgroundServer, call_id: str, query: str = "") -> str:
    """Open a media socket for `call_id`, start the audio, and read the agent's greeting from the call."""
    async with connect(f"ws://127.0.0.1:{server.port}/ws/acs?callId={call_id}{query}") as ws:
        await ws.send(acs.audio_metadata_message(acs.AudioFormat.for_rate(16000)))
        for _ in range(200):
            session = server.registry.session(call_id)
            if session is not None:
                return str(session.agent.greeting())
            await asyncio.sleep(0.02)
    raise AssertionError("the call never started")


async def test_the_default_agent_without_a_choice(server: BackgroundServer) -> None:
    assert PIZZA_GREETING in await greeting_of(server, "default-1")


async def test_a_call_asks_for_a_loaded_agent(server: BackgroundServer) -> None:
    assert BANK_GREETING in await greeting_of(server, "bank-1", "&agent=bank")


async def test_an_agent_not_loaded_is_refused_before_accept(server: BackgroundServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{server.port}/ws/acs?callId=x&agent=bank-desk")
    assert refused.value.response.status_code == 400
    assert b"unknown_agent" in (refused.value.response.body or b"")
    assert b"pizza, bank" in (refused.value.response.body or b"") or b"bank, pizza" in (
        refused.value.response.body or b""
    )


@pytest.mark.usefixtures("no_media_start")
def test_the_handshake_may_name_the_agent() -> None:
    """Twilio names the agent only in `start` (after accept): the default made at connect is replaced."""
    config = settings()
    handler = MediaHandler(call_id="t-1", settings=config, engines=scripted_engines(config))
    assert PIZZA_GREETING in handler.agent.greeting()
    started = StreamStarted(acs.AudioFormat.for_rate(16000), "CA1", {"agent": "bank"})
    handler._on_stream_started(started)
    assert handler.agent_name == "bank" and BANK_GREETING in handler.agent.greeting()
    assert [event["agent"] for event in handler.events.of("agent_selected")] == ["bank"]


@pytest.mark.usefixtures("no_media_start")
def test_a_handshake_naming_an_unknown_agent_keeps_the_default() -> None:
    config = settings()
    handler = MediaHandler(call_id="t-2", settings=config, engines=scripted_engines(config))
    handler._on_stream_started(StreamStarted(acs.AudioFormat.for_rate(16000), "CA2", {"agent": "nope"}))
    assert handler.agent_name == "" and PIZZA_GREETING in handler.agent.greeting()
    assert handler.input_errors == 1
    assert "does not load" in handler.events.of("input_error")[0]["error"]


@pytest.fixture
def no_media_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake tests stop at the media start (it needs a running writer)."""
    monkeypatch.setattr(MediaHandler, "_on_metadata", lambda self, fmt: None, raising=True)


# ---------------------------------------------------------------------------- settings


def test_agents_by_number_from_pairs_or_json() -> None:
    pairs = settings(agents_by_number="+1 (425) 555-0100=bank, +14255550101=pizza")
    as_json = settings(agents_by_number=json.dumps({"+14255550100": "bank"}))
    for config in (pairs, as_json):
        assert config.agent_for_number("+14255550100") == "bank"
        assert config.agent_for_number("tel:+1-425-555-0100") == "bank"
        assert config.agent_for_number("4:+14255550100") == "bank"  # ACS's phone-number raw id
        assert config.agent_for_number("+19999999999") is None
    assert pairs.agent_for_number("+14255550101") == "pizza"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("+1=nope", "not loaded: nope"),
        ("+1", "is not key=value"),
        ("=bank", "is not key=value"),
        ("{not json", "not a JSON object"),
    ],
)
def test_bad_agents_by_number_are_named(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as error:
        settings(agents_by_number=value)
    assert message in str(error.value)


def test_agent_names_are_the_default_first_each_once() -> None:
    assert settings(agents="bank,pizza,bank").agent_names == ["pizza", "bank"]
    assert settings(agents=[]).agent_names == ["pizza"]


def test_the_startup_line_names_the_agents_a_call_may_choose() -> None:
    config = settings()
    assert describe_agent(config, scripted_engines(config)) == "agent pizza; a call may ask for bank (?agent=NAME)"


def test_acs_media_url_carries_the_agent() -> None:
    url = media_url("https://parley.example.org", "k1", "+1425", "bank")
    assert url == "wss://parley.example.org/ws/acs?callId=k1&callerId=%2B1425&agent=bank"
    assert "agent" not in media_url("https://parley.example.org", "k1", "")


@pytest.mark.usefixtures("no_media_start")
def test_the_handshake_names_the_caller_for_the_agents_prompts() -> None:
    config = settings()
    handler = MediaHandler(call_id="t-3", settings=config, engines=scripted_engines(config))
    handler._on_stream_started(StreamStarted(acs.AudioFormat.for_rate(16000), "CA3", {"from": "+14255550199"}))
    assert handler.caller_id == "+14255550199" and handler.agent_name == ""
    assert not handler.events.of("agent_selected")
    assert handler.events.of("stream_started")[0]["parameters"] == ["from"]  # names, never the number
