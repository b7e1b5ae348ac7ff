"""The engine choices a server can start with: every --stt and --tts option builds and works."""

from __future__ import annotations

import numpy as np
import pytest

from parley.engines import build_engines
from parley.settings import SettingsError, load_settings
from parley.speech.silent import NoPartials
from parley.voice.espeak import EspeakSynthesizer
from parley.voice.guarded import GuardedSynthesizer
from parley.voice.piper import PiperSynthesizer


def engines_for(**overrides: object):  # type: ignore[no-untyped-def]
    return build_engines(load_settings(engine_pool_warm=0, **overrides))


def test_defaults_are_two_pass_and_piper() -> None:
    engines = engines_for()
    try:
        assert engines.final_pass is not None
        voice = engines.synthesizer_for(None)
        assert isinstance(voice, GuardedSynthesizer) and isinstance(voice.primary, PiperSynthesizer)
        assert isinstance(voice.fallback, EspeakSynthesizer)  # speaks while Piper fails
        # An espeak-ng voice name in an agent's YAML is not a Piper voice: the default is used.
        assert engines.synthesizer_for("en-gb") is engines.synthesizer_for(None)
    finally:
        engines.close()


def test_pocketsphinx_only_and_espeak() -> None:
    engines = engines_for(stt="pocketsphinx", tts="espeak")
    try:
        assert engines.final_pass is None
        voice = engines.synthesizer_for(None)
        assert isinstance(voice, GuardedSynthesizer) and isinstance(voice.primary, EspeakSynthesizer)
        assert voice.fallback is None  # espeak-ng is the last resort
        assert engines.synthesizer_for("en-gb-x-rp") is not voice  # espeak-ng voices by name
        assert engines.synthesizer_for("no-such-voice") is voice  # unknown: the default, logged
    finally:
        engines.close()


def test_whisper_only_has_no_partials(hours_pcm: np.ndarray) -> None:
    engines = engines_for(stt="whisper", tts="espeak")
    try:
        recognizer = engines.recognizers.acquire()
        assert isinstance(recognizer, NoPartials)
        assert engines.final_pass is not None
        text = engines.final_pass.submit(hours_pcm.tobytes()).result(timeout=30).text
        assert "hours" in text.lower()
    finally:
        engines.close()


def test_bad_choices_are_named_at_startup(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SettingsError, match="stt"):
        load_settings(stt="vosk")
    with pytest.raises(SettingsError, match="early_final_ms"):
        load_settings(early_final_ms=600)
    with pytest.raises(Exception, match="not a CTranslate2 Whisper model"):
        engines_for(stt_model=str(tmp_path), tts="espeak")
    with pytest.raises(Exception, match="Piper voice"):
        engines_for(stt="pocketsphinx", tts_voice=str(tmp_path / "missing.onnx"))
