"""Turn a chat model's markdown into plain text a voice can read aloud.

Models write for screens even when told not to: **bold**, `code`, headings, bullet and numbered
lists, [links](https://...), bare URLs and emoji. A TTS engine reads those as "asterisk asterisk",
spells out URLs letter by letter, or stumbles on pictographs, so they are removed or replaced:

- inline markup (`clean_inline`): emphasis and code markers go, links keep their words, bare URLs
  become "the link", emoji and other pictographs go, whitespace collapses;
- line markup (`SpeakableStream`): headings, bullets, numbering, block quotes, code fences and
  horizontal rules go. Line breaks become punctuation, because a list read without it runs its
  items together: short items are joined with ", " and the list is closed with ".", long items
  become sentences, a line introducing a list gets ":".

Line markup is handled on the stream (before text is cut into clauses) because it is only
recognisable at the start of a line and a clause cutter loses the line breaks; inline markup is
cleaned per clause, so `clean_inline` tolerates a marker whose partner went to another clause.
`to_speakable(text)` runs both over a whole text; `SpeakableStream` fed the same text in any
pieces produces the same line-level output.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

# --------------------------------------------------------------------------------------------
# Inline markup

_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_LINK_TAIL = re.compile(r"\]\([^)\s]*\)")
"""What is left of a link whose text was cut into another clause: '](https://...)'."""
_AUTOLINK = re.compile(r"<((?:https?://|mailto:)[^>\s]+)>", re.IGNORECASE)
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\[\]()]+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?'\""
"""Punctuation that ends the sentence rather than the URL: 'see https://x.com.'"""
_LINK_WORDS = "the link"
_TIMES = re.compile(r"(?<=\d) ?\* ?(?=\d)")
"""'2 * 3' is arithmetic, not emphasis."""
_EMPHASIS = re.compile(r"\*+|~~|(?<!\w)_+(?=\S)|(?<=\S)_+(?!\w)")
"""'*', '**', '~~' anywhere; '_' and '__' only at word edges (snake_case keeps its underscores)."""
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:…])")
_REPEATED_COMMA = re.compile(r",(?:\s*,)+")
_LEADING_PUNCT = re.compile(r"^[\s,;:.]+")
_WHITESPACE = re.compile(r"\s+")

_KEEP_SYMBOLS = frozenset("©®°™℃℉№")
"""'Other symbol' characters a TTS engine reads as words ("degrees", "trademark")."""
_EMOJI_JOINERS = frozenset({0x200D, 0xFE0E, 0xFE0F, 0x20E3})
"""Zero-width joiner, variation selectors and the keycap mark that glue emoji sequences."""


def clean_inline(text: str) -> str:
    """Inline markdown -> plain words: emphasis, code, links, URLs, emoji; whitespace collapsed."""
    text = _HTML_BREAK.sub(" ", text)
    text = text.replace("`", "")
    text = _IMAGE.sub(lambda m: m[1], text)
    text = _LINK.sub(_link_words, text)
    text = _LINK_TAIL.sub("", text)
    text = _AUTOLINK.sub(lambda m: m[1], text)
    text = _URL.sub(_url_words, text)
    text = text.replace("[", "").replace("]", "")
    text = _TIMES.sub(" times ", text)
    text = _EMPHASIS.sub("", text)
    if not text.isascii():
        text = _remove_pictographs(text)
    return _tidy(text)


def _link_words(match: re.Match[str]) -> str:
    words = match[1].strip()
    return words if words else _LINK_WORDS


def _url_words(match: re.Match[str]) -> str:
    url = match[0]
    kept = url.rstrip(_URL_TRAILING)
    if url.endswith(")") and "(" not in kept:
        kept = kept.rstrip(")")
    return _LINK_WORDS + url[len(kept) :]


def _remove_pictographs(text: str) -> str:
    return "".join(char for char in text if not _is_pictograph(char))


def _is_pictograph(char: str) -> bool:
    if char in _KEEP_SYMBOLS:
        return False
    code = ord(char)
    if code in _EMOJI_JOINERS or 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F:
        return True  # joiners, skin tones, flag tag characters: parts of an emoji sequence
    return unicodedata.category(char) == "So"


def _tidy(text: str) -> str:
    """Repair the spacing and punctuation that removals leave behind ('Pizza 🍕!' -> 'Pizza!')."""
    text = _EMPTY_BRACKETS.sub("", text)
    text = _WHITESPACE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_COMMA.sub(",", text)
    return _LEADING_PUNCT.sub("", text).strip()


# --------------------------------------------------------------------------------------------
# Line markup, streamed

_Kind = Literal["text", "item", "heading", "quote", "fence", "skip"]

_HEADING = re.compile(r"[ \t]*#{1,6}[ \t]+")
_BULLET = re.compile(r"[ \t]*[-*+•][ \t]+")
_NUMBER = re.compile(r"[ \t]*\d{1,2}[.)][ \t]+")
_QUOTE = re.compile(r"[ \t]*>[> \t]*(?=[^>\s])")
_PREFIXES: tuple[tuple[re.Pattern[str], _Kind], ...] = ((_HEADING, "heading"), (_BULLET, "item"), (_NUMBER, "item"))
_FENCE = re.compile(r"[ \t]*(?:```|~~~)")
_MAYBE_FENCE = re.compile(r"[ \t]*(?:`{0,2}|~{0,2})")
_RULE = re.compile(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*")
_MAYBE_MARKER = re.compile(r"[ \t]*(?:#{1,6}|[-*+•]|\d{1,2}[.)]?|`{1,2}|~{1,2}|>[> \t]*|[-*_][-*_ \t]*)?")
"""A line start that may still become a marker once more characters arrive."""
_BARE_MARKER = re.compile(r"[ \t]*(?:#{1,6}|[-*+•]|\d{1,2}[.)]|>[> \t]*)?[ \t]*")
"""A whole line that is only a marker: nothing to say."""
_LINE_ENDS = tuple(".!?;:,…")
_SHORT_ITEM_WORDS = 5
"""List items up to this many words are read as one list ("a, b, c."), longer ones as sentences."""


@dataclass(slots=True)
class _Line:
    """A finished line whose closing punctuation waits for the next line's kind."""

    kind: _Kind
    punctuated: bool
    words: int


