"""The engines a server runs with, built once at startup from Settings.

Building them here (not per call) surfaces configuration mistakes at startup (a missing agent
file, an unknown voice) and shares what can be shared (the synthesis executor, the agent script).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from parley import native_memory
from parley.media.recognition import FinalPass
from parley.pool import EnginePool, PoolReaper
from parley.protocols import AgentFactory, CallControl, MultiVoiceSynthesizer, Recognizer, Synthesizer, Vad
from parley.settings import Settings
from parley.voice.guarded import GuardedSynthesizer, SynthesisLimits

if TYPE_CHECKING:
    from parley.speech.azure import AzureSpeechOptions
    from parley.speech.turn import TurnDetector

log = logging.getLogger(__name__)


@dataclass
class Engines:
    vads: EnginePool[Vad]
    recognizers: EnginePool[Recognizer]
    synthesizer_for: Callable[[str | None], Synthesizer]  # voice name (None = default) -> synthesizer
    agent_factory: AgentFactory
    final_pass: FinalPass | None = None  # the accurate second pass (None: the recognizer's finals)
    call_control: CallControl | None = None  # hang up / transfer real calls (ACS Call Automation)
    executors: list[Executor] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)  # e.g. cloud synthesizer pools
    warm_count: int = 2
    warm_agents: Callable[[], None] | None = None  # e.g. rehearse the LLM agents' first request
    reaper: PoolReaper | None = None  # shrinks the pools after bursts; started by `warm`
    # Every agent a call may ask for by name (`?agent=`, the called number); `agent_factory` is the default.
    agent_factories: dict[str, AgentFactory] = field(default_factory=dict)
    turn_detector: TurnDetector | None = None  # semantic end of turn (None: the silence rule)

    def factory_for(self, agent: str | None) -> AgentFactory:
        """The named agent's factory (None or '': the default). KeyError for an agent not loaded."""
        return self.agent_factories[agent] if agent else self.agent_factory

    def has_agent(self, agent: str) -> bool:
        return agent in self.agent_factories

    def warm(self) -> None:
        """Pre-load per-call engines so the first calls do not pay for model loads."""
        if self.warm_agents is not None:
            self.warm_agents()
        self.vads.warm(self.warm_count)
        self.recognizers.warm(self.warm_count)
        if self.final_pass is not None:
            # CTranslate2 allocates its buffers on the first pass: ~100 ms the first caller would pay.
            self.final_pass.transcriber.transcribe(bytes(2 * 16000))
        if self.turn_detector is not None:
            self.turn_detector.warm()
        if self.reaper is None:
            self.reaper = PoolReaper([self.vads, self.recognizers])
            self.reaper.start()

    def close(self) -> None:
        if self.reaper is not None:
            self.reaper.stop()
        self.vads.close()
        self.recognizers.close()
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)
        for close in self.closers:
            close()
        if self.turn_detector is not None:
            self.turn_detector.close()


def vad_pool(create: Callable[[], Vad], max_idle: int, warm: int = 0, idle_s: float = 60.0) -> EnginePool[Vad]:
    return EnginePool("vad", create, recycle=lambda vad: vad.reset(), max_idle=max_idle, warm=warm, idle_s=idle_s)


def recognizer_pool(
    create: Callable[[], Recognizer], max_idle: int, warm: int = 0, idle_s: float = 60.0
) -> EnginePool[Recognizer]:
    return EnginePool(
        "recognizer",
        create,
        recycle=_close_open_utterance,
        dispose=lambda rec: rec.close(),
        max_idle=max_idle,
        warm=warm,
        idle_s=idle_s,
    )


def _pool_sizes(settings: Settings) -> dict[str, Any]:
    """The pools' bounds from Settings: at most `engine_pool_idle` idle, shrinking back to
    `engine_pool_warm` after `engine_pool_idle_s` without use."""
    return {
        "max_idle": settings.engine_pool_idle,
        "warm": settings.engine_pool_warm,
        "idle_s": settings.engine_pool_idle_s,
    }


def _close_open_utterance(recognizer: Recognizer) -> None:
    recognizer.end()


def per_call_recognizer_pool(create: Callable[[], Recognizer]) -> EnginePool[Recognizer]:
    """Recognizers never reused across calls (a cloud session belongs to one call): each is
    created when its call starts and closed when it ends."""
    return EnginePool("recognizer", create, dispose=lambda rec: rec.close(), max_idle=0)


