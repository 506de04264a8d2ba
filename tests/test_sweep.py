"""LR sweep trials with real tiny models: resume after an interruption, divergence, failures, settings changes,
and the `lr_check.py` script end to end (CSVs, summary, plot, adaptive search, notebook)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, execute_notebook
from mup_qwen.settings import override
from mup_qwen.sweep import (SETTINGS_FILE, SweepSettingsError, TrialKey, csv_path, grid_keys, prepare_results_dir,
                            read_trials, run_trial, run_trials)

# Columns that the same trial reproduces exactly (not `seconds`).
DETERMINISTIC = ["parametrization", "width", "log2_lr", "lr", "seed", "steps", "steps_done", "final_train_loss",
                 "val_loss", "diverged", "error"]


def sweep_settings(make_settings, results_dir: Path, **sweep):
    fields = {"steps": 10, "log2_lr_min": -9.0, "log2_lr_max": -5.0, "num_lrs": 3, "log_every": 5, **sweep}
    return make_settings(model={"widths": [32, 64]}, sweep=fields, run={"results_dir": str(results_dir)})


def sorted_rows(results_dir: Path) -> pd.DataFrame:
    trials = read_trials(results_dir)[DETERMINISTIC]
    return trials.sort_values(["parametrization", "width", "log2_lr", "seed"]).reset_index(drop=True)


class InterruptAfter:
    """Trial function that runs real trials, then raises KeyboardInterrupt (as Ctrl-C would) at trial `count + 1`."""

    def __init__(self, count: int):
        self.count = count

    def __call__(self, **kwargs):
        if self.count == 0:
            raise KeyboardInterrupt
        self.count -= 1
        return run_trial(**kwargs)


class FailAt:
    """Trial function that raises for one key and runs real trials for the others."""

    def __init__(self, width: int, log2_lr: float):
        self.width, self.log2_lr = width, log2_lr

    def __call__(self, **kwargs):
        if kwargs["width"] == self.width and kwargs["log2_lr"] == self.log2_lr:
            raise RuntimeError("worker died")
        return run_trial(**kwargs)


def test_interrupted_sweep_resumes_to_same_csv(make_settings, tmp_path):
    whole = sweep_settings(make_settings, tmp_path / "whole")
    prepare_results_dir(whole)
    keys = grid_keys(whole, ["mup", "sp"])
    assert len(keys) == 12
    run_trials(whole, keys, progress=False)

    resumed = override(whole, "run.results_dir", str(tmp_path / "resumed"))
    prepare_results_dir(resumed)
    with pytest.raises(KeyboardInterrupt):
        run_trials(resumed, keys, trial_function=InterruptAfter(5), progress=False)
    assert len(read_trials(tmp_path / "resumed")) == 5

    # Only SP first, then everything: finished trials are not run again.
    sp_done = sum(1 for key in keys[:5] if key.parametrization == "sp")
    written = run_trials(resumed, [key for key in keys if key.parametrization == "sp"], progress=False)
    assert len(written) == 6 - sp_done
    written = run_trials(resumed, keys, progress=False)
    assert len(written) == 6 - (5 - sp_done)
    assert run_trials(resumed, keys, progress=False) == []

    pd.testing.assert_frame_equal(sorted_rows(tmp_path / "whole"), sorted_rows(tmp_path / "resumed"))


def test_cut_off_row_is_skipped_and_rerun(make_settings, tmp_path):
    settings = sweep_settings(make_settings, tmp_path / "results", num_lrs=1, log2_lr_max=-9.0)
    prepare_results_dir(settings)
    keys = grid_keys(settings, ["sp"])
    run_trials(settings, keys, progress=False)
    path = csv_path(tmp_path / "results", "sp")
    complete = path.read_text()
    path.write_text(complete[:-25])  # a process killed while writing the last row

    assert len(read_trials(tmp_path / "results")) == 1
    written = run_trials(settings, keys, progress=False)
    assert len(written) == 1
    assert len(read_trials(tmp_path / "results")) == 2


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_diverging_lr_is_marked_not_fatal(make_settings, tmp_path, optimizer):
    settings = sweep_settings(make_settings, tmp_path / "results", steps=20)
    settings = override(settings, "optim.optimizer", optimizer)
    prepare_results_dir(settings)
    keys = [TrialKey("sp", 32, 4.0, 0), TrialKey("mup", 64, 4.0, 0), TrialKey("sp", 32, -7.0, 0)]
    run_trials(settings, keys, progress=False)

    trials = read_trials(tmp_path / "results").set_index(["parametrization", "width", "log2_lr"])
    for diverged in [("sp", 32, 4.0), ("mup", 64, 4.0)]:
        assert trials.loc[diverged, "diverged"]
        assert trials.loc[diverged, "steps_done"] < 20
        assert math.isnan(trials.loc[diverged, "val_loss"])
        assert trials.loc[diverged, "error"] == ""
    assert not trials.loc[("sp", 32, -7.0), "diverged"]
    assert trials.loc[("sp", 32, -7.0), "steps_done"] == 20


def test_failed_trial_is_recorded_then_retried(make_settings, tmp_path):
    settings = sweep_settings(make_settings, tmp_path / "results")
    prepare_results_dir(settings)
    keys = grid_keys(settings, ["sp"])
    run_trials(settings, keys, trial_function=FailAt(64, -7.0), progress=False)

    trials = read_trials(tmp_path / "results")
    failed = trials[trials["error"] != ""]
    assert len(trials) == 6
    assert len(failed) == 1
    assert failed["error"].iloc[0] == "RuntimeError: worker died"
    assert (failed["width"].iloc[0], failed["log2_lr"].iloc[0]) == (64, -7.0)

    written = run_trials(settings, keys, progress=False)
    assert [(row["width"], row["log2_lr"], row["error"]) for row in written] == [(64, -7.0, "")]


def test_settings_change_is_detected(make_settings, tmp_path):
    results = tmp_path / "results"
    settings = sweep_settings(make_settings, results, num_lrs=1, log2_lr_max=-9.0)
    prepare_results_dir(settings)
    run_trials(settings, grid_keys(settings, ["sp"]), progress=False)
    before = {path.name: path.read_bytes() for path in results.iterdir()}

    # Widths, LR grid, seeds, device and executor only choose which trials run.
    same = override(settings, "model.widths", [32, 64, 128])
    for dotted, value in [("sweep.log2_lr_min", -12.0), ("sweep.num_lrs", 9), ("sweep.seeds", [0, 1]),
                          ("run.device", "auto"), ("run.threads", 2), ("coord.steps", 7)]:
        same = override(same, dotted, value)
    prepare_results_dir(same)

    for dotted, value in [("optim.warmup_steps", 5), ("sweep.steps", 11), ("model.base_width", 64),
                          ("data.seq_len", 16), ("sweep.divergence_factor", 3.0), ("run.precision", "bfloat16")]:
        changed = override(settings, dotted, value)
        with pytest.raises(SweepSettingsError, match="--fresh") as error:
            prepare_results_dir(changed)
        assert dotted in str(error.value)
    assert {path.name: path.read_bytes() for path in results.iterdir()} == before

    (results / SETTINGS_FILE).unlink()
    with pytest.raises(SweepSettingsError, match="missing"):
        prepare_results_dir(settings)

    changed = override(settings, "optim.warmup_steps", 5)
    prepare_results_dir(changed, fresh=True)
    previous = [path for path in results.iterdir() if path.name.startswith("previous-")]
    assert len(previous) == 1
    assert (previous[0] / "lr_sp.csv").read_bytes() == before["lr_sp.csv"]
    assert not csv_path(results, "sp").exists()
    assert (results / SETTINGS_FILE).is_file()


# ---------------------------------------------------------------------------
# The script


def write_config(settings, path: Path) -> Path:
    raw = settings.to_dict()
    path.write_text(yaml.safe_dump(raw))
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "lr_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """A tiny grid sweep through `lr_check.py`: widths 32 and 64, log2 LR -10..-2 in 2-octave steps, plus +4."""
    from conftest import tiny_settings
    from mup_qwen.shapes import make_base_shapes

    tmp_path = tmp_path_factory.mktemp("lr_check")
    settings = tiny_settings(tmp_path, model={"widths": [32, 64]},
                             sweep={"steps": 20, "log2_lr_min": -10.0, "log2_lr_max": 4.0, "num_lrs": 8,
                                    "log_every": 5})
    make_base_shapes(settings)
    config = write_config(settings, tmp_path / "tiny.yml")
    result = run_script("--config", str(config))
    return tmp_path, config, result


def test_script_writes_csvs_summary_and_plot(script_run):
    tmp_path, _, result = script_run
    assert result.returncode == 0, result.stderr
    results = tmp_path / "results"
    for name in ["lr_mup.csv", "lr_sp.csv", "lr_summary.csv", "lr_sweep.png", SETTINGS_FILE]:
        assert (results / name).is_file(), name

    trials = read_trials(results)
    assert len(trials) == 2 * 2 * 8
    assert trials.loc[trials["log2_lr"] == 4.0, "diverged"].all()
    summary = pd.read_csv(results / "lr_summary.csv")
    assert len(summary) == 4
    assert set(summary["status"]) <= {"fit", "argmin"}
    assert summary["optimum_log2_lr"].between(-10, 4).all()
    assert "μP drift of the optimum across widths" in result.stdout
    assert (results / "lr_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_reruns_nothing_then_adaptive_reuses_grid(script_run):
    tmp_path, config, _ = script_run
    results = tmp_path / "results"
    rerun = run_script("--config", str(config))
    assert rerun.returncode == 0, rerun.stderr
    assert len(read_trials(results)) == 32

    # The coarse grid of the adaptive search (-10..4, 2-octave steps) is the grid already run,
    # so only the 6 refinement points of each (parametrization, width) run.
    adaptive = run_script("--config", str(config), "--search", "adaptive")
    assert adaptive.returncode == 0, adaptive.stderr
    assert "minimum within ±0.25 octave" in adaptive.stdout
    trials = read_trials(results)
    new = trials[~trials["log2_lr"].isin([-10.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0])]
    assert len(trials) == 32 + len(new)
    assert 4 <= len(new) <= 4 * 6


def test_script_rejects_changed_settings(script_run):
    tmp_path, config, _ = script_run
    results = tmp_path / "results"
    before = csv_path(results, "mup").read_bytes()
    result = run_script("--config", str(config), "--steps", "7")
    assert result.returncode == 2
    assert "sweep.steps was 20, now 7" in result.stderr
    assert "--fresh" in result.stderr
    assert "Traceback" not in result.stderr
    assert csv_path(results, "mup").read_bytes() == before


def test_notebook_runs_on_script_results(script_run):
    tmp_path, _, _ = script_run
    text, outputs = execute_notebook("lr_check.ipynb", tmp_path / "results")
    assert "trials in" in text
    assert "SP drift of the optimum across widths" in text
    assert any("image/png" in output.get("data", {}) for output in outputs)
