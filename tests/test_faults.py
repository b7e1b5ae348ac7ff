"""Fault injection on the in-memory harness: every engine failure ends in a defined, logged outcome,
the caller hears something (the apology or the fallback voice), and the call goes on.

A real MediaHandler runs each call (codec, recognition thread, turns, player, writer); only the
engines are scripted doubles (parley.testing.harness).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from parley.protocols import AgentOutput, Hangup, Say, Transfer, UserInput
from parley.testing.harness import CallHarness, ScriptedAgent, ScriptedSynthesizer
from parley.voice.guarded import Backoff
from parley.voice.threaded import stream_from_executor

APOLOGY = "Sorry, I'm having trouble right now. Could you say that again?"


def apology_spoken(call: CallHarness, turn_id: int) -> bool:
    return any(APOLOGY.startswith(e["text"].split(",")[0]) for e in call.named("turn_completed", turn_id=turn_id))


async def answered(call: CallHarness, question: str, turn_id: int) -> dict:
    await call.say(question)
    return await call.wait_for("turn_completed", turn_id=turn_id)


# ------------------------------------------------------------------------------- the agent fails
def failing_agent(when: str) -> ScriptedAgent:
    """An agent that fails on its first input, `before` or `after` its first output, then answers."""
    agent = ScriptedAgent()

    async def behaviour(user: UserInput) -> AsyncIterator[AgentOutput]:
        if len(agent.inputs) == 1:
            if when == "after":
                yield Say("Let me look that up.")
            raise RuntimeError("model server returned garbage")
        yield Say("We open at eleven.")

    agent.behaviour = behaviour
    return agent


@pytest.mark.parametrize("when", ["before", "after"])
async def test_an_agent_that_raises_ends_its_turn_with_the_apology_and_the_call_goes_on(when, caplog) -> None:
    caplog.set_level(logging.ERROR)
    async with CallHarness(agent=failing_agent(when), call_id="agent-raises") as call:
        completed = await answered(call, "when do you open", turn_id=1)
        failed = call.named("turn_failed", turn_id=1)
        assert failed and failed[0]["stage"] == "agent" and "garbage" in failed[0]["error"]
        assert APOLOGY.split(",")[0] in completed["text"]
        if when == "after":
            assert completed["text"].startswith("Let me look that up.")
        assert "agent-raises" in caplog.text and "turn 1 failed" in caplog.text
        # the next question is answered as usual
        second = await answered(call, "when do you open", turn_id=2)
        assert "eleven" in second["text"]


async def test_an_agent_that_never_answers_is_stopped_by_the_watchdog() -> None:
    agent = ScriptedAgent()

    async def hang(user: UserInput) -> AsyncIterator[AgentOutput]:
        await asyncio.Event().wait()
        yield Say("never")

    agent.behaviour = hang
    async with CallHarness(agent=agent, agent_timeout_s=0.3) as call:
        started = time.monotonic()
        completed = await answered(call, "hello", turn_id=1)
        assert time.monotonic() - started < 3
        failed = call.named("turn_failed", turn_id=1)
        assert failed and failed[0]["stage"] == "agent" and "no output for 0.3 s" in failed[0]["error"]
        assert APOLOGY.split(",")[0] in completed["text"]


async def test_an_agent_that_stalls_between_outputs_is_stopped_too() -> None:
    agent = ScriptedAgent()

    async def stall(user: UserInput) -> AsyncIterator[AgentOutput]:
        yield Say("First part.")
        await asyncio.sleep(30)
        yield Say("never")

    agent.behaviour = stall
    async with CallHarness(agent=agent, agent_timeout_s=0.3) as call:
        completed = await answered(call, "hello", turn_id=1)
        assert completed["text"].startswith("First part.") and call.named("turn_failed", turn_id=1)


async def test_an_agent_whose_stream_will_not_close_does_not_hold_the_call() -> None:
    agent = ScriptedAgent()

    async def stubborn(user: UserInput) -> AsyncIterator[AgentOutput]:
        try:
            yield Say("One moment.")
            await asyncio.sleep(30)
        finally:
            await asyncio.shield(asyncio.sleep(5))  # cleanup that ignores cancellation

    agent.behaviour = stubborn
    async with CallHarness(agent=agent, agent_timeout_s=0.2, turn_cleanup_timeout_s=0.2) as call:
        started = time.monotonic()
        await answered(call, "hello", turn_id=1)
        await answered(call, "hello again", turn_id=2)
        assert time.monotonic() - started < 4


# ------------------------------------------------------------------------------- the voice fails
@pytest.mark.parametrize("fault", ["raise", "hang", "silent"])
async def test_a_failing_voice_is_replaced_by_the_fallback_and_retried_after_a_backoff(fault) -> None:
    primary = ScriptedSynthesizer(fault=fault, failures=1)
    fallback = ScriptedSynthesizer(freq=220.0)
    async with CallHarness(synthesizer=primary, fallback=fallback, greeting="Hello there.") as call:
        call.voice.backoff = Backoff(initial_s=0.4)
        greeting = await call.wait_for("turn_completed", turn_id=1)
        assert greeting["text"] == "Hello there." and call.named("turn_failed") == []
        assert fallback.calls == ["Hello there."]  # the same clause, in the fallback voice
        # while the primary waits out its backoff, the fallback speaks without trying it again
        await answered(call, "question one", turn_id=2)
        assert primary.calls == ["Hello there."] and fallback.calls[-1] == "Sure."
        await asyncio.sleep(0.5)
        await answered(call, "question two", turn_id=3)  # backoff over: the primary is back
        assert primary.calls[-1] == "Sure." and len(fallback.calls) == 2


async def test_a_voice_that_breaks_mid_clause_ends_the_turn_with_the_apology_in_the_fallback_voice() -> None:
    primary = ScriptedSynthesizer(fault="raise_mid", failures=1, ms_per_char=30)
    fallback = ScriptedSynthesizer(freq=220.0)
    async with CallHarness(synthesizer=primary, fallback=fallback) as call:
        completed = await answered(call, "hello", turn_id=1)
        failed = call.named("turn_failed", turn_id=1)
        assert failed and failed[0]["stage"] == "voice" and "broke" in failed[0]["error"]
        assert fallback.calls == [APOLOGY.split(",")[0] + ","] or fallback.calls[0].startswith("Sorry")
        assert "Sorry" in completed["text"]


async def test_with_no_voice_at_all_the_turn_ends_logged_and_the_call_goes_on(caplog) -> None:
    caplog.set_level(logging.ERROR)
    primary = ScriptedSynthesizer(fault="raise", failures=2)  # the answer and the apology
    async with CallHarness(synthesizer=primary) as call:
        await answered(call, "hello", turn_id=1)
        stages = [e["stage"] for e in call.named("turn_failed", turn_id=1)]
        assert stages == ["voice", "apology"]
        assert "apology could not be spoken" in caplog.text
        second = await answered(call, "hello again", turn_id=2)
        assert second["text"] == "Sure." and call.sent_audio_ms() > 0


# ------------------------------------------------------------------------------- recognition fails
async def test_a_recognizer_that_fails_mid_call_is_reported_and_keys_still_work() -> None:
    async with CallHarness() as call:
        call.recognizer.fail_next_feed = RuntimeError("decoder crashed")
        call.frames(0.3, loud=True)
        error = await call.wait_for("input_error")
        assert "decoder crashed" in error["error"]
        call.dtmf("1")
        completed = await call.wait_for("turn_completed")
        assert completed["text"] == "Sure."


async def test_a_recognizer_that_fails_to_load_leaves_a_call_that_still_answers_keys() -> None:
    harness = CallHarness()

    def broken() -> object:
        raise OSError("model file missing")

    harness.engines.recognizers._create = broken  # type: ignore[attr-defined]
    async with harness as call:
        await call.wait_for("input_error")
        call.dtmf("5")
        assert (await call.wait_for("turn_completed"))["text"] == "Sure."


# ------------------------------------------------------------------------------- the caller goes away
@pytest.mark.parametrize("moment", ["synthesis", "playback", "tool"])
async def test_a_hang_up_at_any_moment_ends_every_task_of_the_call(moment) -> None:
    agent = ScriptedAgent()
    reached = asyncio.Event()

    async def behaviour(user: UserInput) -> AsyncIterator[AgentOutput]:
        if moment == "tool":
            reached.set()
            await asyncio.sleep(30)  # a tool call in flight
        yield Say("A long answer that keeps the line busy for a while, clause after clause, on and on.")

    agent.behaviour = behaviour
    voice = ScriptedSynthesizer(fault="hang" if moment == "synthesis" else None, ms_per_char=40)
    async with CallHarness(agent=agent, synthesizer=voice, call_id=f"gone-{moment}") as call:
        await call.say("hello")
        if moment == "playback":
            await call.until(lambda: call.sent_audio_ms() > 100)
        elif moment == "tool":
            await asyncio.wait_for(reached.wait(), 5)
        else:
            await call.until(lambda: len(voice.calls) > 0)
        await call.hang_up()
        assert call.named("call_ended")[0]["reason"].startswith("caller_hangup")
        assert call.call_tasks() == []


async def test_a_slow_reader_slows_the_playout_but_the_call_still_ends_cleanly() -> None:
    async with CallHarness(greeting="Hello there, welcome.") as call:
        call.socket.send_delay_s = 0.03  # each frame takes longer to send than it lasts
        await call.wait_for("turn_completed", turn_id=1, timeout=10)
        await call.hang_up()
        assert call.call_tasks() == []


# ------------------------------------------------------------------------------- the executor
async def test_a_cancelled_turn_does_not_wait_for_its_queued_synthesis_job() -> None:
    """Defect: the next turn waited until the shared executor reached a dead job (2 s behind
    another call's synthesis). A queued job is now cancelled with its turn and never runs."""
    executor = ThreadPoolExecutor(1)
    release = threading.Event()
    ran: list[str] = []
    executor.submit(release.wait, 5)  # another call's long synthesis holds the only worker

    def produce(emit) -> None:  # type: ignore[no-untyped-def]
        ran.append("job")
        emit(b"\0\0" * 160)

    async def consume() -> None:
        async for _ in stream_from_executor(executor, produce):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    await asyncio.wait([task])
    assert time.monotonic() - started < 0.1
    release.set()
    executor.shutdown(wait=True)
    assert ran == []


# ------------------------------------------------------------------------------- hang-up requests
async def test_an_agent_hangup_after_its_goodbye_ends_the_call() -> None:
    agent = ScriptedAgent()

    async def goodbye(user: UserInput) -> AsyncIterator[AgentOutput]:
        yield Say("Goodbye.")
        yield Hangup("done")

    agent.behaviour = goodbye
    async with CallHarness(agent=agent) as call:
        await call.say("bye")
        assert call._task is not None
        await asyncio.wait_for(call._task, 5)
        assert call.named("call_ended")[0]["reason"] == "done"


# ------------------------------------------------------------------------------- turn rules
def goodbye_agent() -> ScriptedAgent:
    agent = ScriptedAgent()

    async def behaviour(user: UserInput) -> AsyncIterator[AgentOutput]:
        if "close" in user.text:
            yield Say("We close at ten.")
            return
        yield Say("Thanks for calling Tony's, have a lovely evening, and enjoy the pizza. Goodbye.")
        yield Hangup("agent_goodbye")

    agent.behaviour = behaviour
    return agent


async def test_thanks_bye_over_the_goodbye_still_ends_the_call() -> None:
    """Defect: the goodbye's Hangup was dropped when the caller talked over the goodbye."""
    async with CallHarness(agent=goodbye_agent(), synthesizer=ScriptedSynthesizer(ms_per_char=30)) as call:
        await call.say("that's all")
        await call.until(lambda: call.sent_audio_ms() > 300)
        await call.say("Thanks, bye.")
        assert call._task is not None
        await asyncio.wait_for(call._task, 5)
        assert call.named("control_deferred") and call.named("call_ended")[0]["reason"] == "agent_goodbye"
        assert [e["turn_id"] for e in call.named("turn_started")] == [1]  # nothing more was said


async def test_a_question_over_the_goodbye_is_answered_then_the_call_ends() -> None:
    async with CallHarness(agent=goodbye_agent(), synthesizer=ScriptedSynthesizer(ms_per_char=30)) as call:
        await call.say("that's all")
        await call.until(lambda: call.sent_audio_ms() > 300)
        await call.say("Oh wait, what time do you close?", seconds=0.7)
        assert call._task is not None
        await asyncio.wait_for(call._task, 10)
        completed = call.named("turn_completed", turn_id=2)
        assert completed and completed[0]["text"] == "We close at ten."
        assert call.named("call_ended")[0]["reason"] == "agent_goodbye"


async def test_words_that_quote_the_agent_are_still_answered() -> None:
    """Defect: a final whose words were mostly the agent's last words was dropped as echo, so an
    answer that quotes an option was lost. The reply may resume, but the words are answered."""
    voice = ScriptedSynthesizer(ms_per_char=30)
    greeting = "Which pizza size would you like, small, medium or large? We also have cold drinks today."
    async with CallHarness(synthesizer=voice, greeting=greeting, bargein_confirm_ms=2000) as call:
        await call.until(lambda: call.sent_audio_ms() > 2200)  # the question has been heard
        await call.say("The small pizza.")
        started = await call.wait_for("turn_started", turn_id=2, timeout=10)
        assert started["input"] == "The small pizza."
        resumed = call.named("barge_in_resumed", turn_id=1)
        assert resumed and resumed[0]["reason"] == "echo"  # the reply went on, then the words were answered


# ------------------------------------------------------------------------------- keys
class MenuAgent(ScriptedAgent):
    def __init__(self, expected: int | None) -> None:
        super().__init__()
        self.expected = expected

    def digits_expected(self) -> int | None:
        return self.expected


async def test_ten_keys_are_one_input_answered_once() -> None:
    """Defect: every key was its own turn, and cancelled key turns were queued again (10 keys ->
    13 turns, the fallback spoken three times)."""
    agent = MenuAgent(expected=None)
    async with CallHarness(agent=agent, dtmf_interdigit_ms=300, log_dtmf=True) as call:
        for key in "1234567890":
            call.dtmf(key)
            await asyncio.sleep(0.05)
        await call.wait_for("turn_completed", turn_id=1)
        await asyncio.sleep(0.4)
        assert [e["digits"] for e in call.named("dtmf_input")] == ["1234567890"]
        assert [u.digits for u in agent.inputs] == ["1234567890"]
        assert len(call.named("turn_started")) == 1


async def test_a_terminator_ends_the_input_at_once_and_an_expected_count_too() -> None:
    agent = MenuAgent(expected=None)
    async with CallHarness(agent=agent, dtmf_interdigit_ms=5000, log_dtmf=True) as call:
        call.dtmf("4321#")
        assert (await call.wait_for("dtmf_input", timeout=1))["digits"] == "4321"
        agent.expected = 1  # a menu of single keys: answered at the first key
        call.dtmf("2")
        assert (await call.wait_for("dtmf_input", digits="2", timeout=1))["digits"] == "2"


async def test_keys_are_not_held_behind_a_long_noisy_utterance() -> None:
    agent = MenuAgent(expected=1)
    async with CallHarness(agent=agent, log_dtmf=True) as call:
        call.frames(3.0, loud=True)  # the caller (or the line) is noisy for 3 s ...
        call.dtmf("1")  # ... and presses a key meanwhile
        started = await call.wait_for("turn_started", timeout=1.0)
        assert started["kind"] == "dtmf" and started["input"] == "1"


async def test_a_key_flood_is_bounded_and_nothing_is_dropped() -> None:
    agent = MenuAgent(expected=1)
    slow_agent_voice = ScriptedSynthesizer(ms_per_char=40)
    async with CallHarness(agent=agent, synthesizer=slow_agent_voice, bargein_on_dtmf=False) as call:
        for _ in range(30):
            call.dtmf("7")
        await call.wait_for("turn_started", turn_id=2, timeout=5)
        waiting = sum(len(p.user.digits) for p in call.handler.inbox._items if p.user)  # type: ignore[attr-defined]
        answered = sum(len(u.digits) for u in agent.inputs)
        assert len(call.handler.inbox) <= 4 and waiting + answered == 30


async def test_the_servers_own_greeting_goes_into_the_agents_history() -> None:
    """Defect: PARLEY_GREETING left the greeting out of the LLM agent's history (the model did not
    know it had said hello); an agent's own greeting was there."""

    class Remembering(ScriptedAgent):
        def __init__(self) -> None:
            super().__init__()
            self.spoken: list[str] = []

        def record_spoken(self, text: str) -> None:
            self.spoken.append(text)

    agent = Remembering()
    async with CallHarness(agent=agent, greeting="Hello from the server.") as call:
        await call.wait_for("turn_completed", turn_id=1)
        assert agent.spoken == ["Hello from the server."]


async def test_a_paused_reply_does_not_resume_while_recognition_is_behind_the_caller() -> None:
    """Defect: under CPU overload recognition fell 3 s behind, and the resume timer resumed the
    reply while the caller was still speaking. Now it resumes only once the caller's utterance has
    ended and recognition has caught up; here the words then confirm the barge-in."""
    voice = ScriptedSynthesizer(ms_per_char=40)
    greeting = "Welcome to Tony's, we have a long list of specials today, starting with the garlic bread."
    async with CallHarness(synthesizer=voice, greeting=greeting, bargein_confirm_ms=5000) as call:
        await call.until(lambda: call.sent_audio_ms() > 300)
        call.recognizer.feed_delay_s = 0.03  # 30 ms of work per 20 ms frame: falls behind
        await call.say("No, I want to order a large pepperoni", seconds=1.0)
        await call.wait_for("barge_in_paused", turn_id=1)
        final = await call.wait_for("final", timeout=10)
        paused_for_s = final["t"] - call.named("barge_in_paused")[0]["t"]
        assert paused_for_s > call.settings.resume_after_ms / 1000  # the old timer would have fired
        assert not [e for e in call.named("barge_in_resumed") if e["t"] < final["t"]]
        assert call.named("barge_in_decided", turn_id=1)


class FailingCallControl:
    """ACS Call Automation refusing every request."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def hang_up(self, call_id: str) -> None:
        self.requests.append("hang_up")
        raise ConnectionError("ACS answered 503")

    async def transfer(self, call_id: str, target: str) -> None:
        self.requests.append(f"transfer {target}")
        raise ConnectionError("ACS answered 503")


@pytest.mark.parametrize("control", ["hangup", "transfer"])
async def test_a_failing_hang_up_or_transfer_request_is_logged_and_the_media_ends(control, caplog) -> None:
    caplog.set_level(logging.ERROR)
    agent = ScriptedAgent()

    async def goodbye(user: UserInput) -> AsyncIterator[AgentOutput]:
        yield Say("One moment.")
        yield Hangup("done") if control == "hangup" else Transfer("+15551234567")

    agent.behaviour = goodbye
    harness = CallHarness(agent=agent)
    acs = FailingCallControl()
    harness.engines.call_control = acs
    async with harness as call:
        await call.say("bye")
        assert call._task is not None
        await asyncio.wait_for(call._task, 5)
        ended = call.named("call_ended")[0]["reason"]
        # A refused transfer is hung up instead (a closed media socket alone would leave the caller
        # on a silent line); a refused hang-up still ends the media.
        assert ended in ("done", "hang up_failed", "transfer_failed"), ended
        assert acs.requests[0] == ("hang_up" if control == "hangup" else "transfer +15551234567")
        if control == "transfer":
            assert "hang_up" in acs.requests
        assert "failed: ACS answered 503" in caplog.text
        assert call.named("input_error")
