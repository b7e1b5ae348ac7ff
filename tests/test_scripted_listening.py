"""Scripted agents that listen: slots filled from one sentence, intents chosen by score, facts
stated the same way every time, and specialists that answer the question that brought the caller.

Every conversation runs through the packaged scenarios as the server loads them (load_scenario ->
Scenario -> one call's agent), with recognizer-style and written-style sentences.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from parley.agents.scenario import Scenario, ScenarioAgent, ScenarioError, load_scenario, resolve_agent_path
from parley.agents.scripted import (
    ScriptedAgent,
    ScriptError,
    ScriptSpec,
    fill_placeholders,
    load_script,
    normalize_text,
    resolve_script_path,
)
from parley.agents.slots import number_word
from parley.protocols import AgentOutput, CallContext, Hangup, Say, UserInput

# --------------------------------------------------------------------------------------------
# Helpers


def call(name: str) -> ScenarioAgent:
    """One call of a packaged scenario, greeted, as the server starts it."""
    agent = Scenario(load_scenario(resolve_agent_path(name))).agent(CallContext("listen-1"))
    agent.greeting()
    return agent


async def outputs(agent: ScenarioAgent, text: str) -> list[AgentOutput]:
    user = UserInput(kind="dtmf", digits=text) if text.isdigit() else UserInput(kind="speech", text=text)
    return [output async for output in agent.respond(user)]


async def reply(agent: ScenarioAgent, text: str) -> str:
    return " ".join(o.text for o in await outputs(agent, text) if isinstance(o, Say))


def scripted(agent: ScenarioAgent) -> ScriptedAgent:
    member = agent.member(agent.active)
    assert isinstance(member, ScriptedAgent)
    return member


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def scripted_call(tmp_path: Path, body: str) -> ScenarioAgent:
    return Scenario(load_scenario(write(tmp_path, body))).agent(CallContext("listen-2"))


ASKS_BOTH = (
    "Which pizza would you like: pepperoni, margherita, hawaiian or veggie? And what size, small, medium or large?"
)
ASKS_SIZE = "And what size, small, medium or large?"
ASKS_PIZZA = "Which pizza would you like: pepperoni, margherita, hawaiian or veggie?"


# --------------------------------------------------------------------------------------------
# Slots filled from one sentence


@pytest.mark.parametrize(
    ("sentence", "order"),
    [
        ("I would like to order a medium margherita", "one medium margherita"),
        ("a large pepperoni please", "one large pepperoni"),
        ("two small hawaiian", "two small hawaiian"),
        ("i would like to order a medium margherita", "one medium margherita"),  # recognizer style
        ("Can I get 3 large veggie pizzas?", "three large veggie"),
        ("I'll have a big cheese pizza", "one large margherita"),  # synonyms: big, cheese
        ("one medium pepperoni", "one medium pepperoni"),
        ("id like two margaritas, large", "two large margherita"),  # a common mishearing
    ],
)
async def test_one_sentence_completes_the_order(sentence: str, order: str) -> None:
    agent = call("pizza")
    answer = await reply(agent, sentence)
    assert answer == f"Great, {order}. It will be ready in about twenty minutes. Anything else?"
    member = scripted(agent)
    assert member.last_intent == "order"
    assert member.awaiting == []
    pizza, size = order.split()[2], order.split()[1]
    assert member.slots["pizza"] == pizza and member.slots["size"] == size


@pytest.mark.parametrize(
    ("sentence", "question", "missing"),
    [
        ("I'd like to order a pizza", ASKS_BOTH, ["pizza", "size"]),
        ("I want a pepperoni", ASKS_SIZE, ["size"]),
        ("can i get a large one", ASKS_PIZZA, ["pizza"]),
        ("two medium please", ASKS_PIZZA, ["pizza"]),
    ],
)
async def test_partial_information_asks_only_for_what_is_missing(
    sentence: str, question: str, missing: list[str]
) -> None:
    agent = call("pizza")
    assert await reply(agent, sentence) == question
    assert scripted(agent).awaiting == missing


async def test_answers_to_the_questions_fill_the_order_over_several_turns() -> None:
    agent = call("pizza")
    assert await reply(agent, "I'd like to order a pizza") == ASKS_BOTH
    assert await reply(agent, "margherita") == ASKS_SIZE  # only what is still missing
    assert (
        await reply(agent, "medium")
        == "Great, one medium margherita. It will be ready in about twenty minutes. Anything else?"
    )
    # The order is done: the next one starts from nothing, and the phrasing rotates.
    assert await reply(agent, "and a small hawaiian") == (
        "Lovely, that's one small hawaiian, ready in about twenty minutes. Anything else?"
    )


async def test_a_later_sentence_can_change_a_slot_before_the_order_is_complete() -> None:
    agent = call("pizza")
    assert await reply(agent, "I want a small one") == ASKS_PIZZA
    assert await reply(agent, "actually make it a large pepperoni") == (
        "Great, one large pepperoni. It will be ready in about twenty minutes. Anything else?"
    )


async def test_a_side_question_while_ordering_keeps_the_order_waiting() -> None:
    agent = call("pizza")
    assert await reply(agent, "I'd like to order a pizza") == ASKS_BOTH
    assert await reply(agent, "how much is a large") == (
        "A large pizza is sixteen ninety nine. On Tuesdays every large pizza is twelve dollars."
    )
    assert scripted(agent).awaiting == ["pizza", "size"]  # the price question did not take the order
    assert await reply(agent, "ok a large pepperoni then") == (
        "Great, one large pepperoni. It will be ready in about twenty minutes. Anything else?"
    )


async def test_an_answer_not_understood_repeats_the_question_once_then_falls_back() -> None:
    agent = call("pizza")
    assert await reply(agent, "I want a pepperoni") == ASKS_SIZE
    assert await reply(agent, "uh let me think") == ASKS_SIZE
    fallback = scripted(agent).spec.fallback
    assert await reply(agent, "hmm") == fallback
    assert scripted(agent).awaiting == []
    # Given up: the pepperoni is forgotten, so a size alone starts a new order.
    assert await reply(agent, "medium") == ASKS_PIZZA


async def test_an_intent_asking_for_slots_does_not_end_the_call_or_hand_off_yet(tmp_path: Path) -> None:
    agent = scripted_call(
        tmp_path,
        """\
        name: T
        slots: {colour: {red: [red], blue: [blue]}}
        intents:
          - name: paint
            keywords: [paint]
            slots: [{name: colour, ask: "Which colour?"}]
            reply: "Painting it {colour}. Bye."
            end_call: true
        fallback: F.
        """,
    )
    first = await outputs(agent, "paint it")
    assert [o.text for o in first if isinstance(o, Say)] == ["Which colour?"]
    assert not any(isinstance(o, Hangup) for o in first)
    done = await outputs(agent, "blue")
    assert [o.text for o in done if isinstance(o, Say)] == ["Painting it blue.", "Bye."]
    assert done[-1] == Hangup(reason="intent:paint")


async def test_a_key_press_for_an_intent_with_slots_asks_for_them(tmp_path: Path) -> None:
    agent = scripted_call(
        tmp_path,
        """\
        name: T
        slots: {colour: {red: [red]}, count: number}
        intents:
          - name: paint
            keywords: [paint]
            dtmf: "1"
            slots: [{name: colour, ask: "Which colour?"}, {name: count, default: 1}]
            reply: "{count} {colour}."
        fallback: F.
        """,
    )
    assert await reply(agent, "1") == "Which colour?"
    assert await reply(agent, "red") == "one red."  # `default: 1` is said as a word


def test_numbers_are_read_as_words_and_said_as_words() -> None:
    spec = load_script(resolve_script_path("pizza"))
    assert spec.mentions("3 large")["quantity"] == "three"
    assert spec.mentions("twelve small")["quantity"] == "twelve"
    assert spec.mentions("25 small")["quantity"] == "25"
    assert "quantity" not in spec.mentions("a large")
    assert number_word(0) == "zero" and number_word(20) == "twenty" and number_word(21) == "21"


def test_the_earliest_and_longest_mention_wins(tmp_path: Path) -> None:
    spec = load_script(
        write(
            tmp_path,
            """\
            name: T
            slots:
              size: {large: [large], extra large: [extra large, xl]}
              pizza: {pepperoni: [pepperoni], margherita: [margherita]}
            intents: [{name: a, keywords: [a], reply: A.}]
            fallback: F.
            """,
        )
    )
    assert spec.mentions("an extra large margherita and a pepperoni") == {"size": "extra large", "pizza": "margherita"}
    assert spec.mentions("a large") == {"size": "large"}
    assert spec.mentions("nothing here") == {}


# --------------------------------------------------------------------------------------------
# Intent scoring


async def test_a_price_question_is_answered_with_the_price_not_the_order_flow() -> None:
    agent = call("pizza")
    assert await reply(agent, "How much is a large pepperoni pizza?") == (
        "A large pizza is sixteen ninety nine. On Tuesdays every large pizza is twelve dollars."
    )
    assert scripted(agent).last_intent == "prices"
    assert scripted(agent).awaiting == []


@pytest.mark.parametrize(
    ("sentence", "intent", "start"),
    [
        ("how much is a small margherita", "prices", "A small pizza is nine ninety nine."),
        ("what does a medium cost", "prices", "A medium pizza is thirteen ninety nine."),
        ("how much is a pizza", "prices", "A small pizza is nine ninety nine, a medium"),
        ("what pizzas do you have", "menu", "We make pepperoni"),
        ("do you have vegetarian options", "menu", "We make pepperoni"),
        ("do you deliver a large pepperoni", "delivery", "Yes, we deliver"),
        ("what time do you close tonight", "hours", "We're open every day"),
    ],
)
async def test_the_best_scoring_intent_answers(sentence: str, intent: str, start: str) -> None:
    agent = call("pizza")
    assert (await reply(agent, sentence)).startswith(start)
    assert scripted(agent).last_intent == intent


def test_scores_follow_the_documented_points() -> None:
    spec = load_script(resolve_script_path("pizza"))
    intents = {intent.name: intent for intent in spec.intents}
    text = "How much is a large pepperoni pizza?"
    normalized, mentioned = normalize_text(text), spec.mentions(text)
    # prices: "how much" (2) + its pattern (2); its size slot is optional, so no slot point.
    assert spec.score(intents["prices"], text, normalized, mentioned) == 4
    # order: "pizza" (2) + names values of its slots (1, once however many).
    assert spec.score(intents["order"], text, normalized, mentioned) == 3
    # An intent waiting for the size scores 2 more when the sentence gives one.
    assert spec.score(intents["order"], "large", "large", {"size": "large"}, frozenset({"size"})) == 3
    assert spec.score(intents["order"], "large", "large", {"size": "large"}) == 1
    # A count is not evidence of an order (numbers are in hours and addresses too).
    assert spec.score(intents["order"], "two", "two", {"quantity": "two"}) == 0


# --------------------------------------------------------------------------------------------
# The same facts every time


async def test_the_same_question_twice_gets_the_same_facts() -> None:
    agent = call("pizza")
    hours = load_script(resolve_script_path("pizza")).facts["hours"]
    first = await reply(agent, "what time do you close")
    second = await reply(agent, "what are your hours")
    assert first != second  # the phrasing rotates...
    assert hours in first and hours in second  # ...the facts do not
    assert "until ten at night" in first and "until midnight on Fridays and Saturdays" in first


def scalars(facts: Any) -> list[str]:
    if isinstance(facts, dict):
        return [text for value in facts.values() for text in scalars(value)]
    return [str(facts)]


@pytest.mark.parametrize("name", ["pizza", "bank", "bank-desk"])
def test_packaged_replies_name_their_facts_instead_of_copying_them(name: str) -> None:
    """A fact written out in a reply as well as in `facts:` is two places that drift apart."""
    scenario = load_scenario(resolve_agent_path(name))
    for agent in scenario.agents:
        assert isinstance(agent, ScriptSpec)
        assert agent.facts, agent.name  # every agent states facts, merged from the scenario's
        texts = [agent.greeting or "", agent.fallback] + [text for intent in agent.intents for text in intent.texts]
        for fact in scalars(agent.facts):
            assert not [text for text in texts if fact in text], fact


async def test_scenario_facts_are_shared_and_an_agent_may_override_them(tmp_path: Path) -> None:
    agent = scripted_call(
        tmp_path,
        """\
        name: S
        facts: {hours: nine to five, city: Leeds}
        agents:
          - name: desk
            facts: {city: York}
            intents: [{name: where, keywords: [where], reply: "{facts.city}, {facts.hours}."}]
            fallback: F.
        """,
    )
    assert await reply(agent, "where are you") == "York, nine to five."


async def test_bank_desk_states_hours_from_the_scenario_facts() -> None:
    agent = call("bank-desk")
    assert await reply(agent, "3") == (
        "Our branches are open from nine to five, Monday to Friday, and from nine to one on Saturday."
    )


def test_placeholders_that_cannot_be_filled_stay_as_written() -> None:
    facts: dict[str, Any] = {"price": {"large": "ten"}, "nested": {"a": {"b": 1}}}
    template = "{facts.price.{size}} {facts.price.{colour}} {facts.nope} {facts.nested.a} {facts.nested.a.b} {x}"
    assert fill_placeholders(template, {"size": "large"}, facts) == (
        "ten {facts.price.{colour}} {facts.nope} {facts.nested.a} 1 {x}"
    )
    assert fill_placeholders("{facts.price.{size}}", {"size": "small"}, facts) == "{facts.price.{size}}"


# --------------------------------------------------------------------------------------------
# Handoffs that answer, and teams that pass callers to each other


async def test_after_a_handoff_the_accounts_team_answers_the_question() -> None:
    agent = call("bank-desk")
    assert await reply(agent, "What are the fees on my account?") == (
        "Of course. I'm putting you through to our accounts team."
        " The monthly account fee is five dollars, waived with a balance over one thousand dollars."
    )
    assert agent.active == "accounts"


async def test_after_a_handoff_the_card_team_answers_the_question() -> None:
    agent = call("bank-desk")
    answer = await reply(agent, "my debit card was stolen")
    assert answer.startswith("Certainly. I'm putting you through to our card team. This is the card team.")
    assert "replacement will reach you in five days" in answer
    assert agent.active == "cards"


async def test_the_teams_hand_callers_to_each_other_and_answer() -> None:
    agent = call("bank-desk")
    await reply(agent, "i lost my card")
    assert await reply(agent, "what is my balance") == (
        "Sure. I'll pass you to our accounts team. Statements and your balance are always in the Riverside app."
    )
    assert agent.active == "accounts"
    answer = await reply(agent, "and my credit card was stolen too")
    assert answer.startswith("Sure. I'll pass you to our card team. This is the card team.")
    assert agent.active == "cards"
    assert await reply(agent, "what are the fees") == (
        "Sure. I'll pass you to our accounts team."
        " The monthly account fee is five dollars, waived with a balance over one thousand dollars."
    )
    assert agent.active == "accounts"


async def test_a_team_with_nothing_to_say_to_the_words_greets_instead() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    agent = call("bank-desk")
    agent.listen(lambda name, **fields: events.append((name, fields)))
    # A key pressed at reception: the accounts team has no answer to "2", so it introduces itself.
    assert await reply(agent, "2") == (
        "Of course. I'm putting you through to our accounts team. Accounts team here. You can ask about fees or statements."
    )
    assert events[-1] == (
        "agent_handoff",
        {"source": "reception", "target": "accounts", "announced": True, "history": "shared", "then": "greet"},
    )
    # "something else" at the card team: back to reception, which greets.
    agent = call("bank-desk")
    await reply(agent, "i lost my card")
    assert await reply(agent, "something else") == (
        "Let me pass you back. Welcome to Riverside Bank. Are you calling about a card, or about your account?"
    )
    assert agent.active == "reception"


async def test_handing_back_does_not_loop_on_a_sentence_both_teams_claim(tmp_path: Path) -> None:
    agent = scripted_call(
        tmp_path,
        """\
        name: Ping
        agents:
          - name: a
            intents: [{name: go, keywords: [both], reply: "A.", handoff: b}]
            fallback: F.
            handoffs: [{to: b}]
          - name: b
            intents: [{name: go, keywords: [both], reply: "B.", handoff: a}]
            fallback: F.
            handoffs: [{to: a}]
        """,
    )
    said = [o.text for o in await outputs(agent, "both") if isinstance(o, Say)]
    assert said == ["A.", "B.", "A.", "B."]  # stopped after three handoffs in one turn


# --------------------------------------------------------------------------------------------
# Mistakes in a script fail at startup, naming the problem


BASE = """\
    name: T
    facts: {hours: nine to five, price: {small: one, large: two}}
    slots: {size: {small: [small], large: [large]}, count: number}
    intents:
      - name: a
        keywords: [a]
{intent}
    fallback: F.
