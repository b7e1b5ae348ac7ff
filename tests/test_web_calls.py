"""The calls console (/calls) and the APIs it reads: `GET /api/calls/live` (the live sessions and
their state), `GET /api/calls/{id}/turns` (turn rows with their figures), on real servers with real
calls; then the page itself in a real Chromium: a barge-in call listed live, then its timeline with
the barge-in and its figures, a token asked for and used, the records API off said so, and a page of
another origin refused.

`PARLEY_CALLS_SCREENSHOT=docs/images/calls.png pytest tests/test_web_calls.py -k timeline` saves the
console with the call's timeline open (the picture in docs/web.md)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from parley.caller import CallOptions, CallReport, run_call
from parley.records.live import call_state, masked_caller
from parley.server import BackgroundServer
from parley.testing.browser import launch_chromium, require_browser
from tests.conftest import TEST_GREETING, make_server

TOKEN = "console-test-token"
WAIT_S = 30.0  # generous: a busy 2-core machine; nothing here is a timing assertion


def wait_for(what: str, check: Callable[[], Any], within_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class CallInBackground:
    """A simulated caller's barge-in call on its own thread (the test drives a browser meanwhile)."""

    def __init__(self, server: BackgroundServer, pcm: np.ndarray, caller: str = "+15551234567") -> None:
        url = f"{server.url}?callerId={caller.replace('+', '%2B')}"
        self.options = CallOptions(url=url, pcm=pcm, barge_in_at=1.0, max_wait_s=5.0)
        self.report: CallReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="console-test-call", daemon=True)

    def _run(self) -> None:
        try:
            self.report = asyncio.run(run_call(self.options))
        except BaseException as exc:  # handed to the test, which raises it
            self.error = exc

    def __enter__(self) -> CallInBackground:
        self._thread.start()
        return self

    def join(self) -> CallReport:
        self._thread.join(60)
        if self.error is not None:
            raise self.error
        assert self.report is not None, "the call did not finish"
        return self.report

    def __exit__(self, *_exc: object) -> None:
        self._thread.join(60)


@pytest.fixture(scope="module")
def console_server() -> Iterator[BackgroundServer]:
    server = make_server(engines="plumbing", greeting=TEST_GREETING, store="memory")
    yield server
    server.stop()


# --- the APIs ------------------------------------------------------------------------------------


def test_a_callers_number_is_masked_keeping_its_length() -> None:
    assert masked_caller("+15551234567") == "+15•••••••67"
    assert len(masked_caller("+15551234567")) == len("+15551234567")
    assert masked_caller("") == ""
    assert masked_caller("8:acs:1234567890abcdef") == "8:acs:123456…"
    assert masked_caller("alice") == "alice"


def fake_session(*, media: bool = True, turn: Any = None, playing: bool = False) -> SimpleNamespace:
    """What call_state reads of a MediaHandler: its deadlines, its turn loop, its player."""
    track = SimpleNamespace(start_t=1.0 if playing else None)
    return SimpleNamespace(
        deadlines=SimpleNamespace(media_started=media),
        route=SimpleNamespace(current=turn),
        player=SimpleNamespace(track_of=lambda _turn_id: track),
    )


def a_turn(*, cancelled: bool = False, pending: bool = False) -> SimpleNamespace:
    return SimpleNamespace(id=7, cancelled=cancelled, interruption_pending=pending)


def test_every_live_state_is_told_apart() -> None:
    assert call_state(fake_session(media=False)) == ("connecting", None)
    assert call_state(fake_session()) == ("listening", None)
    assert call_state(fake_session(turn=a_turn())) == ("thinking", 7)
    assert call_state(fake_session(turn=a_turn(), playing=True)) == ("speaking", 7)
    assert call_state(fake_session(turn=a_turn(pending=True), playing=True)) == ("interrupted", 7)
    assert call_state(fake_session(turn=a_turn(cancelled=True), playing=True)) == ("stopping", 7)
    # A session without those parts (another LiveCall) is just listening.
    assert call_state(SimpleNamespace(call_id="x")) == ("listening", None)


