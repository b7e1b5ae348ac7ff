"""Speech recognition with Azure AI Speech (`azure-cognitiveservices-speech`, Microsoft's
proprietary-licensed SDK; install it with the `azure` extra).

Recognition stays VAD-driven: parley's Silero segmenter decides locally, within tens of
milliseconds, when an utterance starts (barge-in) and ends; Azure only says what was said. One
`AzureRecognizer` per call holds one SDK recognizer in continuous recognition on a push stream.
Only utterances are pushed (pre-roll, speech, the closing silence), each followed by
`padding_ms` of silence so Azure closes its phrase now rather than when the caller next speaks.
The pushed stream is therefore the call's utterances back to back, and the offsets of Azure's
results (100 ns ticks of that stream) say which utterance each result belongs to.

Threads: `begin`/`feed`/`end` run on the call's recognition thread and never wait for the network
(the SDK buffers what is written to a push stream and sends it from its own thread). SDK events
arrive on one native SDK thread; they only update state under a lock and resolve futures. The
final text of an utterance reaches the segmenter as a Future, resolved by the `recognized` events
that cover the utterance or, after `final_timeout_s`, with whatever arrived.

When the service fails (`canceled` with an error: bad key, throttling, network), the error is
logged, pending utterances are resolved with what arrived, and a new SDK recognizer is created at
a later utterance with exponential backoff; the call goes on meanwhile (partials stop, finals are
empty).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import azure.cognitiveservices.speech as speechsdk

log = logging.getLogger(__name__)

TICKS_PER_SECOND = 10_000_000
"""The service's offsets and durations are in 100 ns ticks."""
_RELEASE_GRACE_S = 0.2


class AzureSpeechError(RuntimeError):
    """The Speech service canceled recognition or synthesis: why, the error code, its details."""

    def __init__(self, reason: str, code: str, details: str) -> None:
        super().__init__(f"Azure Speech {reason} ({code}): {details}")
        self.reason = reason
        self.code = code
        self.details = details

    @classmethod
    def from_cancellation(cls, details: Any) -> AzureSpeechError:
        """From the SDK's CancellationDetails (recognition: `code`) or
        SpeechSynthesisCancellationDetails (synthesis: `error_code`)."""
        code = getattr(details, "error_code", None) or getattr(details, "code", None)
        return cls(_enum_name(details.reason), _enum_name(code), details.error_details or "")


