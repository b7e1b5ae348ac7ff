"""A rule-based agent defined in YAML: the offline default agent.

A script lists intents (keywords, regex patterns, DTMF digits) with canned replies. Each caller
turn is matched against every intent and the best one answers; nothing matches -> the fallback.
The input usually comes from a weak offline recognizer (lowercase, no punctuation, frequent
misrecognitions), so matching is a forgiving "count the keywords that appear" score rather than
anything strict.

The YAML models are strict (unknown keys are errors) because the same file format is meant to be
reused by other agent kinds later, and a silently ignored typo is the worst failure on a phone line.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from parley.protocols import AgentFactory, AgentOutput, CallContext, Hangup, Say, UserInput

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


class ScriptError(ValueError):
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
        if not (self._keywords or self._patterns or self.dtmf):
            raise ValueError(
                "needs at least one of keywords, patterns or dtmf, or it can never match"
            )
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
                raise ValueError(
                    f"invalid regex {pattern!r} in patterns of intent {self.name!r}: {exc}"
                ) from None
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

    name: str = Field(min_length=1)
    voice: str | None = None
    greeting: str | None = None
    greeting_interruptible: bool = True
    intents: list[IntentSpec]
    fallback: str = Field(min_length=1)
    fallback_dtmf: str | None = None

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
        return self

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
            raise ValueError(
                f"duplicate {what} {value!r} in intents[{first_index[value]}] and intents[{index}]"
            )
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
        f"script {name_or_path!r} not found: not a packaged example (available: {names}) "
        "and not an existing file"
    )


def load_script(path: str | Path) -> ScriptSpec:
    """Read and validate a YAML script; any problem raises ScriptError naming the file."""
    path = Path(path)
    data = _read_yaml(path)
    if data is None:
        raise ScriptError(f"{path}: script is empty")
    if not isinstance(data, dict):
        raise ScriptError(
            f"{path}: top level must be a mapping (name:, intents:, fallback:, ...), "
            f"got {type(data).__name__}"
        )
    try:
        return ScriptSpec.model_validate(data)
    except ValidationError as exc:
        raise ScriptError(_describe_validation_error(path, data, exc)) from None


def _read_yaml(path: Path) -> Any:
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(f"{path}: script file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"{path}: cannot read script: {exc}") from None
    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as exc:
        where = _yaml_position(exc)
        raise ScriptError(f"{path}: YAML syntax error{where}: {_yaml_problem(exc)}") from None


def _yaml_position(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return ""
    return f" at line {mark.line + 1}, column {mark.column + 1}"  # marks are 0-based


def _yaml_problem(exc: yaml.YAMLError) -> str:
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    text = ", ".join(p for p in parts if p)
    return text or str(exc)


def _describe_validation_error(path: Path, data: dict[str, Any], exc: ValidationError) -> str:
    problems = [_describe_one_error(data, err) for err in exc.errors()]
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _describe_one_error(data: dict[str, Any], err: Any) -> str:
    loc: tuple[Any, ...] = tuple(err["loc"])
    where = _describe_location(data, loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = IntentSpec if len(loc) > 1 and loc[0] == "intents" else ScriptSpec
        allowed = ", ".join(model.model_fields)
        return f"{where}: unknown key {loc[-1]!r} (allowed keys: {allowed})"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "value_error":
        # Our own message, without pydantic's "Value error," prefix.
        message = str(err["ctx"]["error"])
    else:
        message = err["msg"]
    return f"{where}: {message}" if where else message


def _describe_location(data: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """Render ("intents", 2, "reply") as "intents[2] (hours).reply", naming the intent if known."""
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if index == 1 and loc[0] == "intents":
                text += _intent_label(data, part)
        else:
            text += f".{part}" if text else str(part)
    return text


def _intent_label(data: dict[str, Any], index: int) -> str:
    intents = data.get("intents")
    if isinstance(intents, list) and index < len(intents) and isinstance(intents[index], dict):
        name = intents[index].get("name")
        if isinstance(name, str) and name:
            return f" ({name})"
    return ""


# --------------------------------------------------------------------------------------------
# The agent


class ScriptedAgent:
    """Answers each turn from a ScriptSpec. One instance per call: it keeps reply rotation state."""

    def __init__(self, spec: ScriptSpec, context: CallContext) -> None:
        self.spec = spec
        self.context = context
        # Name of the intent that answered the last turn; None when the fallback answered.
        self.last_intent: str | None = None
        self._turns_by_intent: dict[str, int] = {}

    @property
    def greeting_interruptible(self) -> bool:
        return self.spec.greeting_interruptible

    @property
    def voice(self) -> str | None:
        return self.spec.voice

    def greeting(self) -> str | None:
        return self.spec.greeting

    async def respond(self, user: UserInput) -> AsyncIterator[AgentOutput]:
        intent = self._match(user)
        self.last_intent = intent.name if intent is not None else None
        reply = self._next_reply(intent, user)
        interruptible = intent.interruptible if intent is not None else True
        for sentence in split_sentences(_fill_placeholders(reply, user.text.strip(), user.digits)):
            yield Say(sentence, interruptible=interruptible)
        if intent is not None and intent.end_call:
            yield Hangup(reason=f"intent:{intent.name}")

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


def scripted_agent_factory(name_or_path: str) -> AgentFactory:
    """Load and validate the script now (so mistakes fail at startup) and build agents per call."""
    spec = load_script(resolve_script_path(name_or_path))

    def build(context: CallContext) -> ScriptedAgent:
        return ScriptedAgent(spec, context)

    return build
