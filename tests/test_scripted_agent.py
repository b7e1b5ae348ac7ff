"""Tests for the YAML scripted agent: loading, matching, streaming output and error messages."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from parley.agents.scripted import (
    EXAMPLES_DIR,
    ScriptedAgent,
    ScriptError,
    ScriptSpec,
    load_script,
    normalize_text,
    packaged_script_names,
    resolve_script_path,
    scripted_agent_factory,
    split_sentences,
)
from parley.protocols import Agent, AgentOutput, CallContext, Hangup, Say, UserInput

CTX = CallContext(call_id="call-1")


# --------------------------------------------------------------------------------------------
# Helpers


def write_script(tmp_path: Path, body: str, name: str = "script.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def make_agent(tmp_path: Path, body: str) -> ScriptedAgent:
    return ScriptedAgent(load_script(write_script(tmp_path, body)), CTX)


async def collect(agent: Agent, user: UserInput) -> list[AgentOutput]:
    return [out async for out in agent.respond(user)]


async def say_text(agent: Agent, text: str) -> str:
    outputs = await collect(agent, UserInput(kind="speech", text=text))
    return " ".join(o.text for o in outputs if isinstance(o, Say))


def speech(text: str) -> UserInput:
    return UserInput(kind="speech", text=text)


def dtmf(digits: str) -> UserInput:
    return UserInput(kind="dtmf", digits=digits)


MINIMAL = """\
    name: Test
    intents:
      - name: hours
        keywords: [hours]
        reply: "Open late."
    fallback: "Pardon?"
"""


@pytest.fixture
def pizza() -> ScriptedAgent:
    return ScriptedAgent(load_script(resolve_script_path("pizza")), CTX)


@pytest.fixture
def bank() -> ScriptedAgent:
    return ScriptedAgent(load_script(resolve_script_path("bank")), CTX)


# --------------------------------------------------------------------------------------------
# Packaged examples


@pytest.mark.parametrize("name", ["pizza", "bank"])
def test_packaged_examples_load(name: str) -> None:
    path = resolve_script_path(name)
    assert path == EXAMPLES_DIR / f"{name}.yaml"
    spec = load_script(path)
    assert isinstance(spec, ScriptSpec)
    assert spec.greeting
    assert spec.intents
    assert any(intent.end_call for intent in spec.intents)


def test_packaged_names_listed() -> None:
    assert {"pizza", "bank"} <= set(packaged_script_names())


def test_pizza_example_shape(pizza: ScriptedAgent) -> None:
    names = [intent.name for intent in pizza.spec.intents]
    expected = ["hours", "delivery", "prices", "menu", "order", "location", "operator", "goodbye"]
    assert set(expected) <= set(names)
    assert "Tony" in pizza.spec.name
    assert pizza.voice is None  # the engine's default voice (Piper or espeak-ng)
    assert pizza.greeting_interruptible is True
    assert pizza.greeting() and "Tony" in pizza.greeting()  # type: ignore[operator]
    assert pizza.spec.fallback_dtmf and "1" in pizza.spec.fallback_dtmf


def test_replies_are_plain_spoken_text() -> None:
    # Replies go straight to TTS: no markdown or emoji, and short enough to say on a call.
    for name in ["pizza", "bank"]:
        spec = load_script(resolve_script_path(name))
        texts = [r for i in spec.intents for r in i.all_replies] + [spec.fallback]
        for text in texts:
            assert not set(text) & set("*_#`[]<>"), text
            assert text.isascii(), text
            assert 1 <= len(split_sentences(text)) <= 3, text


def test_agent_satisfies_protocol(pizza: ScriptedAgent) -> None:
    assert isinstance(pizza, Agent)


def test_factory_builds_fresh_agent_per_call() -> None:
    factory = scripted_agent_factory("pizza")
    first = factory(CallContext(call_id="a"))
    second = factory(CallContext(call_id="b"))
    assert isinstance(first, ScriptedAgent) and isinstance(second, ScriptedAgent)
    assert first is not second
    assert first.spec is second.spec  # loaded once, shared
    assert second.context.call_id == "b"


def test_factory_fails_at_startup_for_bad_script(tmp_path: Path) -> None:
    bad = write_script(tmp_path, "name: x\n")
    with pytest.raises(ScriptError, match="intents"):
        scripted_agent_factory(str(bad))


def test_factory_accepts_file_path(tmp_path: Path) -> None:
    path = write_script(tmp_path, MINIMAL)
    agent = scripted_agent_factory(str(path))(CTX)
    assert isinstance(agent, ScriptedAgent)
    assert agent.spec.name == "Test"


# --------------------------------------------------------------------------------------------
# Matching recognizer-style speech


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("want to order a pizza", "order"),
        ("i would like a large pepperoni", "order"),
        ("what are your opening hours", "hours"),
        ("what are your opening dollars", "hours"),  # misrecognised "hours"
        ("what time do you close tonight", "hours"),
        ("do you deliver", "delivery"),
        ("can you bring it to my house", "delivery"),
        ("how much is a large pizza", "prices"),
        ("what pizzas do you have", "menu"),
        ("where are you located", "location"),
        ("can i talk to a real person", "operator"),
        ("ok thanks bye", "goodbye"),
        ("What's your ADDRESS?", "location"),  # punctuation and case are ignored
    ],
)
async def test_pizza_matches_noisy_speech(pizza: ScriptedAgent, text: str, intent: str) -> None:
    outputs = await collect(pizza, speech(text))
    assert pizza.last_intent == intent
    assert outputs and isinstance(outputs[0], Say)


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("whats my balance", "balance"),
        ("how much money do i have", "balance"),
        ("i lost my card", "lost_card"),
        ("my card was stolen", "lost_card"),
        ("what time does the branch open", "hours"),
        ("speak to an agent please", "agent"),
        ("no thats all goodbye", "goodbye"),
    ],
)
async def test_bank_matches_noisy_speech(bank: ScriptedAgent, text: str, intent: str) -> None:
    await collect(bank, speech(text))
    assert bank.last_intent == intent


async def test_keywords_match_whole_words_only(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: open
            keywords: [open]
            reply: "Open."
        fallback: "Fallback."
        """,
    )
    assert await say_text(agent, "we reopened yesterday") == "Fallback."
    assert agent.last_intent is None
    assert await say_text(agent, "are you open") == "Open."


