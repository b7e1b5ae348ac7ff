"""Turns: the caller inputs waiting for an answer, and the loop that answers them one at a time.

Drop policy of the inbox (bounded, lossless): inputs are never dropped. While the caller is still
speaking the inbox is held, so everything said before the final is answered together; when more
than `capacity` inputs wait, the newest speech is merged into the last waiting speech input.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from parley.protocols import Hangup, Transfer, UserInput

TurnKind = Literal["greeting", "speech", "dtmf", "closing"]  # closing: the last words (finish_politely)


@dataclass
class Turn:
    id: int
    kind: TurnKind
    user: UserInput | None
    source_utterance_id: int
    interruptible: bool = True
    say: str | None = None  # fixed text to speak instead of asking the agent (the greeting)
    cancelled: bool = False
    heard_ms: float = 0.0  # set when cancelled: how much of this answer the caller heard
    heard_text: str = ""
    agent_started: bool = False  # the agent was asked (a greeting or fixed text is not)
    interruption_pending: bool = False  # paused or held, waiting for proof of a real barge-in
    pending_count: int = 0  # identifies the pending interruption a timeout belongs to
    pending_onset: bool = False  # paused on a speech onset alone, not yet sustained speech
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    agent_task: asyncio.Task[None] | None = field(default=None, repr=False)  # reads the agent's output
    agent_error: Exception | None = field(default=None, repr=False)  # what the agent raised, if it did
    control: Hangup | Transfer | None = None  # the agent ended or transferred the call in this turn


@dataclass(frozen=True, slots=True)
class Pending:
    kind: TurnKind
    user: UserInput | None
    utterance_id: int
    interruptible: bool = True
    say: str | None = None


def _merge(first: Pending, second: Pending) -> Pending:
    text = " ".join(p.user.text for p in (first, second) if p.user is not None and p.user.text)
    return Pending("speech", UserInput("speech", text=text), max(first.utterance_id, second.utterance_id))


def _merge_keys(first: Pending, second: Pending) -> Pending:
    digits = first.user.digits + second.user.digits  # type: ignore[union-attr]
    return Pending("dtmf", UserInput("dtmf", digits=digits), max(first.utterance_id, second.utterance_id))


_MAX_KEY_INPUTS = 4  # waiting key inputs; more are joined to the last one


class TurnInbox:
    def __init__(self, capacity: int = 8) -> None:
        self._items: deque[Pending] = deque()
        self._capacity = capacity
        self._changed = asyncio.Event()
        self._held = False
        self._closed = False  # close_with(): the last input is queued, nothing more is taken

    def put(self, item: Pending) -> None:
        if self._closed:
            return
        last = self._items[-1] if self._items else None
        if len(self._items) >= self._capacity and last is not None and last.kind == item.kind == "speech":
            self._items[-1] = _merge(self._items[-1], item)
        elif last is not None and last.kind == item.kind == "dtmf" and self._count("dtmf") >= _MAX_KEY_INPUTS:
            self._items[-1] = _merge_keys(last, item)  # a key flood: bounded, nothing dropped
        else:
            self._items.append(item)
        self._changed.set()

    def _count(self, kind: TurnKind) -> int:
        return sum(item.kind == kind for item in self._items)

    def put_back(self, item: Pending) -> None:
        """Requeue an input whose answer was cancelled before the caller heard any of it."""
        if self._closed:
            return
        self._items.appendleft(item)
        self._changed.set()

    def hold(self) -> None:
        self._held = not self._closed

    def release(self) -> None:
        self._held = False
        self._changed.set()

    def close_with(self, last: Pending) -> None:
        """The call is closing: drop every waiting input, queue `last` (not held for a caller
        mid-utterance), and take nothing more: what the caller says or keys now is not answered."""
        self._items.clear()
        self._items.append(last)
        self._closed = True
        self.release()

    def drop_greetings(self) -> None:
        self._items = deque(item for item in self._items if item.kind != "greeting")

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Pending:
        """The next input once the caller is not mid-utterance (keys do not wait for a noisy
        utterance to end); waiting speech inputs come merged."""
        while not self._items or (self._held and self._items[0].kind != "dtmf"):
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        while item.kind == "speech" and self._items and self._items[0].kind == "speech":
            item = _merge(item, self._items.popleft())
        return item


class RouteTurnLoop:
    """Blocks only on the inbox; runs each turn as its own cancellable playback task."""

    def __init__(
        self, inbox: TurnInbox, run_turn: Callable[[Turn], Coroutine[Any, Any, None]], call_id: str = ""
    ) -> None:
        self._inbox = inbox
        self._run_turn = run_turn
        self._call_id = call_id  # in task names, so a test can find every task of a call
        self._ids = itertools.count(1)
        self.current: Turn | None = None

    async def run(self) -> None:
        while True:
            pending = await self._inbox.get()
            turn = Turn(
                next(self._ids),
                pending.kind,
                pending.user,
                pending.utterance_id,
                pending.interruptible,
                pending.say,
            )
            turn.task = asyncio.create_task(self._run_turn(turn), name=f"turn-{self._call_id}-{turn.id}")
            self.current = turn
            try:
                # asyncio.wait does not raise when the turn is cancelled by a barge-in.
                await asyncio.wait([turn.task])
            finally:
                self.current = None
                if not turn.task.done():  # this loop itself is being cancelled (call ending)
                    turn.task.cancel()
                    await asyncio.wait([turn.task])