def test_live_calls_list_a_call_with_its_state_then_its_turns_have_figures(
    console_server: BackgroundServer, hours_pcm: np.ndarray
) -> None:
    http = httpx.Client(base_url=console_server.http_url, timeout=10)
    states: set[str] = set()

    def listed() -> dict[str, Any] | None:
        calls = http.get("/api/calls/live").json()["calls"]
        states.update(call["state"] for call in calls)
        return calls[0] if calls else None

    with CallInBackground(console_server, hours_pcm) as call:
        live = wait_for("the call in /api/calls/live", listed)
        while not call.report and not call.error and listed():  # watch it change until it ends
            time.sleep(0.05)
        report = call.join()
    assert report.stop_audio_count >= 1
    assert live["caller"] == "+15•••••••67"
    assert live["agent"] == "plumbing"
    assert live["started"] and live["duration_s"] >= 0
    assert states <= {"connecting", "listening", "thinking", "speaking", "interrupted", "stopping"}
    assert "speaking" in states
    body = wait_for(
        "the call to leave the live list", lambda: (b := http.get("/api/calls/live").json())["calls"] == [] and b
    )
    assert body["events_api"] is True

    turns = http.get(f"/api/calls/{live['call_id']}/turns").json()
    assert turns["live"] is False
    by_kind = {turn["kind"]: turn for turn in turns["turns"]}
    greeting, answer = by_kind["greeting"], by_kind["speech"]
    assert greeting["outcome"] == "cancelled" and greeting["barge_ins"]
    assert greeting["figures"]["bargein_onset_to_stop"] > 0
    assert answer["figures"]["voice_to_voice"] == answer["voice_to_voice_ms"]
    assert http.get("/api/calls/no-such-call/turns").status_code == 404


def test_with_the_events_api_off_the_live_list_says_so_and_records_are_not_served() -> None:
    server = make_server(engines="plumbing", store="memory", events_api=False)
    try:
        http = httpx.Client(base_url=server.http_url, timeout=10)
        assert http.get("/api/calls/live").json() == {"events_api": False, "calls": []}
        assert http.get("/api/calls").status_code == 404
        assert http.get("/api/calls/x/turns").status_code == 404
        assert http.get("/calls").status_code == 200  # the page, which says why it shows no history
    finally:
        server.stop()


