"""The local and Ray executors: same trial results, failures isolated, a Ray instance on loopback only.

One local Ray instance serves the whole module and is shut down at its end.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, tiny_settings
from mup_qwen.executor import Task, TaskFailure, run_tasks, start_ray
from mup_qwen.settings import MupQwenError
from mup_qwen.shapes import make_base_shapes
from mup_qwen.train import TrialResult, train_trial

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance started by the executor, shut down after this module."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    start_ray()
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A folder holding a base shapes file named by a path relative to that folder."""
    folder = tmp_path_factory.mktemp("sweep")
    make_base_shapes(relative_settings(folder), folder / "base_shapes.bsh")
    return folder


def relative_settings(folder: Path):
    """Tiny settings (widths 32 and 64, one thread) whose base shapes path only resolves inside `folder`."""
    return tiny_settings(folder, model={"widths": [32, 64]}, run={"base_shapes": "base_shapes.bsh"})


def trial_tasks(settings, widths=(32, 64), log2_lrs=(-8, -6)) -> list[Task]:
    return [
        Task((width, parametrization, log2_lr), train_trial,
             dict(settings=settings, width=width, parametrization=parametrization, lr=2.0 ** log2_lr, seed=0, steps=20))
        for width in widths for parametrization in ("mup", "sp") for log2_lr in log2_lrs
    ]


# ---------------------------------------------------------------------------
# Without Ray