def embedded_engines(settings: Settings) -> Engines:
    """The offline default: Silero VAD, pocketsphinx partials + Whisper finals, Piper (or
    espeak-ng) and the agents of a YAML scenario (scripted offline, LLM when configured)."""
    from parley.agents.scenario import Scenario, load_scenario, resolve_agent_path
    from parley.speech.vad import SileroVad

    llm_config = settings.llm_config()
    scenarios = {name: Scenario(load_scenario(resolve_agent_path(name)), llm_config) for name in settings.agent_names}
    scenario = scenarios[settings.agent]
    synth_executor = ThreadPoolExecutor(settings.synth_workers, thread_name_prefix="synth")
    executors: list[Executor] = [synth_executor]
    final_pass = None
    if settings.stt in ("two-pass", "whisper"):
        # oneDNN (CTranslate2's CPU backend here) caches a compiled primitive per input shape, up
        # to 1024 of them: every new utterance length kept ~0.5 MB for good, RSS creeping call
        # after call. A few cover the repeated shapes; the others cost ~nothing to recompile.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
        from parley.speech.whisper import WhisperTranscriber

        transcriber = WhisperTranscriber(
            settings.stt_model,
            language=settings.stt_language,
            cpu_threads=settings.stt_threads,
            workers=settings.stt_workers,
            trim_context=settings.stt_trim_context,
        )
        stt_executor = ThreadPoolExecutor(settings.stt_workers, thread_name_prefix="stt-final")
        executors.append(stt_executor)
        final_pass = FinalPass(transcriber, stt_executor)
    closers: list[Callable[[], None]] = []
    synthesizer_for = _voices(settings, synth_executor, closers)
    for voice in sorted(set().union(*(each.voices for each in scenarios.values()))):
        synthesizer_for(voice)  # loaded now: loading one mid-call would stall the loop
    return Engines(
        vads=vad_pool(SileroVad, **_pool_sizes(settings)),
        recognizers=_recognizers(settings),
        synthesizer_for=synthesizer_for,
        agent_factory=scenario.agent,
        final_pass=final_pass,
        executors=executors,
        closers=closers,
        warm_count=settings.engine_pool_warm,
        warm_agents=functools.partial(_warm_scenarios, list(scenarios.values())),
        agent_factories={name: each.agent for name, each in scenarios.items()},
    )


def _warm_scenarios(scenarios: list[Any]) -> None:
    for scenario in scenarios:
        scenario.warm()


def _recognizers(settings: Settings) -> EnginePool[Recognizer]:
    if settings.stt == "azure":
        options = azure_speech_options(settings)
        from parley.speech.azure import AzureRecognizer

        # The segmenter's closing silence tells the recognizer where each utterance's speech ended.
        return per_call_recognizer_pool(
            lambda: AzureRecognizer(options, trailing_silence_ms=settings.endpoint_silence_ms)
        )
    return recognizer_pool(_streaming_recognizer(settings), **_pool_sizes(settings))


def azure_speech_options(settings: Settings) -> AzureSpeechOptions:
    """Settings -> the Speech SDK connection options (the SDK is imported only when Azure is used)."""
    try:
        from parley.speech.azure import AzureSpeechOptions
    except ImportError as exc:
        raise ValueError(
            "stt/tts=azure needs the Speech SDK: pip install 'parley[azure]' (azure-cognitiveservices-speech)"
        ) from exc

    credential = None
    if settings.azure_speech_auth == "entra":
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as exc:
            raise ValueError(
                "azure_speech_auth=entra needs the azure-identity package (pip install azure-identity)"
            ) from exc
        credential = DefaultAzureCredential()
    key = settings.azure_speech_key
    return AzureSpeechOptions(
        key=key.get_secret_value() if key is not None else None,
        region=settings.azure_speech_region,
        endpoint=settings.azure_speech_endpoint,
        credential=credential,
        language=settings.azure_speech_language,
        languages=tuple(settings.azure_speech_languages),
        phrases=tuple(settings.azure_speech_phrases),
        segmentation_silence_ms=settings.azure_speech_segmentation_silence_ms,
    )


def _streaming_recognizer(settings: Settings) -> Callable[[], Recognizer]:
    if settings.stt == "whisper":
        from parley.speech.silent import NoPartials

        return NoPartials
    from parley.speech.pocketsphinx import PocketsphinxRecognizer

    return lambda: PocketsphinxRecognizer(settings.partial_interval_ms)


def _voices(
    settings: Settings, executor: Executor, closers: list[Callable[[], None]]
) -> Callable[[str | None], Synthesizer]:
    """voice name (None = the default voice) -> a synthesizer, each voice loaded once, each watched
    by timeouts with the embedded fallback voice behind it (see parley.voice.guarded)."""
    default = _default_voice(settings, executor, closers)
    fallback = _fallback_voice(settings, executor) if settings.tts_fallback else None
    limits = synthesis_limits(settings)
    voices: dict[str | None, Synthesizer] = {
        None: GuardedSynthesizer(default, fallback, name=f"tts={settings.tts}", limits=limits)
    }

    def synthesizer_for(voice: str | None) -> Synthesizer:
        if voice not in voices:
            try:
                if not isinstance(default, MultiVoiceSynthesizer):
                    raise ValueError("this synthesizer has a single voice")
                voices[voice] = GuardedSynthesizer(
                    default.with_voice(voice), fallback, name=f"tts={settings.tts} voice {voice}", limits=limits
                )
            # A voice of the other engine, a missing or broken file (onnxruntime raises its own
            # types): say so once and keep the call on the default voice.
            except Exception as exc:  # noqa: BLE001 - any failure to load a voice falls back to the default
                log.warning(
                    "voice %r is not usable with tts=%s (%s); using the default voice", voice, settings.tts, exc
                )
                voices[voice] = voices[None]
        return voices[voice]

    return synthesizer_for


