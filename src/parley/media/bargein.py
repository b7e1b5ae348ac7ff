"""Barge-in policy: what a caller signal does to the agent's turn. Pure; the handler acts.

Signals, earliest first: the first sign of speech (`onset`: a loud frame or the first VAD window
over the threshold; `onset_lost` when the VAD then hears no voice), the VAD's sustained-speech gate (`vad`, ~64 ms after onset),
recognizer partials, `continues` (the utterance stayed voiced for `long_speech_ms`: more than a backchannel),
the utterance's `final` text, a `timeout` of a pending interruption, and DTMF keys.

Per agent state (the seeds treat every sound as an interruption; real phones need more care):
- thinking (no audio out yet): `cancel` the turn (its input is answered with the new one) or `off`;
- speaking, one of
  - `pause` (default): StopAudio at the first sign of speech (the onset), as fast as a hard stop,
    then wait for proof. An onset the VAD does not sustain (a click, a breath) resumes at once,
    where the reply stopped. Sustained speech waits for more: more speech or
    real words confirm (the turn is cancelled), while a backchannel ("uh-huh"), a cough, our own
    echo or no words at all within `resume_after_ms` resume the reply at the clause it cut;
  - `confirm`: keep talking until the same proof arrives (backchannels never interrupt at all,
    at the cost of ~0.3-0.6 s slower real barge-ins);
  - `stop`: the seeds' behaviour, any speech cancels at once (an onset pauses until it is speech);
  - `off`.
Non-interruptible turns and clauses (a greeting, a legal notice) ignore every signal, DTMF included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Trigger = Literal["onset", "onset_lost", "vad", "continues", "partial", "final", "timeout", "dtmf"]
SpeakingMode = Literal["pause", "confirm", "stop", "off"]
ThinkingMode = Literal["cancel", "off"]
AgentState = Literal["thinking", "speaking"]
Action = Literal["none", "pause", "hold", "cancel", "resume"]

DEFAULT_BACKCHANNELS = (
    "uh-huh",
    "mm-hmm",
    "mhm",
    "mm",
    "hmm",
    "uh",
    "um",
    "ah",
    "oh",
    "huh",
    "yeah",
    "yep",
    "okay",
    "ok",
    "right",
    "alright",
    "sure",
    "i see",
    "got it",
    "cool",
    "nice",
    "wow",
    # how Whisper spells a hummed "mm-hmm"
    "um-hum",
    "uh-hum",
    "mm-hm",
    "hm",
    "hum",
    "mmm",
)
_ECHO_SHARE = 0.6  # at least this share of the words were in what the agent just said: echo
_FUNCTION_WORDS = frozenset(
    "i i'm im i'll i'd i've me my a an the and or but so to of on in at it it's its is was be this that they"
    " them we you he she his her there not".split()
)
"""Words that carry no request on their own: a final made only of these ("I'm on.", "and them")
is a misheard hum or the start of a sentence the caller abandoned, not a reason to cut the agent.
"not" is here because Whisper hears a hummed "mm-hmm" as "I'm not" (a final decides only
utterances voiced under 600 ms: "I'm not sure" said in full has been confirmed by then).
"no", "stop", "wait" and every other content word still interrupt."""

_ANSWER_WORDS = frozenset(
    "yes no nope nah stop wait hold cancel help repeat pardon sorry zero one two three four five six"
    " seven eight nine ten eleven twelve hundred thousand".split()
)
"""Short real answers: said over the agent they are always a request, however Whisper scored them
(a clipped "No" or "Stop" is often decoded with low confidence)."""

# How a hum, a breath or an "uh-huh" comes out of Whisper when it has to spell it: "Fuh", "Uh",
# "Hmm", "Mhm", "Er", "Huh", "Mm-mm", "mamama". One optional f/h/m onset, at most one vowel (never
# "i": hums are not "hi"), then only h, m or r: the shape of a murmur, not of a word.
_HUM_SHAPE = re.compile(r"^[fhm]?[aeou]?[hmr]*$")
_REPEATED_SYLLABLE = re.compile(r"^([a-z]{1,3})\1+[a-z]{0,2}$")
_HUM_SHAPED_WORDS = frozenset("ham harm farm form far for fur mar hem fem".split())
"""Real words of the hum shape: never taken for a hum ("mom", "mum" are: Whisper writes a hummed
"mm-hmm" as "I'm mom")."""

# Whisper's own "probably not speech" rule, with a lower no-speech bar for one short word said over
# the agent (most such sounds are listeners' noises): `transcribe` already drops text above 0.6.
_SHORT_ANSWER_TOKENS = 2  # "yes", "no", "two", "yes please": longer finals go through every rule
_UNCLEAR_NO_SPEECH = 0.45
_UNCLEAR_LOGPROB = -1.0
_SHORT_VOICED_MS = 600


@dataclass(frozen=True, slots=True)
class SpeechEvidence:
    """What the recognizer knows of an utterance besides its words: how long it was voiced and how
    sure the final pass was (Whisper's average log-probability and no-speech probability; None from
    recognizers that do not say)."""

    voiced_ms: int = 0
    avg_logprob: float | None = None
    no_speech_prob: float | None = None

    def unclear(self) -> bool:
        """Short, and the recognizer itself doubts it was speech."""
        return (
            0 < self.voiced_ms < _SHORT_VOICED_MS
            and self.avg_logprob is not None
            and self.no_speech_prob is not None
            and self.avg_logprob < _UNCLEAR_LOGPROB
            and self.no_speech_prob > _UNCLEAR_NO_SPEECH
        )


@dataclass(frozen=True, slots=True)
class Signal:
    trigger: Trigger
    utterance_id: int = 0  # 0 for DTMF
    text: str = ""
    evidence: SpeechEvidence | None = None  # how the final's audio sounded (finals only)


@dataclass(frozen=True, slots=True)
class ActiveTurn:
    """What the policy needs to know about the turn that is thinking or speaking."""

    turn_id: int
    interruptible: bool
    source_utterance_id: int  # the newest caller utterance this turn answers
    state: AgentState = "speaking"
    pending: bool = False  # an interruption is waiting for proof (paused or held)
    pending_onset: bool = False  # ... paused on an onset alone: no sustained speech yet
    recent_text: str = ""  # what the agent said in the last seconds (to recognise its echo)
    line_echo: bool = True  # False once the echo gate has ruled out any echo on this line


# Not answered: the caller's sound carried no request. "echo" (the words repeat what the agent just
# said) is not among them: such a final may be a real answer that quotes the agent ("The small
# pizza." after "small, medium or large?"), so the reply resumes but the words are still answered.
_NOT_A_REQUEST = frozenset({"backchannel", "no_content", "unclear"})


def _is_letter(word: str) -> bool:
    """A lone letter ("F.") is what Whisper makes of a short hum or breath, not a request."""
    return len(word) == 1 and word.isalpha()


def is_hum(token: str) -> bool:
    """A token spelled like a murmur ("fuh", "hmm", "mhm", "uh", "er", "mamama"), not a word."""
    if token in _HUM_SHAPED_WORDS or len(token) < 2:
        return False
    collapsed = re.sub(r"(.)\1+", r"\1", token)
    if _HUM_SHAPE.match(collapsed):
        return True
    repeated = _REPEATED_SYLLABLE.match(collapsed)
    return repeated is not None and _HUM_SHAPE.match(repeated.group(1)) is not None


def is_answer(token: str) -> bool:
    """A short real answer ("yes", "no", "stop", "two", "4"): always a request."""
    return token in _ANSWER_WORDS or any(char.isdigit() for char in token)


_FAREWELL_WORDS = frozenset(
    "bye goodbye thanks thank you cheers ok okay that's thats all great no nothing else perfect fine"
    " have a good day nice see ya".split()
)


def is_farewell(text: str) -> bool:
    """ "Thanks, bye", "no, that's all", "goodbye": the caller is done (said over the agent's goodbye,
    the call still ends). A question or a request is not a farewell."""
    words = normalize_words(text)
    if not words or "?" in text:
        return False
    return "bye" in words or "goodbye" in words or all(word in _FAREWELL_WORDS for word in words)


def sound_tokens(text: str) -> list[str]:
    """Lower-case tokens split at hyphens too ("Uh-huh." -> uh, huh; "Mm-term" -> mm, term)."""
    return re.findall(r"[a-z0-9']+", text.lower())


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str

    @property
    def interrupt(self) -> bool:
        return self.action == "cancel"

    @property
    def said_over_agent(self) -> bool:
        """The caller's words were a backchannel, our echo or no request: not to be answered."""
        return self.reason in _NOT_A_REQUEST


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation; hyphenated fillers kept whole ("uh-huh" -> "uhhuh")."""
    return re.sub(r"[^a-z0-9' ]+", "", text.lower().replace("-", "")).split()


@dataclass(frozen=True, slots=True)
class BargeInPolicy:
    partial_min_chars: int = 4
    on_dtmf: bool = True
    speaking: SpeakingMode = "pause"
    thinking: ThinkingMode = "cancel"
    backchannels: tuple[str, ...] = DEFAULT_BACKCHANNELS
    _fillers: frozenset[str] = field(init=False, repr=False)
    _phrases: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phrases = {" ".join(normalize_words(phrase)) for phrase in self.backchannels}
        object.__setattr__(self, "_phrases", frozenset(phrases))
        object.__setattr__(self, "_fillers", frozenset(p for p in phrases if " " not in p))

    def decide(self, signal: Signal, turn: ActiveTurn | None) -> Decision:
        if turn is None:
            return Decision("none", "agent_idle")
        if not turn.interruptible:
            return Decision("none", "not_interruptible")
        if signal.trigger == "dtmf":
            return Decision("cancel", "dtmf") if self.on_dtmf else Decision("none", "dtmf_disabled")
        if signal.trigger == "timeout":
            if not turn.pending:
                return Decision("none", "not_pending")
            return Decision("resume", "onset_not_sustained" if turn.pending_onset else "no_words")
        if signal.utterance_id <= turn.source_utterance_id:
            # A late signal of the very utterance this turn answers (the seeds' "turn guard").
            return Decision("none", "same_utterance")
        if signal.trigger in ("onset", "onset_lost"):
            return self._onset(signal, turn)
        if turn.state == "thinking":
            return self._while_thinking(signal)
        return self._while_speaking(signal, turn)

    @property
    def pauses_on_onset(self) -> bool:
        """Does an onset ever pause the agent? Only where speech stops it (`pause`, `stop`):
        `confirm` keeps talking until proof, `off` never stops."""
        return self.speaking in ("pause", "stop")

    def _onset(self, signal: Signal, turn: ActiveTurn) -> Decision:
        """A first sign of speech only ever pauses audio that is playing (nothing to pause while
        thinking, and `confirm` keeps talking); its loss resumes a pause that nothing else backs."""
        if signal.trigger == "onset_lost":
            return Decision("resume", "onset_lost") if turn.pending_onset else Decision("none", "not_pending")
        if turn.state == "thinking" or not self.pauses_on_onset:
            return Decision("none", "onset_not_used")
        if turn.pending:
            return Decision("none", "already_pending")
        return Decision("pause", "onset")

    def _while_thinking(self, signal: Signal) -> Decision:
        if self.thinking == "off":
            return Decision("none", "thinking_not_interruptible")
        if signal.trigger == "partial" and not self._long_enough(signal.text):
            return Decision("none", "partial_too_short")
        if signal.trigger == "final" and not signal.text.strip():
            return Decision("none", "no_words")
        return Decision("cancel", signal.trigger)

    def _while_speaking(self, signal: Signal, turn: ActiveTurn) -> Decision:
        mode = self.speaking
        if mode == "off":
            return Decision("none", "speaking_not_interruptible")
        if signal.trigger == "vad":
            if mode == "stop":
                return Decision("cancel", "vad")
            if turn.pending and not turn.pending_onset:  # (sustained speech after an onset: wait for proof)
                return Decision("none", "already_pending")
            return Decision("pause" if mode == "pause" else "hold", "vad")
        if signal.trigger == "continues":
            return Decision("cancel", "sustained_speech")
        words, reason = self._content_words(signal.text, turn.recent_text, signal.evidence, turn.line_echo)
        if signal.trigger == "partial":
            return self._partial(words, reason, mode)
        # final: the whole utterance is known
        if words:
            return Decision("cancel", "final")
        return Decision("resume", reason) if turn.pending else Decision("none", reason)

    def _partial(self, words: list[str], reason: str, mode: SpeakingMode) -> Decision:
        """Streaming partials of short sounds are often wrong ("okay" -> "o que"). Paused, the
        caller hears nothing more anyway: wait for the final or sustained speech. Still talking
        (`confirm`), a partial of two words, eight letters or more confirms."""
        if mode == "pause":
            return Decision("none", reason or "awaiting_final")
        text = " ".join(words)
        if mode == "confirm" and (len(words) < 2 or len(text) < 8):
            return Decision("none", reason or "partial_too_short")
        if self._long_enough(text):
            return Decision("cancel", "partial")
        return Decision("none", reason or "partial_too_short")

    def _content_words(
        self, text: str, recent_text: str, evidence: SpeechEvidence | None = None, line_echo: bool = True
    ) -> tuple[list[str], str]:
        """Words that mean the caller wants the floor, and why there are none ('' if there are).

        Said over the agent, a sound is judged on several pieces of evidence, not on one spelling:
        the configured backchannel phrases, the shape of each token (a hum spelled "Fuh" or "Mm-mm"
        is still a hum), function words and lone letters, our own recent words (echo), and the
        recognizer's own doubt about one short word. A short real answer ("yes", "no", "stop",
        "two", "wait", "yes please") always counts as a request.
        """
        words = normalize_words(text)
        if not words:
            return [], "no_words"
        if " ".join(words) in self._phrases:
            return [], "backchannel"
        tokens = sound_tokens(text)
        if len(tokens) <= _SHORT_ANSWER_TOKENS and any(is_answer(token) for token in tokens):
            return words, ""
        murmurs = [token in self._fillers or is_hum(token) for token in tokens]
        if all(murmurs):
            return [], "backchannel"
        spoken = set(normalize_words(recent_text)) if line_echo else set()
        if spoken and sum(word in spoken for word in words) >= _ECHO_SHARE * len(words):
            return [], "echo"
        content = [token for token, murmur in zip(tokens, murmurs, strict=True) if not murmur]
        if all(word in _FUNCTION_WORDS or _is_letter(word) for word in content):
            return [], "no_content"
        if len(content) == 1 and evidence is not None and evidence.unclear():
            return [], "unclear"
        return content, ""

    def _long_enough(self, text: str) -> bool:
        return self.partial_min_chars > 0 and len(text.strip()) >= self.partial_min_chars
