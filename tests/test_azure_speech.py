"""Azure AI Speech plugins, offline: the REAL Speech SDK against a local fake speech service.

The SDK (native client included) connects to `parley.testing.fake_speech` on loopback, so what
runs here is the production path down to the WebSocket: connection, speech.context, audio frames,
results with offsets, errors. Only the service's own behaviour (its recognition, its timing, its
exact error answers) is scripted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np
import pytest

pytest.importorskip("azure.cognitiveservices.speech")

from parley.engines import per_call_recognizer_pool, vad_pool
from parley.media.bridge import Final, ThreadBridge
from parley.media.recognition import RecognitionThread, SegmenterConfig
from parley.settings import SettingsError, load_settings
from parley.speech.azure import AzureRecognizer, AzureSpeechError, AzureSpeechOptions
from parley.speech.vad import SileroVad
from parley.testing.fake_speech import FakeSpeechService
from parley.voice.azure import AzureSynthesizer, AzureVoice
from tests.conftest import HOURS_PHRASE, ORDER_PHRASE, make_server
from tests.test_media_units import RecordingSink

RATE = 16000
HOURS_TEXT = "What are your opening hours?"
ORDER_TEXT = "I want to order a pizza."


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSpeechService]:
    service = FakeSpeechService().start()
    yield service
    service.stop()


@pytest.fixture(autouse=True)
def fresh_fake(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        service: FakeSpeechService = request.getfixturevalue("fake")
        service.reset()
        service.segmentation_ms = 500
        service.tts_ms_per_char = 40
        service.tts_chunk_delay_s = 0.005


def options_for(fake: FakeSpeechService, **extra: object) -> AzureSpeechOptions:
    return AzureSpeechOptions(key="test-key", endpoint=fake.url, **extra)  # type: ignore[arg-type]


def tone(seconds: float, hz: float = 300.0, rate: int = RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def silence(seconds: float, rate: int = RATE) -> bytes:
    return bytes(2 * int(seconds * rate))


def feed_paced(recognizer: AzureRecognizer, pcm: bytes, speed: float = 4.0) -> list[str]:
    """Feed 20 ms frames a few times faster than real time; return the partials."""
    partials = []
    for start in range(0, len(pcm), 640):
        partial = recognizer.feed(pcm[start : start + 640])
        if partial:
            partials.append(partial)
        time.sleep(0.02 / speed)
    return partials


def final_of(result: str | Future[str], timeout: float = 5.0) -> str:
    return result.result(timeout) if isinstance(result, Future) else result


def wait_until(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- recognition through parley's real recognition thread -------------------------------------------


async def recognize_call(pcm: np.ndarray, recognizer_options: AzureSpeechOptions, finals: int) -> RecordingSink:
    """Real-time frames through RecognitionThread (Silero VAD + AzureRecognizer) until `finals`."""
    sink = RecordingSink()
    config = SegmenterConfig()
    thread = RecognitionThread(
        call_id="azure-test",
        input_rate=RATE,
        vads=vad_pool(SileroVad, 1),
        recognizers=per_call_recognizer_pool(
            lambda: AzureRecognizer(recognizer_options, trailing_silence_ms=config.endpoint_silence_ms)
        ),
        bridge=ThreadBridge(asyncio.get_running_loop(), sink),
        config=config,
    )
    thread.start()
    data = pcm.astype("<i2").tobytes()
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(data), 640)):
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        thread.submit(data[offset : offset + 640].ljust(640, b"\0"), time.monotonic())
    deadline = time.monotonic() + 5
    while sum(kind == "final" for kind, _, _ in sink.seen) < finals and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    thread.stop()
    thread.join(5)
    return sink


async def test_partials_and_finals_of_two_utterances_reach_the_loop(fake: FakeSpeechService, voice) -> None:  # type: ignore[no-untyped-def]
    hours = np.frombuffer(voice.synthesize_blocking(HOURS_PHRASE, RATE), dtype=np.int16)
    order = np.frombuffer(voice.synthesize_blocking(ORDER_PHRASE, RATE), dtype=np.int16)
    gap = np.zeros(RATE, dtype=np.int16)
    fake.texts.extend([HOURS_TEXT, ORDER_TEXT])
    sink = await recognize_call(np.concatenate([gap[:8000], hours, gap, order, gap]), options_for(fake), 2)

    finals = [event for kind, event, _ in sink.seen if kind == "final"]
    assert [(f.utterance_id, f.text) for f in finals] == [(1, HOURS_TEXT), (2, ORDER_TEXT)]  # type: ignore[attr-defined]
    partials = [event for kind, event, _ in sink.seen if kind == "partial"]
    assert {p.utterance_id for p in partials} == {1, 2}  # type: ignore[attr-defined]
    assert any(p.text.startswith("what are") for p in partials)  # type: ignore[attr-defined]
    loop_thread = threading.current_thread().name
    assert {name for kind, _, name in sink.seen} == {loop_thread}
    # Each final comes soon after its utterance ended, not after the 3 s fallback timeout.
    for final in finals:
        assert isinstance(final, Final) and final.t - final.endpoint_t < 1.0
    # One continuous recognition for the whole call, as the SDK opened it.
    (connection,) = fake.of_kind("stt")
    assert connection.headers["ocp-apim-subscription-key"] == "test-key"
    assert connection.contexts[0]["phraseDetection"]["language"] == "en-US"
    assert connection.phrases_sent == [HOURS_TEXT, ORDER_TEXT]


def test_phrases_of_one_utterance_are_joined_and_mapped_by_offset(fake: FakeSpeechService) -> None:
    """Azure may cut one VAD utterance into several phrases; a late phrase belongs to its utterance."""
    fake.texts.extend(["Hello.", "Two words.", "Next one."])
    recognizer = AzureRecognizer(
        options_for(fake, segmentation_silence_ms=200), trailing_silence_ms=500, final_timeout_s=3.0
    )
    try:
        recognizer.begin()
        feed_paced(recognizer, tone(0.4) + silence(0.3) + tone(0.4) + silence(0.5))
        first = recognizer.end()
        recognizer.begin()  # the next utterance starts before the first one's final arrived
        feed_paced(recognizer, tone(0.3) + silence(0.5))
        second = recognizer.end()
        assert final_of(first) == "Hello. Two words."
        assert final_of(second) == "Next one."
    finally:
        recognizer.close()
    context = fake.of_kind("stt")[0].contexts[0]
    assert context["phraseDetection"]["CONVERSATION"]["segmentation"]["segmentationSilenceTimeoutMs"] == 200


def test_no_match_and_no_answer_give_empty_finals(fake: FakeSpeechService) -> None:
    fake.texts.append("")  # the service hears something but recognises nothing: NoMatch
    recognizer = AzureRecognizer(options_for(fake), trailing_silence_ms=500, final_timeout_s=0.6)
    try:
        recognizer.begin()
        feed_paced(recognizer, tone(0.3) + silence(0.5))
        started = time.monotonic()
        assert final_of(recognizer.end()) == ""
        assert time.monotonic() - started < 0.5  # resolved by the NoMatch, not by the timeout
        fake.segmentation_ms = 60_000  # now the service never closes a phrase
        recognizer.begin()
        feed_paced(recognizer, tone(0.3) + silence(0.5))
        started = time.monotonic()
        assert final_of(recognizer.end()) == ""
        assert 0.5 < time.monotonic() - started < 1.5  # the fallback timeout
    finally:
        recognizer.close()


def test_language_identification_and_phrase_list_reach_the_service(fake: FakeSpeechService) -> None:
    options = options_for(fake, languages=("de-DE", "en-US"), phrases=("Contoso", "pepperoni"))
    recognizer = AzureRecognizer(options, trailing_silence_ms=500)
    try:
        fake.texts.append("Guten Tag.")
        recognizer.begin()
        feed_paced(recognizer, tone(0.3) + silence(0.5))
        assert final_of(recognizer.end()) == "Guten Tag."
    finally:
        recognizer.close()
    (connection,) = fake.of_kind("stt")
    assert connection.path == "/stt/speech/universal/v2"
    context = connection.contexts[0]
    assert context["languageId"]["languages"] == ["de-DE", "en-US"]
    assert context["languageId"]["mode"] == "DetectContinuous"
    assert [item["Text"] for item in context["dgi"]["Groups"][0]["Items"]] == ["Contoso", "pepperoni"]


# --- recognition errors: typed, logged, the call goes on, the recognizer comes back with backoff ------


def utterance(recognizer: AzureRecognizer) -> str:
    recognizer.begin()
    feed_paced(recognizer, tone(0.3) + silence(0.5), speed=8.0)
    return final_of(recognizer.end())


def azure_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "recognition failed: Azure Speech" in r.getMessage()]


@pytest.mark.parametrize(
    ("statuses", "code"),
    [([401], "AuthenticationFailure"), ([429] * 5, "TooManyRequests")],  # the SDK retries a 429 itself 4 times
)
def test_a_refused_connection_is_logged_and_the_recognizer_is_recreated(
    fake: FakeSpeechService, caplog: pytest.LogCaptureFixture, statuses: list[int], code: str
) -> None:
    fake.reject.extend(statuses)
    recognizer = AzureRecognizer(options_for(fake), trailing_silence_ms=500, backoff_first_s=0.2)
    caplog.set_level(logging.INFO, logger="parley.speech.azure")
    try:
        assert utterance(recognizer) == ""  # the failing session: no words, no exception
        assert wait_until(lambda: azure_errors(caplog), 3)
        assert f"({code})" in azure_errors(caplog)[0]
        fake.texts.append("Back again.")
        time.sleep(0.25)  # past the first backoff step
        assert utterance(recognizer) == "Back again."
        assert recognizer.sessions_created == 2
    finally:
        recognizer.close()
    assert [c.status for c in fake.of_kind("stt")] == [*statuses, 101]


def test_backoff_doubles_while_the_service_keeps_refusing(
    fake: FakeSpeechService, caplog: pytest.LogCaptureFixture
) -> None:
    fake.reject.extend([401, 401, 401])
    recognizer = AzureRecognizer(options_for(fake), trailing_silence_ms=500, backoff_first_s=0.15)
    try:
        deadline = time.monotonic() + 4
        while len(fake.of_kind("stt")) < 4 and time.monotonic() < deadline:
            recognizer.begin()  # one short utterance every 20 ms
            recognizer.feed(silence(0.02))
            recognizer.end()
            time.sleep(0.02)
    finally:
        recognizer.close()
    opened = [c.opened_t for c in fake.of_kind("stt")]
    gaps = np.diff(opened)
    assert len(opened) == 4, opened
    assert 0.15 <= gaps[0] < gaps[1] < gaps[2] and gaps[2] >= 0.6  # 0.15, 0.3, 0.6 s (+ the failures)


def test_nothing_listening_is_a_connection_failure_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = AzureSpeechOptions(key="k", endpoint=f"ws://127.0.0.1:{port}")
    recognizer = AzureRecognizer(options, trailing_silence_ms=500, final_timeout_s=0.5)
    caplog.set_level(logging.INFO, logger="parley.speech.azure")
    try:
        assert utterance(recognizer) == ""
        assert wait_until(lambda: azure_errors(caplog), 4)
        assert "(ConnectionFailure)" in azure_errors(caplog)[0]
        assert utterance(recognizer) == ""  # within the backoff: no new recognizer, no error
        assert recognizer.sessions_created == 1
    finally:
        recognizer.close()


# --- synthesis -------------------------------------------------------------------------------------------


def dominant_hz(pcm: bytes, rate: int) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / samples.size)


async def collect(synthesizer: AzureSynthesizer, text: str, rate: int) -> list[bytes]:
    return [chunk async for chunk in synthesizer.stream(text, rate)]


@pytest.mark.parametrize(
    ("rate", "native"),
    [(16000, "raw-16khz-16bit-mono-pcm"), (24000, "raw-24khz-16bit-mono-pcm"), (8000, "raw-24khz-16bit-mono-pcm")],
)
async def test_synthesis_streams_pcm_at_the_call_rate(fake: FakeSpeechService, rate: int, native: str) -> None:
    synthesizer = AzureSynthesizer(options_for(fake), "en-US-JennyNeural")
    text = "Hello & welcome to <parley>."
    chunks = await collect(synthesizer, text, rate)
    pcm = b"".join(chunks)
    assert len(chunks) > 3
    expected_s = fake.tts_ms_per_char * len(text) / 1000
    assert abs(len(pcm) / 2 / rate - expected_s) < 0.15
    assert abs(dominant_hz(pcm, rate) - 440) < 5  # the fake's tone, at the rate we asked for
    (connection,) = fake.of_kind("tts")
    assert connection.contexts[0]["synthesis"]["audio"]["outputFormat"] == native
    assert '<voice name="en-US-JennyNeural">Hello &amp; welcome to &lt;parley&gt;.</voice>' in connection.ssml[0]


async def test_voices_styles_and_rates_become_ssml(fake: FakeSpeechService) -> None:
    synthesizer = AzureSynthesizer(options_for(fake))
    cheerful = synthesizer.with_voice("de-DE-KatjaNeural;style=cheerful;degree=1.5;rate=1.1")
    assert synthesizer.with_voice(None) is synthesizer and cheerful.pool is synthesizer.pool
    await collect(cheerful, "Hallo", 16000)
    ssml = fake.of_kind("tts")[0].ssml[0]
    assert 'xml:lang="de-DE"' in ssml and '<voice name="de-DE-KatjaNeural">' in ssml
    assert '<mstts:express-as style="cheerful" styledegree="1.5"><prosody rate="+10%">Hallo' in ssml
    assert AzureVoice.parse("en-US-Ava:DragonHDLatestNeural").name == "en-US-Ava:DragonHDLatestNeural"
    for bad in ("en-gb", "/voices/joe.onnx", "en-US-JennyNeural;pitch=2", "en-US-JennyNeural;rate=9"):
        with pytest.raises(ValueError):
            AzureVoice.parse(bad)


async def test_cancelling_stops_the_synthesis_and_a_fresh_synthesizer_follows(fake: FakeSpeechService) -> None:
    fake.tts_chunk_delay_s = 0.05  # ~2x real time: the reply is still being synthesized when cut
    synthesizer = AzureSynthesizer(options_for(fake))
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in synthesizer.stream("A long answer that the caller will interrupt. " * 3, 16000):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 5)
    cancelled_at = time.monotonic()
    task.cancel()
    await asyncio.wait([task])
    assert time.monotonic() - cancelled_at < 0.5  # the SDK confirmed the stop promptly
    connection = fake.of_kind("tts")[0]
    assert wait_until(lambda: connection.closed_t is not None, 2)  # the SDK drops the socket on stop
    assert connection.synthesis_finished == [False]
    fake.tts_chunk_delay_s = 0.0
    assert b"".join(await collect(synthesizer, "Again.", 16000))
    # A stopped synthesizer is not reused (a late event of the stopped synthesis could end the
    # next one early); one that completed goes back to the pool and serves the next clause.
    assert synthesizer.pool.created == 2
    assert b"".join(await collect(synthesizer, "And again.", 16000))
    assert synthesizer.pool.created == 2


async def test_a_synthesis_error_is_raised_from_the_stream(fake: FakeSpeechService) -> None:
    fake.reject.append(401)
    synthesizer = AzureSynthesizer(options_for(fake))
    with pytest.raises(AzureSpeechError) as error:
        await collect(synthesizer, "Hello.", 16000)
    assert error.value.code == "AuthenticationFailure"
    assert b"".join(await collect(synthesizer, "Hello.", 16000))  # a fresh synthesizer works


# --- settings and a whole call -----------------------------------------------------------------------


def test_azure_without_credentials_is_refused_at_startup() -> None:
    with pytest.raises(SettingsError, match="PARLEY_AZURE_SPEECH_KEY"):
        load_settings(stt="azure")
    with pytest.raises(SettingsError, match="custom domain"):
        load_settings(tts="azure", azure_speech_auth="entra", azure_speech_key="k", azure_speech_region="r")
    with pytest.raises(SettingsError, match="wss://"):
        load_settings(stt="azure", azure_speech_endpoint="myresource.cognitiveservices.azure.com")
    assert load_settings(stt="azure", azure_speech_key="k", azure_speech_region="westeurope").stt == "azure"


class StaticCredential:
    """An azure-core TokenCredential (as azure-identity's credentials are), counting its tokens."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: object) -> object:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(f"entra-token-{len(self.scopes)}", int(time.time()) + 3600)


async def test_entra_id_tokens_are_asked_from_the_credential(fake: FakeSpeechService) -> None:
    credential = StaticCredential()
    options = AzureSpeechOptions(endpoint=fake.url, credential=credential)
    recognizer = AzureRecognizer(options)
    recognizer.begin()
    recognizer.feed(silence(0.1))
    recognizer.end()
    assert await asyncio.to_thread(wait_until, lambda: fake.of_kind("stt"), 3)
    recognizer.close()
    assert b"".join(await collect(AzureSynthesizer(options), "Hello.", 16000))
    assert [c.headers["authorization"] for c in fake.connections] == ["Bearer entra-token-1", "Bearer entra-token-2"]
    assert credential.scopes == [("https://cognitiveservices.azure.com/.default",)] * 2
    with pytest.raises(ValueError, match="custom-domain"):
        AzureSpeechOptions(region="westeurope", credential=credential)


def test_engines_build_azure_recognizers_per_call_and_azure_voices(fake: FakeSpeechService) -> None:
    from parley.engines import build_engines
    from parley.voice.guarded import GuardedSynthesizer
    from parley.voice.piper import PiperSynthesizer

    engines = build_engines(
        load_settings(
            stt="azure",
            tts="azure",
            azure_speech_endpoint=fake.url,
            azure_speech_key="k",
            engine_pool_warm=0,
        )
    )
    try:
        assert engines.final_pass is None
        recognizer = engines.recognizers.acquire()
        assert isinstance(recognizer, AzureRecognizer)
        engines.recognizers.release(recognizer)
        assert engines.recognizers.idle == 0  # never reused by another call
        voice = engines.synthesizer_for(None)
        assert isinstance(voice, GuardedSynthesizer)  # watched, with the embedded voice behind it
        assert isinstance(voice.primary, AzureSynthesizer) and voice.primary.voice == "en-US-JennyNeural"
        assert isinstance(voice.fallback, PiperSynthesizer)
        assert engines.synthesizer_for("en-gb") is voice  # not an Azure voice: the default, logged
        other = engines.synthesizer_for("en-GB-RyanNeural;rate=0.9")
        assert isinstance(other, GuardedSynthesizer) and isinstance(other.primary, AzureSynthesizer)
        assert other is not voice and other.fallback is voice.fallback
    finally:
        engines.close()


async def test_a_call_with_azure_recognition_and_synthesis_and_a_barge_in(fake: FakeSpeechService, speech_dir) -> None:  # type: ignore[no-untyped-def]
    """The real server with stt=azure and tts=azure: the caller talks over the greeting, Azure's
    words confirm the barge-in, the greeting's synthesis is stopped and the question answered."""
    from parley.caller import CallOptions, run_call

    fake.tts_ms_per_char = 30
    fake.tts_chunk_delay_s = 0.1  # real time: the greeting is still being synthesized when cut
    fake.texts.append(HOURS_TEXT)
    greeting = "Hi, thanks for calling the pizza place, where every pizza is baked fresh. How can I help?"
    server = make_server(
        stt="azure",
        tts="azure",
        azure_speech_endpoint=fake.url,
        azure_speech_key="test-key",
        greeting=greeting,
    )
    try:
        report = await run_call(CallOptions(url=server.url, audio=speech_dir / "hours_16000.wav", barge_in_at=1.0))
    finally:
        server.stop()
    assert report.errors == []
    assert report.stop_audio_count == 1 and report.leaked_audio_ms == 0
    events = {e["event"] for e in report.events}
    assert {"barge_in_paused", "barge_in_decided", "partial"} <= events
    assert [e["text"] for e in report.events if e["event"] == "final"] == [HOURS_TEXT]
    replies = [e.get("text", "") for e in report.events if e["event"] == "turn_completed"]
    assert any("eleven in the morning" in text for text in replies), replies
    synthesized = [
        (ssml, done) for c in fake.of_kind("tts") for ssml, done in zip(c.ssml, c.synthesis_finished, strict=False)
    ]
    spoken = [(re.sub("<[^>]+>", "", ssml), done) for ssml, done in synthesized]
    assert any(text in greeting and not done for text, done in spoken), spoken  # a clause stopped mid-way
    assert any("eleven in the morning" in text and done for text, done in spoken)
    assert len(fake.of_kind("stt")) == 1