def log_callback_errors(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    """The SDK swallows exceptions raised in its callbacks: log them instead of losing them."""

    def guarded(event: Any) -> None:
        try:
            handler(event)
        except Exception:
            log.exception("azure speech: error in an SDK event handler")

    return guarded


def _enum_name(value: object) -> str:
    return getattr(value, "name", str(value))


@dataclass(frozen=True)
class AzureSpeechOptions:
    """How to reach the Speech resource, shared by recognition and synthesis.

    Authentication, one of: `key` + `region`; `endpoint` (+ `key` when the endpoint needs one);
    `credential` (an azure-core TokenCredential, e.g. azure-identity's DefaultAzureCredential) +
    `endpoint`, the resource's custom domain: the SDK asks the credential for a fresh token
    whenever the current one nears expiry. An `endpoint` of just `wss://<resource>.
    cognitiveservices.azure.com` serves both recognition and synthesis (the SDK adds the paths).
    `languages` (two or more) turns on continuous language identification instead of `language`.
    """

    key: str | None = None
    region: str | None = None
    endpoint: str | None = None
    credential: object | None = None
    language: str = "en-US"
    languages: tuple[str, ...] = ()
    phrases: tuple[str, ...] = ()
    segmentation_silence_ms: int | None = None

    def __post_init__(self) -> None:
        if self.credential is not None and not self.endpoint:
            raise ValueError("Azure Speech with Entra ID needs the resource's custom-domain endpoint")
        if not self.endpoint and not (self.key and self.region):
            raise ValueError("Azure Speech needs a key and a region, or an endpoint")

    def speech_config(self, *, recognition: bool = False) -> speechsdk.SpeechConfig:
        endpoint = self.endpoint
        if recognition and self.languages and not endpoint:
            # Continuous language identification is only served by the universal v2 endpoint.
            endpoint = f"wss://{self.region}.stt.speech.microsoft.com/speech/universal/v2"
        if self.credential is not None:
            return speechsdk.SpeechConfig(endpoint=endpoint, token_credential=self.credential)
        if endpoint:
            return speechsdk.SpeechConfig(endpoint=endpoint, subscription=self.key)
        return speechsdk.SpeechConfig(subscription=self.key, region=self.region)


@dataclass(eq=False)
class _Utterance:
    """One utterance's span of the pushed stream, in samples, and the phrases Azure gave for it."""

    start: int
    stop: int | None = None  # end of the pushed padding; None while the utterance is open
    speech_end: int = 0  # where the caller's speech ended (before the segmenter's closing silence)
    texts: list[str] = field(default_factory=list)
    covered_to: int | None = None  # end of the latest result placed in this utterance
    future: Future[str] | None = None
    timer: threading.Timer | None = None


class _RecognitionSession:
    """One SDK recognizer and its push stream: created at an utterance, retired on failure or close.

    `written` and the open utterance change on the recognition thread; SDK callbacks and timers
    touch the utterances only under `_lock`.
    """

    def __init__(
        self,
        options: AzureSpeechOptions,
        *,
        trailing_silence_ms: int,
        padding_ms: int,
        final_timeout_s: float,
        end_slack_ms: int,
    ) -> None:
        self._rate = AzureRecognizer.sample_rate
        self._trailing = self._rate * trailing_silence_ms // 1000
        self._padding = bytes(2 * self._rate * padding_ms // 1000)
        self._slack = self._rate * end_slack_ms // 1000
        self._final_timeout_s = final_timeout_s
        self._lock = threading.Lock()
        self._utterances: list[_Utterance] = []  # oldest first; resolved ones are removed
        self._open: _Utterance | None = None
        self._hypothesis = ""
        self.written = 0  # samples pushed so far
        self.error: AzureSpeechError | None = None
        self.failed_t = 0.0
        self.recognized_any = False
        self._retired = False
        stream = speechsdk.audio.PushAudioInputStream(
            speechsdk.audio.AudioStreamFormat(samples_per_second=self._rate, bits_per_sample=16, channels=1)
        )
        recognizer = _create_recognizer(options, stream)
        self._signals = self._connect(recognizer)
        recognizer.start_continuous_recognition_async()  # not waited for: it connects meanwhile
        # Both become None when retired (released on a helper thread).
        self._stream: speechsdk.audio.PushAudioInputStream | None = stream
        self._recognizer: speechsdk.SpeechRecognizer | None = recognizer

    def _connect(self, recognizer: speechsdk.SpeechRecognizer) -> list[Any]:
        handlers = (
            (recognizer.recognizing, self._on_recognizing),
            (recognizer.recognized, self._on_recognized),
            (recognizer.canceled, self._on_canceled),
            (recognizer.session_started, lambda event: log.debug("azure speech session %s started", event.session_id)),
            (recognizer.session_stopped, lambda event: log.debug("azure speech session %s stopped", event.session_id)),
        )
        for signal, handler in handlers:
            signal.connect(log_callback_errors(handler))
        return [signal for signal, _ in handlers]

    # --- recognition thread ------------------------------------------------------------------------
    def open_utterance(self) -> None:
        with self._lock:
            self._open = _Utterance(start=self.written)
            self._utterances.append(self._open)
            self._hypothesis = ""

    def write(self, pcm: bytes) -> None:
        if self._stream is None:  # retired
            return
        self._stream.write(pcm)
        self.written += len(pcm) // 2

    def partial(self) -> str:
        with self._lock:
            if self._open is None:
                return ""
            return _joined([*self._open.texts, self._hypothesis])

    def close_utterance(self) -> str | Future[str]:
        """Push the padding and return the utterance's final text, now or as a future."""
        with self._lock:
            utterance, self._open = self._open, None
            if utterance is None:
                return ""
            if self.error is not None:
                self._forget(utterance)
                return _joined(utterance.texts)
        speech_end = max(utterance.start, self.written - self._trailing)
        self.write(self._padding)
        future: Future[str] = Future()
        with self._lock:
            utterance.stop = self.written
            utterance.speech_end = speech_end
            utterance.future = future
            done = self._reached_speech_end(utterance)  # Azure was faster than the VAD
        if done:
            self._resolve(utterance)
        else:
            utterance.timer = threading.Timer(self._final_timeout_s, self._resolve, (utterance, True))
            utterance.timer.daemon = True
            utterance.timer.start()
        return future

    def retire(self) -> None:
        """Stop recognition without waiting: resolve what is pending, end the stream, stop the SDK
        recognizer in the background and let go of it."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            pending = list(self._utterances)
        for utterance in pending:
            self._resolve(utterance)
        recognizer, self._recognizer = self._recognizer, None
        signals, self._signals = self._signals, []
        stream, self._stream = self._stream, None
        assert recognizer is not None and stream is not None
        stream.close()  # end of audio: the service closes its turn
        stopping = recognizer.stop_continuous_recognition_async()
        release_in_background(stopping, signals, recognizer, stream)

    # --- SDK thread ---------------------------------------------------------------------------------
    def _on_recognizing(self, event: Any) -> None:
        offset = self._samples(event.result.offset)
        with self._lock:
            if self._open is not None and self._owner(offset) is self._open:
                self._hypothesis = event.result.text

    def _on_recognized(self, event: Any) -> None:
        result = event.result
        text = result.text if result.reason == speechsdk.ResultReason.RecognizedSpeech else ""
        offset = self._samples(result.offset)
        end = offset + self._samples(result.duration)
        if text:
            self.recognized_any = True
            if log.isEnabledFor(logging.DEBUG):
                log.debug("azure recognized %r at %.2f s%s", text, offset / self._rate, _language_of(result))
        with self._lock:
            owner = self._owner(offset)
            if owner is not None:
                if text:
                    owner.texts.append(text)
                owner.covered_to = max(owner.covered_to or 0, end)
                if owner is self._open:
                    self._hypothesis = ""
            elif text:
                # What the caller said: its text only at DEBUG.
                log.warning("azure recognized %d chars after their utterance was finalized; dropped", len(text))
                log.debug("azure: dropped late text %r", text)
            done = [u for u in self._utterances if u.future is not None and self._completes(u, offset)]
        for utterance in done:
            self._resolve(utterance)

    def _on_canceled(self, event: Any) -> None:
        details = event.cancellation_details
        if details.reason != speechsdk.CancellationReason.Error:
            log.debug("azure speech recognition ended: %s", _enum_name(details.reason))
            return
        error = AzureSpeechError.from_cancellation(details)
        with self._lock:
            if self._retired:
                return
            self.error = error
            self.failed_t = time.monotonic()
            pending = [u for u in self._utterances if u.future is not None]
        log.error("azure speech recognition failed: %s", error)
        for utterance in pending:
            self._resolve(utterance)

    # --- helpers (call with the lock held unless said otherwise) ---------------------------------
    def _samples(self, ticks: int) -> int:
        return int(ticks) * self._rate // TICKS_PER_SECOND

    def _owner(self, offset: int) -> _Utterance | None:
        """The latest unresolved utterance starting at or before `offset` (a little slack: Azure
        may place a word onset a few ms before the pre-roll that carried it)."""
        for utterance in reversed(self._utterances):
            if utterance.start <= offset + self._rate // 10:
                return utterance
        return None

    def _completes(self, utterance: _Utterance, offset: int) -> bool:
        """Has Azure said all it will about this closed utterance? Yes when a result reaches its
        speech end, or when a result lies beyond it (the service is past it)."""
        assert utterance.stop is not None
        return offset >= utterance.stop or self._reached_speech_end(utterance)

    def _reached_speech_end(self, utterance: _Utterance) -> bool:
        covered = utterance.covered_to
        return covered is not None and covered >= utterance.speech_end - self._slack

    def _forget(self, utterance: _Utterance) -> None:
        if utterance in self._utterances:
            self._utterances.remove(utterance)

    def _resolve(self, utterance: _Utterance, timed_out: bool = False) -> None:
        """Deliver what arrived for this utterance (any thread, lock not held)."""
        with self._lock:
            self._forget(utterance)
            text = _joined(utterance.texts)
        if utterance.timer is not None:
            utterance.timer.cancel()
        future = utterance.future
        if future is None or future.done():
            return
        if timed_out:
            log.warning(
                "azure speech: no final within %.1f s; using the %d chars recognized so far",
                self._final_timeout_s,
                len(text),
            )
        try:
            future.set_result(text)
        except InvalidStateError:  # another thread (SDK callback, timer) resolved it meanwhile
            log.debug("azure speech: utterance already resolved")


def _create_recognizer(
    options: AzureSpeechOptions, stream: speechsdk.audio.PushAudioInputStream
) -> speechsdk.SpeechRecognizer:
    config = options.speech_config(recognition=True)
    if options.segmentation_silence_ms is not None:
        config.set_property(
            speechsdk.PropertyId.Speech_SegmentationSilenceTimeoutMs, str(options.segmentation_silence_ms)
        )
    audio = speechsdk.audio.AudioConfig(stream=stream)
    if options.languages:
        config.set_property(speechsdk.PropertyId.SpeechServiceConnection_LanguageIdMode, "Continuous")
        languages = speechsdk.languageconfig.AutoDetectSourceLanguageConfig(languages=list(options.languages))
        recognizer = speechsdk.SpeechRecognizer(
            config, audio_config=audio, auto_detect_source_language_config=languages
        )
    else:
        config.speech_recognition_language = options.language
        recognizer = speechsdk.SpeechRecognizer(config, audio_config=audio)
    if options.phrases:
        grammar = speechsdk.PhraseListGrammar.from_recognizer(recognizer)
        for phrase in options.phrases:
            grammar.addPhrase(phrase)
    return recognizer


def release_in_background(stopping: Any, signals: list[Any], *objects: object) -> None:
    """Let go of SDK objects on a helper thread: wait for `stopping` (an SDK ResultFuture, or
    None), disconnect the `signals`, then drop the objects. Never on the loop or the recognition
    thread: an SDK object's destructor joins its native threads and closes its connection, which
    took 60-100 ms here and once 10 s; and dropping a running object, or exiting with callbacks
    still connected, can abort the process."""

    def release(held: list[object]) -> None:
        try:
            if stopping is not None:
                stopping.get()
        except Exception:  # an object that failed to stop is dropped all the same
            log.debug("azure speech object did not stop cleanly", exc_info=True)
        for signal in signals:
            signal.disconnect_all()
        # The caller's frame may still hold a reference for a moment: let it return first, so the
        # last reference (and with it the destructor) is surely this thread's.
        time.sleep(_RELEASE_GRACE_S)
        held.clear()

    threading.Thread(target=release, args=(list(objects),), name="azure-release", daemon=True).start()


def _joined(texts: list[str]) -> str:
    return " ".join(text.strip() for text in texts if text and text.strip())


def _language_of(result: Any) -> str:
    language = speechsdk.AutoDetectSourceLanguageResult(result).language
    return f" ({language})" if language else ""


class _Backoff:
    """Delays between attempts to recreate a failed recognizer: first, twice that... up to max."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = 0.0
        self.next_attempt_t = 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self.next_attempt_t

    def failed(self, at: float | None = None) -> None:
        """An attempt failed at monotonic time `at` (default: now)."""
        self.delay_s = min(self.max_s, self.delay_s * 2 if self.delay_s else self.first_s)
        self.next_attempt_t = (time.monotonic() if at is None else at) + self.delay_s

    def reset(self) -> None:
        self.delay_s = 0.0
        self.next_attempt_t = 0.0


class AzureRecognizer:
    """Implements `parley.protocols.Recognizer` with Azure AI Speech; one instance per call.

    `trailing_silence_ms`: the silence the segmenter feeds after the last speech before it ends an
    utterance (its `endpoint_silence_ms`); with it the recognizer knows where the speech ended and
    resolves the final as soon as Azure's phrase reaches that point. `end()` returns a Future.
    """

    sample_rate = 16000

    def __init__(
        self,
        options: AzureSpeechOptions,
        *,
        trailing_silence_ms: int = 0,
        padding_ms: int = 600,
        final_timeout_s: float = 3.0,
        end_slack_ms: int = 300,
        backoff_first_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._new_session = functools.partial(
            _RecognitionSession,
            options,
            trailing_silence_ms=trailing_silence_ms,
            padding_ms=padding_ms,
            final_timeout_s=final_timeout_s,
            end_slack_ms=end_slack_ms,
        )
        self._session: _RecognitionSession | None = None
        self._current: _RecognitionSession | None = None  # the session of the open utterance
        self._backoff = _Backoff(backoff_first_s, backoff_max_s)
        self._last_partial = ""
        self.sessions_created = 0

    def begin(self) -> None:
        self._current = self._usable_session()
        self._last_partial = ""
        if self._current is not None:
            self._current.open_utterance()

    def feed(self, pcm: bytes) -> str | None:
        session = self._current
        if session is None or not pcm:
            return None
        session.write(pcm)
        partial = session.partial()
        if not partial or partial == self._last_partial:
            return None
        self._last_partial = partial
        return partial

    def end(self) -> str | Future[str]:
        session, self._current = self._current, None
        return session.close_utterance() if session is not None else ""

    def close(self) -> None:
        self._current = None
        if self._session is not None:
            self._session.retire()
            self._session = None

    def _usable_session(self) -> _RecognitionSession | None:
        """The live session; a failed one is retired and, once the backoff allows, replaced."""
        session = self._session
        if session is not None and session.error is not None:
            if session.recognized_any:  # it worked for a while: start the backoff over
                self._backoff.reset()
            self._backoff.failed(session.failed_t)
            session.retire()
            self._session = session = None
            log.warning("azure speech: a new recognizer after %.1f s (backoff)", self._backoff.delay_s)
        if session is None and self._backoff.ready():
            try:
                session = self._new_session()
            except Exception:  # the SDK refusing its configuration: retried with backoff too
                log.exception("azure speech: could not create a recognizer")
                self._backoff.failed()
                return None
            self._session = session
            self.sessions_created += 1
        return session