class SpeakableStream:
    """Removes line-level markdown from streamed text (LLM deltas) as soon as it is certain.

    `push(delta)` returns the text that can be passed on now; `flush()` the rest at the end of the
    reply, after which the stream is ready for the next reply. Only a line's first few characters
    (a possible marker) and the punctuation between lines are ever held back.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._head = ""  # start of the current line while its kind is undecided
        self._kind: _Kind | None = None  # None: undecided
        self._line = ""  # what the current line has passed on (without its marker)
        self._previous: _Line | None = None  # last non-blank line, its separator not yet sent
        self._in_fence = False

    def push(self, delta: str) -> str:
        out: list[str] = []
        for piece in re.split(r"(\r\n|\r|\n)", delta):
            if piece in ("\n", "\r\n", "\r"):
                out.append(self._end_line())
            elif piece:
                out.append(self._add(piece))
        return "".join(out)

    def flush(self) -> str:
        out = self._end_line()
        previous = self._previous
        if previous is not None and not previous.punctuated and previous.kind in ("item", "heading"):
            out += "."  # close the list (or a heading-only reply)
        self._reset()
        return out

    def _add(self, text: str) -> str:
        if self._kind is not None:
            return self._emit(text)
        self._head += text
        decided = _classify_head(self._head, at_line_end=False, in_fence=self._in_fence)
        if decided is None:
            return ""
        return self._open_line(*decided)

    def _open_line(self, kind: _Kind, marker_len: int) -> str:
        body, self._head = self._head[marker_len:], ""
        self._kind = kind
        return self._emit(body)

    def _emit(self, text: str) -> str:
        if self._kind in ("fence", "skip"):
            return ""  # a fence's language tag, a rule's trailing dashes
        if not self._line:
            text = text.lstrip()  # indentation, the spaces after a marker
            if not text:
                return ""
            # The line has its first word: now the previous line's closing punctuation is known.
            self._line = text
            return self._separator() + text
        self._line += text
        return text

    def _separator(self) -> str:
        """Punctuation between the last non-blank line and the one starting now."""
        previous, self._previous = self._previous, None
        if previous is None:
            return ""
        if previous.punctuated:
            return "\n"
        if self._kind == "item":
            if previous.kind == "item":
                return ", " if previous.words <= _SHORT_ITEM_WORDS else ".\n"
            return ":\n"  # "Here are the options" + items
        return ".\n"

    def _end_line(self) -> str:
        out = ""
        if self._kind is None and self._head:
            decided = _classify_head(self._head, at_line_end=True, in_fence=self._in_fence)
            assert decided is not None  # at a line end every line has a kind
            out = self._open_line(*decided)
        if self._kind == "fence":
            self._in_fence = not self._in_fence
        line = self._line.rstrip()
        if line and self._kind not in ("fence", "skip"):
            assert self._kind is not None
            self._previous = _Line(self._kind, line.endswith(_LINE_ENDS), len(line.split()))
        self._head, self._kind, self._line = "", None, ""
        return out


def _classify_head(head: str, *, at_line_end: bool, in_fence: bool) -> tuple[_Kind, int] | None:
    """The kind of a line from its first characters and the marker's length, None if undecided."""
    if fence := _FENCE.match(head):
        return "fence", fence.end()
    if in_fence:
        if not at_line_end and _MAYBE_FENCE.fullmatch(head):
            return None  # may be the closing fence
        return "text", 0  # code is read as it is (rarely useful, but never dropped)
    for pattern, kind in _PREFIXES:
        if marker := pattern.match(head):
            return kind, marker.end()
    if at_line_end:
        if _RULE.fullmatch(head) or _BARE_MARKER.fullmatch(head):
            return "skip", len(head)
        if quote := _QUOTE.match(head):
            return "quote", quote.end()
        return "text", 0
    if quote := _QUOTE.match(head):
        return "quote", quote.end()
    if _MAYBE_MARKER.fullmatch(head):
        return None
    return "text", 0


# --------------------------------------------------------------------------------------------
# Whole texts


def to_speakable(text: str) -> str:
    """Markdown (as chat models write it) -> plain text for TTS. Pure."""
    stream = SpeakableStream()
    return clean_inline(stream.push(text) + stream.flush())
