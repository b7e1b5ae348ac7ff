"""A rule-based agent defined in YAML: the offline default agent.

A script lists intents (keywords, regex patterns, DTMF digits) with canned replies. Each caller
turn is scored against every intent and the best one answers; nothing scores -> the fallback.
The input usually comes from a weak offline recognizer (lowercase, no punctuation, frequent
misrecognitions), so matching is a forgiving "count the evidence that appears" score rather than
anything strict (see ScriptSpec.score). An intent may need slots (parley.agents.slots) filled
before it acts: they are taken from every sentence, and only the missing ones are asked for.
Facts (hours, prices) live once in `facts:` and replies name them ({facts.hours}), so every
phrasing of an answer states the same facts.

The same YAML format describes a scripted agent alone or as one agent of a scenario
(parley.agents.scenario), where an intent can hand the caller to another agent (`handoff:`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from parley.agents.handoff import HandoffSpec
from parley.agents.loading import (
    AgentConfigError,
    describe_validation_error,
    read_yaml_mapping,
)
from parley.agents.slots import NUMBER, RESERVED_NAMES, SLOT_NAME, SlotType, SlotUse
from parley.protocols import (
    AgentFactory,
    AgentOutput,
    CallContext,
    Handoff,
    Hangup,
    Say,
    UserInput,
)

__all__ = [
    "EXAMPLES_DIR",
    "IntentSpec",
    "ScriptError",
    "ScriptSpec",
    "ScriptedAgent",
    "load_script",
    "normalize_text",
    "packaged_script_names",
    "resolve_script_path",
    "scripted_agent_factory",
    "split_sentences",
]

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"

# Bare script names ("pizza") map to packaged examples; anything else is treated as a path.
_BARE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_DTMF_DIGITS = re.compile(r"^[0-9*#A-Da-d]+$")
_APOSTROPHES = re.compile(r"['\u2019]")
_NON_WORD = re.compile(r"[\W_]+")
# {text}, {digits}, an intent's slots ({size}) and facts ({facts.hours}, {facts.price.large},
# or the entry for the slot's value: {facts.price.{size}}). Filled by lookup (instead of
# str.format), so stray braces or unknown names in a reply stay as written and can never raise in
# the middle of a call.
_PLACEHOLDER = re.compile(r"\{(facts(?:\.[A-Za-z0-9_-]+)+(?:\.\{[a-z_][a-z0-9_]*\})?|[A-Za-z_][A-Za-z0-9_]*)\}")
_FACT_REFERENCE = re.compile(r"\{facts((?:\.[A-Za-z0-9_-]+)+)(?:\.\{([a-z_][a-z0-9_]*)\})?\}")
_SLOT_REFERENCE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")

# Points of evidence (see ScriptSpec.score). Kept as integers so scores compare exactly.
KEYWORD_POINTS = 2
PATTERN_POINTS = 2
SLOT_MENTION_POINTS = 1
AWAITED_SLOT_POINTS = 2


ScriptError = AgentConfigError
"""A script could not be found, parsed or validated. The message names the file and problem."""


# --------------------------------------------------------------------------------------------
# Text helpers


def normalize_text(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, collapse whitespace.

    Apostrophes are removed rather than spaced so "what's" and "whats" (both common recognizer
    spellings) normalise to the same word.
    """
    text = _APOSTROPHES.sub("", text.casefold())
    return _NON_WORD.sub(" ", text).strip()


# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "e.g", "i.e"})
# A run of terminators, optionally followed by closing quotes/brackets, then whitespace or the end.
# Requiring whitespace after the run is what keeps decimals like 9.99 in one piece.
_SENTENCE_END = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*(?=\s|$)""")
_LAST_WORD = re.compile(r"(\S+)$")


def _is_abbreviation(text: str, end: re.Match[str]) -> bool:
    """True when the terminator at `end` is the period of a known abbreviation ("Mr.")."""
    if end.group() != ".":
        return False
    word = _LAST_WORD.search(text, 0, end.start())
    if word is None:
        return False
    return word.group(1).lstrip("\"'(\u201c[").casefold() in _ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences at . ! ? (kept), so TTS can start speaking the first one early.

    Decimals ("9.99") and common abbreviations ("Mr.") do not split. Text without a terminator is
    one sentence; blank text gives an empty list.
    """
    sentences: list[str] = []
    start = 0
    for end in _SENTENCE_END.finditer(text):
        if _is_abbreviation(text, end):
            continue
        piece = text[start : end.end()].strip()
        if piece:
            sentences.append(piece)
        start = end.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def fill_placeholders(template: str, values: Mapping[str, str], facts: Mapping[str, Any]) -> str:
    """`template` with {name} from `values` and {facts.path} from `facts`; unknown ones stay."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key.startswith("facts."):
            path, _, index = key.removesuffix("}").partition(".{")
            keys = path.split(".")[1:]
            if index:
                if index not in values:
                    return match.group(0)
                keys.append(values[index])
            found = lookup_fact(facts, keys)
            return match.group(0) if found is None else found
        return values.get(key, match.group(0))

    return _PLACEHOLDER.sub(value, template)


def lookup_fact(facts: Mapping[str, Any], path: list[str]) -> str | None:
    """The fact at `path` as text, or None when it is missing or not a single value."""
    node: Any = facts
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, str | int | float):
        return None
    return str(node)


def fact_references(text: str) -> frozenset[str]:
    """The facts a text names ("hours", "price.large", "price.{size}")."""
    return frozenset(
        m.group(1)[1:] + (f".{{{m.group(2)}}}" if m.group(2) else "") for m in _FACT_REFERENCE.finditer(text)
    )


def slot_references(text: str) -> frozenset[str]:
    """The names a text uses as {name} (alone or inside a fact): slots, if the intent has them."""
    return frozenset(_SLOT_REFERENCE.findall(text))


# --------------------------------------------------------------------------------------------
# Script models


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    return value


class IntentSpec(BaseModel):
    """One thing a caller may ask for, how to recognise it and what to answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    keywords: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)
    dtmf: str | None = None
    reply: str | None = None
    replies: list[str] | None = None
    slots: list[SlotUse] = Field(default_factory=list, description="Filled before the reply; asked if missing.")
    end_call: bool = False
    handoff: str | None = Field(None, description="After the reply, hand the caller to this agent.")
    # False plays the reply through anything the caller says (a legal notice, a disclosure).
    interruptible: bool = True

    # Derived at validation time so every call shares the work done once at startup.
    _keywords: tuple[str, ...] = PrivateAttr(default=())
    _patterns: tuple[re.Pattern[str], ...] = PrivateAttr(default=())

    @field_validator("dtmf", mode="before")
    @classmethod
    def _dtmf_as_text(cls, value: Any) -> Any:
        # YAML reads `dtmf: 1` as an int; accept it rather than make authors quote every digit.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return _blank_to_none(value)

    @field_validator("dtmf")
    @classmethod
    def _dtmf_is_digits(cls, value: str | None) -> str | None:
        if value is not None and not _DTMF_DIGITS.match(value.strip()):
            raise ValueError(f"dtmf must be keypad digits (0-9, *, #, A-D), got {value!r}")
        # Upper-case so the rare A-D tones match however the transport spells them.
        return value.strip().upper() if value is not None else None

    @model_validator(mode="after")
    def _check_and_compile(self) -> IntentSpec:
        self._check_replies()
        self._keywords = self._normalized_keywords()
        self._patterns = self._compiled_patterns()
        if self.end_call and self.handoff:
            raise ValueError("an intent cannot both end the call and hand it off")
        if not (self._keywords or self._patterns or self.dtmf):
            raise ValueError("needs at least one of keywords, patterns or dtmf, or it can never match")
        self._check_slots()
        return self

    def _check_slots(self) -> None:
        names = [use.name for use in self.slots]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"slots listed twice: {', '.join(duplicates)}")
        optional = self.optional_slots
        if optional and all(self.optional_slots_named(reply) for reply in self.all_replies):
            raise ValueError(
                f"at least one reply must name none of the optional slots ({', '.join(sorted(optional))}):"
                " it is what the caller hears when they did not say them"
            )
        # Variants differ in wording only: a fact in one phrasing and not in another is how a
        # caller hears "until ten" and then "until midnight" for the same question. (Replies for
        # different optional slots given are different answers, compared among themselves.)
        groups: dict[frozenset[str], list[tuple[int, str]]] = {}
        for index, reply in enumerate(self.all_replies):
            groups.setdefault(self.optional_slots_named(reply), []).append((index, reply))
        for group in groups.values():
            if len({fact_references(reply) for _, reply in group}) > 1:
                described = "; ".join(
                    f"replies[{i}]: {', '.join(sorted(fact_references(r))) or 'none'}" for i, r in group
                )
                raise ValueError(f"every reply must name the same facts, so only the wording varies ({described})")

    @property
    def optional_slots(self) -> frozenset[str]:
        return frozenset(use.name for use in self.slots if use.optional)

    def optional_slots_named(self, reply: str) -> frozenset[str]:
        return slot_references(reply) & self.optional_slots

    def replies_for(self, given: Mapping[str, str]) -> list[str]:
        """The replies that use the most optional slots the caller gave (all of them given)."""
        usable = [r for r in self.all_replies if self.optional_slots_named(r) <= given.keys()]
        most = max(len(self.optional_slots_named(r)) for r in usable)
        return [r for r in usable if len(self.optional_slots_named(r)) == most]

    def _check_replies(self) -> None:
        if (self.reply is None) == (self.replies is None):
            raise ValueError("exactly one of 'reply' or 'replies' is required")
        if self.replies is not None and not self.replies:
            raise ValueError("'replies' must list at least one reply")
        if any(not r.strip() for r in self.all_replies):
            raise ValueError("replies must not be blank")

    def _normalized_keywords(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}  # ordered set: "distinct keywords" must not double count
        for keyword in self.keywords:
            normalized = normalize_text(keyword)
            if not normalized:
                raise ValueError(f"keyword {keyword!r} has no letters or digits")
            seen.setdefault(normalized, None)
        return tuple(seen)

    def _compiled_patterns(self) -> tuple[re.Pattern[str], ...]:
        compiled = []
        for pattern in self.patterns:
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r} in patterns of intent {self.name!r}: {exc}") from None
        return tuple(compiled)

    @property
    def all_replies(self) -> list[str]:
        """The reply texts in rotation order (a single `reply` is a rotation of one)."""
        return [self.reply] if self.reply is not None else list(self.replies or [])

    @property
    def texts(self) -> list[str]:
        """Everything this intent may say: its replies and its slots' questions."""
        return self.all_replies + [use.ask for use in self.slots if use.ask is not None]

    def score(self, text: str, normalized: str | None = None) -> int:
        """Distinct keywords/phrases present as whole words + patterns that match.

        A pattern is tried on the raw text and on the normalised text, so authors may write it
        either with punctuation ("what's") or in recognizer style ("whats"); it counts once.
        `normalized` may be passed when the caller already computed normalize_text(text).
        """
        keywords, patterns = self.evidence(text, normalize_text(text) if normalized is None else normalized)
        return keywords + patterns

    def evidence(self, text: str, normalized: str) -> tuple[int, int]:
        """(distinct keywords present, patterns that match)."""
        padded = f" {normalized} "
        keywords = sum(1 for kw in self._keywords if f" {kw} " in padded)
        patterns = sum(1 for p in self._patterns if p.search(text) or p.search(normalized))
        return keywords, patterns


