"""Cut reply text into clauses so speech synthesis can start before the whole reply is rendered.

Time to first audio is roughly the synthesis time of the first clause, so the first clause is cut
at the first comma, colon or dash once it is `min_chars` long. Later clauses are synthesised while
earlier ones play, so they only break at commas once they are longer (fewer joints, better
prosody); sentence ends (. ! ? ; ... and line breaks) always break a clause of `min_chars`.

A punctuation mark only ends a clause when whitespace follows it. That keeps "3.50", "1,000" and
"e.g" whole, and it is also what makes streaming safe: a streamed "3." is undecided until the next
character arrives. Abbreviations ("Mr.", "Dr.", "e.g.", "U.S.") and initials ("J. K.") never end
a clause. A run longer than `max_chars` without a usable boundary is cut at its last space.

`split_clauses(text)` and a `ClauseBuffer` fed the same text in any pieces give the same clauses:
both run the one incremental scanner below, which only cuts where later text cannot change the
decision.
"""

from __future__ import annotations

import re

_HARD = frozenset(".!?;…")
"""Sentence ends: always a clause boundary (subject to min_chars)."""
_SOFT = frozenset(",:—–")
"""Pauses inside a sentence: a boundary for the first clause, and for later ones once long."""
_PUNCT = _HARD | _SOFT | {"-"}
_CLOSERS = frozenset("\"'”’)]»")
"""Closing quotes/brackets stay with the punctuation they follow: 'he said "yes." Then'."""
_OPENERS = "\"'“‘([«"
_SPACE = " "
_NEWLINE = "\n"

_LATER_SOFT_FACTOR = 3
"""After the first clause a comma/colon/dash only cuts a clause of min_chars * this."""

_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "prof.", "vs.", "mt.", "approx."})
_INITIALS = re.compile(r"(?:[A-Za-z]\.){2,}|[A-Z]\.")
"""'e.g.', 'i.e.', 'a.m.', 'U.S.' and single initials like the 'J.' of 'J. K. Rowling'."""
_WHITESPACE = re.compile(r"\s+")


def split_clauses(text: str, *, min_chars: int = 12, max_chars: int = 160) -> list[str]:
    """Whole reply text to clauses (whitespace-normalised, punctuation kept, never empty)."""
    buffer = ClauseBuffer(min_chars=min_chars, max_chars=max_chars)
    return buffer.push(text) + buffer.flush()


class ClauseBuffer:
    """Clauses from streamed text deltas (e.g. LLM tokens), cut as soon as they are certain.

    `push` returns the clauses completed by a delta, `flush` the rest at the end of the reply; the
    buffer is then empty and ready for the next reply (whose first clause is again cut early).
    """

    def __init__(self, *, min_chars: int = 12, max_chars: int = 160) -> None:
        if not 0 < min_chars <= max_chars:
            raise ValueError(f"need 0 < min_chars <= max_chars (got {min_chars}, {max_chars})")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._pending = ""  # normalised, no leading whitespace
        self._first = True

    def push(self, delta: str) -> list[str]:
        self._pending = _normalise(self._pending + delta).lstrip()
        return self._drain(final=False)

    def flush(self) -> list[str]:
        self._pending = self._pending.rstrip()
        clauses = self._drain(final=True)
        self._pending = ""
        self._first = True
        return clauses

    def _drain(self, *, final: bool) -> list[str]:
        clauses: list[str] = []
        while self._pending:
            cut = self._find_cut(final=final)
            if cut is None:
                break
            clause = self._pending[:cut].replace(_NEWLINE, _SPACE).strip()
            self._pending = self._pending[cut:].lstrip()
            if clause:
                clauses.append(clause)
                self._first = False
        return clauses

    def _find_cut(self, *, final: bool) -> int | None:
        """Where the next clause ends in the pending text, or None while that is undecided."""
        text = self._pending
        # At the end of the reply, a trailing space settles the last punctuation run.
        boundaries, decided = _scan(text + _SPACE if final else text)
        decided = min(decided, len(text))
        soft_min = self.min_chars if self._first else self.min_chars * _LATER_SOFT_FACTOR
        for end, hard in boundaries:
            if end > self.max_chars:
                break
            # The pending text starts with a non-space and `end` follows punctuation, a closer or a
            # word (newline boundary), so the clause is exactly `end` characters long.
            if end >= (self.min_chars if hard else soft_min):
                return end
        if final and len(text) <= self.max_chars:
            return len(text)
        if len(text) > self.max_chars and (final or decided >= self.max_chars):
            return _hard_split(text, self.max_chars)
        return None


