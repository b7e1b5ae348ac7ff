"""Streaming recognition with pocketsphinx 5 (model `en-us` shipped inside the wheel).

Fed only VAD-gated audio: pocketsphinx hallucinates words in noise and silence.
"""

from __future__ import annotations

from pocketsphinx import Decoder

# Settings measured on 2 cores (see docs/speech-stack): fast single-pass search, ~4 ms per 20 ms frame.
_DECODER_OPTIONS = dict(fwdflat=False, bestpath=False, maxhmmpf=3000, maxwpf=10, loglevel="FATAL")


class PocketsphinxRecognizer:
    """Implements `parley.protocols.Recognizer` at 16 kHz.

    `feed` returns a changed hypothesis at most every `partial_interval_ms` of audio: `hyp()` costs a
    search traceback, and captions/barge-in need no more than ~10 updates a second.
    """

    sample_rate = 16000

    def __init__(self, partial_interval_ms: int = 100) -> None:
        self._decoder = Decoder(samprate=self.sample_rate, **_DECODER_OPTIONS)
        self._partial_bytes = self.sample_rate * 2 * partial_interval_ms // 1000
        self._since_partial = 0
        self._last_partial = ""
        self._in_utterance = False

    def begin(self) -> None:
        if self._in_utterance:
            self._decoder.end_utt()
        self._decoder.start_utt()
        self._in_utterance = True
        self._since_partial = 0
        self._last_partial = ""

    def feed(self, pcm: bytes) -> str | None:
        if not self._in_utterance:
            return None
        self._decoder.process_raw(pcm, False, False)
        self._since_partial += len(pcm)
        if self._since_partial < self._partial_bytes:
            return None
        self._since_partial = 0
        text = self._hypothesis()
        if text == self._last_partial:
            return None
        self._last_partial = text
        return text

    def end(self) -> str:
        if not self._in_utterance:
            return ""
        self._decoder.end_utt()
        self._in_utterance = False
        return self._hypothesis()

    def close(self) -> None:
        if self._in_utterance:
            self._decoder.end_utt()
            self._in_utterance = False
        self._decoder = None  # type: ignore[assignment]  # frees ~90 MB of model now, not at GC

    def _hypothesis(self) -> str:
        hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""
