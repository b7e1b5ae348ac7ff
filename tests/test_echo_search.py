"""The echo gate's lag search, vectorised: the same decisions as the loop over lags it replaced.

The loop (one pass per candidate lag, `np.median` and `np.corrcoef` on each lag's evidence) is
kept here as the reference; generated lines (echo at various lags and losses, a caller talking
over it, a silent or noisy line, the agent pausing and being cut) go through both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from parley.media.echo import SILENT_DB, EchoConfig, EchoGate, EchoReference, EchoState, _levels_at, search_lags

WINDOW_S = 0.032


# --- the reference: the loop over lags, as it was ---------------------------------------------------
@dataclass
class LoopResult:
    most_active: int
    silent_at_every_lag: bool
    best: tuple[float, float, float, float] | None  # (spread, lag, loss, correlation)
    max_correlation: float


def loop_search(
    in_t: np.ndarray, in_db: np.ndarray, ref_t: np.ndarray, ref_db: np.ndarray, c: EchoConfig
) -> LoopResult:
    lags = np.arange(c.min_lag_s, c.max_lag_s + 1e-9, c.lag_step_s)
    best: tuple[float, float, float, float] | None = None
    max_correlation = -1.0
    most_active = 0
    silent_at_every_lag = True
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
            continue
        correlation = _loop_correlation(heard, played[active])
        max_correlation = max(max_correlation, correlation)
        difference = heard - played[active]
        median = float(np.median(difference))
        spread = float(np.median(np.abs(difference - median)))
        if best is None or spread < best[0]:
            best = (spread, float(lag), -median, correlation)
    return LoopResult(most_active, silent_at_every_lag, best, max_correlation)


def _loop_correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or float(a.std()) < 1e-6 or float(b.std()) < 1e-6:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


class LoopEchoGate(EchoGate):
    """The gate with its estimate and prediction as they were (a loop, array snapshots)."""

    def _estimate(self) -> None:
        c = self._config
        if len(self._inbound_t) < c.min_active_silent:
            return
        in_t, in_db = np.asarray(self._inbound_t), np.asarray(self._inbound_db)
        ref_t, ref_db = self._reference.snapshot(in_t[0] - c.max_lag_s - 0.04)
        if ref_t.size < c.min_active_silent:
            return
        found = loop_search(in_t, in_db, ref_t, ref_db, c)
        best = found.best
        if best is not None and best[0] <= c.max_spread_db and best[3] >= c.min_correlation:
            self.state, self.lag_s, self.loss_db = EchoState.ECHO, best[1], best[2]
        elif (
            found.most_active >= c.min_active_silent and found.silent_at_every_lag and self.state is EchoState.UNKNOWN
        ) or (
            found.most_active >= c.min_active_for_none and (best is None or found.max_correlation < c.none_correlation)
        ):
            self.state = EchoState.NONE

    def _predicted_echo_db(self, t: float, duration_s: float) -> float:
        c = self._config
        if self.state is EchoState.ECHO:
            start, end = t - self.lag_s - 0.02, t + duration_s - self.lag_s + 0.02
        else:
            start, end = t - c.max_lag_s, t + duration_s - c.min_lag_s
        times, levels = self._reference.snapshot(start - 0.02)
        inside = (times >= start - 0.02) & (times <= end)
        if not inside.any():
            return SILENT_DB
        return float(levels[inside].max()) - self.loss_db


# --- generated lines -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One call's levels: the agent's playout (20 ms frames) and the inbound VAD windows (32 ms)."""

    played: list[tuple[float, float]]  # (play time, level)
    cuts: dict[int, float]  # before played frame i: StopAudio at this time
    windows: list[tuple[float, float]]  # (start time, level)


def generated_line(seed: int) -> Line:
    rng = random.Random(seed)
    t0 = 1000.0
    seconds = rng.uniform(3.0, 9.0)
    # The agent: talk spurts and pauses, syllable-like level swings.
    played: list[tuple[float, float]] = []
    talking, level = True, -25.0
    for i in range(int(seconds / 0.02)):
        if rng.random() < 0.02:
            talking = not talking
        level = min(-8.0, max(-45.0, level + rng.gauss(0, 4)))
        played.append((t0 + i * 0.02, level if talking else rng.choice((SILENT_DB, -70.0))))
    cuts = {i: played[i][0] for i in range(1, len(played)) if rng.random() < 0.004}
    # The line: echo (or none), noise, a caller who may talk over the agent.
    echo = rng.random() < 0.6
    lag, loss = rng.uniform(-0.15, 0.45), rng.uniform(8, 35)
    noise_db = rng.choice((SILENT_DB, -75.0, -60.0, -50.0))
    caller_from, caller_to = sorted(rng.uniform(0, seconds) for _ in range(2)) if rng.random() < 0.5 else (0, 0)
    times = np.array([t for t, _ in played])
    levels = np.array([v for _, v in played])
    windows: list[tuple[float, float]] = []
    t = t0
    while t < t0 + seconds:
        parts = [noise_db + rng.gauss(0, 2) if noise_db > SILENT_DB else SILENT_DB]
        if echo:
            heard = float(_levels_at(times, levels, np.array([t + WINDOW_S / 2 - lag]))[0])
            if heard > SILENT_DB:
                parts.append(heard - loss + rng.gauss(0, rng.choice((0.5, 2.0, 6.0))))
        if caller_from <= t - t0 < caller_to:
            parts.append(rng.uniform(-35, -10))
        power = sum(10 ** (p / 10) for p in parts if p > SILENT_DB)
        windows.append((t, 10 * np.log10(power) if power > 1e-12 else SILENT_DB))
        # Mostly even windows; sometimes a network burst resets the clock (as the segmenter does).
        t += WINDOW_S if rng.random() > 0.05 else rng.choice((0.0, 0.012, 0.05))
    return Line(played, cuts, windows)


