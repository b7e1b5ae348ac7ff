"""Speech synthesis with Azure AI Speech (`azure-cognitiveservices-speech`, Microsoft's
proprietary-licensed SDK; install it with the `azure` extra).

Each clause is sent as SSML to a `SpeechSynthesizer` with no audio device (`audio_config=None`)
whose output format is raw 16-bit mono PCM at the call's rate (16 or 24 kHz; other rates are
synthesized at 24 kHz and resampled). Audio chunks arrive on the SDK's thread through the
`synthesizing` event and are handed to the event loop with `call_soon_threadsafe`; nothing here
blocks the loop. Synthesizers are kept in a small idle pool per rate: a synthesizer keeps its
connection open between requests, so later clauses skip the connection set-up.

Voices are named `NAME[;style=STYLE][;degree=DEGREE][;rate=RATE]`, for example
`en-US-JennyNeural` or `en-US-JennyNeural;style=cheerful;rate=1.1`: NAME is an Azure voice name
(HD voices contain a colon, e.g. `en-US-Ava:DragonHDLatestNeural`, hence `;` between the parts),
STYLE an `mstts:express-as` speaking style, DEGREE its intensity (0.01-2) and RATE a speaking-rate
multiplier (0.5-2).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import azure.cognitiveservices.speech as speechsdk

from parley.audio import StreamResampler
from parley.speech.azure import (
    AzureSpeechError,
    AzureSpeechOptions,
    log_callback_errors,
    release_in_background,
)

log = logging.getLogger(__name__)

DEFAULT_VOICE = "en-US-JennyNeural"
_OUTPUT_FORMATS = {
    16000: speechsdk.SpeechSynthesisOutputFormat.Raw16Khz16BitMonoPcm,
    24000: speechsdk.SpeechSynthesisOutputFormat.Raw24Khz16BitMonoPcm,
}
_VOICE_NAME = re.compile(r"^[a-z]{2,3}-[A-Za-z]{2,4}(-[A-Za-z0-9]+)*-[A-Za-z0-9:]+$")
_STYLE = re.compile(r"^[a-z][a-z-]*$")


@dataclass(frozen=True, slots=True)
class AzureVoice:
    """A voice as the synthesizer speaks it: Azure voice name, optional style and rate."""

    name: str
    style: str | None = None
    degree: float | None = None
    rate: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> AzureVoice:
        """`NAME[;style=STYLE][;degree=DEGREE][;rate=RATE]` (see the module notes)."""
        name, *parts = [part.strip() for part in spec.split(";")]
        if not _VOICE_NAME.match(name):
            raise ValueError(f"{spec!r} is not an Azure voice name like en-US-JennyNeural")
        options: dict[str, str] = {}
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or key not in ("style", "degree", "rate") or not value:
                raise ValueError(f"voice {spec!r}: expected style=..., degree=... or rate=..., got {part!r}")
            options[key] = value
        style = options.get("style")
        if style is not None and not _STYLE.match(style):
            raise ValueError(f"voice {spec!r}: {style!r} is not a speaking style name")
        degree = _number(options, "degree", spec, 0.01, 2.0)
        rate = _number(options, "rate", spec, 0.5, 2.0)
        return cls(name, style, degree, 1.0 if rate is None else rate)

    @property
    def language(self) -> str:
        """The locale the name starts with (en-US-JennyNeural -> en-US), for `xml:lang`."""
        return "-".join(self.name.split("-")[:2])

    def ssml(self, text: str) -> str:
        body = escape(text)
        if self.rate != 1.0:
            body = f"<prosody rate={quoteattr(f'{(self.rate - 1) * 100:+.0f}%')}>{body}</prosody>"
        if self.style:
            degree = f" styledegree={quoteattr(f'{self.degree:g}')}" if self.degree is not None else ""
            body = f"<mstts:express-as style={quoteattr(self.style)}{degree}>{body}</mstts:express-as>"
        return (
            '<speak version="1.0" xmlns="http://www.w3.org/2001/10/synthesis"'
            ' xmlns:mstts="https://www.w3.org/2001/mstts"'
            f" xml:lang={quoteattr(self.language)}><voice name={quoteattr(self.name)}>{body}</voice></speak>"
        )


def _number(options: dict[str, str], key: str, spec: str, low: float, high: float) -> float | None:
    if key not in options:
        return None
    try:
        value = float(options[key])
    except ValueError:
        raise ValueError(f"voice {spec!r}: {key} must be a number") from None
    if not low <= value <= high:
        raise ValueError(f"voice {spec!r}: {key} must be between {low:g} and {high:g}")
    return value


class SynthesizerPool:
    """Idle SDK synthesizers per output rate, shared by every voice and call of the process.

    A synthesizer serves one request at a time; one that finished cleanly goes back to the pool
    (with its connection still open). Acquire/release may come from several event loops (tests).
    """

    def __init__(self, options: AzureSpeechOptions, max_idle: int = 8) -> None:
        self._options = options
        self._max_idle = max_idle
        self._idle: dict[int, list[speechsdk.SpeechSynthesizer]] = {}
        self._lock = threading.Lock()
        self._abandoned: list[speechsdk.SpeechSynthesizer] = []
        self.created = 0

    def acquire(self, rate: int) -> speechsdk.SpeechSynthesizer:
        with self._lock:
            idle = self._idle.get(rate)
            if idle:
                return idle.pop()
        config = self._options.speech_config()
        config.set_speech_synthesis_output_format(_OUTPUT_FORMATS[rate])
        synthesizer = speechsdk.SpeechSynthesizer(speech_config=config, audio_config=None)
        with self._lock:
            self.created += 1
        return synthesizer

    def release(self, rate: int, synthesizer: speechsdk.SpeechSynthesizer) -> None:
        """Back to the pool after a clean finish (or let go, off the loop, if the pool is full)."""
        with self._lock:
            idle = self._idle.setdefault(rate, [])
            if len(idle) < self._max_idle:
                idle.append(synthesizer)
                return
        self.discard(synthesizer)

    def discard(self, synthesizer: speechsdk.SpeechSynthesizer) -> None:
        """A synthesizer that failed: let go of it on a helper thread (its destructor may block)."""
        release_in_background(None, [], synthesizer)

    def abandon(self, synthesizer: speechsdk.SpeechSynthesizer) -> None:
        """A synthesizer that did not confirm its stop: kept referenced (dropping a running SDK
        synthesizer can abort the process), never reused."""
        with self._lock:
            self._abandoned.append(synthesizer)

    def close(self) -> None:
        with self._lock:
            idle = [synthesizer for synthesizers in self._idle.values() for synthesizer in synthesizers]
            self._idle.clear()
        release_in_background(None, [], *idle)


class _SynthesisRun:
    """One request on one synthesizer: SDK events -> an asyncio queue on the consumer's loop."""

    def __init__(self, synthesizer: speechsdk.SpeechSynthesizer, loop: asyncio.AbstractEventLoop) -> None:
        self._synthesizer = synthesizer
        self._loop = loop
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.finished = asyncio.Event()  # completed or canceled: the synthesizer is idle again
        self.error: AzureSpeechError | None = None
        self._signals = [
            (synthesizer.synthesizing, self._on_synthesizing),
            (synthesizer.synthesis_completed, self._on_completed),
            (synthesizer.synthesis_canceled, self._on_canceled),
        ]
        for signal, handler in self._signals:
            signal.connect(log_callback_errors(handler))

    def start(self, ssml: str) -> None:
        self._synthesizer.speak_ssml_async(ssml)  # returns at once; events follow on the SDK thread

    def disconnect(self) -> None:
        for signal, _ in self._signals:
            signal.disconnect_all()

    # --- SDK thread --------------------------------------------------------------------------------
    def _on_synthesizing(self, event: Any) -> None:
        self._post(self.chunks.put_nowait, event.result.audio_data)

    def _on_completed(self, event: Any) -> None:
        self._post(self._finish, None)

    def _on_canceled(self, event: Any) -> None:
        details = event.result.cancellation_details
        error = None
        if details.reason == speechsdk.CancellationReason.Error:
            error = AzureSpeechError.from_cancellation(details)
        self._post(self._finish, error)

    def _post(self, callback: Any, argument: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, argument)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # --- event loop ---------------------------------------------------------------------------------
    def _finish(self, error: AzureSpeechError | None) -> None:
        self.error = error
        self.finished.set()
        self.chunks.put_nowait(None)


