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
    """What the agent played and when: (playout time, level in dBFS) per outbound 20 ms frame.

    A ring of the last `horizon_frames`, kept twice over in arrays of twice that length, so the
    newest frames are always one contiguous slice: reading them is a copy, not a loop.
    """

    def __init__(self, horizon_frames: int = 300) -> None:  # 6 s of playout
        self._capacity = horizon_frames
        self._times = np.zeros(2 * horizon_frames)
        self._levels = np.zeros(2 * horizon_frames)
        self._newest = horizon_frames - 1  # ring position of the newest frame
        self._count = 0
        self._lock = threading.Lock()

    def add(self, play_t: float, level_db: float) -> None:
        with self._lock:
            position = self._newest = (self._newest + 1) % self._capacity
            self._times[position] = self._times[position + self._capacity] = play_t
            self._levels[position] = self._levels[position + self._capacity] = level_db
            self._count = min(self._count + 1, self._capacity)

    def cut(self, at: float) -> None:
        """StopAudio at `at`: frames that would have played from then on never will."""
        with self._lock:
            while self._count and self._times[self._newest] >= at:
                self._newest = (self._newest - 1) % self._capacity
                self._count -= 1

    def snapshot(self, since: float) -> tuple[np.ndarray, np.ndarray]:
        """(times, levels) of frames playing from `since` on, in time order."""
        with self._lock:
            times, levels = self._since(since)
            return times.copy(), levels.copy()

    def loudest(self, start: float, end: float) -> float | None:
        """The loudest level of the frames playing from `start` to `end` (None if none)."""
        with self._lock:
            times, levels = self._since(start)
            inside = levels[times <= end]
            return float(inside.max()) if inside.size else None

    def playing(self, now: float) -> bool:
        """Is any agent audio playing (or queued to play) at `now`?"""
        with self._lock:
            return self._count > 0 and self._times[self._newest] + 0.02 >= now

    def _since(self, since: float) -> tuple[np.ndarray, np.ndarray]:
        """Views of the newest frames back to (not including) the newest one older than `since`
        (the lock held). Play times only grow, so this is every frame playing from `since` on."""
        end = self._newest + self._capacity + 1
        times = self._times[end - self._count : end]
        older = np.flatnonzero(times < since)
        first = int(older[-1]) + 1 if older.size else 0
        return times[first:], self._levels[end - self._count + first : end]


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
        c = self._config
        history = int(c.history_s / 0.02) + 1
        # Two columns, not a deque of pairs: the estimate reads them as arrays four times a second.
        self._inbound_t: deque[float] = deque(maxlen=history)
        self._inbound_db: deque[float] = deque(maxlen=history)
        self._lags = np.arange(c.min_lag_s, c.max_lag_s + 1e-9, c.lag_step_s)
        self._next_update = 0.0
        self.state = EchoState.UNKNOWN
        self.loss_db = c.assumed_loss_db
        self.lag_s = 0.0
        self.suppressed = 0

    def explains(self, t: float, level_db: float, duration_s: float) -> bool:
        """Record the window starting at `t`, then say whether echo explains it."""
        self._inbound_t.append(t + duration_s / 2)
        self._inbound_db.append(level_db)
        if t >= self._next_update:
            self._next_update = t + self._config.update_every_s
            self._estimate()
        explained = self.would_explain(t, level_db, duration_s)
        self.suppressed += explained
        return explained

    def would_explain(self, t: float, level_db: float, duration_s: float) -> bool:
        """Whether echo explains audio at `level_db` from `t` on, without recording it (a single
        frame judged between two windows must not weigh in the echo path's estimate)."""
        if self.state is EchoState.NONE or level_db <= self._config.floor_db:
            return False
        return level_db < self._predicted_echo_db(t, duration_s) + self._config.margin_db

    @property
    def reference(self) -> EchoReference:
        return self._reference

    # ---------------------------------------------------------------------------------------
    def _predicted_echo_db(self, t: float, duration_s: float) -> float:
        c = self._config
        if self.state is EchoState.ECHO:
            # The frames that could be echoing into this window, a frame either side for jitter.
            start, end = t - self.lag_s - 0.02, t + duration_s - self.lag_s + 0.02
        else:  # UNKNOWN: any lag is possible
            start, end = t - c.max_lag_s, t + duration_s - c.min_lag_s
        loudest = self._reference.loudest(start - 0.02, end)
        return SILENT_DB if loudest is None else loudest - self.loss_db

    def _estimate(self) -> None:
        """Search the lag at which (inbound - played) is most consistent: every lag at once, as rows
        of one 2-D array (a loop over the 36 lags cost as much CPU as the VAD itself)."""
        c = self._config
        if len(self._inbound_t) < c.min_active_silent:
            return
        in_t = np.array(self._inbound_t)
        in_db = np.array(self._inbound_db)
        ref_t, ref_db = self._reference.snapshot(in_t[0] - c.max_lag_s - 0.04)
        if ref_t.size < c.min_active_silent or not (ref_db > c.active_db).any():
            return  # (no playout loud enough to teach anything: no lag would have evidence)
        search = search_lags(in_t, in_db, ref_t, ref_db, self._lags, c)
        best = search.best
        if (
            best is not None
            and search.spread[best] <= c.max_spread_db
            and search.correlation[best] >= c.min_correlation
        ):
            self.state, self.lag_s, self.loss_db = EchoState.ECHO, float(self._lags[best]), float(search.loss[best])
        elif (
            search.most_active >= c.min_active_silent and search.silent_at_every_lag and self.state is EchoState.UNKNOWN
        ) or (
            search.most_active >= c.min_active_for_none
            and (best is None or search.max_correlation < c.none_correlation)
        ):
            self.state = EchoState.NONE
        # otherwise inconclusive (the caller is talking over the agent): keep what we knew


