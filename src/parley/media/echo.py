"""Echo-aware speech gate: is what the caller's line carries just our own voice coming back?

Speakerphones and browsers without echo cancellation send the agent's voice back to us, and every
VAD calls it speech (Silero even 30 dB down), so without a gate the agent interrupts itself.

The gate compares levels, not waveforms (codecs and phone speakers keep the envelope, not the
samples). It learns the echo path of the call from the line itself: at the right lag, the inbound
level minus the level we played is a constant (the echo return loss, ERL) while only echo is
there, so it searches the lag at which that difference is most consistent. A window is "explained
by echo" when its level is no louder than the echo predicted for it plus a margin; such windows do
not count as speech. The caller talking over the agent is louder than the echo and passes at once;
nothing is delayed on calls that have no echo (the gate learns that too, and then stays open).

Threads: `EchoReference` is written on the event loop (each frame the player sends) and read by
the recognition thread; `EchoGate` lives on the recognition thread only.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from enum import Enum

import numpy as np

SILENT_DB = -120.0


class EchoReference:
    """What the agent played and when: (playout time, level in dBFS) per outbound 20 ms frame."""

    def __init__(self, horizon_frames: int = 300) -> None:  # 6 s of playout
        self._frames: deque[tuple[float, float]] = deque(maxlen=horizon_frames)
        self._lock = threading.Lock()

    def add(self, play_t: float, level_db: float) -> None:
        with self._lock:
            self._frames.append((play_t, level_db))

    def cut(self, at: float) -> None:
        """StopAudio at `at`: frames that would have played from then on never will."""
        with self._lock:
            while self._frames and self._frames[-1][0] >= at:
                self._frames.pop()

    def snapshot(self, since: float) -> tuple[np.ndarray, np.ndarray]:
        """(times, levels) of frames playing from `since` on, in time order."""
        recent: list[tuple[float, float]] = []
        with self._lock:  # newest first, stopping at `since`: called for every VAD window
            for frame in reversed(self._frames):
                if frame[0] < since:
                    break
                recent.append(frame)
        recent.reverse()
        if not recent:
            return np.zeros(0), np.zeros(0)
        times, levels = zip(*recent, strict=True)
        return np.asarray(times), np.asarray(levels)


class EchoState(Enum):
    UNKNOWN = "unknown"  # not enough playout heard yet: assume a strong echo path
    ECHO = "echo"  # a consistent echo path was measured
    NONE = "none"  # the line stays quiet (or unrelated) while the agent speaks


@dataclass(frozen=True, slots=True)
class EchoConfig:
    margin_db: float = 6.0  # louder than the predicted echo by this much = the caller
    assumed_loss_db: float = 15.0  # ERL assumed until measured (speakerphones: 10-25 dB)
    min_lag_s: float = -0.2  # the far end may play earlier than our playout clock says
    max_lag_s: float = 0.5
    lag_step_s: float = 0.02
    history_s: float = 2.5
    update_every_s: float = 0.25
    active_db: float = -50.0  # playout frames quieter than this teach nothing
    floor_db: float = -65.0  # inbound windows quieter than this are line silence
    min_active: int = 20  # windows with the agent audible needed for an estimate
    # Declaring "no echo" opens the gate. A line that stays silent while the agent is loud says so
    # quickly; a noisy line needs longer to show that its level does not follow the agent's.
    min_active_for_none: int = 35
    min_active_silent: int = 10  # ~0.3 s of the agent loud on a silent line
    silent_share: float = 0.1
    max_spread_db: float = 5.0  # median deviation of (in - out) at the lag for "consistent"
    min_correlation: float = 0.5
    none_correlation: float = 0.25


class EchoGate:
    """Decides per VAD window whether the inbound level is explained by the agent's echo."""

    def __init__(self, reference: EchoReference, config: EchoConfig | None = None) -> None:
        self._reference = reference
        self._config = config or EchoConfig()
        history = int(self._config.history_s / 0.02) + 1
        self._inbound: deque[tuple[float, float]] = deque(maxlen=history)
        self._next_update = 0.0
        self.state = EchoState.UNKNOWN
        self.loss_db = self._config.assumed_loss_db
        self.lag_s = 0.0
        self.suppressed = 0

    def explains(self, t: float, level_db: float, duration_s: float) -> bool:
        """Record the window starting at `t`, then say whether echo explains it."""
        self._inbound.append((t + duration_s / 2, level_db))
        if t >= self._next_update:
            self._next_update = t + self._config.update_every_s
            self._estimate()
        if self.state is EchoState.NONE or level_db <= self._config.floor_db:
            return False
        predicted = self._predicted_echo_db(t, duration_s)
        explained = level_db < predicted + self._config.margin_db
        self.suppressed += explained
        return explained

    # ---------------------------------------------------------------------------------------
    def _predicted_echo_db(self, t: float, duration_s: float) -> float:
        c = self._config
        if self.state is EchoState.ECHO:
            # The frames that could be echoing into this window, a frame either side for jitter.
            start, end = t - self.lag_s - 0.02, t + duration_s - self.lag_s + 0.02
        else:  # UNKNOWN: any lag is possible
            start, end = t - c.max_lag_s, t + duration_s - c.min_lag_s
        times, levels = self._reference.snapshot(start - 0.02)
        inside = (times >= start - 0.02) & (times <= end)
        if not inside.any():
            return SILENT_DB
        return float(levels[inside].max()) - self.loss_db

    def _estimate(self) -> None:
        c = self._config
        if len(self._inbound) < c.min_active_silent:
            return
        in_t, in_db = (np.asarray(column) for column in zip(*self._inbound, strict=True))
        ref_t, ref_db = self._reference.snapshot(in_t[0] - c.max_lag_s - 0.04)
        if ref_t.size < c.min_active_silent:
            return
        lags = np.arange(c.min_lag_s, c.max_lag_s + 1e-9, c.lag_step_s)
        best: tuple[float, float, float, float] | None = None  # (spread, lag, loss, correlation)
        max_correlation = -1.0
        most_active = 0
        silent_at_every_lag = True  # of the lags with enough evidence
        for lag in lags:
            played = _levels_at(ref_t, ref_db, in_t - lag)
            active = played > c.active_db
            most_active = max(most_active, int(active.sum()))
            if active.sum() < c.min_active_silent:
                continue
            heard = in_db[active]
            audible = float((heard > c.floor_db).mean())
            silent_at_every_lag &= audible < c.silent_share
            if active.sum() < c.min_active or audible < 0.3:
                continue  # the line stays silent while the agent is loud: no echo at this lag
            correlation = _correlation(heard, played[active])
            max_correlation = max(max_correlation, correlation)
            difference = heard - played[active]
            median = float(np.median(difference))
            spread = float(np.median(np.abs(difference - median)))
            if best is None or spread < best[0]:
                best = (spread, float(lag), -median, correlation)
        if best is not None and best[0] <= c.max_spread_db and best[3] >= c.min_correlation:
            self.state, self.lag_s, self.loss_db = EchoState.ECHO, best[1], best[2]
        elif (most_active >= c.min_active_silent and silent_at_every_lag and self.state is EchoState.UNKNOWN) or (
            most_active >= c.min_active_for_none and (best is None or max_correlation < c.none_correlation)
        ):
            self.state = EchoState.NONE
        # otherwise inconclusive (the caller is talking over the agent): keep what we knew


def _levels_at(times: np.ndarray, levels: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The level of the 20 ms playout frame covering each instant of `at` (silence if none)."""
    index = np.searchsorted(times, at, side="right") - 1
    valid = (index >= 0) & (at - times[np.clip(index, 0, None)] < 0.02 + 1e-6)
    out = np.full(at.shape, SILENT_DB)
    out[valid] = levels[index[valid]]
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or float(a.std()) < 1e-6 or float(b.std()) < 1e-6:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