async def test_multi_word_phrases_and_distinct_counting(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: pizza
            keywords: [pizza, Pizza]          # duplicates count once
            reply: "Pizza."
          - name: human
            keywords: [real person]
            reply: "Human."
        fallback: "Fallback."
        """,
    )
    assert await say_text(agent, "pizza pizza pizza real person") == "Pizza."  # 1 vs 1, first wins
    assert await say_text(agent, "a real person") == "Human."
    assert await say_text(agent, "a person who is real") == "Fallback."


async def test_highest_score_wins_over_order(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: first
            keywords: [pizza]
            reply: "First."
          - name: second
            keywords: [pizza, large]
            reply: "Second."
        fallback: "Fallback."
        """,
    )
    assert await say_text(agent, "large pizza") == "Second."
    assert agent.last_intent == "second"


async def test_ties_go_to_first_listed_intent(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: alpha
            keywords: [apple]
            reply: "Alpha."
          - name: beta
            keywords: [banana]
            reply: "Beta."
        fallback: "Fallback."
        """,
    )
    assert await say_text(agent, "banana and apple") == "Alpha."
    assert agent.last_intent == "alpha"


async def test_patterns_score_and_ignore_case(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: other
            keywords: [close]
            reply: "Other."
          - name: hours
            keywords: [close]
            patterns: ['\\bwhat time\\b', "what's"]
            reply: "Hours."
        fallback: "Fallback."
        """,
    )
    # keyword tie would pick "other"; the pattern adds a point to "hours"
    assert await say_text(agent, "WHAT TIME do you close") == "Hours."
    # a pattern written with an apostrophe still matches raw text that has one
    assert await say_text(agent, "what's up") == "Hours."
    assert await say_text(agent, "somewhat timely") == "Fallback."


