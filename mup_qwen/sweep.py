"""Learning-rate sweep trials: the task each trial runs, the CSV rows it appends, and resume.

Each parametrization has one CSV in `run.results_dir` (`lr_mup.csv`, `lr_sp.csv`) with one row per
trial, appended and flushed as the trial finishes. A JSON file beside them stores the settings that
change a trial's result, so a rerun with other settings stops instead of mixing incomparable rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from mup_qwen.executor import Task, TaskFailure, run_tasks
from mup_qwen.settings import MupQwenError, Settings, SweepSettings
from mup_qwen.train import TrialResult, train_trial

logger = logging.getLogger("mup_qwen")

COLUMNS = ("parametrization", "width", "log2_lr", "lr", "seed", "steps", "steps_done", "final_train_loss",
           "val_loss", "diverged", "seconds", "error")
SETTINGS_FILE = "lr_sweep_settings.json"
SUMMARY_FILE = "lr_summary.csv"
PLOT_FILE = "lr_sweep.png"
# log2 LR values are rounded to this many decimals everywhere, so a value read back from a CSV
# equals the value that a grid or the adaptive search computes again.
LOG2_LR_DECIMALS = 6


class SweepSettingsError(MupQwenError):
    """Results on disk that were written with other settings than the current ones."""


class TrialKey(NamedTuple):
    """One trial of the sweep: a model at one width and base LR, trained from one seed."""

    parametrization: str
    width: int
    log2_lr: float
    seed: int


def round_log2_lr(log2_lr: float) -> float:
    return round(float(log2_lr), LOG2_LR_DECIMALS)


def csv_path(results_dir: str | Path, parametrization: str) -> Path:
    return Path(results_dir) / f"lr_{parametrization}.csv"


def lr_grid(sweep: SweepSettings) -> list[float]:
    """Return the `sweep.num_lrs` log2 LR values evenly spaced from `log2_lr_min` to `log2_lr_max`."""
    points = np.linspace(sweep.log2_lr_min, sweep.log2_lr_max, sweep.num_lrs)
    return sorted({round_log2_lr(x) for x in points})


def grid_keys(settings: Settings, parametrizations: Iterable[str]) -> list[TrialKey]:
    """Return the trials of the full grid, interleaving widths so the progress bar's rate is representative."""
    return [TrialKey(parametrization, width, log2_lr, seed)
            for seed in settings.sweep.seeds
            for log2_lr in lr_grid(settings.sweep)
            for width in settings.model.widths
            for parametrization in parametrizations]


# ---------------------------------------------------------------------------
# Settings fingerprint


def result_settings(settings: Settings) -> dict[str, Any]:
    """Return the settings that change the result of a trial with a given (parametrization, width, LR, seed).

    Left out: the widths, the LR grid and the seeds (they choose which trials run), the coordinate
    check, and where and how trials run (device, threads, paths). The device does change the last
    digits of a loss, but rows from a CPU and a GPU run are still comparable.
    """
    raw = settings.to_dict()
    model = {name: value for name, value in raw["model"].items() if name != "widths"}
    sweep = {name: raw["sweep"][name] for name in ("steps", "divergence_factor", "log_every")}
    run = {name: raw["run"][name] for name in ("precision", "tf32", "attn_implementation")}
    return {"model": model, "data": raw["data"], "optim": raw["optim"], "sweep": sweep, "run": run}


