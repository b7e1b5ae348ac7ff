"""TwilioWire (Twilio's stream as the handler's wire) and its 8 <-> 16 kHz resampling."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from parley.transports import acs
from parley.transports import twilio as tw
from parley.transports.twilio_resample import Downsampler, Upsampler
from parley.transports.twilio_wire import FORMAT, NOT_STARTED, TwilioWire
from parley.transports.wire import MarksPlayout, MediaWire, Played, StreamEnded, StreamStarted


def _tone(hz: float, rate: int, seconds: float, amplitude: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def _level_db(samples: np.ndarray, reference: float = 10000.0) -> float:
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    return 20 * np.log10(max(rms, 1e-9) / (reference / np.sqrt(2)))


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def _chunked(resampler: Upsampler | Downsampler, samples: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([resampler.process(samples[i : i + size]) for i in range(0, len(samples), size)])


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def test_a_1khz_tone_keeps_its_frequency_and_level_up_then_down() -> None:
    tone8 = _tone(1000, 8000, 1.0)
    up = _chunked(Upsampler(), tone8, 160)
    assert len(up) == 16000  # exactly twice, chunk by chunk: no burst, no lag in chunks
    assert _peak_hz(up[800:], 16000) == pytest.approx(1000, abs=5)
    assert _level_db(up[800:]) == pytest.approx(0.0, abs=0.2)
    down = _chunked(Downsampler(), up, 320)
    assert len(down) == 8000
    assert _peak_hz(down[400:], 8000) == pytest.approx(1000, abs=5)
    assert _level_db(down[400:]) == pytest.approx(0.0, abs=0.3)


def test_downsampling_rejects_what_8khz_cannot_carry() -> None:
    # A 6 kHz tone at 16 kHz would fold down to 2 kHz without the low-pass: it must be gone.
    down = _chunked(Downsampler(), _tone(6000, 16000, 0.5), 320)
    assert _level_db(down[200:]) < -50
    # The phone band is kept flat.
    assert _level_db(_chunked(Downsampler(), _tone(3300, 16000, 0.5), 320)[200:]) == pytest.approx(0, abs=0.5)


def test_chunking_does_not_change_the_output() -> None:
    audio = np.random.default_rng(3).integers(-20000, 20000, 4801).astype(np.int16)
    whole = Downsampler().process(audio)
    assert np.array_equal(_chunked(Downsampler(), audio, 37), whole)  # odd chunks: the phase carries
    assert np.array_equal(_chunked(Upsampler(), audio, 53), Upsampler().process(audio))


# --------------------------------------------------------------------------------------------
# The wire
# --------------------------------------------------------------------------------------------


def _started(**params: str) -> TwilioWire:
    wire = TwilioWire()
    started = wire.parse(tw.start_message("MZ1", "CA1", custom_parameters=params), None)
    assert started == StreamStarted(format=acs.AudioFormat.for_rate(16000), call_id="CA1", parameters=params)
    return wire


def test_is_a_media_wire_that_marks_playout() -> None:
    wire: MediaWire = TwilioWire()
    assert isinstance(wire, MarksPlayout)
    assert wire.name == "twilio"


def test_start_gives_the_call_and_its_parameters() -> None:
    wire = _started(agent="echo", to="+15550001", **{"from": "+15550002"})
    assert wire.stream_sid == "MZ1" and wire.call_sid == "CA1"


def test_media_becomes_exact_20ms_frames_at_16khz() -> None:
    wire = _started()
    tone8 = _tone(1000, 8000, 0.4)
    frames = []
    for i in range(0, len(tone8), 160):
        frame = wire.parse(
            tw.inbound_media_message("MZ1", tw.mulaw_encode(tone8[i : i + 160]), i // 160, i // 8), FORMAT
        )
        assert isinstance(frame, acs.AudioFrame) and len(frame.pcm) == FORMAT.frame_bytes and not frame.silent
        frames.append(np.frombuffer(frame.pcm, dtype="<i2"))
    pcm = np.concatenate(frames)
    assert _peak_hz(pcm[1600:], 16000) == pytest.approx(1000, abs=10)
    assert _level_db(pcm[1600:]) == pytest.approx(0.0, abs=0.5)  # mu-law costs a little


def test_short_chunks_are_held_until_a_frame_is_whole() -> None:
    wire = _started()
    first = wire.parse(tw.inbound_media_message("MZ1", bytes([0xFF] * 100), 1, 0), FORMAT)
    assert isinstance(first, acs.UnknownMessage)  # 12.5 ms: nothing for the handler yet
    second = wire.parse(tw.inbound_media_message("MZ1", bytes([0xFF] * 100), 2, 12), FORMAT)
    assert isinstance(second, acs.AudioFrame) and len(second.pcm) == 640
    third = wire.parse(tw.inbound_media_message("MZ1", bytes([0xFF] * 120), 3, 25), FORMAT)
    assert isinstance(third, acs.AudioFrame)  # 80 held + 240 new samples: the next frame


def test_outbound_audio_is_one_160_byte_mulaw_media_message_per_frame() -> None:
    wire = _started()
    tone16 = _tone(1000, 16000, 0.4)
    payloads = []
    for i in range(0, len(tone16), 320):
        message = tw.parse_outbound(wire.audio(tone16[i : i + 320].astype("<i2").tobytes()))
        assert isinstance(message, tw.OutboundMedia) and message.stream_sid == "MZ1"
        assert len(message.payload) == 160
        payloads.append(message.payload)
    pcm8 = tw.mulaw_decode(b"".join(payloads))
    assert _peak_hz(pcm8[800:], 8000) == pytest.approx(1000, abs=10)
    assert _level_db(pcm8[800:]) == pytest.approx(0.0, abs=0.5)


def test_stop_is_clear_and_mark_is_mark() -> None:
    wire = _started()
    assert tw.parse_outbound(wire.stop()) == tw.OutboundClear("MZ1")
    assert tw.parse_outbound(wire.mark("3:0:10")) == tw.OutboundMark("MZ1", "3:0:10")


def test_marks_dtmf_and_stop_come_in_as_the_handler_values() -> None:
    wire = _started()
    assert wire.parse(tw.mark_echo_message("MZ1", "3:0:10"), FORMAT) == Played("3:0:10")
    assert wire.parse(tw.dtmf_message("MZ1", "5"), FORMAT) == acs.Dtmf("5")
    assert wire.parse(tw.stop_message("MZ1", "CA1"), FORMAT) == StreamEnded("stop")
    assert wire.parse(tw.connected_message(), FORMAT) == acs.UnknownMessage("connected")
    assert wire.parse('{"event":"new","streamSid":"MZ1"}', FORMAT) == acs.UnknownMessage("new")


def test_the_outbound_track_is_not_the_caller() -> None:
    wire = _started()
    message = json.loads(tw.inbound_media_message("MZ1", bytes(160), 1, 0))
    message["media"]["track"] = "outbound"
    assert isinstance(wire.parse(json.dumps(message), FORMAT), acs.UnknownMessage)


def test_outbound_before_start_is_dropped_with_a_log(caplog: pytest.LogCaptureFixture) -> None:
    wire = TwilioWire()
    with caplog.at_level(logging.WARNING, logger="parley.transports.twilio_wire"):
        assert wire.audio(bytes(640)) == NOT_STARTED
        assert wire.stop() == NOT_STARTED
        assert wire.mark("x") == NOT_STARTED
    assert "before the stream's start message" in caplog.text
    assert len(caplog.records) == 1  # logged once, not per frame


@pytest.mark.parametrize(
    ("setup", "message", "words"),
    [
        (False, tw.inbound_media_message("MZ1", bytes(160), 1, 0), "media before the start message"),
        (True, tw.inbound_media_message("MZ9", bytes(160), 1, 0), "media for stream 'MZ9'"),
        (True, tw.inbound_media_message("MZ1", bytes(320), 1, 0), "at most one 20 ms chunk"),
        (True, tw.start_message("MZ2", "CA2"), "a second start"),
        (True, "{", "not valid JSON"),
    ],
)
def test_bad_streams_raise_protocol_errors(setup: bool, message: str, words: str) -> None:
    wire = _started() if setup else TwilioWire()
    with pytest.raises(acs.AcsProtocolError, match=words):
        wire.parse(message, FORMAT)