class ScriptSpec(BaseModel):
    """A whole scripted agent: greeting, intents in priority order and fallbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["scripted"] = "scripted"
    name: str = Field(min_length=1)
    description: str = ""
    voice: str | None = None
    greeting: str | None = None
    greeting_interruptible: bool = True
    intents: list[IntentSpec]
    fallback: str = Field(min_length=1)
    fallback_dtmf: str | None = None
    handoffs: list[HandoffSpec] = Field(default_factory=list)
    facts: dict[str, Any] = Field(default_factory=dict, description="Named in replies as {facts.name}.")
    slots: dict[str, Literal["number"] | dict[str, list[str]]] = Field(default_factory=dict)

    _slot_types: dict[str, SlotType] = PrivateAttr(default_factory=dict)

    @field_validator("voice", "greeting", "fallback_dtmf", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        # An empty `greeting:` in YAML means "no greeting", not "say nothing audibly".
        return _blank_to_none(value)

    @field_validator("fallback")
    @classmethod
    def _fallback_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("fallback must not be blank")
        return value

    @field_validator("intents")
    @classmethod
    def _has_intents(cls, intents: list[IntentSpec]) -> list[IntentSpec]:
        if not intents:
            raise ValueError("no intents defined; a script needs at least one intent")
        return intents

    @model_validator(mode="after")
    def _unique_names_and_keys(self) -> ScriptSpec:
        # Duplicates would make the later intent unreachable for DTMF and ambiguous in logs.
        _reject_duplicates("intent name", [(i, it.name) for i, it in enumerate(self.intents)])
        _reject_duplicates("dtmf", [(i, it.dtmf) for i, it in enumerate(self.intents) if it.dtmf])
        declared = {handoff.to for handoff in self.handoffs}
        for intent in self.intents:
            if intent.handoff is not None and intent.handoff not in declared:
                raise ValueError(
                    f"intent {intent.name!r} hands off to {intent.handoff!r}, which is not in "
                    f"this agent's handoffs ({', '.join(sorted(declared)) or 'none declared'})"
                )
        self._slot_types = self._compiled_slots()
        self._check_fact_references()
        return self

    def _compiled_slots(self) -> dict[str, SlotType]:
        types = {}
        for name, values in self.slots.items():
            if not SLOT_NAME.match(name) or name in RESERVED_NAMES:
                raise ValueError(
                    f"slot name {name!r} must be lowercase letters, digits and '_', and not one of"
                    f" {', '.join(sorted(RESERVED_NAMES))} (those are placeholders already)"
                )
            if isinstance(values, dict) and not values:
                raise ValueError(f"slot {name!r} lists no values (or say `{name}: {NUMBER}` for a count)")
            types[name] = SlotType(name, values, normalize_text)
        for intent in self.intents:
            unknown = [use.name for use in intent.slots if use.name not in types]
            if unknown:
                raise ValueError(
                    f"intent {intent.name!r} fills slot {unknown[0]!r}, which is not in this agent's slots"
                    f" ({', '.join(sorted(types)) or 'none declared'})"
                )
        return types

    def _check_fact_references(self) -> None:
        # A fact that is not there would be read out as "{facts.hours}": refuse to start instead.
        texts: list[tuple[str, str | None, IntentSpec | None]] = [
            ("greeting", self.greeting, None),
            ("fallback", self.fallback, None),
            ("fallback_dtmf", self.fallback_dtmf, None),
        ]
        texts += [(f"intent {intent.name!r}", text, intent) for intent in self.intents for text in intent.texts]
        for where, text, intent in texts:
            for reference in sorted(fact_references(text or "")):
                problem = self._fact_problem(reference, intent)
                if problem:
                    raise ValueError(f"{where} names {{facts.{reference}}}, {problem}")

    def _fact_problem(self, reference: str, intent: IntentSpec | None) -> str | None:
        path, _, index = reference.removesuffix("}").partition(".{")
        keys = path.split(".")
        known = ", ".join(sorted(self.facts)) or "none"
        if not index:
            if lookup_fact(self.facts, keys) is None:
                return f"which is not a single value in facts (facts: {known})"
            return None
        slot = self._slot_types.get(index)
        if intent is None or slot is None or index not in {use.name for use in intent.slots}:
            return f"but {index!r} is not a slot of {'this intent' if intent else 'an intent'}"
        if slot.is_number:
            return f"but {index!r} is a count: facts cannot list an entry for every number"
        entries = [lookup_fact(self.facts, [*keys, value]) for value in slot.values]
        missing = [value for value, entry in zip(slot.values, entries, strict=True) if entry is None]
        if missing:
            return f"so facts.{path} needs an entry for every {index}; missing: {', '.join(missing)}"
        return None

    def mentions(self, text: str) -> dict[str, str]:
        """Every slot value the sentence mentions: {slot name: canonical value}."""
        normalized = normalize_text(text)
        found = {}
        for name, slot in self._slot_types.items():
            hit = slot.find(normalized)
            if hit is not None:
                found[name] = hit[1]
        return found

    def score(
        self,
        intent: IntentSpec,
        text: str,
        normalized: str,
        mentioned: Mapping[str, str],
        awaited: frozenset[str] = frozenset(),
    ) -> int:
        """Points of evidence that the caller wants `intent` (docs/agents.md, "How a sentence is
        matched"): 2 per distinct keyword present and per pattern that matches; 1 if the sentence
        names any value of one of its slots (what it acts on, weaker than what is asked for; not
        counts, not optional slots);
        2 more if the intent is waiting for a slot the sentence fills (the answer to its question).
        """
        keywords, patterns = intent.evidence(text, normalized)
        points = KEYWORD_POINTS * keywords + PATTERN_POINTS * patterns
        if any(
            use.name in mentioned and not use.optional and self._slot_types[use.name].is_evidence
            for use in intent.slots
        ):
            points += SLOT_MENTION_POINTS
        if awaited & mentioned.keys():
            points += AWAITED_SLOT_POINTS
        return points

    def handoff_to(self, name: str) -> HandoffSpec:
        return next(h for h in self.handoffs if h.to == name)

    @property
    def dtmf_fallback(self) -> str:
        return self.fallback_dtmf if self.fallback_dtmf is not None else self.fallback

    def match_text(
        self,
        text: str,
        mentioned: Mapping[str, str] | None = None,
        awaiting: IntentSpec | None = None,
        awaited: frozenset[str] = frozenset(),
    ) -> IntentSpec | None:
        """Best-scoring intent for recognised speech; ties go to the earlier intent; 0 -> None.

        `awaiting` is an intent that asked for the slots `awaited`; `mentioned` the slot values in
        `text` (computed here when not given).
        """
        normalized = normalize_text(text)
        if not normalized:  # silence or pure noise: never let a permissive regex claim it
            return None
        if mentioned is None:
            mentioned = self.mentions(text)
        best: IntentSpec | None = None
        best_score = 0
        for intent in self.intents:
            score = self.score(intent, text, normalized, mentioned, awaited if intent is awaiting else frozenset())
            if score > best_score:  # strictly greater, so the first listed wins a tie
                best, best_score = intent, score
        return best

    def match_dtmf(self, digits: str) -> IntentSpec | None:
        digits = digits.strip().upper()
        return next((i for i in self.intents if i.dtmf is not None and i.dtmf == digits), None)


def _reject_duplicates(what: str, items: list[tuple[int, str | None]]) -> None:
    first_index: dict[str | None, int] = {}
    for index, value in items:
        if value in first_index:
            raise ValueError(f"duplicate {what} {value!r} in intents[{first_index[value]}] and intents[{index}]")
        first_index[value] = index


# --------------------------------------------------------------------------------------------
# Loading


def packaged_script_names() -> list[str]:
    """Names of the example scripts shipped with parley (usable as bare names)."""
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))


def resolve_script_path(name_or_path: str) -> Path:
    """A bare name ("pizza") selects a packaged example; anything else is a file path."""
    if _BARE_NAME.match(name_or_path):
        packaged = EXAMPLES_DIR / f"{name_or_path}.yaml"
        if packaged.is_file():
            return packaged
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    names = ", ".join(packaged_script_names()) or "(none)"
    raise ScriptError(
        f"script {name_or_path!r} not found: not a packaged example (available: {names}) and not an existing file"
    )


def load_script(path: str | Path) -> ScriptSpec:
    """Read and validate a single scripted agent's YAML; any problem raises ScriptError naming the file."""
    path = Path(path)
    data = read_yaml_mapping(path)
    try:
        return ScriptSpec.model_validate(data)
    except ValidationError as exc:
        raise ScriptError(describe_validation_error(path, data, exc, ScriptSpec)) from None


# --------------------------------------------------------------------------------------------
# The agent


@dataclass
class _Awaiting:
    """An intent that asked the caller for slots it still needs, and what it has so far."""

    intent: IntentSpec
    values: dict[str, str] = field(default_factory=dict)
    reasked: bool = False  # asked again after a sentence that matched nothing

    @property
    def missing(self) -> list[SlotUse]:
        return [use for use in self.intent.slots if use.required and use.name not in self.values]


@dataclass
class _Answer:
    intent: IntentSpec | None
    text: str
    acts: bool  # the intent is complete: its end_call / handoff happens
    values: dict[str, str] = field(default_factory=dict)  # the slots its placeholders read


class ScriptedAgent:
    """Answers each turn from a ScriptSpec. One instance per call: it keeps reply rotation state
    and the conversation (so an LLM agent taking over in a scenario knows what was said)."""

    def __init__(self, spec: ScriptSpec, context: CallContext) -> None:
        self.spec = spec
        self.context = context
        self.name = spec.name
        # Name of the intent that answered the last turn; None when the fallback answered.
        self.last_intent: str | None = None
        # The slots of the last intent with slots that answered ({"pizza": "margherita", ...}).
        self.slots: dict[str, str] = {}
        self._awaiting: _Awaiting | None = None
        self._turns_by_intent: dict[str, int] = {}
        self.messages: list[dict[str, Any]] = []
        self._last_user: dict[str, Any] | None = None
        self._last_reply: dict[str, Any] | None = None

    @property
    def greeting_interruptible(self) -> bool:
        return self.spec.greeting_interruptible

    @property
    def voice(self) -> str | None:
        return self.spec.voice

    def digits_expected(self) -> int | None:
        """The longest key sequence an intent waits for (a menu of single keys: 1)."""
        return max((len(intent.dtmf) for intent in self.spec.intents if intent.dtmf), default=None)

    def greeting(self) -> str | None:
        if self.spec.greeting:
            self.record_spoken(self.spec.greeting)
        return self.spec.greeting

    @property
    def awaiting(self) -> list[str]:
        """The slots the agent asked for and is still waiting for (empty: none)."""
        return [use.name for use in self._awaiting.missing] if self._awaiting is not None else []

    def understands(self, user: UserInput) -> bool:
        """Whether some intent would answer `user` (not the fallback); nothing changes."""
        return self._match(user, self._mentions(user)) is not None

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        answer = self._answer(user)
        intent = answer.intent
        self.last_intent = intent.name if intent is not None else None
        values = {"text": user.text.strip(), "digits": user.digits, **answer.values}
        reply = fill_placeholders(answer.text, values, self.spec.facts)
        self._record_turn(user, reply)
        interruptible = intent.interruptible if intent is not None else True
        for sentence in split_sentences(reply):
            yield Say(sentence, interruptible=interruptible)
        if intent is None or not answer.acts:
            return
        if intent.end_call:
            yield Hangup(reason=f"intent:{intent.name}")
        elif intent.handoff is not None:
            yield Handoff(intent.handoff, self.spec.handoff_to(intent.handoff))

    def _answer(self, user: UserInput) -> _Answer:
        mentioned = self._mentions(user)
        intent = self._match(user, mentioned)
        awaiting = self._awaiting
        if intent is None:
            if awaiting is not None and not awaiting.reasked:
                # The caller was answering a question and we did not understand: ask it again
                # (once) rather than recite the menu of everything the agent can do.
                awaiting.reasked = True
                return _Answer(awaiting.intent, _ask(awaiting.missing), acts=False, values=awaiting.values)
            self._awaiting = None
            return _Answer(None, self._fallback(user), acts=False)
        values = dict(awaiting.values) if awaiting is not None and awaiting.intent is intent else {}
        values.update({use.name: mentioned[use.name] for use in intent.slots if use.name in mentioned})
        if any(use.required for use in intent.slots):
            self._awaiting = _Awaiting(intent, values)
            missing = self._awaiting.missing
            if missing:
                return _Answer(intent, _ask(missing), acts=False, values=values)
            self._awaiting = None
        # else a side question ("how much is a large?"): an intent waiting for slots still waits.
        values.update({use.name: use.default for use in intent.slots if use.default and use.name not in values})
        if intent.slots:
            self.slots = values
        return _Answer(intent, self._next_reply(intent, values), acts=True, values=values)

    def _mentions(self, user: UserInput) -> dict[str, str]:
        return self.spec.mentions(user.text) if user.kind == "speech" else {}

    def _match(self, user: UserInput, mentioned: dict[str, str]) -> IntentSpec | None:
        if user.kind == "dtmf":
            return self.spec.match_dtmf(user.digits)
        awaiting = self._awaiting
        if awaiting is None:
            return self.spec.match_text(user.text, mentioned)
        awaited = frozenset(use.name for use in awaiting.missing)
        return self.spec.match_text(user.text, mentioned, awaiting.intent, awaited)

    def _fallback(self, user: UserInput) -> str:
        return self.spec.dtmf_fallback if user.kind == "dtmf" else self.spec.fallback

    def _next_reply(self, intent: IntentSpec, values: Mapping[str, str]) -> str:
        # Rotate so a caller asking twice hears a different phrasing, which sounds less robotic.
        # The facts come from `facts:` whichever phrasing is picked (IntentSpec._check_slots).
        replies = intent.replies_for(values)
        turn = self._turns_by_intent.get(intent.name, 0)
        self._turns_by_intent[intent.name] = turn + 1
        return replies[turn % len(replies)]

    # ------------------------------------------------------------------ conversation memory
    def _record_turn(self, user: UserInput, reply: str) -> None:
        text = user.text.strip() if user.kind == "speech" else "The caller pressed: " + " ".join(user.digits)
        self._last_user = {"role": "user", "content": text}
        self._last_reply = {"role": "assistant", "content": reply}
        self.messages += [self._last_user, self._last_reply]

    def record_spoken(self, text: str) -> None:
        self._last_user = None
        self._last_reply = {"role": "assistant", "content": text}
        self.messages.append(self._last_reply)

    def truncate_last_reply(self, heard_text: str, *, forget_input: bool = False) -> None:
        """Remember only what the caller heard of the last reply (see LlmAgent)."""
        heard = " ".join(heard_text.split())
        if self._last_reply is not None:
            if heard:
                self._last_reply["content"] = heard
            else:
                self._forget(self._last_reply)
                self._last_reply = None
        if forget_input and not heard and self._last_user is not None:
            self._forget(self._last_user)
            self._last_user = None

    def history(self, *, before_last_input: bool = False) -> list[dict[str, Any]]:
        messages = self.messages
        if before_last_input and self._last_user is not None:
            index = next((i for i, m in enumerate(messages) if m is self._last_user), len(messages))
            messages = messages[:index]
        return [dict(m) for m in messages if m.get("content")]

    def adopt_history(self, messages: list[dict[str, Any]]) -> None:
        self.messages = [dict(m) for m in messages]
        self._last_user = self._last_reply = None

    def _forget(self, entry: dict[str, Any]) -> None:
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index] is entry:
                del self.messages[index]
                return


def _ask(missing: list[SlotUse]) -> str:
    """The questions for the missing slots, in the order the intent lists them."""
    return " ".join(use.ask for use in missing if use.ask is not None)


def scripted_agent_factory(name_or_path: str) -> AgentFactory:
    """Load and validate the script now (so mistakes fail at startup) and build agents per call."""
    spec = load_script(resolve_script_path(name_or_path))

    def build(context: CallContext) -> ScriptedAgent:
        return ScriptedAgent(spec, context)

    return build