def synthesis_limits(settings: Settings) -> SynthesisLimits:
    return SynthesisLimits(
        first_chunk_s=settings.tts_first_audio_timeout_s,
        next_chunk_s=settings.tts_chunk_timeout_s,
        cleanup_s=settings.turn_cleanup_timeout_s,
    )


def _default_voice(settings: Settings, executor: Executor, closers: list[Callable[[], None]]) -> Synthesizer:
    if settings.tts == "azure":
        options = azure_speech_options(settings)
        from parley.voice.azure import AzureSynthesizer

        azure = AzureSynthesizer(options, settings.tts_voice or settings.azure_tts_voice)
        closers.append(azure.close)
        return azure
    if settings.tts == "piper":
        from parley.voice.piper import PiperSynthesizer

        return PiperSynthesizer(
            executor, settings.tts_voice, rate=settings.tts_rate, intra_op_threads=settings.tts_threads
        )
    from parley.voice.espeak import EspeakSynthesizer

    return EspeakSynthesizer(executor, settings.tts_voice or "en-us", settings.tts_rate_wpm)


def _fallback_voice(settings: Settings, executor: Executor) -> Synthesizer | None:
    """The embedded voice that speaks while the configured one fails, loaded now (never mid-call):
    Piper behind a cloud voice, espeak-ng behind Piper; espeak-ng itself has none."""
    try:
        if settings.tts == "azure":
            from parley.voice.piper import PiperSynthesizer

            return PiperSynthesizer(executor, None, intra_op_threads=settings.tts_threads)
        if settings.tts == "piper":
            from parley.voice.espeak import EspeakSynthesizer

            return EspeakSynthesizer(executor, "en-us", settings.tts_rate_wpm)
    except Exception as exc:  # noqa: BLE001 - a missing fallback must not stop the server; say so
        log.warning("no fallback voice for tts=%s (%s): a failing voice leaves turns silent", settings.tts, exc)
    return None


def plumbing_engines(settings: Settings) -> Engines:
    """Real Silero VAD with TEST DOUBLES for recognizer, agent and synthesizer (see parley.testing.doubles)."""
    from parley.protocols import CallContext
    from parley.speech.vad import SileroVad
    from parley.testing.doubles import AgentDouble, RecognizerDouble, SynthesizerDouble

    greeting = (
        settings.greeting
        if settings.greeting is not None
        else ("This is the plumbing profile greeting, a tone that stands in for a few seconds of speech.")
    )
    reply = "This is the plumbing profile reply, a tone standing in for a spoken answer."
    synthesizer = SynthesizerDouble()

    def agent_factory(context: CallContext) -> AgentDouble:
        return AgentDouble(context, greeting, reply)

    return Engines(
        vads=vad_pool(SileroVad, **_pool_sizes(settings)),
        recognizers=recognizer_pool(RecognizerDouble, **_pool_sizes(settings)),
        synthesizer_for=lambda voice: synthesizer,
        agent_factory=agent_factory,
        warm_count=settings.engine_pool_warm,
        agent_factories=dict.fromkeys(settings.agent_names, agent_factory),  # one double stands in for all
    )


def build_engines(settings: Settings) -> Engines:
    native_memory.limit_arenas()  # before the engines' threads allocate (see parley.native_memory)
    if settings.engines == "plumbing":
        return plumbing_engines(settings)  # measures the server's plumbing: the silence rule, no model
    turn_detector = _turn_detector(settings)  # first: a missing model stops startup before the big loads
    engines = embedded_engines(settings)
    engines.turn_detector = turn_detector
    return engines


def _turn_detector(settings: Settings) -> TurnDetector | None:
    """Smart Turn when PARLEY_TURN_DETECTION=smart-turn. Its model is fetched at setup (`parley
    models fetch smart-turn`): chosen explicitly, a missing model is a startup error naming that
    command; as the default, the server falls back to the silence rule and says so."""
    if settings.turn_detection != "smart-turn":
        return None
    from parley.models import ModelError
    from parley.speech.turn import SmartTurn, TurnDetector

    try:
        return TurnDetector(SmartTurn(settings.models_dir))
    except ModelError as exc:
        if "turn_detection" in settings.model_fields_set:
            raise
        log.warning("turn detection: %s; ending turns on %d ms of silence instead", exc, settings.endpoint_silence_ms)
        return None