async def test_pattern_only_intent(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: number
            patterns: ['\\b\\d{3}\\b']
            reply: "Got a number."
        fallback: "Fallback."
        """,
    )
    assert await say_text(agent, "my code is 123") == "Got a number."


async def test_fallback_for_unknown_and_empty_speech(pizza: ScriptedAgent) -> None:
    fallback = pizza.spec.fallback
    for text in ["the weather is nice", "", "   ", "?!"]:
        outputs = await collect(pizza, speech(text))
        assert " ".join(o.text for o in outputs if isinstance(o, Say)) == fallback
        assert not any(isinstance(o, Hangup) for o in outputs)
        assert pizza.last_intent is None


async def test_empty_text_ignores_permissive_patterns(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: anything
            patterns: ['.*']
            reply: "Anything."
        fallback: "Fallback."
        """,
    )
    assert await say_text(agent, "") == "Fallback."
    assert await say_text(agent, "hello") == "Anything."


def test_normalize_text() -> None:
    assert normalize_text("  What's YOUR   address?! ") == "whats your address"
    assert normalize_text("drop-off_time") == "drop off time"
    assert normalize_text("...") == ""


# --------------------------------------------------------------------------------------------
# DTMF


async def test_dtmf_selects_intent(pizza: ScriptedAgent) -> None:
    outputs = await collect(pizza, dtmf("1"))
    assert pizza.last_intent == "hours"
    assert outputs and all(isinstance(o, Say) for o in outputs)
    await collect(pizza, dtmf("2"))
    assert pizza.last_intent == "delivery"


async def test_unknown_dtmf_uses_fallback_dtmf(pizza: ScriptedAgent) -> None:
    outputs = await collect(pizza, dtmf("7"))
    text = " ".join(o.text for o in outputs if isinstance(o, Say))
    assert text == pizza.spec.fallback_dtmf
    assert pizza.last_intent is None


async def test_fallback_dtmf_defaults_to_fallback(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, MINIMAL)
    outputs = await collect(agent, dtmf("5"))
    assert [o.text for o in outputs if isinstance(o, Say)] == ["Pardon?"]


async def test_dtmf_ignores_speech_text_and_accepts_int_yaml(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: hours
            keywords: [hours]
            dtmf: 1                 # unquoted: YAML int
            reply: "Hours."
          - name: multi
            dtmf: "42#"
            reply: "Multi."
        fallback: "Fallback."
        """,
    )
    assert agent.spec.intents[0].dtmf == "1"
    assert [o.text for o in await collect(agent, dtmf("1")) if isinstance(o, Say)] == ["Hours."]
    assert [o.text for o in await collect(agent, dtmf("42#")) if isinstance(o, Say)] == ["Multi."]
    # speech never triggers a DTMF-only intent, and DTMF never matches keywords
    assert await say_text(agent, "42") == "Fallback."
    outputs = await collect(agent, UserInput(kind="dtmf", text="hours", digits="3"))
    assert [o.text for o in outputs if isinstance(o, Say)] == ["Fallback."]


# --------------------------------------------------------------------------------------------
# Output: rotation, placeholders, sentences, hangup


async def test_replies_rotate_per_intent(tmp_path: Path) -> None:
    body = """\
        name: T
        intents:
          - name: joke
            keywords: [joke]
            replies: ["One.", "Two.", "Three."]
          - name: hi
            keywords: [hi]
            reply: "Hi."
        fallback: "Fallback."
        """
    agent = make_agent(tmp_path, body)
    heard = [await say_text(agent, "joke") for _ in range(4)]
    assert heard == ["One.", "Two.", "Three.", "One."]
    assert await say_text(agent, "hi") == "Hi."
    assert await say_text(agent, "joke") == "Two."
    # rotation state belongs to the call: a new agent starts over
    fresh = ScriptedAgent(agent.spec, CallContext(call_id="other"))
    assert await say_text(fresh, "joke") == "One."


async def test_placeholders_are_filled_safely(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: echo
            keywords: [pizza]
            reply: "You said {text}. Digits {digits}, unknown {name} and {0} and {{ stay"
          - name: key
            dtmf: "5"
            reply: "You pressed {digits}"
        fallback: "I heard {text}"
        """,
    )
    assert await say_text(agent, "  a pizza {digits} ") == (
        "You said a pizza {digits}. Digits , unknown {name} and {0} and {{ stay"
    )
    assert [o.text for o in await collect(agent, dtmf("5")) if isinstance(o, Say)] == ["You pressed 5"]
    assert await say_text(agent, "hello there") == "I heard hello there"


