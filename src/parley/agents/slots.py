"""Slots: what a scripted intent needs from the caller before it can act (which pizza, what size).

An agent declares its slot types once; an intent lists the ones it fills:

    slots:                           # the agent's vocabulary: canonical value -> words callers say
      pizza: {pepperoni: [pepperoni, peperoni], margherita: [margherita, margarita]}
      size: {small: [small], large: [large, big]}
      quantity: number               # a count: "two", "2"
    intents:
      - name: order
        slots:
          - {name: pizza, ask: "Which pizza would you like?"}
          - {name: size, ask: "What size?"}
          - {name: quantity, default: one}
      - name: prices
        slots: [{name: size, optional: true}]    # used when said, never asked
        replies:                                 # the replies naming the most given slots are used
          - "A small is nine ninety nine and a large sixteen ninety nine."
          - "A {size} is {facts.price.{size}}."  # the fact for the slot's value

Every slot is looked for in every sentence, so "a large pepperoni please" fills two at once, and
an answer to a question ("large") fills the slot that was asked for. Matching is whole words on
the normalised text (the same forgiving rules as keywords); the earliest mention in the sentence
wins, and the longer phrase when two start at the same place ("extra large" over "large").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["NUMBER", "RESERVED_NAMES", "SlotType", "SlotUse", "number_word"]

NUMBER = "number"
# Placeholders a reply already has; a slot of the same name would shadow them.
RESERVED_NAMES = frozenset({"text", "digits", "facts"})
SLOT_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen twenty"
).split()
_WORD_VALUES = {word: value for value, word in enumerate(_NUMBER_WORDS)}
_TOKEN = re.compile(r"\S+")


def number_word(value: int) -> str:
    """How a count is said in a reply: words up to twenty (TTS reads them best), digits beyond."""
    return _NUMBER_WORDS[value] if 0 <= value < len(_NUMBER_WORDS) else str(value)


class SlotType:
    """One slot's vocabulary, compiled once at startup: `find` is a few substring searches."""

    def __init__(
        self, name: str, values: Literal["number"] | dict[str, list[str]], normalize: Callable[[str], str]
    ) -> None:
        self.name = name
        self.is_number = values == NUMBER
        self.values: tuple[str, ...] = tuple(values) if isinstance(values, dict) else ()
        # (normalised phrase, canonical value), longest phrase first so it wins a tie in position.
        self._phrases: list[tuple[str, str]] = []
        if isinstance(values, dict):
            self._phrases = sorted(_phrases(name, values, normalize), key=lambda p: -len(p[0]))

    @property
    def is_evidence(self) -> bool:
        """Whether a mention says anything about what the caller wants. A number does not: one
        appears in hours, addresses and account numbers as often as in orders."""
        return not self.is_number

    def find(self, normalized: str) -> tuple[int, str] | None:
        """(position, canonical value) of the earliest mention in `normalized`, or None."""
        if self.is_number:
            return _find_number(normalized)
        padded = f" {normalized} "
        best: tuple[int, str] | None = None
        for phrase, value in self._phrases:
            at = padded.find(f" {phrase} ")
            if at >= 0 and (best is None or at < best[0]):
                best = (at, value)
        return best


def _phrases(slot: str, values: dict[str, list[str]], normalize: Callable[[str], str]) -> list[tuple[str, str]]:
    owner: dict[str, str] = {}
    for value, words in values.items():
        for word in [value, *words]:
            phrase = normalize(word)
            if not phrase:
                raise ValueError(f"slot {slot!r}: {word!r} has no letters or digits")
            if owner.get(phrase, value) != value:
                # One phrase naming two values would make the slot's answer depend on dict order.
                raise ValueError(f"slot {slot!r}: {word!r} is listed for both {owner[phrase]!r} and {value!r}")
            owner[phrase] = value
    return list(owner.items())


def _find_number(normalized: str) -> tuple[int, str] | None:
    for token in _TOKEN.finditer(normalized):
        word = token.group()
        if word in _WORD_VALUES:
            return token.start(), word
        if word.isdigit() and len(word) <= 3:
            return token.start(), number_word(int(word))
    return None


class SlotUse(BaseModel):
    """A slot an intent fills: asked for when missing, unless it has a default or is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    ask: str | None = Field(None, description="Said when the caller has not given this slot yet.")
    default: str | None = Field(None, description="Used when the caller does not say; never asked.")
    optional: bool = Field(False, description="Used when the caller says it; never asked, no default.")

    @field_validator("default", mode="before")
    @classmethod
    def _default_as_text(cls, value: Any) -> Any:
        # `default: 1` in YAML is an int; a reply says it, so keep it as the words a caller hears.
        if isinstance(value, int) and not isinstance(value, bool):
            return number_word(value)
        return value

    @model_validator(mode="after")
    def _askable(self) -> SlotUse:
        if self.ask is not None and not self.ask.strip():
            raise ValueError(f"slot {self.name!r}: ask must not be blank")
        if self.optional and (self.ask is not None or self.default is not None):
            raise ValueError(f"slot {self.name!r} is optional: it is never asked and has no default")
        if not self.optional and self.ask is None and self.default is None:
            raise ValueError(
                f"slot {self.name!r} needs an ask (to ask the caller for it), a default, or optional: true"
            )
        return self

    @property
    def required(self) -> bool:
        """The intent cannot act without it: it asks."""
        return self.default is None and not self.optional
