"""The engines a server runs with, built once at startup from Settings.

Building them here (not per call) surfaces configuration mistakes at startup (a missing agent
file, an unknown voice) and shares what can be shared (the synthesis executor, the agent script).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from parley.protocols import AgentFactory, Recognizer, Synthesizer, Vad
from parley.settings import Settings


@dataclass
class Engines:
    make_vad: Callable[[], Vad]
    make_recognizer: Callable[[], Recognizer]
    synthesizer_for: Callable[[str | None], Synthesizer]  # voice name (None = default) -> synthesizer
    agent_factory: AgentFactory
    executors: list[Executor] = field(default_factory=list)

    def close(self) -> None:
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)


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
        make_vad=SileroVad,
        make_recognizer=lambda: PocketsphinxRecognizer(settings.partial_interval_ms),
        synthesizer_for=synthesizer_for,
        agent_factory=agent_factory,
        executors=[executor],
    )