async def test_reply_is_streamed_as_sentences(tmp_path: Path) -> None:
    agent = make_agent(
        tmp_path,
        """\
        name: T
        intents:
          - name: price
            keywords: [price]
            reply: "A large is $9.99. Ask Mr. Smith! Want one?"
        fallback: "Fallback."
        """,
    )
    outputs = await collect(agent, speech("price"))
    assert outputs == [Say("A large is $9.99."), Say("Ask Mr. Smith!"), Say("Want one?")]


async def test_end_call_yields_hangup_last(pizza: ScriptedAgent) -> None:
    outputs = await collect(pizza, speech("goodbye"))
    assert pizza.last_intent == "goodbye"
    assert isinstance(outputs[-1], Hangup)
    assert outputs[-1].reason == "intent:goodbye"
    assert len(outputs) >= 2 and all(isinstance(o, Say) for o in outputs[:-1])


async def test_end_call_via_dtmf(bank: ScriptedAgent) -> None:
    outputs = await collect(bank, dtmf("9"))
    assert outputs[-1] == Hangup(reason="intent:goodbye")


async def test_no_hangup_without_end_call(pizza: ScriptedAgent) -> None:
    outputs = await collect(pizza, speech("do you deliver"))
    assert not any(isinstance(o, Hangup) for o in outputs)


async def test_greeting_options(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, MINIMAL)
    assert agent.greeting() is None
    assert agent.voice is None
    assert agent.greeting_interruptible is True
    agent = make_agent(
        tmp_path,
        MINIMAL + '    greeting: "Hello."\n    greeting_interruptible: false\n    voice: en-gb\n',
    )
    assert agent.greeting() == "Hello."
    assert agent.greeting_interruptible is False
    assert agent.voice == "en-gb"


