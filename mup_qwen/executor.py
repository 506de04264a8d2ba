"""Executors that run independent trials (sweep points, coordinate-check runs).

A task is a picklable `(function, kwargs)` pair. `run_tasks` yields each task's key and
result as it finishes, so callers can write results as they arrive. A task that raises
yields a `TaskFailure` in place of a result, and the others go on.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator

logger = logging.getLogger("mup_qwen")


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


def run_tasks(tasks: Iterable[Task], executor: str = "local", **options) -> Iterator[tuple[Hashable, Any]]:
    """Run tasks with the named executor and yield `(key, result)` as each one finishes.

    `options` are those of `mup_qwen.cli.executor_options` (address, cpus_per_trial,
    gpus_per_trial); the local executor ignores them.
    """
    if executor == "local":
        return run_local(tasks)
    # TODO: the Ray executor ("ray") is not written yet.
    raise ValueError(f"executor is {executor!r}, expected 'local'.")
