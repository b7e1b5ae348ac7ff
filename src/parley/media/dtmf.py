"""Key presses collected into one caller input. Pure: the handler gives it the time and runs its timer.

A caller typing an account number presses ten keys; each key as its own turn meant ten answers
(and cancelled answers asked again). Keys now gather into one input, which is complete when:
- the agent said how many digits it wants (a menu of single keys: at once), or
- the terminator key is pressed (`#` by default; not part of the input), or
- `max_digits` keys were pressed, or
- no key came for `interdigit_s` after the last one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DigitRules:
    interdigit_s: float = 1.0
    terminator: str = "#"  # "" for none
    max_digits: int = 20


class DigitCollector:
    def __init__(self, rules: DigitRules | None = None) -> None:
        self.rules = rules or DigitRules()
        self._digits = ""
        self.generation = 0  # identifies the input a timer belongs to

    @property
    def collecting(self) -> bool:
        return bool(self._digits)

    def press(self, keys: str, expected: int | None = None) -> list[str]:
        """Keys pressed (ACS may send several in one message); the inputs they complete, in order.
        `expected`: how many digits the agent asked for, if it said."""
        completed: list[str] = []
        for key in keys:
            if self.rules.terminator and key == self.rules.terminator:
                if self._digits:
                    completed.append(self._take())
                elif expected is None:
                    completed.append(key)  # a lone '#' may mean something to the agent
                continue
            self._digits += key
            if (expected is not None and len(self._digits) >= expected) or len(self._digits) >= self.rules.max_digits:
                completed.append(self._take())
        return completed

    def expire(self, generation: int) -> str | None:
        """The inter-digit timer of `generation` fired: what was typed so far is the input."""
        if generation != self.generation or not self._digits:
            return None
        return self._take()

    def _take(self) -> str:
        digits, self._digits = self._digits, ""
        self.generation += 1
        return digits