def drive(gate_type: type[EchoGate], line: Line) -> tuple[list[bool], list[EchoState], EchoGate]:
    """Feed the line in time order (playout is known 100 ms ahead, as the player sends it)."""
    reference = EchoReference()
    gate = gate_type(reference)
    decisions, states = [], []
    next_frame = 0
    for start, level in line.windows:
        while next_frame < len(line.played) and line.played[next_frame][0] <= start + 0.1:
            if next_frame in line.cuts:
                reference.cut(line.cuts[next_frame])
            reference.add(*line.played[next_frame])
            next_frame += 1
        decisions.append(gate.explains(start, level, WINDOW_S))
        states.append(gate.state)
    return decisions, states, gate


@pytest.mark.parametrize("seed", range(60))
def test_the_gate_decides_as_the_loop_did(seed: int) -> None:
    line = generated_line(seed)
    loop_decisions, loop_states, loop_gate = drive(LoopEchoGate, line)
    decisions, states, gate = drive(EchoGate, line)
    assert states == loop_states
    assert decisions == loop_decisions
    assert (gate.lag_s, gate.loss_db, gate.suppressed) == (loop_gate.lag_s, loop_gate.loss_db, loop_gate.suppressed)


def test_generated_lines_reach_every_state() -> None:
    """The comparison above means something only if the lines exercise each outcome."""
    reached = {drive(EchoGate, generated_line(seed))[2].state for seed in range(60)}
    assert reached == {EchoState.ECHO, EchoState.NONE, EchoState.UNKNOWN}


@pytest.mark.parametrize("seed", range(40))
def test_every_lag_measures_what_the_loop_measured(seed: int) -> None:
    line = generated_line(seed)
    c = EchoConfig()
    ref_t = np.array([t for t, _ in line.played])
    ref_db = np.array([v for _, v in line.played])
    lags = np.arange(c.min_lag_s, c.max_lag_s + 1e-9, c.lag_step_s)
    windows = np.array(line.windows)
    for end in range(c.min_active_silent, len(windows), 17):  # the last 126 windows, as the gate keeps
        in_t = windows[max(0, end - 126) : end, 0] + WINDOW_S / 2
        in_db = windows[max(0, end - 126) : end, 1]
        expected = loop_search(in_t, in_db, ref_t, ref_db, c)
        found = search_lags(in_t, in_db, ref_t, ref_db, lags, c)
        assert found.most_active == expected.most_active
        assert found.silent_at_every_lag == expected.silent_at_every_lag
        if expected.best is None:
            assert found.best is None
            continue
        assert found.best is not None
        spread, lag, loss, correlation = expected.best
        assert (found.spread[found.best], float(lags[found.best]), found.loss[found.best]) == (spread, lag, loss)
        assert found.correlation[found.best] == pytest.approx(correlation, abs=1e-12)
        assert found.max_correlation == pytest.approx(expected.max_correlation, abs=1e-12)


def test_no_playout_teaches_nothing() -> None:
    """The line is loud but the agent never spoke: no lag has evidence, the state stays unknown."""
    reference = EchoReference()
    gate = EchoGate(reference)
    for i in range(200):
        reference.add(1000.0 + i * 0.02, SILENT_DB)
    for i in range(100):
        gate.explains(1000.0 + i * WINDOW_S, -30.0, WINDOW_S)
    assert gate.state is EchoState.UNKNOWN


def test_the_loudest_frame_is_found_without_arrays() -> None:
    reference = EchoReference()
    for i, level in enumerate((-30.0, -10.0, -20.0, -40.0)):
        reference.add(1.0 + i * 0.02, level)
    assert reference.loudest(1.0, 1.06) == -10.0
    assert reference.loudest(1.03, 1.06) == -20.0
    assert reference.loudest(1.07, 2.0) is None
    assert reference.loudest(0.0, 0.5) is None


def test_the_reference_ring_keeps_the_newest_frames_through_wraps_and_cuts() -> None:
    """Against a plain list: adds past the horizon, StopAudio cuts, reads from any time."""
    rng = random.Random(7)
    reference = EchoReference(horizon_frames=50)
    model: list[tuple[float, float]] = []
    t = 0.0
    for _ in range(2000):
        if rng.random() < 0.03:
            at = t - rng.uniform(0, 0.3)
            reference.cut(at)
            while model and model[-1][0] >= at:
                model.pop()
            t = max(at, model[-1][0] + 0.02 if model else at)
        t += 0.02
        level = rng.uniform(-60, -10)
        reference.add(t, level)
        model = [*model, (t, level)][-50:]
        since = t - rng.uniform(-0.1, 1.5)
        times, levels = reference.snapshot(since)
        kept = [frame for frame in model if frame[0] >= since]
        assert list(zip(times.tolist(), levels.tolist(), strict=True)) == kept
        end = since + rng.uniform(0, 0.5)
        inside = [level for play_t, level in kept if play_t <= end]
        assert reference.loudest(since, end) == (max(inside) if inside else None)
