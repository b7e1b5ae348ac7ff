"""The talk page in a real Chromium against a real server (embedded defaults: Silero VAD,
pocketsphinx + Whisper, Piper): the page connects, the caller's words come back as captions, the
agent's reply reaches the player, and the caller talking over the agent flushes the player and
marks the timeline.

The caller is Chromium's fake microphone fed from a WAV made with Piper (parley.testing.browser):
silence, then the question while the greeting is still playing (a barge-in), then silence for the
answer. Chromium loops the file; the test ends before the second round matters.

Set PARLEY_WEB_SCREENSHOT=path.png to keep a screenshot of the page mid-conversation (docs/images).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parley.audio import write_wav
from parley.server import BackgroundServer
from parley.settings import load_settings
from parley.testing.browser import FAKE_AUDIO_RATE, launch_chromium, require_browser
from tests.conftest import HOURS_PHRASE, TEST_GREETING, make_server

TOKEN = "talk-page-token_0123456789"
LEAD_S = 1.2  # silence before the question: the greeting (~3 s) is playing when it starts
ANSWER_S = 9.0  # silence after it, while the agent answers


@pytest.fixture(scope="module")
def caller_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone's file: silence, the question (Piper's voice), silence; at Chromium's rate."""
    require_browser()  # before the voice is loaded: a machine without a browser skips at once
    from parley.voice.piper import load_default_piper

    with ThreadPoolExecutor(1) as executor:
        speech = np.frombuffer(
            load_default_piper(executor).synthesize_blocking(HOURS_PHRASE, FAKE_AUDIO_RATE), dtype=np.int16
        )
    silence = np.zeros(int(FAKE_AUDIO_RATE * LEAD_S), dtype=np.int16)
    after = np.zeros(int(FAKE_AUDIO_RATE * ANSWER_S), dtype=np.int16)
    path = tmp_path_factory.mktemp("browser") / "caller.wav"
    write_wav(path, np.concatenate([silence, speech, after]), FAKE_AUDIO_RATE)
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    require_browser()
    srv = make_server(greeting=TEST_GREETING)
    yield srv
    srv.stop()


def wait_for(page: Any, expression: str, timeout_s: float) -> Any:
    """Poll a page expression until it is truthy (a deadline, no fixed sleeps)."""
    page.wait_for_function(expression, timeout=timeout_s * 1000, polling=100)
    return page.evaluate(expression)


def test_talking_to_the_agent_in_a_real_browser(server: BackgroundServer, caller_wav: Path) -> None:
    with launch_chromium(fake_audio=caller_wav) as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.http_url + "/")
        wait_for(page, "document.querySelector('#agent option[value=\"pizza\"]')", 10)
        page.click("#talk-button")
        wait_for(page, "window.parley.state === 'live'", 15)
        assert page.get_attribute("#talk-button", "aria-pressed") == "true"

        # The greeting plays: its frames reach the player worklet.
        wait_for(page, "window.parley.framesPlayed >= 10", 15)
        # The question, over the greeting: the player is flushed and the timeline says so.
        wait_for(page, "window.parley.flushes >= 1", 20)
        markers = page.evaluate("window.parley.markers.map(m => m.kind)")
        assert "flush" in markers
        assert {"pause", "barge-in"} & set(markers), markers
        assert page.locator("#timeline .marker.flush").count() >= 1
        # The caller's words as a caption, then the answer played.
        captions = wait_for(page, "window.parley.captions.length && window.parley.captions", 20)
        assert any("hour" in caption.lower() or "open" in caption.lower() for caption in captions), captions
        wait_for(page, "window.parley.agentText.some(t => /eleven|hours/i.test(t))", 20)
        played = page.evaluate("window.parley.framesPlayed")
        wait_for(page, f"window.parley.framesPlayed >= {played + 50}", 15)  # a second of the answer
        if shot := os.environ.get("PARLEY_WEB_SCREENSHOT"):
            page.screenshot(path=shot, full_page=True)
        figures = page.evaluate("window.parley.figures.map(f => f.name)")
        assert "voice_to_voice" in figures or "bargein_onset_to_stop" in figures, figures
        stats: dict[str, Any] = page.evaluate("window.parley")
        assert stats["framesSent"] > 100 and stats["framesDropped"] == 0
        assert page.locator(".captions .caller.final").count() >= 1

        page.click("#talk-button")  # hang up
        wait_for(page, "window.parley.state === 'idle'", 10)
        assert "Call ended" in (page.text_content("#status") or "")
        assert not errors


