"""Plots of the LR sweep: validation loss against log2 LR, one line per width, μP and SP side by side.

The functions build a matplotlib `Figure` without pyplot, so scripts and notebooks draw the same
figure from the same CSVs and no global figure state is kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from mup_qwen.optimum import drift, loss_curve
from mup_qwen.sweep import latest_rows

TITLES = {"mup": "μP", "sp": "SP"}
# The y axis shows this many nats above the lowest loss, so the region around the optima stays readable
# next to the losses of tiny LRs (about ln 256 ≈ 5.5 nats for bytes).
Y_RANGE_NATS = 1.5


def width_colors(widths: Iterable[int]) -> dict[int, tuple]:
    widths = sorted(set(int(w) for w in widths))
    cmap = colormaps["viridis"]
    return {w: cmap(i / max(1, len(widths) - 1) * 0.85) for i, w in enumerate(widths)}


def plot_panel(ax, trials: pd.DataFrame, summary: pd.DataFrame, parametrization: str, colors: dict[int, tuple],
               y_top: float) -> None:
    """Draw one parametrization's loss curves on `ax`: diverged LRs as crosses at the top, optima as stars."""
    subset = trials[trials["parametrization"] == parametrization]
    for width in sorted(subset["width"].unique()):
        curve = loss_curve(subset[subset["width"] == width])
        finite = curve[np.isfinite(curve["val_loss"])]
        color = colors[int(width)]
        ax.plot(finite["log2_lr"], finite["val_loss"], "o-", ms=3, lw=1.2, color=color, label=f"width {width}")
        diverged = curve[~np.isfinite(curve["val_loss"])]
        if len(diverged):
            # An empty unclipped line would give the constrained layout an invalid bounding box.
            ax.plot(diverged["log2_lr"], [y_top] * len(diverged), "x", color=color, clip_on=False)

        row = summary[(summary["parametrization"] == parametrization) & (summary["width"] == width)]
        if len(row) == 0 or row["status"].iloc[0] == "none":
            continue
        row = row.iloc[0]
        # The star sits on the drawn curve: a fitted parabola's minimum can lie below every measured loss.
        y = np.interp(row["optimum_log2_lr"], finite["log2_lr"], finite["val_loss"])
        # A hollow star marks an optimum that is only an argmin at the edge of the LRs tried.
        face = color if row["status"] != "edge" else "none"
        ax.plot([row["optimum_log2_lr"]], [y], "*", ms=13, color=color, markerfacecolor=face, markeredgecolor="black",
                markeredgewidth=0.7, zorder=5)

    value, edge_widths = drift(summary, parametrization)
    name = TITLES.get(parametrization, parametrization)
    bound = "≥ " if edge_widths else ""
    ax.set_title(f"{name}: optimum drift {bound}{value:.2f} octaves" if math.isfinite(value) else name)
    ax.set_xlabel("log2 learning rate")
    ax.grid(alpha=0.3)


def plot_lr_sweep(trials: pd.DataFrame, summary: pd.DataFrame, path: Optional[str | Path] = None,
                  parametrizations: Iterable[str] = ("mup", "sp")) -> Figure:
    """Return (and write to `path` if given) the figure of validation loss against log2 LR, μP and SP side by side.

    Stars mark each width's optimum (hollow at the edge of the LRs tried); crosses at the top mark diverged LRs.
    """
    trials = latest_rows(trials)
    parametrizations = [p for p in parametrizations if (trials["parametrization"] == p).any()] or list(parametrizations)
    figure = Figure(figsize=(5.5 * len(parametrizations), 4.2), layout="constrained")
    axes = figure.subplots(1, len(parametrizations), sharey=True, squeeze=False)[0]

    finite = trials.loc[(trials["error"] == "") & ~trials["diverged"], "val_loss"]
    finite = finite[np.isfinite(finite)]
    low = float(finite.min()) if len(finite) else 0.0
    high = float(finite.max()) if len(finite) else 1.0
    y_top = min(high, low + Y_RANGE_NATS) + 0.05
    colors = width_colors(trials["width"]) if len(trials) else {}

    for ax, parametrization in zip(axes, parametrizations):
        plot_panel(ax, trials, summary, parametrization, colors, y_top)
        ax.set_ylim(low - 0.05, y_top)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[-1].legend(loc="upper right", fontsize=8)

    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