# --------------------------------------------------------------------------------------------
# split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello there. How are you?", ["Hello there.", "How are you?"]),
        ("It costs 9.99 today. Thanks!", ["It costs 9.99 today.", "Thanks!"]),
        ("Ask Mr. Jones or Dr. Who. Bye.", ["Ask Mr. Jones or Dr. Who.", "Bye."]),
        ("Toppings, e.g. ham. Sure.", ["Toppings, e.g. ham.", "Sure."]),
        ("No punctuation here", ["No punctuation here"]),
        ("Wait... what?! Really.", ["Wait...", "what?!", "Really."]),
        ('He said "hi." Then left.', ['He said "hi."', "Then left."]),
        ("Line one.\nLine two", ["Line one.", "Line two"]),
        ("  Spaces.   ", ["Spaces."]),
        ("...", ["..."]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


# --------------------------------------------------------------------------------------------
# Errors: every ScriptError names the file and the problem


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ScriptError) as info:
        load_script(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_script(tmp_path, 'name: T\nintents:\n  - name: "unterminated\n    reply: x\n')
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert str(path) in message
    assert "YAML syntax error" in message
    assert "line " in message


def test_empty_file(tmp_path: Path) -> None:
    path = write_script(tmp_path, "")
    with pytest.raises(ScriptError, match="empty") as info:
        load_script(path)
    assert str(path) in str(info.value)


def test_top_level_not_mapping(tmp_path: Path) -> None:
    path = write_script(tmp_path, "- a\n- b\n")
    with pytest.raises(ScriptError, match="mapping") as info:
        load_script(path)
    assert str(path) in str(info.value)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_script(tmp_path, MINIMAL + "    model: gpt\n")
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key 'model'" in message
    assert "allowed keys" in message and "fallback" in message


def test_unknown_intent_key_names_intent(tmp_path: Path) -> None:
    body = MINIMAL.replace('reply: "Open late."', 'reply: "Open late."\n        keyword: [x]')
    with pytest.raises(ScriptError) as info:
        load_script(write_script(tmp_path, body))
    message = str(info.value)
    assert "intents[0] (hours)" in message
    assert "unknown key 'keyword'" in message


def test_missing_required_fields(tmp_path: Path) -> None:
    path = write_script(tmp_path, "name: T\nintents:\n  - {name: a, keywords: [a], reply: A}\n")
    with pytest.raises(ScriptError) as info:
        load_script(path)
    assert "fallback: required field is missing" in str(info.value)


def test_no_intents(tmp_path: Path) -> None:
    path = write_script(tmp_path, "name: T\nintents: []\nfallback: F\n")
    with pytest.raises(ScriptError) as info:
        load_script(path)
    assert str(path) in str(info.value)
    assert "no intents" in str(info.value)


def test_missing_intents_key(tmp_path: Path) -> None:
    path = write_script(tmp_path, "name: T\nfallback: F\n")
    with pytest.raises(ScriptError, match="intents: required field is missing"):
        load_script(path)


def test_bad_regex_names_intent_and_pattern(tmp_path: Path) -> None:
    path = write_script(
        tmp_path,
        """\
        name: T
        intents:
          - name: ok
            keywords: [ok]
            reply: "Ok."
          - name: broken
            patterns: ['(unclosed']
            reply: "Never."
        fallback: "F."
        """,
    )
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert str(path) in message
    assert "intents[1] (broken)" in message
    assert "invalid regex '(unclosed' in patterns of intent 'broken'" in message


@pytest.mark.parametrize(
    ("intent_body", "problem"),
    [
        ('keywords: [a]\n    reply: "A."\n    replies: ["B."]', "exactly one of 'reply' or"),
        ("keywords: [a]", "exactly one of 'reply' or 'replies'"),
        ("keywords: [a]\n    replies: []", "at least one reply"),
        ('keywords: [a]\n    reply: "  "', "must not be blank"),
        ('reply: "A."', "can never match"),
        ('keywords: ["!!"]\n    reply: "A."', "keyword '!!'"),
        ('dtmf: "x1"\n    reply: "A."', "dtmf must be keypad digits"),
    ],
)
def test_intent_validation_errors(tmp_path: Path, intent_body: str, problem: str) -> None:
    body = f"name: T\nintents:\n  - name: bad\n    {intent_body}\nfallback: F\n"
    path = write_script(tmp_path, body)
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert str(path) in message
    assert "intents[0] (bad)" in message
    assert problem in message


def test_duplicate_intent_names_and_dtmf(tmp_path: Path) -> None:
    dup_names = (
        "name: T\nintents:\n"
        "  - {name: a, keywords: [x], reply: X}\n"
        "  - {name: a, keywords: [y], reply: Y}\n"
        "fallback: F\n"
    )
    expected = r"duplicate intent name 'a' in intents\[0\] and intents\[1\]"
    with pytest.raises(ScriptError, match=expected):
        load_script(write_script(tmp_path, dup_names, "names.yaml"))
    dup_dtmf = "name: T\nintents:\n  - {name: a, dtmf: '1', reply: X}\n  - {name: b, dtmf: 1, reply: Y}\nfallback: F\n"
    with pytest.raises(ScriptError, match="duplicate dtmf '1'"):
        load_script(write_script(tmp_path, dup_dtmf, "dtmf.yaml"))


def test_wrong_type_is_reported_with_location(tmp_path: Path) -> None:
    path = write_script(tmp_path, MINIMAL.replace("keywords: [hours]", "keywords: hours"))
    with pytest.raises(ScriptError) as info:
        load_script(path)
    assert "intents[0] (hours).keywords" in str(info.value)
    assert "list" in str(info.value)


def test_several_problems_are_all_listed(tmp_path: Path) -> None:
    path = write_script(tmp_path, "name: T\nintents: []\nextra: 1\n")
    with pytest.raises(ScriptError) as info:
        load_script(path)
    message = str(info.value)
    assert "3 problems" in message
    assert "no intents" in message and "unknown key 'extra'" in message and "fallback" in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: Caf\xe9\n".encode("latin-1"))
    with pytest.raises(ScriptError, match="cannot read script") as info:
        load_script(path)
    assert str(path) in str(info.value)


def test_resolve_unknown_name_lists_packaged_examples() -> None:
    with pytest.raises(ScriptError) as info:
        resolve_script_path("no-such-agent")
    message = str(info.value)
    assert "'no-such-agent'" in message
    assert "pizza" in message and "bank" in message


def test_resolve_missing_path_lists_packaged_examples(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match=r"available: .*pizza"):
        resolve_script_path(str(tmp_path / "missing.yaml"))


def test_resolve_file_path(tmp_path: Path) -> None:
    path = write_script(tmp_path, MINIMAL, "pizza.yaml")
    assert resolve_script_path(str(path)) == path


def test_script_error_is_value_error() -> None:
    assert issubclass(ScriptError, ValueError)
