"""Clause splitting for low-latency TTS: whole-text and streamed (LLM token) input agree."""

from __future__ import annotations

import random

import pytest

from parley.voice.clauses import ClauseBuffer, split_clauses

TEXTS = [
    "Sure, a large pizza.",
    "Hello there, how are you today? I'm fine.",
    "That's $3.50 for 1,000 items, e.g. pens. Mr. Smith and Dr. Jones live on Main St. today!",
    (
        "Thanks for calling Mario's pizza; how can I help you today? We have pepperoni, mushrooms, "
        "olives, and extra cheese, plus drinks: cola, lemonade - and water. Call 1-800-555-1234."
    ),
    "Options:\n1. Pepperoni\n2. Cheese\n\nWhich one would you like?",
    'He said "yes." Then he left, quickly, very quickly indeed, without a word... Odd!',
    "Well… I think — no wait—let me see. We open at 9 a.m. and close at 5 p.m. every day.",
    "word " * 70,
    "x" * 400 + " tail.",
    "   Spaces   everywhere ,  and\ttabs\r\n too .  ",
    "It is 10:30 now. The range is 10–12 people, J. K. Rowling said, in the U.S. of course.",
    "",
    "Hi!",
]


def test_first_clause_is_cut_at_the_first_comma():
    assert split_clauses("Hello there, how are you today? I'm fine.") == [
        "Hello there,",
        "how are you today?",
        "I'm fine.",
    ]


def test_tiny_pieces_merge_with_the_next():
    assert split_clauses("Sure, a large pizza.") == ["Sure, a large pizza."]
    assert split_clauses("Hi! How can I help you today?") == ["Hi! How can I help you today?"]


def test_numbers_and_abbreviations_are_not_cut():
    text = "Mr. Smith paid $3.50 for 1,000 pens at 10:30 today. Dr. Jones, e.g. the dentist, did not."
    assert split_clauses(text) == [
        "Mr. Smith paid $3.50 for 1,000 pens at 10:30 today.",
        "Dr. Jones, e.g. the dentist, did not.",
    ]


def test_sentence_ends_and_semicolons_are_hard_boundaries():
    assert split_clauses("I can help with that; let me check. Is that all right? Great!") == [
        "I can help with that;",
        "let me check.",
        "Is that all right?",
        "Great!",
    ]


def test_later_clauses_only_break_at_commas_once_long():
    text = "Thanks for calling. We have cola, lemonade, and water, or a milkshake if you like, sir."
    assert split_clauses(text) == [
        "Thanks for calling.",
        "We have cola, lemonade, and water, or a milkshake if you like,",
        "sir.",
    ]


def test_dashes_split_but_hyphens_do_not():
    assert split_clauses("A well-known shop — open 24-7 — sells pizza.") == [
        "A well-known shop —",
        "open 24-7 — sells pizza.",
    ]
    assert split_clauses("One moment please - checking now.") == ["One moment please -", "checking now."]


def test_punctuation_and_closing_quotes_stay_with_the_clause():
    assert split_clauses('He said "yes." Then he left.') == ['He said "yes."', "Then he left."]


def test_long_runs_are_cut_at_the_last_space_before_max_chars():
    clauses = split_clauses("word " * 70, max_chars=160)
    assert all(len(clause) <= 160 for clause in clauses)
    assert " ".join(clauses) == ("word " * 70).strip()
    assert len(clauses[0]) > 150  # the last space before the limit, not an early one
    assert [len(c) for c in split_clauses("x" * 350)] == [160, 160, 30]


def test_output_is_whitespace_normalised_and_never_empty():
    assert split_clauses("   Spaces   everywhere ,  and\ttabs\r\n too .  ") == [
        "Spaces everywhere ,",
        "and tabs too .",  # the line break was a boundary, but too short
    ]
    assert split_clauses("") == []
    assert split_clauses("   \n ") == []
    for text in TEXTS:
        for clause in split_clauses(text):
            assert clause and clause == " ".join(clause.split())


def test_nothing_is_lost():
    for text in TEXTS:
        # Compared without spaces: a run with no space at all is cut mid-word.
        assert "".join(split_clauses(text)).replace(" ", "") == "".join(text.split())