"""


def intent_with(body: str) -> str:
    return BASE.replace("{intent}", textwrap.indent(textwrap.dedent(body), " " * 8))


@pytest.mark.parametrize(
    ("intent", "message"),
    [
        (
            'reply: "{facts.days}"',
            r"names \{facts.days\}, which is not a single value in facts \(facts: hours, price\)",
        ),
        ('reply: "{facts.price}"', r"names \{facts.price\}, which is not a single value"),
        ('reply: "{facts.price.{size}}"', r"but 'size' is not a slot of this intent"),
        (
            'slots: [{name: count, ask: "How many?"}]\nreply: "{facts.price.{count}}"',
            r"'count' is a count: facts cannot list an entry",
        ),
        ("slots: [{name: colour, ask: Which}]\nreply: R.", r"fills slot 'colour', which is not in this agent's slots"),
        ("slots: [{name: size}]\nreply: R.", r"needs an ask .* a default, or optional: true"),
        ("slots: [{name: size, optional: true, ask: Which}]\nreply: R.", r"is optional: it is never asked"),
        ('slots: [{name: size, ask: " "}]\nreply: R.', r"ask must not be blank"),
        ("slots: [{name: size, ask: A}, {name: size, ask: B}]\nreply: R.", r"slots listed twice: size"),
        ('replies: ["Open {facts.hours}.", "We open at nine."]', r"every reply must name the same facts"),
        ('slots: [{name: size, optional: true}]\nreply: "A {size}."', r"at least one reply must name none"),
    ],
)
def test_script_mistakes_are_refused_at_load(tmp_path: Path, intent: str, message: str) -> None:
    with pytest.raises(ScriptError, match=message):
        load_script(write(tmp_path, intent_with(intent)))


def test_an_indexed_fact_needs_an_entry_for_every_value(tmp_path: Path) -> None:
    body = intent_with('slots: [{name: size, optional: true}]\nreplies: ["P.", "{facts.price.{size}}."]')
    body = body.replace("price: {small: one, large: two}", "price: {small: one}")
    with pytest.raises(ScriptError, match=r"facts.price needs an entry for every size; missing: large"):
        load_script(write(tmp_path, body))


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ("{text: {a: [a]}}", r"slot name 'text' must be lowercase"),
        ("{Size: {a: [a]}}", r"slot name 'Size' must be lowercase"),
        ("{size: {}}", r"slot 'size' lists no values"),
        ("{size: {small: [little], tiny: [little]}}", r"'little' is listed for both 'small' and 'tiny'"),
        ("{size: {small: ['?']}}", r"'\?' has no letters or digits"),
        ("{size: many}", r"slots"),
    ],
)
def test_bad_slot_declarations_are_refused(tmp_path: Path, slots: str, message: str) -> None:
    body = f"""\
        name: T
        slots: {slots}
        intents: [{{name: a, keywords: [a], reply: A.}}]
        fallback: F.
        """
    with pytest.raises(ScriptError, match=message):
        load_script(write(tmp_path, body))


def test_a_greeting_cannot_index_facts_by_a_slot(tmp_path: Path) -> None:
    body = intent_with("reply: R.").replace("fallback: F.", 'fallback: "{facts.price.{size}}"')
    with pytest.raises(ScriptError, match=r"fallback names .* but 'size' is not a slot of an intent"):
        load_script(write(tmp_path, body))


def test_a_scenario_agent_naming_a_fact_nobody_has_is_refused(tmp_path: Path) -> None:
    body = """\
        name: S
        facts: {hours: nine}
        agents:
          - name: desk
            intents: [{name: a, keywords: [a], reply: "{facts.city}"}]
            fallback: F.
        """
    with pytest.raises(ScenarioError, match=r"agents\[0\] \(desk\).*names \{facts.city\}.*facts: hours"):
        load_scenario(write(tmp_path, body))