def fingerprint(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for section in sorted(set(old) | set(new)):
        old_fields, new_fields = old.get(section, {}), new.get(section, {})
        for name in sorted(set(old_fields) | set(new_fields)):
            before, after = old_fields.get(name, "<absent>"), new_fields.get(name, "<absent>")
            if before != after:
                changes.append(f"{section}.{name} was {before!r}, now {after!r}")
    return changes


def sweep_files(results_dir: Path) -> list[Path]:
    names = ["lr_mup.csv", "lr_sp.csv", SETTINGS_FILE, SUMMARY_FILE, PLOT_FILE]
    return [results_dir / name for name in names if (results_dir / name).exists()]


def move_aside(results_dir: Path) -> Optional[Path]:
    """Move the sweep files of `results_dir` into a new `previous-<date>-<time>` folder inside it.

    Nothing is deleted.
    """
    files = sweep_files(results_dir)
    if not files:
        return None
    folder = results_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    suffix = 1
    while folder.exists():
        folder = results_dir / f"{time.strftime('previous-%Y%m%d-%H%M%S')}-{suffix}"
        suffix += 1
    folder.mkdir(parents=True)
    for path in files:
        shutil.move(str(path), str(folder / path.name))
    logger.info("moved %d earlier sweep files to %s", len(files), folder)
    return folder


def prepare_results_dir(settings: Settings, fresh: bool = False) -> Path:
    """Create the results folder and check that its trials were run with the current settings.

    `fresh` first moves the earlier sweep files aside (`move_aside`). Raises `SweepSettingsError`,
    touching no file, when existing CSVs were written with other result settings.
    """
    results_dir = Path(settings.run.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        move_aside(results_dir)

    fields = result_settings(settings)
    settings_path = results_dir / SETTINGS_FILE
    csvs = [path for path in (csv_path(results_dir, "mup"), csv_path(results_dir, "sp")) if path.exists()]
    fix = "Rerun with --fresh to move them into a previous-<time> folder, or pass another --results-dir."
    if csvs:
        names = ", ".join(str(path) for path in csvs)
        if not settings_path.is_file():
            raise SweepSettingsError(f"{names} exist but {str(settings_path)!r} is missing, "
                                     f"so the settings of their trials are unknown. {fix}")
        try:
            stored = json.loads(settings_path.read_text())
            old_fields = stored["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SweepSettingsError(f"{str(settings_path)!r} could not be read ({error}). {fix}") from None
        if fingerprint(old_fields) != fingerprint(fields):
            changes = _changed_fields(old_fields, fields)
            listed_changes = "; ".join(changes[:5]) + ("; ..." if len(changes) > 5 else "")
            raise SweepSettingsError(f"the trials in {names} were run with other settings ({listed_changes}). {fix}")
        return results_dir

    settings_path.write_text(json.dumps({"fingerprint": fingerprint(fields), "settings": fields}, indent=2) + "\n")
    return results_dir


# ---------------------------------------------------------------------------
# Trials and rows


def run_trial(settings: Settings, parametrization: str, width: int, log2_lr: float, seed: int,
              on_log: Optional[Callable[[int, float], None]] = None) -> TrialResult:
    """Train one sweep trial for `sweep.steps` steps at LR 2**log2_lr. This is the task function of the sweep."""
    return train_trial(settings, width, parametrization, 2.0**log2_lr, seed, settings.sweep.steps, on_log=on_log)


def trial_row(key: TrialKey, result: TrialResult | TaskFailure, steps: int) -> dict[str, Any]:
    row = {"parametrization": key.parametrization, "width": key.width, "log2_lr": key.log2_lr,
           "lr": 2.0**key.log2_lr, "seed": key.seed, "steps": steps}
    if isinstance(result, TaskFailure):
        row.update(steps_done=0, final_train_loss=math.nan, val_loss=math.nan, diverged=False, seconds=math.nan,
                   error=result.error)
    else:
        row.update(steps_done=result.steps_done, final_train_loss=result.final_train_loss, val_loss=result.val_loss,
                   diverged=result.diverged, seconds=round(result.seconds, 3), error="")
    return row


class TrialWriter:
    """Appends rows to one CSV, flushing each one to disk before the next trial starts."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        if not new and not _ends_with_newline(path):
            # The last row was cut off by a killed process. Ending it here lets `read_trials` skip it.
            self.file.write("\n")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        if new:
            self.writer.writeheader()
        self._sync()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow(row)
        self._sync()

    def _sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    return {"parametrization": row["parametrization"], "width": int(row["width"]),
            "log2_lr": round_log2_lr(float(row["log2_lr"])), "lr": float(row["lr"]), "seed": int(row["seed"]),
            "steps": int(row["steps"]), "steps_done": int(row["steps_done"]),
            "final_train_loss": float(row["final_train_loss"]), "val_loss": float(row["val_loss"]),
            "diverged": {"True": True, "False": False}[row["diverged"]], "seconds": float(row["seconds"]),
            "error": row["error"] or ""}


def read_trials(results_dir: str | Path, parametrizations: Iterable[str] = ("mup", "sp")) -> pd.DataFrame:
    """Return every trial row of the sweep CSVs in `results_dir`, in file order. A cut-off row is skipped."""
    rows = []
    for parametrization in parametrizations:
        path = csv_path(results_dir, parametrization)
        if not path.is_file():
            continue
        with open(path, newline="") as file:
            for line_number, row in enumerate(csv.DictReader(file), start=2):
                try:
                    rows.append(_parse_row(row))
                except (KeyError, ValueError, TypeError):
                    logger.warning("%s line %d is incomplete or unreadable; it is ignored and the trial reruns",
                                   path, line_number)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype({"width": int, "seed": int, "steps": int, "steps_done": int, "diverged": bool})


def finished_keys(trials: pd.DataFrame) -> set[TrialKey]:
    """Return the keys of trials that finished, diverged or not. Trials that failed with an error are left out."""
    ok = trials[trials["error"] == ""]
    return {TrialKey(p, int(w), float(x), int(s))
            for p, w, x, s in zip(ok["parametrization"], ok["width"], ok["log2_lr"], ok["seed"])}


# ---------------------------------------------------------------------------
# Running


class StepProgress:
    """`on_log` callback that shows one trial's steps and loss as a nested progress bar."""

    def __init__(self, steps: int, description: str):
        self.steps, self.description = steps, description
        self.bar: Optional[tqdm] = None

    def __call__(self, step: int, loss: float) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.steps, desc=self.description, unit="step", position=1, leave=False)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe(key: TrialKey) -> str:
    return f"{key.parametrization} width {key.width} log2_lr {key.log2_lr:g} seed {key.seed}"


def run_trials(settings: Settings, keys: Iterable[TrialKey], executor_options: Optional[dict] = None, *,
               trial_function: Callable[..., TrialResult] = run_trial, bar: Optional[tqdm] = None,
               progress: bool = True) -> list[dict[str, Any]]:
    """Run the trials of `keys` that the CSVs lack and append one row per trial as each one finishes.

    Trials that finished earlier, diverged or not, are skipped. Trials recorded with an error run again.
    Results may arrive in any order. `bar` is an outer progress bar to advance, made here when None.
    Returns the rows written.
    """
    options = dict(executor_options or {"executor": "local"})
    results_dir = Path(settings.run.results_dir)
    done = finished_keys(read_trials(results_dir))
    keys = list(dict.fromkeys(TrialKey(p, int(w), round_log2_lr(x), int(s)) for p, w, x, s in keys))
    todo = [key for key in keys if key not in done]
    skipped = len(keys) - len(todo)
    if skipped:
        logger.info("%d trials already in %s are skipped", skipped, results_dir)
    if not todo:
        return []

    local = options.get("executor", "local") == "local"
    steps = settings.sweep.steps
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(todo), desc="LR sweep", unit="trial", position=0, disable=not progress)
    step_bars: dict[TrialKey, StepProgress] = {}

    def tasks() -> Iterator[Task]:
        for key in todo:
            kwargs = dict(settings=settings, parametrization=key.parametrization, width=key.width,
                          log2_lr=key.log2_lr, seed=key.seed)
            if local and progress:
                # Callbacks cannot travel to remote workers, so only the local executor shows steps.
                step_bars[key] = kwargs["on_log"] = StepProgress(steps, describe(key))
            yield Task(key=key, function=trial_function, kwargs=kwargs)

    writers = {parametrization: TrialWriter(csv_path(results_dir, parametrization))
               for parametrization in dict.fromkeys(key.parametrization for key in todo)}
    rows = []
    try:
        for key, result in run_tasks(tasks(), **options):
            if key in step_bars:
                step_bars.pop(key).close()
            row = trial_row(key, result, steps)
            writers[key.parametrization].write(row)
            rows.append(row)
            bar.set_postfix_str(f"{describe(key)}: val {row['val_loss']:.3f}"
                                + (" diverged" if row["diverged"] else ""), refresh=False)
            bar.update(1)
    finally:
        for step_bar in step_bars.values():
            step_bar.close()
        for writer in writers.values():
            writer.close()
        if own_bar:
            bar.close()
    return rows


def latest_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Return one row per trial key: the last finished row, else the last failed one."""
    if trials.empty:
        return trials
    ranked = trials.assign(_finished=trials["error"] == "", _order=np.arange(len(trials)))
    ranked = ranked.sort_values(["_finished", "_order"])
    latest = ranked.drop_duplicates(["parametrization", "width", "log2_lr", "seed"], keep="last")
    return latest.sort_values("_order").drop(columns=["_finished", "_order"]).reset_index(drop=True)