def test_buffer_emits_clauses_as_soon_as_they_are_certain():
    buffer = ClauseBuffer()
    assert buffer.push("Hello there,") == []  # the next character could still be part of it
    assert buffer.push(" how") == ["Hello there,"]
    assert buffer.push(" are you? It costs 3.") == ["how are you?"]
    assert buffer.push("50 in total") == []  # "3." was not a sentence end
    assert buffer.flush() == ["It costs 3.50 in total"]


def test_flush_resets_for_the_next_reply():
    buffer = ClauseBuffer()
    assert buffer.push("Hello there, my dear friend. ") == ["Hello there,", "my dear friend."]
    assert buffer.push("Bye.") == []
    assert buffer.flush() == ["Bye."]
    # A new reply: its first clause is cut early again.
    assert buffer.push("Once again then, from the top. ") == ["Once again then,", "from the top."]


def _chunkings(text: str, rng: random.Random) -> list[list[str]]:
    """Whole, one character at a time, token-like pieces and random cuts."""
    ways = [[text], list(text), [*[piece + " " for piece in text.split(" ")][:-1], text.split(" ")[-1]]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 12))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return ways


@pytest.mark.parametrize("min_chars,max_chars", [(12, 160), (1, 40), (30, 60)])
def test_streamed_clauses_equal_whole_text_clauses(min_chars: int, max_chars: int):
    rng = random.Random(7)
    for text in TEXTS:
        expected = split_clauses(text, min_chars=min_chars, max_chars=max_chars)
        for pieces in _chunkings(text, rng):
            assert "".join(pieces) == text
            buffer = ClauseBuffer(min_chars=min_chars, max_chars=max_chars)
            got = [clause for piece in pieces for clause in buffer.push(piece)] + buffer.flush()
            assert got == expected, pieces


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError):
        split_clauses("hi", min_chars=0)
    with pytest.raises(ValueError):
        ClauseBuffer(min_chars=50, max_chars=10)


_TOKENS = [
    "pizza",
    "large",
    "Mr.",
    "e.g.",
    "U.S.",
    "3.50",
    "1,000",
    "10:30",
    "well-known",
    "J.",
    "ok",
    ",",
    ".",
    "!",
    "?",
    ";",
    ":",
    "…",
    "...",
    "—",
    " - ",
    "--",
    '"',
    "'",
    ")",
    "\n",
    "\n\n",
    "  ",
    "\t",
    "a",
    "reasonably",
    "extraordinarily",
    "x" * 30,
]


def test_streaming_matches_on_random_tricky_texts():
    rng = random.Random(11)
    for _ in range(120):
        words = rng.choices(_TOKENS, k=rng.randint(0, 60))
        text = "".join(word if rng.random() < 0.3 else " " + word for word in words)
        for min_chars, max_chars in ((12, 160), (3, 25)):
            expected = split_clauses(text, min_chars=min_chars, max_chars=max_chars)
            assert all(clause and len(clause) <= max_chars for clause in expected)
            for pieces in _chunkings(text, rng)[:6]:
                buffer = ClauseBuffer(min_chars=min_chars, max_chars=max_chars)
                got = [clause for piece in pieces for clause in buffer.push(piece)] + buffer.flush()
                assert got == expected, (text, pieces)


def test_quick_start_cuts_a_long_first_clause_before_a_phrase() -> None:
    from parley.voice.clauses import quick_start

    text = "We're open every day from eleven in the morning until ten at night."
    assert quick_start(split_clauses(text)) == [
        "We're open every day",
        "from eleven in the morning until ten at night.",
    ]
    opener = "Sure, we're open every day from eleven in the morning."
    assert quick_start(split_clauses(opener)) == ["Sure,", "we're open every day from eleven in the morning."]
    # An opener is only cut off when enough follows it.
    assert quick_start(["Of course, we deliver pizzas anywhere in town."]) == [
        "Of course,",
        "we deliver pizzas anywhere in town.",
    ]
    short = split_clauses("Hi, thanks for calling. How can I help?")
    assert quick_start(short) == short
    assert quick_start([]) == []
    # A cut that would leave a stub behind is not made.
    stub = ["Supercalifragilistic expialidocious words everywhere and more"]
    assert quick_start(stub) == stub
