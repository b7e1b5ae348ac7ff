"""Word error rate, with a normaliser that makes Whisper's written English comparable with
LibriVox-style references (lower case, no punctuation, numbers and titles spelled out).

Without normalising, "Mr. Dashwood" against "mister dashwood" or "ill-disposed" against "ill
disposed" would count as errors the listener never heard; the WER would measure typography.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

_ABBREVIATIONS: Final = {
    "mr": "mister",
    "mrs": "missus",
    "ms": "miss",
    "dr": "doctor",
    "st": "saint",
    "jr": "junior",
    "sr": "senior",
}
_ABBREVIATION_RE: Final = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", re.IGNORECASE)
# Without a full stop only the unambiguous titles: a bare "st" may be a street, "ms" a manuscript.
# (pocketsphinx's dictionary spells "mister" as "mr", pronounced in full.)
_BARE_TITLES_RE: Final = re.compile(r"\b(mr|mrs|dr)\b", re.IGNORECASE)
_ONES: Final = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS: Final = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_MAX_SPELLED: Final = 999_999  # larger numbers are years, phone numbers...: left as digits
_NUMBER_RE: Final = re.compile(r"\d+(?:,\d{3})*")
_HYPHENS_RE: Final = re.compile(r"[-\u2010-\u2015]")  # hyphen, dashes
_APOSTROPHES_RE: Final = re.compile(r"[\u2018\u2019\u02bc`]")
_NOT_WORD_RE: Final = re.compile(r"[^a-z0-9' ]+")


def number_to_words(n: int) -> str:
    """0 <= n <= 999,999 in words, the way a reader says it ("one hundred twenty three")."""
    if not 0 <= n <= _MAX_SPELLED:
        raise ValueError(f"{n} is out of range")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_to_words(thousands)} thousand" + (f" {number_to_words(rest)}" if rest else "")


def _spell_number(match: re.Match[str]) -> str:
    value = int(match.group().replace(",", ""))
    return f" {number_to_words(value)} " if value <= _MAX_SPELLED else match.group().replace(",", "")


def normalize(text: str) -> str:
    """Lower case, titles expanded, hyphens to spaces, small numbers in words, no punctuation."""
    text = _ABBREVIATION_RE.sub(lambda m: _ABBREVIATIONS[m.group(1).lower()], text)
    text = _BARE_TITLES_RE.sub(lambda m: _ABBREVIATIONS[m.group(1).lower()], text)
    text = _APOSTROPHES_RE.sub("'", text.lower())
    text = _HYPHENS_RE.sub(" ", text).replace("&", " and ")
    text = _NUMBER_RE.sub(_spell_number, text)
    text = _NOT_WORD_RE.sub(" ", text)
    # Apostrophes stay inside words ("don't") but not as quotes around them ('yes').
    words = (word.strip("'") for word in text.split())
    return " ".join(word for word in words if word)


@dataclass(frozen=True, slots=True)
class WordErrors:
    """Edits turning the reference into the hypothesis; `words` is the reference length."""

    substitutions: int
    deletions: int
    insertions: int
    words: int

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Edits per reference word (can exceed 1 with many insertions); 0 for empty vs empty."""
        if self.words == 0:
            return 0.0 if self.edits == 0 else float("inf")
        return self.edits / self.words

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.words + other.words,
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "wer": round(self.wer, 4),
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "words": self.words,
        }


def align(reference: list[str], hypothesis: list[str]) -> WordErrors:
    """Levenshtein alignment over words, counting each kind of edit on one optimal path.

    Ties prefer a substitution over a deletion plus an insertion (same cost here as in jiwer and
    NIST sclite), so the counts are the conventional ones.
    """
    rows, cols = len(reference) + 1, len(hypothesis) + 1
    # cost[i][j] = (edits, substitutions, deletions, insertions) for reference[:i] -> hypothesis[:j]
    previous = [(j, 0, 0, j) for j in range(cols)]
    for i in range(1, rows):
        current = [(i, 0, i, 0)]
        for j in range(1, cols):
            diag = previous[j - 1]
            if reference[i - 1] == hypothesis[j - 1]:
                best = diag
            else:
                best = (diag[0] + 1, diag[1] + 1, diag[2], diag[3])
            up, left = previous[j], current[j - 1]
            deletion = (up[0] + 1, up[1], up[2] + 1, up[3])
            insertion = (left[0] + 1, left[1], left[2], left[3] + 1)
            current.append(min(best, deletion, insertion, key=lambda cost: cost[0]))
        previous = current
    _, substitutions, deletions, insertions = previous[-1]
    return WordErrors(substitutions, deletions, insertions, len(reference))


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """Edits between two texts after `normalize`."""
    return align(normalize(reference).split(), normalize(hypothesis).split())


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis).wer


def aggregate(pairs: Iterable[tuple[str, str]]) -> WordErrors:
    """Corpus WER: total edits over total reference words (not the mean of per-clip WERs, which
    would let a short clip weigh as much as a long one)."""
    total = WordErrors(0, 0, 0, 0)
    for reference, hypothesis in pairs:
        total = total + word_errors(reference, hypothesis)
    return total
