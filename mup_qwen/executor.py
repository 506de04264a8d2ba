"""Executors that run independent trials (sweep points, coordinate-check runs).

A task is a picklable `(function, kwargs)` pair. `run_tasks` yields each task's key and
result as it finishes, so callers can write results as they arrive. A task that raises
yields a `TaskFailure` in place of a result, and the others go on.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import os
import re
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional

from mup_qwen.settings import MupQwenError

logger = logging.getLogger("mup_qwen")

RAY_REQUIREMENT = "ray==2.60.0"
RAY_LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray colours the task name in the remote traceback it puts in the error message.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# The folder that contains the `mup_qwen` package. Ray workers get it on their PYTHONPATH.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Task:
    """One unit of work: `function(**kwargs)`, identified by `key`."""

    key: Hashable
    function: Callable[..., Any]
    kwargs: dict


@dataclass
class TaskFailure:
    """The error of a task that raised or whose worker died."""

    error: str
    details: str = ""


def run_local(tasks: Iterable[Task]) -> Iterator[tuple[Hashable, Any]]:
    """Run tasks one after another in this process."""
    for task in tasks:
        try:
            yield task.key, task.function(**task.kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # a failed trial is recorded and the sweep goes on
            logger.error("task %s failed: %s: %s", task.key, type(error).__name__, error)
            yield task.key, TaskFailure(f"{type(error).__name__}: {error}", traceback.format_exc())


def run_processes(tasks: Iterable[Task], workers: int) -> Iterator[tuple[Hashable, Any]]:
    """Run tasks in `workers` fresh processes on this machine, and yield results as they finish.

    Processes start with "spawn", so no torch thread pool is inherited from this process.
    Each trial sets its own thread count from `run.threads`.
    """
    if workers < 1:
        raise MupQwenError(f"--workers is {workers}, expected a positive integer such as 2.")
    tasks = list(tasks)
    pool = ProcessPoolExecutor(max_workers=min(workers, max(1, len(tasks))),
                               mp_context=multiprocessing.get_context("spawn"))
    pending = {pool.submit(task.function, **task.kwargs): task.key for task in tasks}
    logger.info("running %d tasks in %d worker processes", len(pending), pool._max_workers)
    return _process_results(pool, pending)


def _process_results(pool: ProcessPoolExecutor, pending: dict) -> Iterator[tuple[Hashable, Any]]:
    """Yield `(key, result)` for each finished process task; cancel the rest if the caller stops early."""
    try:
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                try:
                    result = future.result()
                except Exception as error:  # the task raised, or its worker process died
                    logger.error("task %s failed: %s: %s", key, type(error).__name__, error)
                    result = TaskFailure(f"{type(error).__name__}: {error}",
                                         "".join(traceback.format_exception(error)))
                yield key, result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_tasks(
    tasks: Iterable[Task],
    executor: str = "local",
    *,
    workers: int = 1,
    address: Optional[str] = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
) -> Iterator[tuple[Hashable, Any]]:
    """Run tasks with the named executor and yield `(key, result)` as each one finishes.

    The keyword arguments are those of `mup_qwen.cli.executor_options`: "processes" uses
    `workers`, "ray" the rest, and "local" none. The Ray executor connects and submits
    every task before this returns, so a missing package or an impossible resource
    request raises here.
    """
    if executor == "local":
        return run_local(tasks)
    if executor == "processes":
        return run_processes(tasks, workers)
    if executor == "ray":
        return run_ray(tasks, address=address, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    raise MupQwenError(f"executor is {executor!r}, expected 'local', 'processes' or 'ray'.")


# ---------------------------------------------------------------------------
# Ray


def import_ray():
    """Import and return the `ray` module, or raise `MupQwenError` with the install command."""
    try:
        import ray
    except ImportError:
        raise MupQwenError(
            f"the Ray executor needs the `ray` package. Run `pip install {RAY_REQUIREMENT}`, "
            "or use --executor local."
        ) from None
    return ray


def check_trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Reject resource requests that Ray cannot schedule."""
    if not (math.isfinite(cpus_per_trial) and cpus_per_trial > 0):
        raise MupQwenError(f"--cpus-per-trial is {cpus_per_trial}, expected a positive number such as 1.")
    if not (math.isfinite(gpus_per_trial) and gpus_per_trial >= 0):
        raise MupQwenError(f"--gpus-per-trial is {gpus_per_trial}, expected 0 or a positive number such as 0.25.")
    # Ray accepts fractions of one GPU, but above one it needs whole GPUs.
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        raise MupQwenError(f"--gpus-per-trial is {gpus_per_trial}: above 1, Ray needs a whole number of GPUs. "
                           f"Use {math.floor(gpus_per_trial)} or {math.ceil(gpus_per_trial)}.")