def test_the_console_apis_are_guarded_like_the_others() -> None:
    server = make_server(engines="plumbing", store="memory", api_token=TOKEN)
    try:
        http = httpx.Client(base_url=server.http_url, timeout=10)
        for path in ("/api/calls/live", "/api/calls/x/turns"):
            refused = http.get(path)
            assert refused.status_code == 401
            assert "Authorization: Bearer" in refused.json()["detail"]
            assert http.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get("/api/calls/live", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert http.get("/calls").status_code == 200  # the page itself holds nothing private
    finally:
        server.stop()


def test_on_loopback_without_a_token_only_a_foreign_origin_is_refused(console_server: BackgroundServer) -> None:
    http = httpx.Client(base_url=console_server.http_url, timeout=10)
    assert http.get("/api/calls/live").status_code == 200  # a same-origin GET carries no Origin
    refused = http.get("/api/calls/live", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403
    assert "a page of origin 'http://evil.example'" in refused.json()["detail"]
    server = make_server(engines="plumbing", store="memory", allowed_origins=["http://console.example"])
    try:
        allowed = httpx.get(f"{server.http_url}/api/calls/live", headers={"Origin": "http://console.example"})
        assert allowed.status_code == 200
    finally:
        server.stop()


# --- the page in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_browser()
    with launch_chromium() as chromium:
        yield chromium


def test_the_console_shows_a_live_call_then_its_timeline_with_the_barge_in(
    console_server: BackgroundServer, hours_pcm: np.ndarray, browser: Any
) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{console_server.http_url}/calls")
    page.wait_for_selector("#live-empty:visible")
    timeline = page.locator("#timeline")
    with CallInBackground(console_server, hours_pcm) as call:
        live_row = page.locator("#live tbody tr").first
        live_row.wait_for(timeout=WAIT_S * 1000)
        assert "+15•••••••67" in live_row.inner_text()
        call_id = live_row.get_attribute("data-call-id")
        live_row.click()  # its timeline while it is live...
        timeline.locator('li[data-event="turn_started"]').first.wait_for(timeout=WAIT_S * 1000)
        report = call.join()
    assert report.stop_audio_count >= 1
    # ...follows it to its end (the events after the last one shown).
    timeline.locator('li[data-event="call_ended"]').wait_for(timeout=WAIT_S * 1000)
    assert timeline.locator('li[data-event="call_started"]').count() == 1
    # Ended: it leaves the live list and is in the recent calls, with how it ended.
    page.wait_for_selector("#live-empty:visible", timeout=WAIT_S * 1000)
    page.wait_for_selector(f'#recent tbody tr.selected[data-call-id="{call_id}"]:has-text("caller_hangup")')
    page.wait_for_selector('#call-facts:has-text("caller_hangup")')  # the facts of the ended call
    # The barge-in: the pause highlighted, the StopAudio with its onset-to-stop figure.
    paused = timeline.locator('li[data-event="barge_in_paused"]').first
    assert "bargein" in (paused.get_attribute("class") or "")
    stop = timeline.locator('li[data-event="stop_audio_sent"]').first
    assert "stop" in (stop.get_attribute("class") or "")
    assert "onset to stop" in stop.inner_text()
    assert "plumbing test utterance" in timeline.locator('li[data-event="final"]').first.inner_text()
    assert "voice to voice" in timeline.locator('li[data-event="first_audio_sent"]').nth(1).inner_text()
    assert timeline.locator('li[data-event="agent_text"]').count() >= 2
    # One event a line (the talk page's styles name their own timeline: no rule of theirs lays ours out).
    lefts = page.evaluate("[...new Set([...document.querySelectorAll('#timeline li')].map(li => li.offsetLeft))]")
    assert len(lefts) == 1
    turns = page.locator("#turns tbody tr")
    page.wait_for_function("document.querySelectorAll('#turns tbody tr').length === 2")
    assert "barge-in" in turns.nth(0).inner_text()
    assert page.locator("#raw-events").get_attribute("href") == f"/api/calls/{call_id}/events"
    assert page.locator("#call-facts").inner_text().count("caller_hangup") == 1
    screenshot = os.environ.get("PARLEY_CALLS_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot)
    # The raw JSON the link names is the API's answer.
    raw = page.request.get(f"{console_server.http_url}/api/calls/{call_id}/events").json()
    assert raw["events"][0]["event"] == "call_started"
    assert errors == []
    page.close()


def test_the_console_asks_for_the_token_with_the_servers_words_and_uses_it(browser: Any) -> None:
    server = make_server(engines="plumbing", store="memory", api_token=TOKEN)
    try:
        page = browser.new_page()
        page.goto(f"{server.http_url}/calls")
        access = page.wait_for_selector("#access:visible")
        assert "this API needs a token" in access.inner_text()
        page.fill("#access-token", "wrong")
        page.click("#access-form button")
        page.wait_for_selector('#access-message:has-text("wrong API token")')
        page.fill("#access-token", TOKEN)
        page.click("#access-form button")
        page.wait_for_selector("#access", state="hidden")
        page.wait_for_selector("#recent-empty:visible")  # the records answered, with the token
        assert page.evaluate("sessionStorage.getItem('parley.token')") == TOKEN
        page.close()
    finally:
        server.stop()


def test_the_console_says_when_call_records_are_off(browser: Any, hours_pcm: np.ndarray) -> None:
    server = make_server(engines="plumbing", greeting=TEST_GREETING, store="memory", events_api=False)
    try:
        page = browser.new_page()
        page.goto(f"{server.http_url}/calls")
        notice = page.wait_for_selector("#notice:visible")
        assert "PARLEY_EVENTS_API=false" in notice.inner_text()
        assert page.locator("#recent-card").is_hidden()
        assert page.locator("#access").is_hidden()
        with CallInBackground(server, hours_pcm):  # still listed live; no timeline, and why
            page.locator("#live tbody tr").first.click(timeout=WAIT_S * 1000)
            page.wait_for_selector('#detail-empty:has-text("call records are off")')
            assert page.locator("#detail-body").is_hidden()
        page.close()
    finally:
        server.stop()


def test_a_page_of_another_origin_cannot_read_the_calls(
    console_server: BackgroundServer, browser: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """http://localhost:PORT is another origin than http://127.0.0.1:PORT. The console served there
    works: its same-origin GETs carry no Origin (an Origin of localhost would be refused, since
    PARLEY_ALLOWED_ORIGINS does not list it). Its fetch of http://127.0.0.1:PORT carries its Origin:
    the server refuses it (403, logged), and the page learns nothing (no CORS headers either).
    (Playwright does not report the Origin Chromium adds, so the server's log is the witness.)"""
    page = browser.new_page()
    with caplog.at_level(logging.WARNING, logger="parley.security.access"):
        page.goto(f"http://localhost:{console_server.port}/calls")
        page.wait_for_selector("#live-empty:visible")
        page.wait_for_function(  # the recent calls answered too
            "document.querySelector('#recent tbody tr') || !document.querySelector('#recent-empty').hidden"
        )
        assert "refused" not in caplog.text
        foreign = f"{console_server.http_url}/api/calls/live"
        outcome = page.evaluate("url => fetch(url).then(r => 'read ' + r.status, () => 'blocked')", foreign)
        assert outcome == "blocked"
        wait_for("the refusal in the log", lambda: "a page of origin 'http://localhost:" in caplog.text)
    page.close()


def test_the_console_says_what_it_cannot_read(console_server: BackgroundServer, browser: Any) -> None:
    """A call the records do not have; then a server gone: said, and asked again (no token box)."""
    server = make_server(engines="plumbing", store="memory")
    page = browser.new_page()
    try:
        page.goto(f"{server.http_url}/calls#call=no-such-call")
        page.wait_for_selector('#timeline:has-text("not in the call records")')
    finally:
        server.stop()
    notice = page.wait_for_selector("#notice:visible", timeout=WAIT_S * 1000)
    assert "Could not read the calls" in notice.inner_text()
    assert "Trying again" in notice.inner_text()
    assert page.locator("#access").is_hidden()
    page.close()


def test_with_a_token_the_raw_json_link_opens_the_calls_events(browser: Any, hours_pcm: np.ndarray) -> None:
    """A plain link cannot carry the token: the page fetches the JSON with it and opens that."""
    server = make_server(engines="plumbing", store="memory", api_token=TOKEN)
    try:
        options = CallOptions(url=server.url, pcm=hours_pcm, max_wait_s=3.0, api_token=TOKEN)
        with ThreadPoolExecutor(1) as thread:  # Playwright's sync API holds this thread's event loop
            report = thread.submit(asyncio.run, run_call(options)).result(60)
        assert report.errors == []
        context = browser.new_context()
        context.add_init_script(f"sessionStorage.setItem('parley.token', {TOKEN!r})")
        page = context.new_page()
        page.goto(f"{server.http_url}/calls")
        page.locator("#recent tbody tr").first.click()
        page.locator('#timeline li[data-event="call_ended"]').wait_for(timeout=WAIT_S * 1000)
        with context.expect_page() as opened:
            page.click("#raw-events")
        raw = opened.value
        raw.wait_for_load_state()
        wait_for("the JSON in the new tab", lambda: '"call_started"' in raw.inner_text("body"))
        assert '"events"' in raw.inner_text("body")
        context.close()
    finally:
        server.stop()
