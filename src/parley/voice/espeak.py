"""espeak-ng text to speech through the shared library shipped by `espeakng-loader` (GPL-3.0).

espeak-ng keeps global state (one voice, one callback per process), so one lock serialises all
synthesis in the process. It runs about 1000x faster than real time, so a single engine serves many
calls; chunks arrive every ~60 ms of audio and synthesis aborts at the next chunk when cancelled.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

import espeakng_loader
import numpy as np

from parley.audio import StreamResampler
from parley.voice.threaded import Emit, produce_all, stream_from_executor

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_BUFFER_MS = 60

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    pass


class EspeakEngine:
    """The process-wide espeak-ng library. Use `EspeakEngine.shared()`."""

    _instance: EspeakEngine | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def shared(cls) -> EspeakEngine:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data_path = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"espeak-ng failed to initialise (data at {data_path.decode()})")
        self._lib = lib
        self.sample_rate: int = rate
        self._lock = threading.Lock()
        self._on_samples: Callable[[np.ndarray], bool] | None = None
        self._callback = _SynthCallback(self._dispatch)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def check_voice(self, voice: str) -> None:
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice named {voice!r}")

    def synthesize(self, text: str, voice: str, rate_wpm: int, on_samples: Callable[[np.ndarray], bool]) -> None:
        """Blocking. `on_samples(int16 array at self.sample_rate)` returns False to abort."""
        encoded = text.encode("utf-8") + b"\0"
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice named {voice!r}")
            self._lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)
            self._on_samples = on_samples
            try:
                self._lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            finally:
                self._on_samples = None

    def _dispatch(self, wav: ctypes._Pointer[ctypes.c_short], count: int, _events: int) -> int:
        if count <= 0 or self._on_samples is None:
            return 0
        samples = np.ctypeslib.as_array(wav, shape=(count,)).copy()
        return 0 if self._on_samples(samples) else 1  # 1 tells espeak-ng to abort


class EspeakSynthesizer:
    """Implements `parley.protocols.Synthesizer` with espeak-ng, resampled with soxr."""

    def __init__(self, executor: Executor, voice: str = "en-us", rate_wpm: int = 175) -> None:
        self._engine = EspeakEngine.shared()
        self._engine.check_voice(voice)
        self._executor = executor
        self.voice = voice
        self.rate_wpm = rate_wpm

    def with_voice(self, voice: str | None) -> EspeakSynthesizer:
        if not voice or voice == self.voice:
            return self
        return EspeakSynthesizer(self._executor, voice, self.rate_wpm)

    def stream(self, text: str, sample_rate: int) -> AsyncIterator[bytes]:
        return stream_from_executor(self._executor, lambda emit: self._produce(text, sample_rate, emit))

    def synthesize_blocking(self, text: str, sample_rate: int) -> bytes:
        """Whole utterance at once (tests and test-audio generation)."""
        return produce_all(lambda emit: self._produce(text, sample_rate, emit))

    def _produce(self, text: str, sample_rate: int, emit: Emit) -> None:
        resampler = StreamResampler(self._engine.sample_rate, sample_rate)
        self._engine.synthesize(
            text, self.voice, self.rate_wpm, lambda samples: emit(resampler.process(samples.tobytes()))
        )
        emit(resampler.process(b"", last=True))
