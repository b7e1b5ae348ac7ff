"""The engines a server runs with, built once at startup from Settings.

Building them here (not per call) surfaces configuration mistakes at startup (a missing agent
file, an unknown voice) and shares what can be shared (the synthesis executor, the agent script).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from parley.pool import EnginePool
from parley.protocols import AgentFactory, Recognizer, Synthesizer, Vad
from parley.settings import Settings


@dataclass
class Engines:
    vads: EnginePool[Vad]
    recognizers: EnginePool[Recognizer]
    synthesizer_for: Callable[[str | None], Synthesizer]  # voice name (None = default) -> synthesizer
    agent_factory: AgentFactory
    executors: list[Executor] = field(default_factory=list)
    warm_count: int = 2

    def warm(self) -> None:
        """Pre-load per-call engines so the first calls do not pay for model loads."""
        self.vads.warm(self.warm_count)
        self.recognizers.warm(self.warm_count)

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
    """The offline default: Silero VAD, pocketsphinx, espeak-ng and the scripted YAML agent."""
    from parley.agents.scripted import scripted_agent_factory
    from parley.speech.pocketsphinx import PocketsphinxRecognizer
    from parley.speech.vad import SileroVad
    from parley.voice.espeak import EspeakSynthesizer

    agent_factory = scripted_agent_factory(settings.agent)
    executor = ThreadPoolExecutor(settings.synth_workers, thread_name_prefix="synth")
    default_voice = EspeakSynthesizer(executor, settings.tts_voice, settings.tts_rate_wpm)
    voices: dict[str | None, EspeakSynthesizer] = {None: default_voice}

    def synthesizer_for(voice: str | None) -> Synthesizer:
        if voice not in voices:
            voices[voice] = default_voice.with_voice(voice)
        return voices[voice]

    return Engines(
        vads=vad_pool(SileroVad, settings.engine_pool_idle),
        recognizers=recognizer_pool(
            lambda: PocketsphinxRecognizer(settings.partial_interval_ms), settings.engine_pool_idle
        ),
        synthesizer_for=synthesizer_for,
        agent_factory=agent_factory,
        executors=[executor],
        warm_count=settings.engine_pool_warm,
    )


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
