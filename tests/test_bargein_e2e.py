"""Barge-in for real phones, end to end on the default pipeline (Silero + pocketsphinx + Whisper,
Piper): backchannels and coughs pause the agent and it resumes; its own echo never interrupts it;
a real interruption over the echo still does."""

from __future__ import annotations

import numpy as np
import pytest

from parley.caller import CallOptions, CallReport, run_call
from tests.conftest import TEST_GREETING, make_server

GREETING_TURN = 1


def events_named(report: CallReport, name: str) -> list[dict]:
    return [event for event in report.events if event.get("event") == name]


@pytest.fixture(scope="module")
def server():
    srv = make_server(greeting=TEST_GREETING + " We are open every day from eleven until ten.")
    yield srv
    srv.stop()


def cough(seconds: float = 0.35, seed: int = 5) -> np.ndarray:
    """A cough-like burst: broadband noise with a sharp attack and a fast decay, twice."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    envelope = np.exp(-np.linspace(0, 7, n // 2))
    burst = np.concatenate([envelope, 0.7 * envelope])[:n]
    return (rng.normal(0, 0.3, n) * burst * 32767).clip(-32768, 32767).astype(np.int16)


async def call(server, pcm: np.ndarray, **options) -> CallReport:  # type: ignore[no-untyped-def]
    options.setdefault("max_wait_s", 10.0)
    return await run_call(CallOptions(url=server.url, pcm=pcm, **options))


def assert_resumed_and_completed(report: CallReport) -> None:
    paused = events_named(report, "barge_in_paused")
    resumed = events_named(report, "barge_in_resumed")
    # On failure, say what the server heard and decided (timing-dependent on a loaded machine).
    story = [
        (e["event"], e.get("text") or e.get("reason") or e.get("trigger"))
        for e in report.events
        if e["event"] in ("final", "barge_in_paused", "barge_in_resumed", "barge_in_decided")
    ]
    assert paused and paused[0]["turn_id"] == GREETING_TURN, story
    assert resumed and resumed[0]["turn_id"] == GREETING_TURN, story
    assert events_named(report, "barge_in_decided") == [], story  # never cancelled
    # The greeting went on from the start of the clause it was cut in, and was played to the end.
    assert resumed[0]["from_ms"] <= paused[0]["heard_ms"]
    completed = [e["turn_id"] for e in events_named(report, "turn_completed")]
    assert GREETING_TURN in completed
    assert [e for e in events_named(report, "turn_started") if e["turn_id"] > GREETING_TURN] == []


@pytest.mark.parametrize("word", ["uh huh", "okay"])
async def test_a_backchannel_pauses_the_agent_and_it_resumes(server, voice, word: str) -> None:  # type: ignore[no-untyped-def]
    pcm = np.frombuffer(voice.synthesize_blocking(word, 16000), dtype=np.int16)
    report = await call(server, pcm, barge_in_at=1.5)
    assert report.errors == []
    assert_resumed_and_completed(report)
    # Whisper spells the sound as the word ("Uh-huh."), as nothing, or as a murmur it has to
    # invent a spelling for ("F.", "Fuh.", "FER.", "Uh-uh."): the policy judges its shape and
    # Whisper's own doubt, so every one of these is a non-request and the agent resumes.
    final = events_named(report, "final")[0]
    assert final["voiced_ms"] > 0
    reason = events_named(report, "barge_in_resumed")[0]["reason"]
    assert reason in ("backchannel", "no_words", "no_content", "unclear"), (final["text"], reason)


async def test_a_cough_pauses_the_agent_and_it_resumes(server) -> None:  # type: ignore[no-untyped-def]
    report = await call(server, cough(), barge_in_at=1.5)
    assert report.errors == []
    if not events_named(report, "barge_in_paused"):
        return  # the VAD did not even take this cough for speech: nothing to recover from
    assert_resumed_and_completed(report)


async def test_the_agents_own_echo_never_interrupts_it(server) -> None:  # type: ignore[no-untyped-def]
    silence = np.zeros(16000, dtype=np.int16)
    report = await call(server, silence, barge_in_at=0.5, echo_db=-20.0)
    assert report.errors == []
    for name in ("barge_in_paused", "barge_in_decided", "speech_started"):
        assert events_named(report, name) == [], name
    echo = events_named(report, "call_ended")[0]["echo"]
    assert echo["state"] == "echo" and abs(echo["loss_db"] - 20) < 4 and echo["suppressed_windows"] > 0
    assert GREETING_TURN in [e["turn_id"] for e in events_named(report, "turn_completed")]


async def test_a_real_interruption_over_the_echo_still_stops_the_agent(server, speech_dir) -> None:  # type: ignore[no-untyped-def]
    from parley.audio import read_wav

    pcm = read_wav(speech_dir / "hours_16000.wav", 16000)
    report = await call(server, pcm, barge_in_at=1.5, echo_db=-20.0, max_wait_s=8.0)
    assert report.errors == []
    assert report.stop_audio_count >= 1 and report.leaked_audio_ms == 0
    decided = events_named(report, "barge_in_decided")
    assert decided and decided[0]["turn_id"] == GREETING_TURN
    assert len(report.onset_to_stop_ms) >= 1 and report.onset_to_stop_ms[0] < 500


async def test_a_non_interruptible_notice_plays_through_speech(speech_dir) -> None:  # type: ignore[no-untyped-def]
    """Per-state policy: the bank's fee disclosure (interruptible: false) is not cut by the caller."""
    from parley.audio import read_wav

    srv = make_server(agent="bank", greeting="")
    try:
        pcm = read_wav(speech_dir / "hours_16000.wav", 16000)
        report = await run_call(
            CallOptions(
                url=srv.url,
                pcm=pcm,
                dtmf=[(0.2, "4")],
                barge_in_at=1.5,
                max_wait_s=15.0,
                greeting_wait_s=2.0,
            )
        )
    finally:
        srv.stop()
    assert report.errors == []
    assert events_named(report, "barge_in_decided") == [] and events_named(report, "barge_in_paused") == []
    ignored = events_named(report, "barge_in_ignored")
    assert ignored and ignored[0]["reason"] == "not_interruptible"
    completed = events_named(report, "turn_completed")
    assert completed and "fees have changed" in completed[0]["text"]
    # What the caller said over the notice is answered after it.
    answer = [e for e in events_named(report, "turn_started") if "hours" in (e.get("input") or "")]
    assert answer and answer[0]["t"] >= completed[0]["t"]
