"""docs/extending.md's example agent (examples/echo_agent.py) answers real calls, so the page
cannot rot: a real server with the embedded engines, real speech, the real ACS protocol."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from parley.caller import CallOptions, CallReport, run_call
from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.voice.espeak import EspeakSynthesizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "echo_agent.py"


def load_example() -> ModuleType:
    """The example as a user runs it: a file, not part of the parley package."""
    spec = importlib.util.spec_from_file_location("echo_agent", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def echo_server() -> Iterator[BackgroundServer]:
    settings = load_settings(host="127.0.0.1", port=0, event_log=False)
    server = BackgroundServer(settings, load_example().echo_engines(settings)).start()
    yield server
    server.stop()


def completed_texts(report: CallReport) -> list[str]:
    return [event.get("text", "") for event in report.events if event["event"] == "turn_completed"]


async def test_the_echo_agent_says_back_what_the_caller_said(echo_server: BackgroundServer, speech_dir: Path) -> None:
    report = await run_call(CallOptions(url=echo_server.url, audio=speech_dir / "hours_16000.wav"))
    assert report.errors == []
    texts = completed_texts(report)
    assert any("Echo here" in text for text in texts), texts  # its greeting
    assert any(text.startswith("You said:") and "opening" in text.lower() for text in texts), texts
    assert not report.hung_up_by_server


async def test_the_echo_agent_hangs_up_after_goodbye(echo_server: BackgroundServer, voice: EspeakSynthesizer) -> None:
    goodbye = np.frombuffer(voice.synthesize_blocking("goodbye", 16000), dtype=np.int16)
    report = await run_call(CallOptions(url=echo_server.url, pcm=goodbye))
    assert report.errors == []
    assert any(text.endswith("Goodbye!") for text in completed_texts(report)), completed_texts(report)
    assert report.hung_up_by_server
    ended = [event for event in report.events if event["event"] == "call_ended"]
    assert ended and ended[0]["reason"] == "caller_said_goodbye"