def test_the_worklet_resampler_keeps_speech_and_drops_what_16_khz_cannot_carry(server: BackgroundServer) -> None:
    """The worklet's resampler, run in Chromium: a 1 kHz tone passes 48 kHz -> 16 kHz whole, a 10 kHz
    one (which sample dropping would fold to 6 kHz) is filtered out; 16 kHz -> 48 kHz keeps a tone."""
    with launch_chromium() as browser:
        page = browser.new_page()
        page.goto(server.http_url + "/")
        levels = page.evaluate(
            """async () => {
              const source = await (await fetch('/static/audio-worklet.js')).text();
              const scope = { sampleRate: 48000, AudioWorkletProcessor: class {}, registerProcessor() {} };
              const Resampler = new Function(...Object.keys(scope), source + '; return Resampler;')(...Object.values(scope));
              const rms = (inRate, outRate, hz) => {
                const r = new Resampler(inRate, outRate);
                const out = [];
                for (let n = 0; n < inRate; n += 128) {
                  const block = new Float32Array(128).map((_, i) => 0.5 * Math.sin(2 * Math.PI * hz * (n + i) / inRate));
                  r.push(block);
                  while (r.canProduce()) out.push(r.next());
                }
                const tail = out.slice(200);
                return [out.length, Math.sqrt(tail.reduce((s, v) => s + v * v, 0) / tail.length)];
              };
              return [rms(48000, 16000, 1000), rms(48000, 16000, 10000), rms(16000, 48000, 1000), rms(44100, 16000, 9000)];
            }"""
        )
    full = 0.5 / 2**0.5
    (n_down, kept), (_, folded), (n_up, up), (_, folded_44k) = levels
    assert abs(n_down - 16000) < 20 and abs(n_up - 48000) < 60  # the rates, to a kernel's length
    assert abs(kept - full) < 0.01 and abs(up - full) < 0.01
    assert folded < 0.01 * full and folded_44k < 0.05 * full


def test_the_page_works_at_360_px(server: BackgroundServer) -> None:
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 360, "height": 740})
        page.goto(server.http_url + "/")
        wait_for(page, "document.querySelector('#agent option[value=\"pizza\"]')", 10)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, f"the page scrolls sideways at 360 px ({width} px wide)"
        assert page.locator("#talk-button").is_visible()
        assert page.get_by_role("button", name="Talk").is_enabled()


def test_a_refused_socket_says_so_on_the_page(tmp_path: Path) -> None:
    """A server whose browser channel refuses the page (here: a non-loopback bind without a token)."""
    require_browser()
    settings = load_settings(host="0.0.0.0", port=0, event_log=False, engines="plumbing", engine_pool_warm=0)
    srv = BackgroundServer(settings).start()
    try:
        with launch_chromium() as browser:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{srv.port}/")
            wait_for(page, "document.querySelector('#agents-status').textContent.includes('403')", 10)
            page.click("#talk-button")
            error = wait_for(page, "window.parley.error", 15)
            assert "refused" in error
            assert page.get_attribute("#status", "data-state") == "error"
            assert page.evaluate("window.parley.state") == "idle"
    finally:
        srv.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_off_loopback_the_page_connects_with_the_token_it_was_given() -> None:
    """A server on every interface with PARLEY_API_TOKEN and its own origin allowed: the page, given
    the token once, lists the agents and opens the socket with the token as a subprotocol."""
    require_browser()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    settings = load_settings(
        host="0.0.0.0",
        port=port,
        event_log=False,
        engines="plumbing",
        engine_pool_warm=0,
        greeting=TEST_GREETING,
        api_token=TOKEN,
        allowed_origins=[origin],
    )
    srv = BackgroundServer(settings).start()
    try:
        with launch_chromium() as browser:
            page = browser.new_page()
            page.goto(origin + "/")
            wait_for(page, "document.querySelector('#agents-status').textContent.includes('401')", 10)
            page.fill("#token", "wrong-token")
            page.click("#token-form button")
            page.click("#talk-button")
            assert "refused" in wait_for(page, "window.parley.error", 15)

            page.fill("#token", TOKEN)
            page.click("#token-form button")
            wait_for(page, "document.querySelector('#agent option[value=\"pizza\"]')", 10)
            page.click("#talk-button")
            wait_for(page, "window.parley.state === 'live'", 15)
            wait_for(page, "window.parley.framesPlayed >= 10", 15)  # the greeting, played
            page.click("#talk-button")
            wait_for(page, "window.parley.state === 'idle'", 10)

            page.reload()  # the token is kept for the tab
            assert page.input_value("#token") == TOKEN
            wait_for(page, "document.querySelector('#agent option[value=\"pizza\"]')", 10)
    finally:
        srv.stop()