def _normalise(text: str) -> str:
    """Collapse whitespace runs; a run with a line break stays a (single) line break."""
    return _WHITESPACE.sub(lambda m: _NEWLINE if "\n" in m[0] or "\r" in m[0] else _SPACE, text)


def _scan(text: str) -> tuple[list[tuple[int, bool]], int]:
    """Clause boundaries in `text` as (end index, is_hard), and how far the text is decided.

    Scanning stops at a punctuation run that reaches the end of the text: whether "3." ends a
    clause depends on the next character. A trailing space is undecided too (it may become a
    line break, which is a boundary).
    """
    boundaries: list[tuple[int, bool]] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == _NEWLINE:
            boundaries.append((i, True))
            i += 1
            continue
        if char not in _PUNCT:
            i += 1
            continue
        run_end = i
        while run_end < n and text[run_end] in _PUNCT:
            run_end += 1
        end = run_end
        while end < n and text[end] in _CLOSERS:
            end += 1
        if end == n:
            return boundaries, i
        hard = _classify(text, i, run_end, end)
        if hard is not None:
            boundaries.append((end, hard))
        i = end
    return boundaries, n - 1 if text.endswith(_SPACE) else n


def _classify(text: str, start: int, run_end: int, end: int) -> bool | None:
    """Is the punctuation run text[start:run_end] (closers up to `end`) a hard, soft or no boundary?"""
    run = text[start:run_end]
    spaced = text[end] in (_SPACE, _NEWLINE)
    if set(run) <= {"-"}:
        # "well-known" and "1-800" are words; " - " and "--" are dashes.
        if len(run) >= 2 or (spaced and start > 0 and text[start - 1] == _SPACE):
            return False
        return None
    if set(run) == {"—"}:
        return False  # an em dash is a pause even when written "word—word"
    if not spaced:
        return None  # "3.50", "1,000", "10:30", "10–12"
    if run == "." and _is_abbreviation(text, start):
        return None
    return any(char in _HARD for char in run)


def _is_abbreviation(text: str, dot: int) -> bool:
    word_start = max(text.rfind(_SPACE, 0, dot), text.rfind(_NEWLINE, 0, dot)) + 1
    word = text[word_start : dot + 1].lstrip(_OPENERS)
    return word.lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def _hard_split(text: str, max_chars: int) -> int:
    """Cut a run with no usable boundary at its last space within max_chars (mid-word if none)."""
    space = max(text.rfind(_SPACE, 0, max_chars + 1), text.rfind(_NEWLINE, 0, max_chars + 1))
    return space if space > 0 else max_chars


_PHRASE_STARTERS = frozenset(
    "and but or so because from until with for to at in on about which that when if while after"
    " before since than".split()
)
"""Words a spoken phrase starts with: a cut before one sounds like a breath, not a stumble."""


_OPENER = re.compile(r"^([^,]{2,14},) ")
"""A short opening phrase ending in a comma: "Sure,", "Of course,", "Hi Sam,"."""


def quick_start(clauses: list[str], *, over_chars: int = 40, min_chars: int = 16) -> list[str]:
    """Cut a long FIRST clause after a short opener ("Sure,") or else before its first
    phrase-starting word after `min_chars`.

    Time to first audio is the synthesis time of the first clause (~55 ms per second of speech
    for Piper here), and a reply's first sentence often has no comma: "We're open every day |
    from eleven in the morning until ten at night." The rest renders while the first part plays.
    """
    if not clauses or len(clauses[0]) <= over_chars:
        return clauses
    first = clauses[0]
    opener = _OPENER.match(first)
    if opener is not None and len(first) - opener.end() >= min_chars:
        # "Sure, ..." / "Of course, ...": the opener is a phrase of its own, said in ~80 ms of
        # synthesis, and its comma is where a speaker pauses while the rest renders.
        return [opener.group(1), first[opener.end() :], *clauses[1:]]
    for match in re.finditer(r" (\w+)", first):
        if match.start() >= min_chars and match.group(1).lower() in _PHRASE_STARTERS:
            if len(first) - match.start() < min_chars:
                break  # the rest would be a stub
            return [first[: match.start()], first[match.start() + 1 :], *clauses[1:]]
    return clauses
