"""The optimum finder on loss curves with known minima, and the per-width summary and drift."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mup_qwen.optimum import drift, find_optimum, format_summary, summarize


def parabola(minimum: float, curvature: float = 0.1, floor: float = 2.0):
    return lambda x: floor + curvature * (np.asarray(x) - minimum) ** 2


@pytest.mark.parametrize("minimum", [-9.3, -8.0, -7.55])
def test_parabola_fit_is_exact(minimum):
    x = np.arange(-12.0, -4.0 + 0.5, 1.0)
    optimum = find_optimum(x, parabola(minimum)(x))

    assert optimum.status == "fit"
    assert optimum.fit_log2_lr == pytest.approx(minimum, abs=1e-9)
    assert optimum.fit_val_loss == pytest.approx(2.0, abs=1e-9)
    assert optimum.argmin_log2_lr == float(np.round(minimum))
    assert optimum.log2_lr == optimum.fit_log2_lr


def test_fit_ignores_points_far_from_argmin():
    x = np.arange(-16.0, 0.5, 2.0)
    y = parabola(-7.2)(x)
    y[x < -10] += 5.0  # far from the minimum the curve is not a parabola
    optimum = find_optimum(x, y)
    assert optimum.status == "fit"
    assert optimum.fit_log2_lr == pytest.approx(-7.2, abs=1e-9)


def test_unsorted_input_with_diverged_points():
    x = np.array([-4.0, -10.0, -6.0, -8.0, -12.0, -2.0])
    y = parabola(-7.7)(x)
    y[x == -2.0] = math.inf
    y[x == -4.0] = math.nan
    optimum = find_optimum(x, y)
    assert optimum.status == "fit"
    assert optimum.fit_log2_lr == pytest.approx(-7.7, abs=1e-9)


@pytest.mark.parametrize("minimum, edge", [(-15.0, -12.0), (-3.0, -6.0)])
def test_argmin_at_grid_edge(minimum, edge):
    x = np.arange(-12.0, -5.5, 1.0)
    optimum = find_optimum(x, parabola(minimum)(x))

    assert optimum.status == "edge"
    assert optimum.argmin_log2_lr == edge
    assert optimum.log2_lr == edge
    assert math.isnan(optimum.fit_log2_lr)


def test_diverged_neighbour_gives_argmin_only():
    x = np.arange(-12.0, -5.5, 1.0)
    y = parabola(-6.8)(x)
    y[x == -6.0] = math.inf
    optimum = find_optimum(x, y)
    assert optimum.status == "argmin"
    assert optimum.log2_lr == -7.0


def test_all_diverged():
    optimum = find_optimum([-8.0, -7.0, -6.0], [math.inf, math.nan, math.inf])
    assert optimum.status == "none"
    assert math.isnan(optimum.log2_lr)


def synthetic_trials(minima: dict[tuple[str, int], float], seeds=(0, 1)) -> pd.DataFrame:
    """Return sweep rows whose loss per seed is a parabola in log2 LR, with seed noise that averages out."""
    rows = []
    for (parametrization, width), minimum in minima.items():
        for x in np.arange(-12.0, -5.5, 1.0):
            for seed in seeds:
                noise = 0.01 if seed == 0 else -0.01
                rows.append({"parametrization": parametrization, "width": width, "log2_lr": x, "lr": 2.0**x,
                             "seed": seed, "steps": 100, "steps_done": 100, "final_train_loss": 2.5,
                             "val_loss": float(parabola(minimum)(x)) + noise, "diverged": False, "seconds": 1.0,
                             "error": ""})
    return pd.DataFrame(rows)


def test_summary_and_drift():
    minima = {("mup", 64): -8.6, ("mup", 128): -8.8, ("mup", 256): -8.9,
              ("sp", 64): -8.4, ("sp", 128): -9.4, ("sp", 256): -10.4}
    trials = synthetic_trials(minima)
    summary = summarize(trials)

    assert len(summary) == 6
    for (parametrization, width), minimum in minima.items():
        row = summary[(summary["parametrization"] == parametrization) & (summary["width"] == width)].iloc[0]
        assert row["status"] == "fit"
        assert row["optimum_log2_lr"] == pytest.approx(minimum, abs=1e-9)
        assert row["num_trials"] == 14
        assert row["num_lrs"] == 7
    assert drift(summary, "mup")[0] == pytest.approx(0.3, abs=1e-9)
    assert drift(summary, "sp")[0] == pytest.approx(2.0, abs=1e-9)
    assert set(summary["drift_octaves"].round(6)) == {0.3, 2.0}
    assert "SP drift of the optimum across widths: 2.00 octaves" in format_summary(summary)


def test_summary_with_failures_diverged_seed_and_edge():
    trials = synthetic_trials({("sp", 64): -8.0, ("sp", 128): -13.0})
    # A diverged seed makes that LR count as diverged; a failed row followed by a rerun is replaced.
    diverged = (trials["width"] == 64) & (trials["log2_lr"] == -7.0) & (trials["seed"] == 1)
    trials.loc[diverged, ["val_loss", "diverged"]] = [math.nan, True]
    failed = trials[(trials["width"] == 64) & (trials["log2_lr"] == -9.0) & (trials["seed"] == 0)].copy()
    failed[["val_loss", "error"]] = [math.nan, "RuntimeError: worker died"]
    trials = pd.concat([failed, trials], ignore_index=True)

    summary = summarize(trials, parametrizations=["sp"])
    narrow = summary[summary["width"] == 64].iloc[0]
    assert narrow["status"] == "argmin"  # the LR above the argmin diverged
    assert narrow["optimum_log2_lr"] == -8.0
    assert narrow["num_diverged"] == 1
    assert narrow["num_failed"] == 0
    assert narrow["num_trials"] == 14

    value, edge_widths = drift(summary, "sp")
    assert edge_widths == [128]
    assert value == pytest.approx(4.0)
    assert "at least" in format_summary(summary)


def test_summary_restricts_widths_and_seeds():
    trials = synthetic_trials({("mup", 64): -8.0, ("mup", 128): -9.0}, seeds=(0, 1, 2))
    summary = summarize(trials, widths=[128], seeds=[0, 1], parametrizations=["mup"])
    assert summary["width"].tolist() == [128]
    assert summary["num_trials"].tolist() == [14]


def test_plot_panels_fill_figure(tmp_path):
    from mup_qwen.sweep_plot import plot_lr_sweep

    trials = synthetic_trials({("mup", 64): -8.0, ("mup", 128): -8.2, ("sp", 64): -8.0, ("sp", 128): -9.0})
    figure = plot_lr_sweep(trials, summarize(trials), tmp_path / "sweep.png")

    assert (tmp_path / "sweep.png").stat().st_size > 0
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["μP: optimum drift 0.20 octaves", "SP: optimum drift 1.00 octaves"]
    for ax in figure.axes:
        assert ax.get_position().width > 0.3
