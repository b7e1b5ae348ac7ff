"""ThreadBridge: the only way recognition results cross from their thread into the event loop.

Everything goes through `loop.call_soon_threadsafe`, which is FIFO, so the loop sees events in the
order the recognition thread produced them (a final never overtakes its own partials).

Drop policy (written down because queues must be bounded):
- partials: at most one undelivered partial per call; a newer one replaces it (only the latest
  hypothesis matters, and under load stale partials are worthless); a final discards it;
- onsets (and their loss), speech_started and finals: never dropped;
- after `close()` everything is discarded (the call is over).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpeechOnset:
    """The first sign of caller speech while the caller was silent (a frame well above the line's
    background, or the first VAD window over the threshold): maybe speech, not yet proof of it.
    `utterance_id` is the one it would start; `onset_t` when that frame's or window's audio began."""

    utterance_id: int
    onset_t: float
    detected_t: float
    cue: str = "vad"  # what showed it: "level" (a frame well above the line's floor) or "vad" (a window)


@dataclass(frozen=True, slots=True)
class OnsetLost:
    """The VAD windows after an onset stayed under the release threshold (`onset_lost_ms`) before they
    made an utterance: it was a click, a breath or a burst of noise."""

    utterance_id: int
    t: float


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Sustained caller speech detected. `onset_t`: when the first speech audio arrived."""

    utterance_id: int
    onset_t: float
    detected_t: float


@dataclass(frozen=True, slots=True)
class SpeechContinues:
    """The open utterance has been voiced for `long_speech_ms`: more than a backchannel or cough."""

    utterance_id: int
    t: float


@dataclass(frozen=True, slots=True)
class Partial:
    utterance_id: int
    text: str
    t: float


@dataclass(frozen=True, slots=True)
class Final:
    utterance_id: int
    text: str
    t: float  # when the final text was ready
    speech_end_t: float  # end of the last speech window
    endpoint_t: float = 0.0  # when the silence after it was long enough to end the utterance
    voiced_ms: int = 0  # voiced speech in the utterance (VAD windows over the release threshold)
    avg_logprob: float | None = None  # the final pass's confidence, when it reports one (Whisper)
    no_speech_prob: float | None = None


class SpeechSink(Protocol):
    """What the event loop side implements (the media handler). Called on the loop only."""

    def on_speech_onset(self, event: SpeechOnset) -> None: ...

    def on_onset_lost(self, event: OnsetLost) -> None: ...

    def on_speech_started(self, event: SpeechStarted) -> None: ...

    def on_speech_continues(self, event: SpeechContinues) -> None: ...

    def on_partial(self, event: Partial) -> None: ...

    def on_final(self, event: Final) -> None: ...

    def on_recognition_failed(self, message: str) -> None: ...


class ThreadBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop, sink: SpeechSink) -> None:
        self._loop = loop
        self._sink = sink
        self._lock = threading.Lock()
        self._pending_partial: Partial | None = None
        self._closed = False

    # --- called on the recognition thread; never blocks ------------------------------------------
    def schedule_barge_in(self, event: SpeechOnset | OnsetLost | SpeechStarted | SpeechContinues) -> None:
        """Speech onset (or its loss, or sustained speech): hand it to the loop at once, where the
        barge-in policy decides. Never dropped."""
        if isinstance(event, SpeechOnset):
            self._post(self._sink.on_speech_onset, event)
        elif isinstance(event, OnsetLost):
            self._post(self._sink.on_onset_lost, event)
        elif isinstance(event, SpeechStarted):
            self._post(self._sink.on_speech_started, event)
        else:
            self._post(self._sink.on_speech_continues, event)

    def queue_partial(self, event: Partial) -> None:
        with self._lock:
            if self._closed:
                return
            replacing = self._pending_partial is not None
            self._pending_partial = event
        if not replacing:  # else the delivery already queued will carry this newer text
            self._post(self._deliver_partial)

    def queue_speech_result(self, event: Final) -> None:
        """A final result; it becomes the caller's input for the next turn. Never dropped.

        An undelivered partial of the same utterance is superseded by the final. With a second
        pass the final may be ready after the next utterance has begun: its partials are kept.
        May be called from any thread (the second pass delivers from its executor).
        """
        with self._lock:
            pending = self._pending_partial
            if pending is not None and pending.utterance_id <= event.utterance_id:
                self._pending_partial = None
        self._post(self._sink.on_final, event)

    def report_failure(self, message: str) -> None:
        """The recognizer or VAD failed; the call goes on without recognition."""
        self._post(self._sink.on_recognition_failed, message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pending_partial = None

    # --- internals ---------------------------------------------------------------------------------
    def _post(self, callback: Callable[..., None], *args: object) -> None:
        if self._closed:
            return
        try:
            self._loop.call_soon_threadsafe(self._guarded, callback, args)
        except RuntimeError:  # the loop is closed: the call (or server) is gone
            log.debug("event loop closed; dropping %s", getattr(callback, "__name__", callback))

    def _guarded(self, callback: Callable[..., None], args: tuple[object, ...]) -> None:
        if self._closed:
            return
        callback(*args)

    def _deliver_partial(self) -> None:
        with self._lock:
            event, self._pending_partial = self._pending_partial, None
        if event is not None:
            self._sink.on_partial(event)