class AzureSynthesizer:
    """Implements `parley.protocols.Synthesizer` with Azure AI Speech.

    `voice`: see the module notes. Cancelling the consuming task (barge-in) stops the synthesis
    (`stop_speaking_async`) and waits, at most `stop_timeout_s`, for the SDK to confirm.
    """

    def __init__(
        self,
        options: AzureSpeechOptions,
        voice: str | None = None,
        *,
        pool: SynthesizerPool | None = None,
        stop_timeout_s: float = 2.0,
    ) -> None:
        self.voice = voice or DEFAULT_VOICE
        self._voice = AzureVoice.parse(self.voice)
        self._options = options
        self._pool = pool or SynthesizerPool(options)
        self._stop_timeout_s = stop_timeout_s

    @property
    def pool(self) -> SynthesizerPool:
        return self._pool

    def with_voice(self, voice: str | None) -> AzureSynthesizer:
        """This synthesizer for None or its own voice, else one for another voice (same pool)."""
        if not voice or voice == self.voice:
            return self
        return AzureSynthesizer(self._options, voice, pool=self._pool, stop_timeout_s=self._stop_timeout_s)

    def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        return self._stream(text, sample_rate)

    def close(self) -> None:
        self._pool.close()

    async def _stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        native_rate = sample_rate if sample_rate in _OUTPUT_FORMATS else 24000
        resampler = StreamResampler(native_rate, sample_rate) if native_rate != sample_rate else None
        synthesizer = self._pool.acquire(native_rate)
        run = _SynthesisRun(synthesizer, asyncio.get_running_loop())
        try:
            run.start(self._voice.ssml(text))
            while (chunk := await run.chunks.get()) is not None:
                pcm = resampler.process(chunk) if resampler is not None else chunk
                if pcm:
                    yield pcm
            if run.error is not None:
                raise run.error
            if resampler is not None and (tail := resampler.process(b"", last=True)):
                yield tail
        finally:
            await self._settle(synthesizer, run, native_rate)

    async def _settle(self, synthesizer: speechsdk.SpeechSynthesizer, run: _SynthesisRun, rate: int) -> None:
        """After the stream: stop an unfinished synthesis, wait (bounded) for the SDK to confirm,
        then give the synthesizer back (or keep it aside if it never confirmed)."""
        stopped = not run.finished.is_set()
        if stopped:
            synthesizer.stop_speaking_async()  # returns at once; synthesis_canceled follows
            try:
                await asyncio.wait_for(run.finished.wait(), self._stop_timeout_s)
            except TimeoutError:
                log.warning("azure speech: synthesis did not stop within %.1f s", self._stop_timeout_s)
        run.disconnect()
        if not run.finished.is_set():
            self._pool.abandon(synthesizer)
        elif run.error is None and not stopped:
            self._pool.release(rate, synthesizer)  # (a stopped one may still deliver a late event)
        else:
            self._pool.discard(synthesizer)
