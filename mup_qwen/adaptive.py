"""Adaptive LR search: a coarse log2 LR grid, then successive halving of the bracket around its best point.

The search is a pure function of the losses known so far (`search_step`), so a rerun replays it from
the sweep CSVs and runs only the trials still missing. Each halving evaluates the two quarter points of
the bracket [best - h, best + h] and keeps the half centred on the lowest of the three points. A unimodal
loss curve then has its minimum within `tolerance` octaves of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from mup_qwen.settings import MupQwenError, Settings
from mup_qwen.sweep import TrialKey, latest_rows, read_trials, round_log2_lr, run_trials


@dataclass
class SearchState:
    """The state of one search after replaying the known losses.

    `status` is "running" (evaluate `needed` next), "done" (the minimum lies within `half_width`
    of `best`), "edge" (the best coarse point is an end of the range, so the minimum may lie
    outside it) or "none" (every coarse point diverged or failed).
    """

    status: str
    needed: list[float] = field(default_factory=list)
    best: float = math.nan
    half_width: float = math.nan


def coarse_grid(log2_lr_min: float, log2_lr_max: float, coarse_step: float) -> list[float]:
    """Return evenly spaced points from min to max, at most `coarse_step` octaves apart."""
    if log2_lr_max <= log2_lr_min:
        return [round_log2_lr(log2_lr_min)]
    count = math.ceil((log2_lr_max - log2_lr_min) / coarse_step - 1e-9) + 1
    return [round_log2_lr(x) for x in np.linspace(log2_lr_min, log2_lr_max, count)]


def _loss(losses: Mapping[float, float], x: float) -> float:
    value = losses[x]
    return value if math.isfinite(value) else math.inf


def search_step(losses: Mapping[float, float], log2_lr_min: float, log2_lr_max: float,
                coarse_step: float = 2.0, tolerance: float = 0.25) -> SearchState:
    """Replay the search on `losses` (log2 LR → loss, inf for a diverged trial) and return what it needs next."""
    if coarse_step <= 0 or tolerance <= 0:
        raise MupQwenError(f"coarse_step is {coarse_step} and tolerance is {tolerance}; both must be positive octaves.")
    grid = coarse_grid(log2_lr_min, log2_lr_max, coarse_step)
    missing = [x for x in grid if x not in losses]
    if missing:
        return SearchState("running", needed=missing)

    values = [_loss(losses, x) for x in grid]
    index = int(np.argmin(values))
    best = grid[index]
    if not math.isfinite(values[index]):
        return SearchState("none")
    if len(grid) == 1:
        return SearchState("edge", best=best, half_width=0.0)
    half_width = grid[1] - grid[0]
    if index == 0 or index == len(grid) - 1:
        return SearchState("edge", best=best, half_width=half_width)

    # Invariant: the loss at `best` is at most the loss at best ± half_width.
    # NOTE: the bracket contains the true minimum only for a unimodal curve. Near a flat optimum, seed noise
    # can exceed the loss differences between points `tolerance` apart, and the search then keeps the best noisy point.
    while half_width > tolerance + 1e-9:
        quarter = half_width / 2
        left, right = round_log2_lr(best - quarter), round_log2_lr(best + quarter)
        missing = [x for x in (left, right) if x not in losses]
        if missing:
            return SearchState("running", needed=missing, best=best, half_width=half_width)
        # Ties keep the centre, so the bracket never moves on equal losses.
        candidates = [(_loss(losses, best), 0, best), (_loss(losses, left), 1, left), (_loss(losses, right), 2, right)]
        best = min(candidates)[2]
        half_width = quarter
    return SearchState("done", best=best, half_width=half_width)


def max_evaluations(log2_lr_min: float, log2_lr_max: float, coarse_step: float = 2.0, tolerance: float = 0.25) -> int:
    """Return the most points one search evaluates: the coarse grid plus two per halving."""
    grid = coarse_grid(log2_lr_min, log2_lr_max, coarse_step)
    if len(grid) < 3:
        return len(grid)
    half_width, halvings = grid[1] - grid[0], 0
    while half_width > tolerance + 1e-9:
        half_width /= 2
        halvings += 1
    return len(grid) + 2 * halvings


def minimize(objective: Callable[[float], float], log2_lr_min: float, log2_lr_max: float,
             coarse_step: float = 2.0, tolerance: float = 0.25) -> tuple[SearchState, dict[float, float]]:
    """Run the search on a function of log2 LR, one point at a time, and return the final state and every evaluation."""
    losses: dict[float, float] = {}
    while True:
        state = search_step(losses, log2_lr_min, log2_lr_max, coarse_step, tolerance)
        if state.status != "running":
            return state, losses
        for x in state.needed:
            losses[x] = objective(x)


# ---------------------------------------------------------------------------
# Searching with sweep trials


def point_losses(trials: pd.DataFrame, seeds: Iterable[int], attempted: set[TrialKey]) -> dict[float, float]:
    """Return log2 LR → validation loss (the mean over `seeds`, inf if any diverged) of one (parametrization, width).

    An LR counts as known once every seed has a finished row. A failed trial counts as inf only once
    it was attempted in this run, so each run retries earlier failures once.
    """
    seeds = list(seeds)
    losses = {}
    for log2_lr, group in trials.groupby("log2_lr"):
        values = []
        for seed in seeds:
            rows = group[group["seed"] == seed]
            row = rows.iloc[-1] if len(rows) else None
            key = TrialKey(str(group["parametrization"].iloc[0]), int(group["width"].iloc[0]), float(log2_lr), seed)
            if row is not None and row["error"] == "":
                finite = not row["diverged"] and math.isfinite(row["val_loss"])
                values.append(float(row["val_loss"]) if finite else math.inf)
            elif key in attempted:
                values.append(math.inf)
            else:
                break
        if len(values) == len(seeds):
            losses[float(log2_lr)] = float(np.mean(values))
    return losses


def run_adaptive(settings: Settings, parametrizations: Iterable[str], executor_options: Optional[dict] = None, *,
                 coarse_step: float = 2.0, tolerance: float = 0.25, progress: bool = True,
                 trial_function: Optional[Callable] = None) -> dict[tuple[str, int], SearchState]:
    """Search the optimal log2 LR of every (parametrization, width) in rounds, all searches advancing together.

    Each round collects the points every unfinished search needs and runs them as one batch of
    trials through `run_trials`, so an executor can run them in parallel. Returns each search's final state.
    """
    sweep, results_dir = settings.sweep, Path(settings.run.results_dir)
    searches = [(p, w) for w in settings.model.widths for p in parametrizations]
    attempted: set[TrialKey] = set()
    per_search = max_evaluations(sweep.log2_lr_min, sweep.log2_lr_max, coarse_step, tolerance)
    bar = tqdm(total=per_search * len(searches) * len(sweep.seeds), desc="adaptive LR search", unit="trial",
               position=0, disable=not progress)
    kwargs = {} if trial_function is None else {"trial_function": trial_function}

    try:
        while True:
            trials = latest_rows(read_trials(results_dir, parametrizations))
            states, keys = {}, []
            for parametrization, width in searches:
                subset = trials[(trials["parametrization"] == parametrization) & (trials["width"] == width)]
                losses = point_losses(subset, sweep.seeds, attempted)
                state = search_step(losses, sweep.log2_lr_min, sweep.log2_lr_max, coarse_step, tolerance)
                states[(parametrization, width)] = state
                keys += [TrialKey(parametrization, width, x, seed) for x in state.needed for seed in sweep.seeds]
            if not keys:
                bar.total = bar.n
                return states
            bar.total = max(bar.total, bar.n + len(keys))
            run_trials(settings, keys, executor_options, bar=bar, progress=progress, **kwargs)
            attempted.update(keys)
    finally:
        bar.close()


def format_searches(states: Mapping[tuple[str, int], SearchState]) -> str:
    """Return one line per search: its status, best log2 LR and bracket half-width."""
    lines = []
    for (parametrization, width), state in states.items():
        if state.status == "done":
            detail = f"best log2_lr {state.best:g}, minimum within ±{state.half_width:g} octave"
        elif state.status == "edge":
            detail = (f"best log2_lr {state.best:g} is an end of the range. Widen it with --log2-lr-min "
                      "and --log2-lr-max (sweep.log2_lr_min, sweep.log2_lr_max)")
        else:
            detail = "no finite loss, because every coarse point diverged or failed"
        lines.append(f"{parametrization} width {width}: {state.status}, {detail}")
    return "\n".join(lines)