def start_ray(address: Optional[str] = None) -> None:
    """Join the Ray cluster at `address`, or start a local instance bound to 127.0.0.1.

    An instance that this process already started or joined is reused. A local instance
    serves no dashboard, and Ray sends no usage statistics from it.
    """
    if address is None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        os.environ[RAY_LOCAL_ONLY_VARIABLE] = "0"
    ray = import_ray()
    if ray.is_initialized():
        return

    start = time.perf_counter()
    if address is None:
        use_loopback_node_address()
        ray.init(include_dashboard=False)
        node_addresses = sorted({node["NodeManagerAddress"] for node in ray.nodes()})
        if node_addresses != ["127.0.0.1"]:
            ray.shutdown()
            raise MupQwenError(f"the local Ray instance listens on {node_addresses}, not only 127.0.0.1. "
                               f"Set {RAY_LOCAL_ONLY_VARIABLE}=0 before starting Python, or join a cluster "
                               "with --address.")
        where = "started a local Ray instance on 127.0.0.1"
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as error:
            raise MupQwenError(f"failed to join the Ray cluster at --address {address!r}: {error}. "
                               "Check the address printed by `ray start --head`.") from None
        where = f"joined the Ray cluster at {address}"
    resources = ray.cluster_resources()
    logger.info("%s in %.1f s: %g CPUs, %g GPUs", where, time.perf_counter() - start,
                resources.get("CPU", 0), resources.get("GPU", 0))


def use_loopback_node_address() -> None:
    """Make a local Ray instance take 127.0.0.1 as its node address, so all its servers listen there.

    Ray 2.60 does this when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0, its default on macOS
    and Windows. It reads the variable once, when `ray` is first imported, so a `ray`
    imported earlier gets the same value through its constants module.
    """
    # NOTE: `ray._private.ray_constants` is Ray's private API. `start_ray` checks the node address afterwards.
    constants = importlib.import_module("ray._private.ray_constants")
    if getattr(constants, "ENABLE_RAY_CLUSTER", False):
        constants.ENABLE_RAY_CLUSTER = False


def check_cluster_fits(ray, cpus_per_trial: float, gpus_per_trial: float, joined: bool) -> None:
    """Raise when the local Ray instance cannot fit one trial, but only warn on a joined cluster.

    A joined cluster may add nodes through its autoscaler, so its totals are not final.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    problems = []
    if cpus_per_trial > cpus:
        problems.append(f"--cpus-per-trial is {cpus_per_trial} but the Ray cluster has {cpus:g} CPUs")
    if gpus_per_trial > gpus:
        problems.append(f"--gpus-per-trial is {gpus_per_trial} but the Ray cluster has {gpus:g} GPUs")
    if problems and not joined:
        raise MupQwenError("; ".join(problems) + ". Lower the per-trial request, or use --gpus-per-trial 0 "
                           "on a machine without a GPU.")
    for problem in problems:
        logger.warning("%s: trials wait until the cluster grows.", problem)
    if gpus > 0 and gpus_per_trial == 0:
        # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for tasks that request no GPU.
        logger.warning("the Ray cluster has %g GPUs but --gpus-per-trial is 0: trials with run.device 'auto' "
                       "use the GPUs without a reservation. Set --gpus-per-trial (e.g. 0.25), or --device cpu.",
                       gpus)


def worker_runtime_env() -> dict:
    """Return the Ray runtime environment that lets workers import `mup_qwen`.

    Workers get the project folder and the driver's PYTHONPATH. On a multi-node cluster
    these paths must exist on every node, for example on a shared filesystem.
    """
    paths = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def call_in_directory(function: Callable[..., Any], kwargs: dict, directory: str) -> Any:
    """Run `function(**kwargs)` in `directory`, the driver's working directory, on a Ray worker.

    Relative paths in the settings (base shapes file, data files) then resolve as they do
    in the driver. On a multi-node cluster the directory must exist on every node.
    """
    if not os.path.isdir(directory):
        raise MupQwenError(
            f"the driver's working directory {directory!r} does not exist on this Ray node. Put the project "
            "and its files (base shapes, data) on a filesystem shared by all nodes, at the same path."
        )
    os.chdir(directory)
    return function(**kwargs)


def describe_ray_error(ray, error: Exception) -> str:
    """Return `Type: message` of the exception a Ray task raised, or of the Ray error itself."""
    cause = getattr(error, "cause", None) if isinstance(error, ray.exceptions.RayTaskError) else None
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"


def run_ray(
    tasks: Iterable[Task],
    *,
    address: Optional[str] = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
) -> Iterator[tuple[Hashable, Any]]:
    """Submit every task as a Ray task with its own CPU and GPU request, and yield results as they finish.

    A fractional `gpus_per_trial` such as 0.25 packs several trials on one GPU. A task
    that raises, or whose worker dies, yields a `TaskFailure`. Tasks are not retried:
    a trial that crashed its worker would most likely crash it again.
    """
    check_trial_resources(cpus_per_trial, gpus_per_trial)
    start_ray(address)
    ray = import_ray()
    check_cluster_fits(ray, cpus_per_trial, gpus_per_trial, joined=address is not None)

    remote = ray.remote(call_in_directory).options(
        num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=0, runtime_env=worker_runtime_env()
    )
    directory = os.getcwd()
    pending = {remote.remote(task.function, task.kwargs, directory): task.key for task in tasks}
    logger.info("submitted %d Ray tasks (%g CPUs, %g GPUs each)", len(pending), cpus_per_trial, gpus_per_trial)
    return _ray_results(ray, pending)


def _ray_results(ray, pending: dict) -> Iterator[tuple[Hashable, Any]]:
    """Yield `(key, result)` for each finished Ray task, and cancel the rest if the caller stops early."""
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as error:  # the task raised, or its worker or node died
                message = describe_ray_error(ray, error)
                logger.error("task %s failed: %s", key, message)
                result = TaskFailure(message, ANSI_ESCAPE.sub("", str(error)))
            yield key, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
