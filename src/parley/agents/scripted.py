"""A rule-based agent defined in YAML: the offline default agent.

A script lists intents (keywords, regex patterns, DTMF digits) with canned replies. Each caller
turn is matched against every intent and the best one answers; nothing matches -> the fallback.
The input usually comes from a weak offline recognizer (lowercase, no punctuation, frequent
misrecognitions), so matching is a forgiving "count the keywords that appear" score rather than
anything strict.

The same YAML format describes a scripted agent alone or as one agent of a scenario
(parley.agents.scenario), where an intent can hand the caller to another agent (`handoff:`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
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
# Only these two placeholders exist; matching them literally (instead of str.format) means stray
# braces or unknown names in a reply can never raise in the middle of a call.
_PLACEHOLDER = re.compile(r"\{(text|digits)\}")


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


def _fill_placeholders(template: str, text: str, digits: str) -> str:
    values = {"text": text, "digits": digits}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


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
        return self

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

    def score(self, text: str, normalized: str | None = None) -> int:
        """Distinct keywords/phrases present as whole words + patterns that match.

        A pattern is tried on the raw text and on the normalised text, so authors may write it
        either with punctuation ("what's") or in recognizer style ("whats"); it counts once.
        `normalized` may be passed when the caller already computed normalize_text(text).
        """
        if normalized is None:
            normalized = normalize_text(text)
        padded = f" {normalized} "
        hits = sum(1 for kw in self._keywords if f" {kw} " in padded)
        hits += sum(1 for p in self._patterns if p.search(text) or p.search(normalized))
        return hits


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
        return self

    def handoff_to(self, name: str) -> HandoffSpec:
        return next(h for h in self.handoffs if h.to == name)

    @property
    def dtmf_fallback(self) -> str:
        return self.fallback_dtmf if self.fallback_dtmf is not None else self.fallback

    def match_text(self, text: str) -> IntentSpec | None:
        """Best-scoring intent for recognised speech; ties go to the earlier intent; 0 -> None."""
        normalized = normalize_text(text)
        if not normalized:  # silence or pure noise: never let a permissive regex claim it
            return None
        best: IntentSpec | None = None
        best_score = 0
        for intent in self.intents:
            score = intent.score(text, normalized)
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


class ScriptedAgent:
    """Answers each turn from a ScriptSpec. One instance per call: it keeps reply rotation state
    and the conversation (so an LLM agent taking over in a scenario knows what was said)."""

    def __init__(self, spec: ScriptSpec, context: CallContext) -> None:
        self.spec = spec
        self.context = context
        self.name = spec.name
        # Name of the intent that answered the last turn; None when the fallback answered.
        self.last_intent: str | None = None
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

    async def respond(self, user: UserInput) -> AsyncGenerator[AgentOutput, None]:
        intent = self._match(user)
        self.last_intent = intent.name if intent is not None else None
        reply = _fill_placeholders(self._next_reply(intent, user), user.text.strip(), user.digits)
        self._record_turn(user, reply)
        interruptible = intent.interruptible if intent is not None else True
        for sentence in split_sentences(reply):
            yield Say(sentence, interruptible=interruptible)
        if intent is not None and intent.end_call:
            yield Hangup(reason=f"intent:{intent.name}")
        elif intent is not None and intent.handoff is not None:
            yield Handoff(intent.handoff, self.spec.handoff_to(intent.handoff))

    def _match(self, user: UserInput) -> IntentSpec | None:
        if user.kind == "dtmf":
            return self.spec.match_dtmf(user.digits)
        return self.spec.match_text(user.text)

    def _next_reply(self, intent: IntentSpec | None, user: UserInput) -> str:
        if intent is None:
            return self.spec.dtmf_fallback if user.kind == "dtmf" else self.spec.fallback
        # Rotate so a caller asking twice hears a different phrasing, which sounds less robotic.
        replies = intent.all_replies
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


def scripted_agent_factory(name_or_path: str) -> AgentFactory:
    """Load and validate the script now (so mistakes fail at startup) and build agents per call."""
    spec = load_script(resolve_script_path(name_or_path))

    def build(context: CallContext) -> ScriptedAgent:
        return ScriptedAgent(spec, context)

    return build
