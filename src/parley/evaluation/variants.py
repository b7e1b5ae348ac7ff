"""Degraded and distracting audio for evaluations: pure numpy transforms of int16 audio at 16 kHz.

Every function is deterministic: randomness comes from a `seed`, so an evaluation run can be
repeated exactly and two server versions can be compared on the same audio.

- `add_noise`: speech plus white, pink or babble-like noise at a given SNR (over active speech).
- `telephone`: a narrow-band phone line: 300-3400 Hz, 8 kHz, G.711 mu-law, back to 16 kHz.
- `add_echo`: a speakerphone's echo of the far end, delayed and attenuated.
- `cough`, `backchannel`, `noise_bed`: non-speech and short-speech stimuli for barge-in trials.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal, Protocol

import numpy as np
import soxr

SAMPLE_RATE: Final = 16000
FULL_SCALE: Final = 32768.0
NoiseKind = Literal["white", "pink", "babble"]
NOISE_KINDS: Final[tuple[NoiseKind, ...]] = ("white", "pink", "babble")

_FRAME_MS: Final = 20
_ACTIVE_FLOOR_DBFS: Final = -60.0  # frames quieter than this are never speech (room tone, silence)
_ACTIVE_MARGIN_DB: Final = 15.9  # P.56: frames this far below the active level are not speech
_BABBLE_TALKERS: Final = 6  # enough voices that no single one is intelligible
_PHONE_BAND: Final = (300.0, 3400.0)
_PHONE_RATE: Final = 8000
_FIR_TAPS: Final = 511  # Blackman window: ~170 Hz transition band at 16 kHz, so 3.6 kHz is well stopped

Shape = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------


def _to_float(pcm: np.ndarray) -> np.ndarray:
    samples = np.asarray(pcm)
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError("audio must be a 1-D int16 array")
    return samples.astype(np.float64)


def _to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples), -32768, 32767).astype(np.int16)


def _frame_db(samples: np.ndarray, frame: int) -> np.ndarray:
    """Level (dBFS) of each whole frame; a partial last frame is measured on its own samples."""
    n_frames = -(-samples.size // frame)
    padded = np.zeros(n_frames * frame)
    padded[: samples.size] = samples
    power = np.mean(padded.reshape(n_frames, frame) ** 2, axis=1)
    if samples.size % frame:
        power[-1] *= frame / (samples.size % frame)
    return 10 * np.log10(power / FULL_SCALE**2 + 1e-20)


def active_mask(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per sample: inside a 20 ms frame of active speech.

    A simplified ITU-T P.56: the active level A is the mean power of the frames louder than
    A - 15.9 dB (found by fixed-point iteration), each active frame extended by one frame either
    side as a hangover. Pauses between words and the silence or room tone around the clip are
    excluded, so an SNR measured over this mask does not depend on how much silence the clip has.
    """
    samples = _to_float(pcm)
    if samples.size == 0:
        return np.zeros(0, dtype=bool)
    frame = sample_rate * _FRAME_MS // 1000
    level = _frame_db(samples, frame)
    active = level > _ACTIVE_FLOOR_DBFS
    for _ in range(20):
        if not active.any():
            break
        mean_db = 10 * np.log10(np.mean(10 ** (level[active] / 10)))
        updated = level > max(_ACTIVE_FLOOR_DBFS, mean_db - _ACTIVE_MARGIN_DB)
        if np.array_equal(updated, active):
            break
        active = updated
    hangover = active.copy()
    hangover[1:] |= active[:-1]
    hangover[:-1] |= active[1:]
    return np.repeat(hangover, frame)[: samples.size]


