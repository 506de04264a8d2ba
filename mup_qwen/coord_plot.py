"""Plots and the verdict table of the coordinate check.

`plot_coord` draws activation size against width, one panel per step. Under μP every line is
flat, and under SP the lines of the hidden matrices rise with width. The functions take the
long-format records and the verdict that `mup_qwen.coord` writes as CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mup_qwen.coord_verdict import MODULE_TYPES

PARAMETRIZATION_NAMES = {"mup": "μP", "sp": "SP"}
VECTOR_OUTPUT_TYPES = ("embed_tokens", "input_layernorm", "q_norm", "k_norm", "post_attention_layernorm", "final_norm")
MAX_PANELS = 10


def line_styles(module_types: Sequence[str]) -> dict[str, dict]:
    """Return a fixed color and line style per module type, the same in every figure.

    Matrix outputs and logits get solid lines in ten distinct colors. Embeddings and norms, whose
    outputs stay flat in width under SP too, get dashed lines.
    """
    palette = plt.get_cmap("tab10").colors
    solid = [name for name in MODULE_TYPES if name not in VECTOR_OUTPUT_TYPES]
    dashed = [name for name in MODULE_TYPES if name in VECTOR_OUTPUT_TYPES]
    styles = {}
    for name in module_types:
        if name in solid:
            styles[name] = dict(color=palette[solid.index(name) % len(palette)], linestyle="-")
        else:
            styles[name] = dict(color=palette[dashed.index(name) % len(palette)], linestyle="--")
    return styles


def plotted_steps(steps: Sequence[int], max_panels: int = MAX_PANELS) -> list[int]:
    """Return the steps to draw: all of them, or `max_panels` spread evenly with the first and last kept."""
    steps = sorted(set(int(step) for step in steps))
    if len(steps) <= max_panels:
        return steps
    picks = np.linspace(0, len(steps) - 1, max_panels).round().astype(int)
    return [steps[i] for i in sorted(set(picks))]


def coord_means(frame: pd.DataFrame, statistic: str = "l1") -> pd.DataFrame:
    """Return one value per module type, step and width: the statistic averaged over layers and seeds."""
    selected = frame[frame["statistic"] == statistic]
    per_seed = selected.groupby(["module_type", "step", "seed", "width"])["value"].mean()
    return per_seed.groupby(["module_type", "step", "width"]).mean().reset_index()


def plot_coord(
    frame: pd.DataFrame,
    title: str = "",
    statistic: str = "l1",
    steps: Optional[Sequence[int]] = None,
    path: Optional[str | Path] = None,
):
    """Draw the coordinate-check grid: one log-log panel per step, width on x, one line per module type.

    All panels share the y-axis, so growth from one step to the next shows as well as growth
    with width. With `path`, the figure is also written there as PNG. Returns the figure.
    """
    means = coord_means(frame, statistic)
    steps = list(steps) if steps is not None else plotted_steps(means["step"].unique())
    kinds = [name for name in MODULE_TYPES if name in set(means["module_type"])]
    styles = line_styles(kinds)
    widths = sorted(means["width"].unique())

    columns = min(5, len(steps))
    rows = int(np.ceil(len(steps) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns + 2.4, 2.7 * rows + 0.6),
                                sharex=True, sharey=True, squeeze=False)
    for ax, step in zip(axes.flat, steps):
        at_step = means[means["step"] == step]
        for kind in kinds:
            line = at_step[at_step["module_type"] == kind].sort_values("width")
            ax.plot(line["width"], line["value"], marker="o", markersize=3, label=kind, **styles[kind])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(widths)
        ax.set_xticklabels([str(w) for w in widths])
        ax.set_title(f"step {step}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(steps):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("width")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean |output|" if statistic == "l1" else f"{statistic} of output")

    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(title or f"coordinate check: {statistic} against width")
    figure.tight_layout(rect=(0, 0, 1 - 2.2 / figure.get_figwidth(), 1))
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def plot_slopes(slopes: dict[str, pd.DataFrame], highest: Optional[float] = None, path: Optional[str | Path] = None):
    """Draw each module type's slope of log(l1) against log(width) over the steps, one panel per parametrization.

    `slopes` maps "mup"/"sp" to `mup_qwen.coord_verdict.fit_slopes` tables, and each line is a seed mean.
    A dashed line marks `highest`, such as the default upper bound of the verdict. Returns the figure.
    """
    figure, axes = plt.subplots(1, len(slopes), figsize=(5.0 * len(slopes) + 2.4, 3.6), sharey=True, squeeze=False)
    for ax, (parametrization, table) in zip(axes.flat, slopes.items()):
        means = table.groupby(["module_type", "step"])["slope"].mean().reset_index()
        kinds = [name for name in MODULE_TYPES if name in set(means["module_type"])]
        styles = line_styles(kinds)
        for kind in kinds:
            line = means[means["module_type"] == kind].sort_values("step")
            ax.plot(line["step"], line["slope"], marker="o", markersize=3, label=kind, **styles[kind])
        ax.axhline(0.0, color="black", linewidth=0.8)
        if highest is not None:
            ax.axhline(highest, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(PARAMETRIZATION_NAMES.get(parametrization, parametrization))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes.flat[0].set_ylabel("slope of log l1 against log width")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1 - 2.2 / figure.get_figwidth(), 1))
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def _format_slope(mean: float, std: float, step: int) -> str:
    if pd.isna(mean):
        return "nan"
    return f"{mean:+.2f} ± {std:.2f} (t={step})"


def format_verdict(verdict: pd.DataFrame) -> str:
    """Return the verdict as a text table: per module type the highest seed-mean slope over steps."""
    has_sp = "sp_slope" in verdict.columns
    header = f"{'module':<26}{'μP slope':<22}{'μP lowest':<18}"
    header += f"{'SP slope':<22}" if has_sp else ""
    header += f"{'bounds':<16}{'μP':<6}" + ("SP" if has_sp else "")
    lines = [header, "-" * len(header)]
    for row in verdict.itertuples():
        line = f"{row.module_type:<26}{_format_slope(row.mup_slope, row.mup_std, row.mup_step):<22}"
        line += f"{row.mup_min_slope:+.2f} (t={row.mup_min_step})".ljust(18)
        if has_sp:
            line += f"{_format_slope(row.sp_slope, row.sp_std, row.sp_step):<22}"
        line += f"[{row.lowest:+.2f}, {row.highest:+.2f}]".ljust(16)
        line += f"{'pass' if row.mup_passed else 'FAIL':<6}"
        if has_sp:
            line += "pass" if row.sp_passed else "fail"
        lines.append(line)
    return "\n".join(lines)
