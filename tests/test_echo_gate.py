"""The echo-aware gate on real audio: our own voice coming back must not count as the caller."""

from __future__ import annotations

import numpy as np
import pytest

from parley.audio import dbfs
from parley.media.bridge import SpeechStarted
from parley.media.echo import EchoGate, EchoReference, EchoState
from parley.media.recognition import SegmenterConfig, SpeechSegmenter
from parley.speech.pocketsphinx import PocketsphinxRecognizer
from parley.speech.vad import SileroVad

FRAME = 320  # 20 ms at 16 kHz
AGENT_TEXT = (
    "Thanks for calling Parley Pizza. Our large pizzas are twelve dollars, and today every second "
    "pizza is half price, so it is a good day to order for the whole family."
)


class Bridge:
    """Collects what the segmenter reports (the ThreadBridge's three entry points)."""

    def __init__(self) -> None:
        self.starts: list[SpeechStarted] = []

    def schedule_barge_in(self, event: object) -> None:
        if isinstance(event, SpeechStarted):
            self.starts.append(event)

    def queue_partial(self, event: object) -> None:
        pass

    def queue_speech_result(self, event: object) -> None:
        pass


@pytest.fixture(scope="module")
def agent_pcm(voice) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.frombuffer(voice.synthesize_blocking(AGENT_TEXT, 16000), dtype=np.int16)


def scaled(pcm: np.ndarray, db: float) -> np.ndarray:
    return (pcm.astype(np.float32) * 10 ** (db / 20)).astype(np.int16)


def run_line(agent: np.ndarray, inbound: np.ndarray, *, gate: bool = True) -> tuple[Bridge, EchoGate | None]:
    """Play `agent` (recorded in the echo reference on its playout clock) while `inbound` arrives."""
    reference = EchoReference()
    echo_gate = EchoGate(reference) if gate else None
    bridge = Bridge()
    segmenter = SpeechSegmenter(
        SileroVad(),
        PocketsphinxRecognizer(),
        bridge,
        SegmenterConfig(),  # type: ignore[arg-type]
        echo_gate=echo_gate,
    )
    t0 = 1000.0
    n = max(agent.size, inbound.size) // FRAME
    agent = np.pad(agent, (0, n * FRAME + FRAME - agent.size))
    inbound = np.pad(inbound, (0, n * FRAME + FRAME - inbound.size))
    for i in range(n):
        out = agent[i * FRAME : (i + 1) * FRAME]
        if out.any():
            reference.add(t0 + i * 0.02, dbfs(out))
        segmenter.push(inbound[i * FRAME : (i + 1) * FRAME].tobytes(), t0 + i * 0.02)
    return bridge, echo_gate


def echo_of(agent: np.ndarray, db: float, delay_ms: int) -> np.ndarray:
    delay = delay_ms * 16
    return np.concatenate([np.zeros(delay, np.int16), scaled(agent, db)])


def test_without_a_gate_the_vad_takes_the_echo_for_the_caller(agent_pcm: np.ndarray) -> None:
    bridge, _ = run_line(agent_pcm, echo_of(agent_pcm, -20, 60), gate=False)
    assert bridge.starts  # the problem the gate solves


@pytest.mark.parametrize(("db", "delay_ms"), [(-20, 60), (-15, 150), (-25, 0), (-20, 300)])
def test_echo_alone_starts_nothing(agent_pcm: np.ndarray, db: float, delay_ms: int) -> None:
    bridge, gate = run_line(agent_pcm, echo_of(agent_pcm, db, delay_ms))
    assert bridge.starts == []
    assert gate is not None and gate.state is EchoState.ECHO
    assert abs(gate.loss_db + db) < 4  # it measured the echo return loss


def test_caller_talking_over_the_echo_is_heard(agent_pcm: np.ndarray, hours_pcm: np.ndarray) -> None:
    start = int(2.5 * 16000)  # the caller speaks 2.5 s into the agent's reply, at a normal level
    caller = np.zeros(agent_pcm.size + 16000, np.int16)
    caller[start : start + hours_pcm.size] = scaled(hours_pcm, -6)[: caller.size - start]
    echo = np.pad(echo_of(agent_pcm, -20, 60), (0, caller.size))[: caller.size]
    bridge, _ = run_line(agent_pcm, (caller.astype(np.int32) + echo).clip(-32768, 32767).astype(np.int16))
    assert len(bridge.starts) == 1
    onset_s = bridge.starts[0].onset_t - 1000.0
    assert 2.4 <= onset_s <= 2.8  # found at the caller's onset, not delayed by the gate


def test_a_line_without_echo_leaves_the_gate_open(agent_pcm: np.ndarray, hours_pcm: np.ndarray) -> None:
    start = int(3.0 * 16000)
    caller = np.zeros(agent_pcm.size, np.int16)
    caller[start : start + hours_pcm.size] = scaled(hours_pcm, -14)[: caller.size - start]  # a quiet caller
    bridge, gate = run_line(agent_pcm, caller)
    assert gate is not None and gate.state is EchoState.NONE
    assert len(bridge.starts) == 1