def test_local_run_never_imports_ray():
    code = ("import sys; from mup_qwen.executor import Task, run_tasks; "
            "results = dict(run_tasks([Task('a', dict, {'x': 1})])); "
            "assert results == {'a': {'x': 1}}, results; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_missing_ray_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(MupQwenError, match=r"pip install ray==2\.60\.0"):
        run_tasks([Task("a", dict, {})], executor="ray")


def test_unknown_executor_rejected():
    with pytest.raises(MupQwenError, match="'dask'"):
        run_tasks([], executor="dask")


@pytest.mark.parametrize("cpus, gpus, flag", [(0, 0, "--cpus-per-trial"), (1, -0.5, "--gpus-per-trial"),
                                              (1, 1.5, "--gpus-per-trial"), (float("nan"), 0, "--cpus-per-trial")])
def test_invalid_trial_resources_rejected(cpus, gpus, flag):
    with pytest.raises(MupQwenError, match=flag):
        run_tasks([], executor="ray", cpus_per_trial=cpus, gpus_per_trial=gpus)


def test_local_failure_keeps_other_tasks(sweep_dir, monkeypatch):
    monkeypatch.chdir(sweep_dir)
    settings = relative_settings(sweep_dir)
    tasks = [Task("bad width", train_trial, dict(settings=settings, width=36, parametrization="mup", lr=1e-3,
                                                 seed=0, steps=2)),
             Task("good", dict, {"x": 1})]
    results = dict(run_tasks(tasks))
    assert isinstance(results["bad width"], TaskFailure)
    assert results["bad width"].error.startswith("SettingsError: width 36")
    assert results["good"] == {"x": 1}


def test_processes_results_equal_local(sweep_dir, monkeypatch):
    monkeypatch.chdir(sweep_dir)
    tasks = trial_tasks(relative_settings(sweep_dir), widths=(64,), log2_lrs=(-7,))
    tasks.append(Task("bad width", train_trial, dict(settings=relative_settings(sweep_dir), width=36,
                                                     parametrization="mup", lr=1e-3, seed=0, steps=2)))
    local = dict(run_tasks(tasks))
    processes = dict(run_tasks(tasks, executor="processes", workers=2))

    assert processes.keys() == local.keys()
    assert isinstance(processes["bad width"], TaskFailure)
    assert processes["bad width"].error.startswith("SettingsError: width 36")
    for key in local:
        if key == "bad width":
            continue
        assert processes[key].train_losses == local[key].train_losses, key
        assert processes[key].val_loss == local[key].val_loss, key


def test_processes_rejects_zero_workers():
    with pytest.raises(MupQwenError, match="--workers is 0"):
        run_tasks([Task("a", dict, {})], executor="processes", workers=0)


# ---------------------------------------------------------------------------
# Local Ray instance


def test_local_ray_listens_on_loopback_only(ray_instance):
    assert sorted({node["NodeManagerAddress"] for node in ray_instance.nodes()}) == ["127.0.0.1"]
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    listeners = 0
    for process in processes:
        try:
            sockets = [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            command = " ".join(process.cmdline())
        except psutil.NoSuchProcess:  # a worker that exited meanwhile
            continue
        for socket in sockets:
            assert socket.laddr.ip in LOOPBACK, f"{command[:80]} listens on {socket.laddr}"
        if "dashboard/dashboard.py" in command:
            assert sockets == [], f"the dashboard serves on {[s.laddr for s in sockets]}"
        listeners += len(sockets)
    assert listeners >= 2, "expected the GCS and raylet among this process's children"


def test_ray_results_equal_local(ray_instance, sweep_dir, monkeypatch):
    # The base shapes path is relative: Ray workers must run in the driver's working directory.
    monkeypatch.chdir(sweep_dir)
    settings = relative_settings(sweep_dir)
    tasks = trial_tasks(settings)
    threads = torch.get_num_threads()
    try:
        local = dict(run_tasks(tasks))
    finally:
        torch.set_num_threads(threads)

    keys = []
    remote = {}
    for key, result in run_tasks(tasks, executor="ray", cpus_per_trial=1, gpus_per_trial=0):
        keys.append(key)
        remote[key] = result

    assert sorted(keys) == sorted(task.key for task in tasks)
    for key, expected in local.items():
        assert isinstance(expected, TrialResult), f"{key}: {expected}"
        assert isinstance(remote[key], TrialResult), f"{key}: {remote[key]}"
        assert remote[key].steps_done == expected.steps_done == 20, key
        assert remote[key].train_losses == expected.train_losses, key
        assert remote[key].val_loss == expected.val_loss, key
        assert remote[key].diverged == expected.diverged, key
    # Sanity: μP and SP differ away from the base width, so the comparison is not vacuous.
    assert local[(64, "mup", -6)].val_loss != local[(64, "sp", -6)].val_loss


def test_ray_failures_keep_other_tasks(ray_instance, sweep_dir, monkeypatch):
    monkeypatch.chdir(sweep_dir)
    settings = relative_settings(sweep_dir)
    tasks = [
        Task("bad width", train_trial, dict(settings=settings, width=36, parametrization="mup", lr=1e-3,
                                            seed=0, steps=2)),
        Task("worker dies", os._exit, {"status": 1}),
        *trial_tasks(settings, widths=(32,), log2_lrs=(-7,)),
    ]
    results = dict(run_tasks(tasks, executor="ray"))

    assert len(results) == len(tasks)
    assert isinstance(results["bad width"], TaskFailure)
    assert results["bad width"].error.startswith("SettingsError: width 36"), results["bad width"].error
    assert "in train_trial" in results["bad width"].details, "expected the worker's traceback"
    assert "\x1b[" not in results["bad width"].details
    assert isinstance(results["worker dies"], TaskFailure)
    assert results["worker dies"].error.startswith("WorkerCrashedError"), results["worker dies"].error
    for parametrization in ("mup", "sp"):
        result = results[(32, parametrization, -7)]
        assert isinstance(result, TrialResult), result
        assert result.steps_done == 20


def test_ray_yields_as_finished_and_cancels_rest(ray_instance):
    total_cpus = ray_instance.cluster_resources()["CPU"]
    if total_cpus < 2:
        pytest.skip("needs 2 CPUs so both tasks run at once")
    tasks = [Task("slow", functools.partial(time.sleep, 120), {}), Task("fast", dict, {"x": 1})]
    results = run_tasks(tasks, executor="ray")
    key, value = next(results)
    assert key == "fast"
    assert value == {"x": 1}

    # Closing the generator cancels the slow task, which frees its CPU long before its 120 s sleep ends.
    results.close()
    deadline = time.monotonic() + 30
    while ray_instance.available_resources().get("CPU", 0) < total_cpus and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_instance.available_resources().get("CPU", 0) == total_cpus, "the cancelled task still holds a CPU"


def test_ray_joins_cluster_at_address(ray_instance, tmp_path):
    # A second driver joins this module's instance through its GCS address, as `--address` does.
    address = ray_instance.get_runtime_context().gcs_address
    code = ("import logging, os; from mup_qwen.executor import Task, run_tasks; "
            "logging.basicConfig(level=logging.INFO); "
            f"results = dict(run_tasks([Task('parent', os.getppid, {{}})], executor='ray', address={address!r})); "
            "print(results['parent'])")
    # The instance took 127.0.0.1 as its node address, so the joining driver must keep that address.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"joined the Ray cluster at {address}" in completed.stderr
    # The worker's parent is a raylet: this module's raylet is a child of this process.
    raylet_pid = int(completed.stdout.split()[-1])
    assert raylet_pid in {child.pid for child in psutil.Process().children(recursive=True)}


def test_ray_gpu_request_without_gpu_rejected(ray_instance):
    if ray_instance.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(MupQwenError, match="--gpus-per-trial is 0.25 but the Ray cluster has 0 GPUs"):
        run_tasks([Task("a", dict, {})], executor="ray", gpus_per_trial=0.25)


# ---------------------------------------------------------------------------
# The LR sweep script


def test_lr_check_ray_matches_local(tmp_path):
    import pandas as pd
    import yaml

    from mup_qwen.sweep import read_trials

    settings = tiny_settings(tmp_path, model={"widths": [32, 64]},
                             sweep={"steps": 20, "log2_lr_min": -8.0, "log2_lr_max": -6.0, "num_lrs": 2})
    make_base_shapes(settings)
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(settings.to_dict()))
    env = {**os.environ, "TQDM_DISABLE": "1"}

    folders = {}
    for executor in ("local", "ray"):
        folders[executor] = tmp_path / executor
        completed = subprocess.run(
            [sys.executable, str(ROOT / "lr_check.py"), "--config", str(config), "--results-dir",
             str(folders[executor]), "--executor", executor, "--cpus-per-trial", "1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, f"{executor}: {completed.stderr[-3000:]}"

    key = ["parametrization", "width", "log2_lr", "seed"]
    compared = key + ["steps_done", "final_train_loss", "val_loss", "diverged", "error"]
    local = read_trials(folders["local"]).sort_values(key).reset_index(drop=True)
    remote = read_trials(folders["ray"]).sort_values(key).reset_index(drop=True)
    assert len(local) == 2 * 2 * 2
    assert (local["error"] == "").all(), local["error"].tolist()
    pd.testing.assert_frame_equal(remote[compared], local[compared])
    # Every summary column but the run time must match.
    summaries = {executor: pd.read_csv(folder / "lr_summary.csv").drop(columns="seconds")
                 for executor, folder in folders.items()}
    pd.testing.assert_frame_equal(summaries["ray"], summaries["local"])
