"""Per-call limits as pure logic: no I/O, no clock of its own (the media handler passes the time in).

- `InboundRateLimiter`: a token bucket over seconds of inbound media. Every message costs 20 ms (one
  audio frame) per started 2 KiB, so an ACS frame at 16 or 24 kHz costs exactly its 20 ms, and a
  large non-audio message costs what its size would. The bucket refills at `rate` x real time and
  holds `burst_s` seconds, so the backlog a network stall delivers at once passes, while a peer that
  keeps sending faster than `rate` x real time empties it within `burst_s / (speed - rate)` seconds.
  A new call starts with only `initial_s` in the bucket (a stream starts in real time; it fills by
  `rate - 1` seconds a second of real-time audio, so it is full within ~3 s at 4x): a peer that
  floods and dials again at once gets ~2 s of audio through per connection, not 10.
  O(1) per message, before any parsing.
- `ErrorWindow`: more than `max_errors` bad messages within `window_s` seconds. Unlike a count of
  consecutive errors, good messages in between do not reset it.
- `Deadlines`: the handshake (first AudioMetadata or AudioData), idle (no message at all) and call
  length deadlines; `expired(now)` names the first one passed, `next_check(now)` says when to look again.
"""

from __future__ import annotations

import math
from collections import deque

FRAME_S = 0.02  # one ACS audio frame
COST_UNIT_BYTES = 2048  # a message costs one frame per started unit (an ACS frame is < 1.4 KB)
BURST_S = 10.0  # inbound media the bucket lets through at once (a stalled network's backlog)
INITIAL_BURST_S = 2.0  # what a new call may send at once
MAX_ERRORS = 50  # bad messages tolerated within ERROR_WINDOW_S (5% of a 50-frames-a-second stream),
ERROR_WINDOW_S = 10.0  # fewer than a new call may send at once: a garbage-only peer ends in 1007

HANDSHAKE_TIMEOUT = "handshake_timeout"
IDLE_TIMEOUT = "idle_timeout"
MAX_CALL_DURATION = "max_call_duration"


def message_cost(size: int) -> float:
    """Seconds of media one inbound message of `size` bytes (or characters) counts as."""
    return FRAME_S * max(1, math.ceil(size / COST_UNIT_BYTES))


class InboundRateLimiter:
    """Token bucket: `admit` is False once the peer has sent more than the bucket allows."""

    def __init__(self, rate: float, now: float, burst_s: float = BURST_S, initial_s: float = INITIAL_BURST_S) -> None:
        if rate <= 1 or burst_s <= 0 or not 0 < initial_s <= burst_s:
            raise ValueError("the rate must exceed real time and the bursts must be positive, initial <= burst")
        self.rate = rate
        self.burst_s = burst_s
        self.tokens = initial_s
        self._last = now

    def admit(self, now: float, cost_s: float = FRAME_S) -> bool:
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(self.burst_s, self.tokens + elapsed * self.rate)
            self._last = now
        self.tokens -= cost_s
        return self.tokens >= -1e-9  # (a sum of 20 ms steps is not exact in floating point)


class ErrorWindow:
    """Counts bad messages; `add` is True when more than `max_errors` fell within `window_s`."""

    def __init__(self, max_errors: int = MAX_ERRORS, window_s: float = ERROR_WINDOW_S) -> None:
        self.max_errors = max_errors
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=max_errors + 1)  # bounded: older ones do not matter

    def add(self, now: float) -> bool:
        self._times.append(now)
        while self._times[0] <= now - self.window_s:
            self._times.popleft()
        return len(self._times) > self.max_errors


class Deadlines:
    """The times by which a call must have done something. All times are monotonic seconds."""

    def __init__(self, started_t: float, *, handshake_s: float, idle_s: float, max_call_s: float) -> None:
        self.started_t = started_t
        self.handshake_s = handshake_s
        self.idle_s = idle_s
        self.max_call_s = max_call_s
        self.media_started = False
        self.last_message_t = started_t
        self._max_call_due = True  # until reported once

    def message(self, t: float) -> None:
        """Any inbound message (O(1): called per frame)."""
        self.last_message_t = t

    def handshake_done(self) -> None:
        self.media_started = True

    def expired(self, now: float) -> str | None:
        """The first deadline passed, if any. `max_call_duration` is reported once (the call then
        ends politely, which takes a few seconds); the others hold until the call ends."""
        if not self.media_started and now >= self.started_t + self.handshake_s:
            return HANDSHAKE_TIMEOUT
        if now >= self.last_message_t + self.idle_s:
            return IDLE_TIMEOUT
        if self._max_call_due and now >= self.started_t + self.max_call_s:
            self._max_call_due = False
            return MAX_CALL_DURATION
        return None

    def next_check(self) -> float:
        """When the next deadline can pass, as things stand (a later message may move it on)."""
        due = [self.last_message_t + self.idle_s]
        if not self.media_started:
            due.append(self.started_t + self.handshake_s)
        if self._max_call_due:
            due.append(self.started_t + self.max_call_s)
        return min(due)
