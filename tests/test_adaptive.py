"""Adaptive LR search on loss curves with known minima, its replay from known losses, and its seed averaging."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mup_qwen.adaptive import coarse_grid, max_evaluations, minimize, point_losses, search_step
from mup_qwen.sweep import TrialKey

LOW, HIGH = -16.0, 0.0
# A grid that resolves 0.25 octave over the reference range -16..0 has 65 points.
FINE_GRID_POINTS = 65


def lopsided_curve(minimum: float, diverge_above: float = -2.0):
    """Return a loss curve shaped like a real sweep: steep towards small LRs, diverged (inf) above a point."""
    def loss(log2_lr: float) -> float:
        if log2_lr > diverge_above:
            return math.inf
        d = log2_lr - minimum
        return 2.0 + 0.05 * d**2 + (0.02 * d**4 if d < 0 else 0.0)

    return loss


def test_coarse_grid_spacing():
    assert coarse_grid(-16, 0, 2) == [-16.0, -14.0, -12.0, -10.0, -8.0, -6.0, -4.0, -2.0, 0.0]
    grid = coarse_grid(-12, -7, 2)
    assert len(grid) == 4
    assert np.allclose(np.diff(grid), 5 / 3)


@pytest.mark.parametrize("minimum", [-13.6, -11.25, -9.9, -8.4, -7.0, -5.3, -3.1])
def test_parabola_minimum_within_tolerance(minimum):
    state, evaluations = minimize(lambda x: (x - minimum) ** 2, LOW, HIGH)

    assert state.status == "done"
    assert abs(state.best - minimum) <= 0.25
    assert state.half_width == 0.25
    assert len(evaluations) <= max_evaluations(LOW, HIGH)
    assert len(evaluations) * 4 <= FINE_GRID_POINTS


@pytest.mark.parametrize("minimum", np.arange(-14.5, -3.0, 0.37).round(2).tolist())
def test_lopsided_curve_with_divergence(minimum):
    state, evaluations = minimize(lopsided_curve(minimum), LOW, HIGH)

    assert state.status == "done"
    assert abs(state.best - minimum) <= 0.25
    assert len(evaluations) == 15


def test_minimum_at_range_edge_is_reported():
    state, evaluations = minimize(lambda x: -x, LOW, HIGH)
    assert state.status == "edge"
    assert state.best == HIGH
    assert sorted(evaluations) == coarse_grid(LOW, HIGH, 2.0)

    state, _ = minimize(lambda x: x, LOW, HIGH)
    assert state.status == "edge"
    assert state.best == LOW


def test_all_diverged_gives_none():
    state, evaluations = minimize(lambda x: math.inf, LOW, HIGH)
    assert state.status == "none"
    assert len(evaluations) == len(coarse_grid(LOW, HIGH, 2.0))


def test_finer_tolerance_and_coarser_grid():
    state, evaluations = minimize(lambda x: (x + 6.3) ** 2, LOW, HIGH, coarse_step=4.0, tolerance=0.125)
    assert state.status == "done"
    assert abs(state.best + 6.3) <= 0.125
    assert len(evaluations) == 5 + 2 * 5


def test_replay_asks_only_for_missing_points():
    curve = lopsided_curve(-8.4)
    _, evaluations = minimize(curve, LOW, HIGH)

    # With every evaluation known, the replay is finished and agrees with the original run.
    assert search_step(evaluations, LOW, HIGH).status == "done"

    # With a finer grid already run (as an earlier sweep in the same CSV would be), the
    # search needs none of those points again.
    known = {x: curve(x) for x in np.arange(LOW, HIGH + 0.5, 1.0)}
    needed = []
    while (state := search_step(known, LOW, HIGH)).status == "running":
        needed += state.needed
        known.update({x: curve(x) for x in state.needed})
    assert abs(state.best + 8.4) <= 0.25
    assert len(needed) == 4
    assert all(x % 1.0 != 0 for x in needed)


def test_point_losses_average_seeds_and_count_failures():
    rows = [
        # log2_lr, seed, val_loss, diverged, error
        (-8.0, 0, 2.0, False, ""),
        (-8.0, 1, 2.2, False, ""),
        (-6.0, 0, 2.5, False, ""),
        (-6.0, 1, math.nan, True, ""),
        (-4.0, 0, 3.0, False, ""),
        (-2.0, 0, math.nan, False, "RuntimeError: worker died"),
        (-2.0, 1, math.nan, False, "RuntimeError: worker died"),
    ]
    trials = pd.DataFrame(
        [{"parametrization": "mup", "width": 64, "log2_lr": x, "seed": s, "val_loss": v, "diverged": d, "error": e}
         for x, s, v, d, e in rows])

    losses = point_losses(trials, seeds=[0, 1], attempted=set())
    assert losses[-8.0] == pytest.approx(2.1)
    assert losses[-6.0] == math.inf
    assert -4.0 not in losses  # seed 1 is missing
    assert -2.0 not in losses  # failed, not yet retried in this run

    attempted = {TrialKey("mup", 64, -2.0, 0), TrialKey("mup", 64, -2.0, 1)}
    assert point_losses(trials, seeds=[0, 1], attempted=attempted)[-2.0] == math.inf
