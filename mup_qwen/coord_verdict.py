"""Coordinate-check verdict: slopes of activation scale against width, and their bounds.

`fit_slopes` fits log(l1) against log(width) per module type, step and seed, and `judge`
decides whether each module type stays width-independent under μP.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# Module types in forward order. q_norm and k_norm exist in Qwen3 only.
MODULE_TYPES = (
    "embed_tokens", "input_layernorm", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_logits",
    "o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj", "final_norm", "lm_head",
)

# Bounds on the seed-mean slope of log(l1) against log(width), at every step: (lowest, highest).
# They were measured with Adam at log2 LR -7 on the embedded Shakespeare corpus, Qwen2 with 2
# layers, on CPU. Widths 64/128/256 ran 10 steps with batches of 8 x 128 tokens, widths 32/64/128
# ran 6 steps with 8 x 64. Each number below is over all 220 3-seed subsets of 12 seeds:
# - correct μP: highest slope 0.31 (99th percentile 0.27), lowest -0.38 (1st percentile -0.33).
#   Both come from o_proj and down_proj at steps 2 and 3, where one seed's slope has a standard
#   deviation of up to 0.25 across seeds.
# - SP, and μP with N(0, σ) hidden init or with no readout division: 0.48 or more at step 1 on
#   the hidden matrices or lm_head. torch Adam in place of MuAdam: 0.3 to 0.9 at step 2.
DEFAULT_BOUNDS = (-0.4, 0.35)
SLOPE_BOUNDS = {
    # μP logits at the init fall like width^-1/2 (constant-std readout init × 1/width_mult), then
    # level off once updates dominate. A readout init that also shrinks (σ/√m) measured -1.01.
    "lm_head": (-0.75, 0.35),
    # Attention logits may shrink: at step 1 under head_scaling fixed_heads (attn_mult / head_dim
    # with a growing head_dim gives -0.5), and over training (-0.15 at widths 64 to 256 and -0.39
    # at 32 to 128, mean of 12 seeds). Under correct μP no 3-seed mean rose above 0.075.
    # NOTE: 1/√head_dim under fixed_heads shifts every step's slope by +0.5, but from -0.5 at
    # step 1, so it stays below 0.25 over the first 10 steps at widths 32 to 128. Only this tight
    # upper bound catches it there.
    "attn_logits": (-1.0, 0.1),
}


def _slope(widths: np.ndarray, values: np.ndarray) -> float:
    """Return the least-squares slope of log(values) against log(widths), or 0 when all values are 0."""
    if np.all(values == 0):
        return 0.0  # a zero-initialised module (query_zero_init) is exactly flat at step 1
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        return math.nan
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def fit_slopes(frame: pd.DataFrame, statistic: str = "l1") -> pd.DataFrame:
    """Return the slope of log(statistic) against log(width) per module type, step and seed.

    A module type's value at one width is the mean over its layers.
    """
    selected = frame[frame["statistic"] == statistic]
    per_width = selected.groupby(["module_type", "step", "seed", "width"], sort=False)["value"].mean().reset_index()
    rows = []
    for (kind, step, seed), group in per_width.groupby(["module_type", "step", "seed"], sort=False):
        group = group.sort_values("width")
        slope = _slope(group["width"].to_numpy(float), group["value"].to_numpy(float))
        rows.append((kind, step, seed, slope))
    return pd.DataFrame(rows, columns=["module_type", "step", "seed", "slope"])


def slope_bounds(kind: str) -> tuple[float, float]:
    """Return the (lowest, highest) seed-mean slope a module type may have at any step and still pass."""
    return SLOPE_BOUNDS.get(kind, DEFAULT_BOUNDS)


def summarize_slopes(slopes: pd.DataFrame) -> pd.DataFrame:
    """Return per module type the step with the highest and the step with the lowest seed-mean slope.

    Columns: module_type, slope, std (over seeds at that step), step, min_slope, min_step, passed.
    A module type passes when every step's mean slope lies within `slope_bounds`. A NaN slope,
    from a non-finite or zero activation at some width, fails.
    """
    per_step = slopes.groupby(["module_type", "step"], sort=False)["slope"].agg(["mean", "std"]).reset_index()
    per_step["std"] = per_step["std"].fillna(0.0)
    rows = []
    for kind, group in per_step.groupby("module_type", sort=False):
        lowest, highest = slope_bounds(kind)
        has_nan = bool(group["mean"].isna().any())
        top = group.loc[group["mean"].idxmax()] if not group["mean"].isna().all() else group.iloc[-1]
        bottom = group.loc[group["mean"].idxmin()] if not group["mean"].isna().all() else group.iloc[-1]
        passed = not has_nan and top["mean"] <= highest and bottom["mean"] >= lowest
        rows.append((kind, top["mean"], top["std"], int(top["step"]), bottom["mean"], int(bottom["step"]), passed))
    return pd.DataFrame(rows, columns=["module_type", "slope", "std", "step", "min_slope", "min_step", "passed"])


def judge(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return the verdict table: per module type, the μP and SP slope summaries side by side.

    `frames` maps "mup" and/or "sp" to `coord_run` records. The columns of each parametrization
    are prefixed with its name (`mup_slope`, `sp_passed`, ...). `lowest` and `highest` are the bounds.
    """
    table = None
    for parametrization, frame in frames.items():
        summary = summarize_slopes(fit_slopes(frame))
        summary = summary.rename(columns={c: f"{parametrization}_{c}" for c in summary.columns if c != "module_type"})
        table = summary if table is None else table.merge(summary, on="module_type", how="outer")
    order = {name: i for i, name in enumerate(MODULE_TYPES)}
    table = table.sort_values("module_type", key=lambda names: names.map(order)).reset_index(drop=True)
    bounds = [slope_bounds(kind) for kind in table["module_type"]]
    table["lowest"] = [low for low, _ in bounds]
    table["highest"] = [high for _, high in bounds]
    return table
