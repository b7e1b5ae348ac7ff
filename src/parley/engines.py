"""The engines a server runs with, built once at startup from Settings.

Building them here (not per call) surfaces configuration mistakes at startup (a missing agent
file, an unknown voice) and shares what can be shared (the synthesis executor, the agent script).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from parley.media.recognition import FinalPass
from parley.pool import EnginePool
from parley.protocols import AgentFactory, CallControl, Recognizer, Synthesizer, Vad
from parley.settings import Settings

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
    warm_count: int = 2

    def warm(self) -> None:
        """Pre-load per-call engines so the first calls do not pay for model loads."""
        self.vads.warm(self.warm_count)
        self.recognizers.warm(self.warm_count)
        if self.final_pass is not None:
            # CTranslate2 allocates its buffers on the first pass: ~100 ms the first caller would pay.
            self.final_pass.transcriber.transcribe(bytes(2 * 16000))

    def close(self) -> None:
        self.vads.close()
        self.recognizers.close()
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)


def vad_pool(create: Callable[[], Vad], max_idle: int) -> EnginePool[Vad]:
    return EnginePool("vad", create, recycle=lambda vad: vad.reset(), max_idle=max_idle)


def recognizer_pool(create: Callable[[], Recognizer], max_idle: int) -> EnginePool[Recognizer]:
    return EnginePool(
        "recognizer", create, recycle=lambda rec: rec.end(), dispose=lambda rec: rec.close(),
        max_idle=max_idle,
    )


def embedded_engines(settings: Settings) -> Engines:
    """The offline default: Silero VAD, pocketsphinx partials + Whisper finals, Piper (or
    espeak-ng) and the agents of a YAML scenario (scripted offline, LLM when configured)."""
    from parley.agents.scenario import scenario_agent_factory
    from parley.speech.vad import SileroVad

    agent_factory = scenario_agent_factory(settings.agent, settings.llm_config())
    synth_executor = ThreadPoolExecutor(settings.synth_workers, thread_name_prefix="synth")
    executors: list[Executor] = [synth_executor]
    final_pass = None
    if settings.stt in ("two-pass", "whisper"):
        from parley.speech.whisper import WhisperTranscriber

        transcriber = WhisperTranscriber(
            settings.stt_model, language=settings.stt_language, cpu_threads=settings.stt_threads,
            workers=settings.stt_workers, trim_context=settings.stt_trim_context,
        )
        stt_executor = ThreadPoolExecutor(settings.stt_workers, thread_name_prefix="stt-final")
        executors.append(stt_executor)
        final_pass = FinalPass(transcriber, stt_executor)
    return Engines(
        vads=vad_pool(SileroVad, settings.engine_pool_idle),
        recognizers=recognizer_pool(_streaming_recognizer(settings), settings.engine_pool_idle),
        synthesizer_for=_voices(settings, synth_executor),
        agent_factory=agent_factory,
        final_pass=final_pass,
        executors=executors,
        warm_count=settings.engine_pool_warm,
    )


def _streaming_recognizer(settings: Settings) -> Callable[[], Recognizer]:
    if settings.stt == "whisper":
        from parley.speech.silent import NoPartials

        return NoPartials
    from parley.speech.pocketsphinx import PocketsphinxRecognizer

    return lambda: PocketsphinxRecognizer(settings.partial_interval_ms)


def _voices(settings: Settings, executor: Executor) -> Callable[[str | None], Synthesizer]:
    """voice name (None = the default voice) -> a synthesizer, each voice loaded once."""
    if settings.tts == "piper":
        from parley.voice.piper import PiperSynthesizer

        default: Synthesizer = PiperSynthesizer(
            executor, settings.tts_voice, rate=settings.tts_rate, intra_op_threads=settings.tts_threads
        )
    else:
        from parley.voice.espeak import EspeakSynthesizer

        default = EspeakSynthesizer(executor, settings.tts_voice or "en-us", settings.tts_rate_wpm)
    voices: dict[str | None, Synthesizer] = {None: default}

    def synthesizer_for(voice: str | None) -> Synthesizer:
        if voice not in voices:
            try:
                voices[voice] = default.with_voice(voice)  # type: ignore[attr-defined]
            except Exception as exc:  # a voice of the other engine, a missing file: say so once
                log.warning("voice %r is not usable with tts=%s (%s); using the default voice",
                            voice, settings.tts, exc)
                voices[voice] = default
        return voices[voice]

    return synthesizer_for


def plumbing_engines(settings: Settings) -> Engines:
    """Real Silero VAD with TEST DOUBLES for recognizer, agent and synthesizer (see parley.doubles)."""
    from parley.doubles import AgentDouble, RecognizerDouble, SynthesizerDouble
    from parley.protocols import CallContext
    from parley.speech.vad import SileroVad

    greeting = settings.greeting if settings.greeting is not None else (
        "This is the plumbing profile greeting, a tone that stands in for a few seconds of speech."
    )
    reply = "This is the plumbing profile reply, a tone standing in for a spoken answer."
    synthesizer = SynthesizerDouble()

    def agent_factory(context: CallContext) -> AgentDouble:
        return AgentDouble(context, greeting, reply)

    return Engines(
        vads=vad_pool(SileroVad, settings.engine_pool_idle),
        recognizers=recognizer_pool(RecognizerDouble, settings.engine_pool_idle),
        synthesizer_for=lambda voice: synthesizer,
        agent_factory=agent_factory,
        warm_count=settings.engine_pool_warm,
    )


def build_engines(settings: Settings) -> Engines:
    return plumbing_engines(settings) if settings.engines == "plumbing" else embedded_engines(settings)