def active_level_dbfs(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """RMS level of the active speech, dBFS (-120 when nothing is active)."""
    mask = active_mask(pcm, sample_rate)
    if not mask.any():
        return -120.0
    power = float(np.mean(_to_float(pcm)[mask] ** 2))
    return 10 * np.log10(power / FULL_SCALE**2 + 1e-20)


def scale_to_dbfs(pcm: np.ndarray, level_dbfs: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`pcm` with its active-speech level set to `level_dbfs` (clipped to int16)."""
    gain_db = level_dbfs - active_level_dbfs(pcm, sample_rate)
    return _to_int16(_to_float(pcm) * 10 ** (gain_db / 20))


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def _shape_spectrum(white: np.ndarray, shape: Shape, sample_rate: int) -> np.ndarray:
    """Filter `white` by a magnitude response in the frequency domain.

    The result is circular (its end joins its start without a click), which is what lets a noise
    bed loop seamlessly under a whole call.
    """
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(white.size, 1 / sample_rate)
    return np.fft.irfft(spectrum * shape(freqs), white.size)


def _pink_shape(freqs: np.ndarray) -> np.ndarray:
    # 1/f power; nothing below 20 Hz (inaudible, and it would dominate the RMS).
    return np.where(freqs >= 20.0, 1 / np.sqrt(np.maximum(freqs, 20.0)), 0.0)


def _speech_shape(freqs: np.ndarray) -> np.ndarray:
    # Long-term average speech spectrum, roughly: flat 100-500 Hz, then falling 6 dB per octave.
    return np.where(freqs < 100.0, 0.0, np.minimum(1.0, 500.0 / np.maximum(freqs, 1.0)))


def _syllable_band(freqs: np.ndarray) -> np.ndarray:
    return ((freqs >= 2.0) & (freqs <= 6.0)).astype(float)


def _syllabic_envelope(n: int, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A talker's loudness over time: peaks at the syllable rate (2-6 Hz), log-normal so that it
    has near-silent gaps and loud syllables like real speech."""
    slow = _shape_spectrum(rng.standard_normal(n), _syllable_band, sample_rate)
    slow /= slow.std() + 1e-12
    return np.exp(1.2 * slow)


def _unit_rms(samples: np.ndarray) -> np.ndarray:
    return samples / (np.sqrt(np.mean(samples**2)) + 1e-12)


def make_noise(n: int, kind: NoiseKind = "pink", seed: int = 0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`n` samples of unit-RMS float noise.

    "babble" is speech-like without being speech anyone could transcribe: several talkers, each
    speech-spectrum noise modulated at the syllable rate, summed.
    """
    if n <= 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    if kind == "white":
        return _unit_rms(rng.standard_normal(n))
    if kind == "pink":
        return _unit_rms(_shape_spectrum(rng.standard_normal(n), _pink_shape, sample_rate))
    if kind == "babble":
        total = np.zeros(n)
        for _ in range(_BABBLE_TALKERS):
            voice = _unit_rms(_shape_spectrum(rng.standard_normal(n), _speech_shape, sample_rate))
            total += voice * _syllabic_envelope(n, rng, sample_rate)
        return _unit_rms(total)
    raise ValueError(f"unknown noise kind {kind!r}; use one of {', '.join(NOISE_KINDS)}")


def add_noise(
    speech: np.ndarray,
    snr_db: float,
    kind: NoiseKind = "pink",
    seed: int = 0,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """`speech` plus noise at `snr_db`, both powers measured over the active speech only."""
    clean = _to_float(speech)
    mask = active_mask(speech, sample_rate)
    if not mask.any():
        raise ValueError("the speech has no active part to measure an SNR against")
    noise = make_noise(clean.size, kind, seed, sample_rate)
    speech_power = np.mean(clean[mask] ** 2)
    noise_power = np.mean(noise[mask] ** 2)
    gain = np.sqrt(speech_power / noise_power / 10 ** (snr_db / 10))
    return _to_int16(clean + gain * noise)


def noise_bed(
    seconds: float,
    kind: NoiseKind = "pink",
    level_dbfs: float = -40.0,
    seed: int = 0,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Noise on its own at an RMS of `level_dbfs`; loops seamlessly (see `_shape_spectrum`)."""
    noise = make_noise(round(seconds * sample_rate), kind, seed, sample_rate)
    return _to_int16(noise * FULL_SCALE * 10 ** (level_dbfs / 20))


# --------------------------------------------------------------------------------------------
# Telephone line
# --------------------------------------------------------------------------------------------

_MULAW_BIAS: Final = 0x84
_MULAW_CLIP: Final = 32635


def mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """G.711 mu-law: int16 -> uint8 codes (segment/mantissa form, as telephone networks use)."""
    x = np.asarray(pcm, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), _MULAW_CLIP) + _MULAW_BIAS
    # frexp gives the exact position of the top bit (log2 of integers can round the wrong way).
    _, top = np.frexp(magnitude.astype(np.float64))
    exponent = top.astype(np.int32) - 8  # magnitude >= 132 has its top bit at 7 or above
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def mulaw_decode(codes: np.ndarray) -> np.ndarray:
    """G.711 mu-law: uint8 codes -> int16 (the middle of each quantisation interval)."""
    u = ~np.asarray(codes, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def bandpass_fir(low_hz: float, high_hz: float, sample_rate: int = SAMPLE_RATE, taps: int = _FIR_TAPS) -> np.ndarray:
    """Linear-phase windowed-sinc band-pass (odd length, so it delays by a whole number of samples)."""
    n = np.arange(taps) - (taps - 1) / 2

    def lowpass(cutoff: float) -> np.ndarray:
        return 2 * cutoff / sample_rate * np.sinc(2 * cutoff / sample_rate * n)

    return (lowpass(high_hz) - lowpass(low_hz)) * np.blackman(taps)


def _filter_same(samples: np.ndarray, fir: np.ndarray) -> np.ndarray:
    """FFT convolution, trimmed so the output lines up with the input (the FIR's delay removed)."""
    size = samples.size + fir.size - 1
    full = np.fft.irfft(np.fft.rfft(samples, size) * np.fft.rfft(fir, size), size)
    start = (fir.size - 1) // 2
    return full[start : start + samples.size]


def telephone(speech: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """What a caller on a G.711 phone line sounds like once ACS hands it over at 16 kHz."""
    samples = _to_float(speech)
    if samples.size == 0:
        return np.zeros(0, dtype=np.int16)
    band = _filter_same(samples, bandpass_fir(*_PHONE_BAND, sample_rate))
    narrow = soxr.resample(band.astype(np.float32), sample_rate, _PHONE_RATE)
    line = mulaw_decode(mulaw_encode(_to_int16(narrow)))
    wide = soxr.resample(line.astype(np.float32), _PHONE_RATE, sample_rate).astype(np.float64)
    out = np.zeros(samples.size)
    out[: min(out.size, wide.size)] = wide[: out.size]
    return _to_int16(out)


# --------------------------------------------------------------------------------------------
# Echo
# --------------------------------------------------------------------------------------------


def add_echo(
    near: np.ndarray,
    far: np.ndarray,
    level_db: float = -20.0,
    delay_ms: float = 40.0,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """`near` plus the far end played from a speaker and picked up again: delayed by `delay_ms`
    and `level_db` relative to the far end (a speakerphone's echo return loss, negated)."""
    out = _to_float(near)
    echo = _to_float(far) * 10 ** (level_db / 20)
    delay = round(delay_ms * sample_rate / 1000)
    if delay < out.size:
        length = min(echo.size, out.size - delay)
        out[delay : delay + length] += echo[:length]
    return _to_int16(out)


# --------------------------------------------------------------------------------------------
# Cough and backchannels
# --------------------------------------------------------------------------------------------


def _cough_shape(centres: list[float]) -> Shape:
    """Broad resonances of an open vocal tract (a cough is turbulent air, shaped like a vowel)."""
    weights, widths = (1.0, 0.8, 0.4), (300.0, 600.0, 900.0)

    def shape(freqs: np.ndarray) -> np.ndarray:
        bumps = sum(
            w * np.exp(-0.5 * ((freqs - c) / bw) ** 2) for w, c, bw in zip(weights, centres, widths, strict=True)
        )
        return np.where(freqs < 80.0, 0.0, bumps + 0.05)

    return shape


def cough(
    duration_ms: int = 450, seed: int = 0, level_dbfs: float = -16.0, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """A synthetic cough: two bursts of shaped noise, each with a ~4 ms attack and a fast decay,
    the second weaker. `level_dbfs` is the RMS of the loudest 20 ms (coughs are louder than talk)."""
    rng = np.random.default_rng(seed)
    n = round(duration_ms * sample_rate / 1000)
    out = np.zeros(n)
    centres = [c * rng.uniform(0.85, 1.15) for c in (450.0, 1300.0, 2600.0)]
    second_at = rng.uniform(0.42, 0.55)
    for start_frac, amplitude, decay_s in ((0.02, 1.0, 0.060), (second_at, 0.55, 0.045)):
        start = int(start_frac * n)
        t = np.arange(n - start) / sample_rate
        envelope = (1 - np.exp(-t / 0.004)) * np.exp(-t / decay_s)
        burst = _unit_rms(_shape_spectrum(rng.standard_normal(t.size), _cough_shape(centres), sample_rate))
        out[start:] += amplitude * envelope * burst
    peak_frame_db = float(np.max(_frame_db(out * FULL_SCALE, sample_rate * _FRAME_MS // 1000)))
    return _to_int16(out * FULL_SCALE * 10 ** ((level_dbfs - peak_frame_db) / 20))


BACKCHANNELS: Final = ("uh-huh", "mm-hmm", "yeah", "okay", "right")
SHORT_ANSWERS: Final = ("yes", "no", "stop", "two", "wait")
"""Short real answers said over the agent: never to be taken for a backchannel."""

# How to spell each backchannel so the TTS voice says it as a listener would: espeak-ng's
# phonemiser (Piper uses it too) reads "mm" as the letters "em em"; "um-hum" gives /ʌmˈhʌm/, the
# usual spoken "mm-hmm". The full stop gives the falling pitch of an acknowledgement.
_TTS_SPELLING: Final = {
    "mm-hmm": "um-hum.",
    "uh-huh": "uh-huh.",
    "okay": "okay.",
    "yeah": "yeah.",
    "right": "right.",
    "yes": "yes.",
    "no": "no.",
    "stop": "stop.",
    "two": "two.",
    "wait": "wait.",
}


class BlockingSynthesizer(Protocol):
    def synthesize_blocking(self, text: str, sample_rate: int) -> bytes: ...


def default_voice() -> BlockingSynthesizer:
    """The Piper voice when it is installed (closer to a human caller), else espeak-ng."""
    try:
        from parley.voice.piper import PiperSynthesizer

        return PiperSynthesizer(ThreadPoolExecutor(1))
    except Exception:  # noqa: BLE001 - Piper or its voice missing or broken: espeak-ng still works
        from parley.voice.espeak import EspeakSynthesizer

        return EspeakSynthesizer(ThreadPoolExecutor(1), "en-us", 175)


def trim_silence(pcm: np.ndarray, margin_ms: int = 40, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`pcm` without leading and trailing inactive audio (keeping a short margin)."""
    mask = active_mask(pcm, sample_rate)
    if not mask.any():
        return pcm
    margin = margin_ms * sample_rate // 1000
    first, last = int(np.argmax(mask)), int(mask.size - np.argmax(mask[::-1]))
    return pcm[max(0, first - margin) : min(pcm.size, last + margin)]


def backchannel(
    word: str,
    synth: BlockingSynthesizer | None = None,
    level_dbfs: float | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """A listener's backchannel ("uh-huh", "mm-hmm", "yeah", "okay", "right") spoken by the TTS
    voice, trimmed of the voice's own leading and trailing silence, optionally set to a level."""
    voice = synth if synth is not None else default_voice()
    text = _TTS_SPELLING.get(word, word)
    pcm = np.frombuffer(voice.synthesize_blocking(text, sample_rate), dtype="<i2").astype(np.int16)
    if pcm.size == 0:
        raise ValueError(f"the voice produced no audio for {word!r}")
    pcm = trim_silence(pcm, sample_rate=sample_rate)
    return pcm if level_dbfs is None else scale_to_dbfs(pcm, level_dbfs, sample_rate)
