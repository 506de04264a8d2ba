"""The loss-minimising log2 LR of each width, and how far it drifts across widths.

Per (parametrization, width) the optimum is the argmin of the validation loss averaged over seeds,
refined by a quadratic fit of loss against log2 LR over 3 to 5 points around it. An argmin at
either end of the LRs tried is reported as "edge": the true optimum may lie outside them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from mup_qwen.sweep import latest_rows

# The quadratic fit uses up to this many points on each side of the argmin (so 3 to 5 points in all),
# and only points within FIT_RADIUS_OCTAVES of it. A parabola describes the curve only near its minimum,
# because the loss rises much more steeply towards small LRs than towards large ones.
FIT_SIDE_POINTS = 2
FIT_RADIUS_OCTAVES = 2.0


@dataclass
class Optimum:
    """The lowest point of the loss-vs-log2 LR curve of one (parametrization, width).

    `status` is one of:
    - "fit": a quadratic fit around the argmin gave `fit_log2_lr`;
    - "argmin": no fit, because one side of the argmin has no finite point within FIT_RADIUS_OCTAVES,
      or the fitted parabola has no minimum inside its points;
    - "edge": the argmin is the smallest or largest LR tried;
    - "none": every trial diverged or failed.
    """

    argmin_log2_lr: float = math.nan
    argmin_val_loss: float = math.nan
    fit_log2_lr: float = math.nan
    fit_val_loss: float = math.nan
    status: str = "none"

    @property
    def log2_lr(self) -> float:
        """The reported optimum: the fitted one where the fit succeeded, else the argmin."""
        return self.fit_log2_lr if self.status == "fit" else self.argmin_log2_lr


def find_optimum(log2_lrs: Iterable[float], losses: Iterable[float]) -> Optimum:
    """Return the optimum of a loss curve. A non-finite loss (a diverged trial) counts as worse than any other."""
    x = np.asarray(list(log2_lrs), dtype=float)
    y = np.asarray(list(losses), dtype=float)
    order = np.argsort(x)
    x, y = x[order], np.where(np.isfinite(y[order]), y[order], np.inf)
    if not np.isfinite(y).any():
        return Optimum()

    best = int(np.argmin(y))
    optimum = Optimum(argmin_log2_lr=float(x[best]), argmin_val_loss=float(y[best]), status="argmin")
    if best == 0 or best == len(x) - 1:
        optimum.status = "edge"
        return optimum

    # A diverged LR, or one farther than FIT_RADIUS_OCTAVES, ends the window on its side.
    def usable(i: int) -> bool:
        return bool(np.isfinite(y[i])) and abs(x[i] - x[best]) <= FIT_RADIUS_OCTAVES + 1e-9

    low = best
    while low > 0 and best - low < FIT_SIDE_POINTS and usable(low - 1):
        low -= 1
    high = best
    while high < len(x) - 1 and high - best < FIT_SIDE_POINTS and usable(high + 1):
        high += 1
    if low == best or high == best:
        return optimum

    a, b, c = np.polyfit(x[low:high + 1], y[low:high + 1], 2)
    if a <= 0:
        return optimum
    vertex = -b / (2 * a)
    if not x[low] <= vertex <= x[high]:
        return optimum
    optimum.fit_log2_lr = float(vertex)
    optimum.fit_val_loss = float(np.polyval([a, b, c], vertex))
    optimum.status = "fit"
    return optimum


def loss_curve(trials: pd.DataFrame) -> pd.DataFrame:
    """Return validation loss against log2 LR for the trials of one (parametrization, width).

    Columns: log2_lr, val_loss (the mean over seeds, or inf when any seed diverged), seeds, diverged.
    Failed trials (error set) are left out.
    """
    finished = trials[trials["error"] == ""]
    loss = np.where(finished["diverged"] | ~np.isfinite(finished["val_loss"]), np.inf, finished["val_loss"])
    grouped = finished.assign(loss=loss).groupby("log2_lr", sort=True)
    return pd.DataFrame({
        "val_loss": grouped["loss"].mean(),
        "seeds": grouped["seed"].nunique(),
        "diverged": grouped["diverged"].any(),
    }).reset_index()


def summarize(trials: pd.DataFrame, widths: Optional[Iterable[int]] = None, seeds: Optional[Iterable[int]] = None,
              parametrizations: Iterable[str] = ("mup", "sp")) -> pd.DataFrame:
    """Return one row per (parametrization, width): the optimum, its status, trial counts and compute spent.

    `widths` and `seeds` restrict the rows used (default: all in `trials`). Every LR present is used,
    whether it came from the grid or the adaptive search. `drift_octaves` is the drift of the
    parametrization (`drift`), repeated on each of its rows.
    """
    trials = latest_rows(trials)
    if seeds is not None:
        trials = trials[trials["seed"].isin(list(seeds))]
    if widths is not None:
        trials = trials[trials["width"].isin(list(widths))]

    rows = []
    for parametrization in parametrizations:
        subset = trials[trials["parametrization"] == parametrization]
        for width in sorted(subset["width"].unique()):
            group = subset[subset["width"] == width]
            curve = loss_curve(group)
            optimum = find_optimum(curve["log2_lr"], curve["val_loss"])
            rows.append({"parametrization": parametrization, "width": int(width),
                         "optimum_log2_lr": optimum.log2_lr, **asdict(optimum),
                         "num_lrs": len(curve), "num_trials": len(group),
                         "num_diverged": int(group["diverged"].sum()),
                         "num_failed": int((group["error"] != "").sum()),
                         "steps_done": int(group["steps_done"].sum()),
                         "seconds": round(float(group["seconds"].sum()), 3)})
    columns = ["parametrization", "width", "optimum_log2_lr", "status", "argmin_log2_lr", "argmin_val_loss",
               "fit_log2_lr", "fit_val_loss", "num_lrs", "num_trials", "num_diverged", "num_failed",
               "steps_done", "seconds"]
    summary = pd.DataFrame(rows, columns=columns)
    drifts = {parametrization: drift(summary, parametrization)[0] for parametrization in parametrizations}
    summary["drift_octaves"] = summary["parametrization"].map(drifts)
    return summary


def drift(summary: pd.DataFrame, parametrization: str) -> tuple[float, list[int]]:
    """Return the drift of the optimum across widths in octaves (max - min), and the widths at the grid edge.

    With any width at the edge, its true optimum lies beyond the LRs tried and the drift is a lower bound.
    """
    rows = summary[(summary["parametrization"] == parametrization) & (summary["status"] != "none")]
    if len(rows) == 0:
        return math.nan, []
    edge_widths = [int(w) for w in rows.loc[rows["status"] == "edge", "width"]]
    return float(rows["optimum_log2_lr"].max() - rows["optimum_log2_lr"].min()), edge_widths


def format_summary(summary: pd.DataFrame) -> str:
    """Return the optimum table and one drift line per parametrization, as plain text."""
    table = summary[["parametrization", "width", "optimum_log2_lr", "status", "argmin_log2_lr", "argmin_val_loss",
                     "fit_log2_lr", "num_lrs", "num_trials", "num_diverged", "num_failed"]]
    lines = [table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), ""]
    for parametrization in dict.fromkeys(summary["parametrization"]):
        value, edge_widths = drift(summary, parametrization)
        name = {"mup": "μP", "sp": "SP"}.get(parametrization, parametrization)
        if math.isnan(value):
            lines.append(f"{name}: no width has a finite optimum, because every trial diverged or failed")
            continue
        line = f"{name} drift of the optimum across widths: {value:.2f} octaves"
        if edge_widths:
            line += (f" (at least: widths {', '.join(map(str, edge_widths))} have their argmin at the edge of the "
                     "LRs tried; widen sweep.log2_lr_min/max)")
        lines.append(line)
    return "\n".join(lines)
