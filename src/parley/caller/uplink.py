"""What the caller's microphone sends up the line besides their voice: room noise and echo."""

from __future__ import annotations

import numpy as np

from parley.caller.options import CallOptions
from parley.caller.playout import PlayoutEmulator


class UplinkMix:
    """What the caller's microphone picks up besides their own voice: a background noise bed and,
    on a speakerphone, the agent's own audio (echo).

    Frame i goes out at t0 + i*20 ms and carries the 20 ms before that, so the audio added to it
    covers timeline samples [(i-1)*N, i*N): consecutive frames join sample-exactly even when the
    sender runs late, and the echo is what played `echo_delay_ms` before each of those samples.
    """

    def __init__(self, options: CallOptions, playout: PlayoutEmulator, samples_per_frame: int) -> None:
        self._playout = playout
        self._n = samples_per_frame
        self._echo_gain = None if options.echo_db is None else 10 ** (options.echo_db / 20)
        self._echo_delay = round(options.echo_delay_ms * options.sample_rate / 1000)
        self._background = options.background

    @classmethod
    def for_options(cls, options: CallOptions, playout: PlayoutEmulator, samples_per_frame: int) -> UplinkMix | None:
        if options.echo_db is None and options.background is None:
            return None
        return cls(options, playout, samples_per_frame)

    def mix(self, own: np.ndarray, index: int) -> np.ndarray:
        """The caller's own frame (int16) with background and echo added, clipped to int16."""
        first = (index - 1) * self._n
        mixed = own.astype(np.float32)
        if self._background is not None:
            mixed += np.take(self._background, np.arange(first, first + self._n), mode="wrap")
        if self._echo_gain is not None:
            echo = self._playout.played_samples(first - self._echo_delay, first - self._echo_delay + self._n)
            mixed += echo * np.float32(self._echo_gain)
        return np.clip(np.round(mixed), -32768, 32767).astype(np.int16)