@dataclass(frozen=True, slots=True)
class LagSearch:
    """What every candidate lag showed. Per lag (rows, in `lags` order): `spread`, `loss` and
    `correlation` (NaN where the lag had too little evidence to judge)."""

    most_active: int  # the most windows, at any lag, that heard the agent audible
    silent_at_every_lag: bool  # of the lags with enough evidence, the line stayed silent at each
    spread: np.ndarray
    loss: np.ndarray
    correlation: np.ndarray
    best: int | None  # the judged lag with the smallest spread (the first of equals)
    max_correlation: float  # over the judged lags (-1 if none)


def search_lags(
    in_t: np.ndarray, in_db: np.ndarray, ref_t: np.ndarray, ref_db: np.ndarray, lags: np.ndarray, c: EchoConfig
) -> LagSearch:
    """Compare the inbound levels with the playout levels shifted by each lag.

    At each lag, the windows during which the agent was audible (`active`) are the evidence: too
    few, or a line that stays silent through them, and the lag is not judged. A judged lag gets the
    median of (inbound - played) (the echo return loss is its negation), the median deviation
    from it (`spread`: small when the inbound level follows the played one) and their correlation.
    """
    played = _levels_at(ref_t, ref_db, in_t[None, :] - lags[:, None])  # (lags, windows)
    active = played > c.active_db
    n_active = active.sum(axis=1)
    audible_count = (active & (in_db > c.floor_db)[None, :]).sum(axis=1)
    audible = audible_count / np.maximum(n_active, 1)
    evidence = n_active >= c.min_active_silent
    judged = evidence & (n_active >= c.min_active) & (audible >= 0.3)
    rows = judged.size
    spread = np.full(rows, np.nan)
    loss = np.full(rows, np.nan)
    correlation = np.full(rows, np.nan)
    if judged.any():
        mask = active[judged]
        heard = np.broadcast_to(in_db, mask.shape)
        median, deviation = _masked_median_and_deviation(
            np.where(mask, heard - played[judged], np.nan), n_active[judged]
        )
        spread[judged], loss[judged] = deviation, -median
        correlation[judged] = _masked_correlation(heard, played[judged], mask, n_active[judged])
    best = int(np.nanargmin(spread)) if judged.any() else None
    return LagSearch(
        most_active=int(n_active.max()) if rows else 0,
        silent_at_every_lag=bool((audible[evidence] < c.silent_share).all()),
        spread=spread,
        loss=loss,
        correlation=correlation,
        best=best,
        max_correlation=float(np.nanmax(correlation)) if judged.any() else -1.0,
    )


def _masked_median_and_deviation(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the median of its non-NaN values and the median of their absolute deviation from
    it, exactly as np.median computes them on each row's values alone (NaNs sort last)."""
    rows = np.arange(values.shape[0])
    low, high = (counts - 1) // 2, counts // 2

    def median(sorted_rows: np.ndarray) -> np.ndarray:
        middle: np.ndarray = (sorted_rows[rows, low] + sorted_rows[rows, high]) / 2
        return middle

    centre = median(np.sort(values, axis=1))
    return centre, median(np.sort(np.abs(values - centre[:, None]), axis=1))


def _masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row: Pearson's correlation of `a` and `b` where `mask` is set (0 where either is flat,
    as `_correlation` says)."""
    n = counts.astype(np.float64)
    mean_a = np.where(mask, a, 0.0).sum(axis=1) / n
    mean_b = np.where(mask, b, 0.0).sum(axis=1) / n
    da = np.where(mask, a - mean_a[:, None], 0.0)
    db = np.where(mask, b - mean_b[:, None], 0.0)
    saa, sbb, sab = (da * da).sum(axis=1), (db * db).sum(axis=1), (da * db).sum(axis=1)
    # std() < 1e-6 (population std, as _correlation checks) is a variance below 1e-12.
    flat = (counts < 3) | (saa / n < 1e-12) | (sbb / n < 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(sab / np.sqrt(saa) / np.sqrt(sbb), -1.0, 1.0)
    correlation: np.ndarray = np.where(flat, 0.0, r)
    return correlation


def _levels_at(times: np.ndarray, levels: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The level of the 20 ms playout frame covering each instant of `at` (silence if none)."""
    index = np.searchsorted(times, at, side="right") - 1
    valid = (index >= 0) & (at - times[np.clip(index, 0, None)] < 0.02 + 1e-6)
    out = np.full(at.shape, SILENT_DB)
    out[valid] = levels[index[valid]]
    return out
