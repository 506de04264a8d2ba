"""Measure LR-sweep throughput (trials per hour) with 1, 4 and 8 trials sharing one GPU through Ray.

Each packing level k runs trials as Ray tasks with `gpus_per_trial = 1/k`, at every width
of the settings (80 to 640 in setting.yml), with short trials of a few hundred steps.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mup_qwen.cli import run_main, setup_logging, widths_arg  # noqa: E402
from mup_qwen.executor import Task, TaskFailure, run_tasks  # noqa: E402
from mup_qwen.settings import MupQwenError, Settings, load_settings, override  # noqa: E402
from mup_qwen.shapes import make_base_shapes  # noqa: E402
from mup_qwen.train import train_trial  # noqa: E402

logger = logging.getLogger("mup_qwen")
FIELDS = ["width", "trials_per_gpu", "gpus_per_trial", "trials", "failed", "seconds", "trials_per_hour",
          "ms_per_step", "speedup"]


def timed_trial(settings: Settings, width: int, steps: int, seed: int, log2_lr: float = -9.0) -> dict:
    """Train one μP trial without the final evaluation and return its wall-clock span and where it ran."""
    start = time.time()
    result = train_trial(settings, width, "mup", 2.0 ** log2_lr, seed, steps, evaluate_at_end=False)
    end = time.time()
    return {"start": start, "end": end, "pid": os.getpid(), "steps": result.steps_done,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "final_train_loss": result.final_train_loss}


def warm_worker(settings: Settings, width: int, barrier: str, count: int, timeout: float = 180.0) -> int:
    """Run a 2-step trial, wait until `count` workers have reached the barrier folder, and return this pid.

    Holding each worker until all have arrived makes Ray start `count` separate workers
    rather than reuse the first one for every warm-up task.
    """
    timed_trial(settings, width, 2, seed=0)
    folder = Path(barrier)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {count} workers started within {timeout:.0f} s")
        time.sleep(0.05)
    return os.getpid()


def warm_workers(settings: Settings, width: int, count: int, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Start `count` Ray workers with CUDA contexts and the corpus loaded, so timed trials skip start-up."""
    with tempfile.TemporaryDirectory(prefix="gpu_packing_") as barrier:
        tasks = [Task(index, warm_worker, dict(settings=settings, width=width, barrier=barrier, count=count))
                 for index in range(count)]
        for index, result in run_tasks(tasks, executor="ray", cpus_per_trial=cpus_per_trial,
                                       gpus_per_trial=gpus_per_trial):
            if isinstance(result, TaskFailure):
                logger.warning("warm-up task %d failed, so timings may include worker start-up: %s", index, result.error)


def run_wave(settings: Settings, width: int, count: int, steps: int, cpus_per_trial: float,
             gpus_per_trial: float) -> tuple[list[dict], int]:
    """Run `count` trials as Ray tasks and return the spans of those that finished, and the failure count."""
    tasks = [Task(seed, timed_trial, dict(settings=settings, width=width, steps=steps, seed=seed))
             for seed in range(count)]
    spans = []
    failed = 0
    for seed, result in run_tasks(tasks, executor="ray", cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial):
        if isinstance(result, TaskFailure):
            logger.error("width %d, %g GPUs per trial, seed %d failed: %s", width, gpus_per_trial, seed, result.error)
            failed += 1
            continue
        if not math.isfinite(result["final_train_loss"]):
            logger.warning("width %d, seed %d: final train loss %s", width, seed, result["final_train_loss"])
        spans.append(result)
    return spans, failed


def measure_packing(settings: Settings, width: int, trials_per_gpu: int, waves: int, steps: int,
                    cpus_per_trial: float, device: str) -> dict:
    """Run `waves × trials_per_gpu` trials at one width and return their throughput.

    `trials_per_gpu` warm workers run them, so the timed span (first trial's start to
    last trial's end) measures training, not process start-up.
    """
    gpus_per_trial = 1.0 / trials_per_gpu if device == "cuda" else 0.0
    warm_workers(settings, width, trials_per_gpu, cpus_per_trial, gpus_per_trial)
    spans, failed = run_wave(settings, width, waves * trials_per_gpu, steps, cpus_per_trial, gpus_per_trial)
    if not spans:
        raise MupQwenError(f"every trial at width {width} with {trials_per_gpu} per GPU failed. See the log above.")

    seconds = max(span["end"] for span in spans) - min(span["start"] for span in spans)
    step_seconds = [(span["end"] - span["start"]) / span["steps"] for span in spans]
    return {
        "width": width, "trials_per_gpu": trials_per_gpu, "gpus_per_trial": round(gpus_per_trial, 4),
        "trials": len(spans), "failed": failed, "seconds": round(seconds, 2),
        "trials_per_hour": round(len(spans) / seconds * 3600, 1),
        "ms_per_step": round(1000 * sum(step_seconds) / len(step_seconds), 2),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "setting.yml"), help="settings file (default: setting.yml)")
    parser.add_argument("--widths", type=widths_arg, help="hidden sizes (default: model.widths, 80 to 640)")
    parser.add_argument("--packing", type=widths_arg, default=[1, 4, 8],
                        help="trials sharing one GPU, e.g. 1,4,8 (default)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per trial (default: 200)")
    parser.add_argument("--waves", type=int, default=2, help="trials per packing slot, run one after another (default: 2)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per Ray task (default: 1)")
    parser.add_argument("--precision", choices=["float32", "bfloat16"], help="run.precision (default: the settings')")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default), or cpu to check the script, with trials sharing CPUs in place of a GPU")
    parser.add_argument("--output", default=str(ROOT / "results" / "gpu_packing"),
                        help="folder for the CSV and the base shapes file (default: results/gpu_packing)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser.parse_args()


def benchmark_settings(args: argparse.Namespace, output: Path) -> Settings:
    settings = load_settings(args.config)
    if args.widths:
        settings = override(settings, "model.widths", args.widths)
    settings = override(settings, "run.device", args.device)
    settings = override(settings, "run.base_shapes", str(output / "base_shapes.bsh"))
    if args.precision:
        settings = override(settings, "run.precision", args.precision)
    return settings


def print_table(rows: list[dict]) -> None:
    print(f"{'width':>6} {'per GPU':>7} {'trials':>6} {'seconds':>8} {'trials/h':>9} {'ms/step':>8} {'speedup':>7}")
    for row in rows:
        print(f"{row['width']:>6} {row['trials_per_gpu']:>7} {row['trials']:>6} {row['seconds']:>8.1f} "
              f"{row['trials_per_hour']:>9.0f} {row['ms_per_step']:>8.2f} {row['speedup']:>7.2f}")


def main() -> None:
    args = parse_args()
    setup_logging(args.verbose)
    if args.steps <= 0 or args.waves <= 0:
        raise MupQwenError(f"--steps is {args.steps} and --waves is {args.waves}, expected positive integers.")
    if any(k <= 0 for k in args.packing):
        raise MupQwenError(f"--packing is {args.packing}, expected positive integers such as 1,4,8.")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: skipped")
            return
        logger.info("GPU: %s, torch %s, CUDA %s", torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)
    cpus = os.cpu_count() or 1
    if max(args.packing) * args.cpus_per_trial > cpus:
        raise MupQwenError(f"{max(args.packing)} trials × --cpus-per-trial {args.cpus_per_trial} need more than the "
                           f"{cpus} CPUs here, so they cannot share the GPU at once. Lower --cpus-per-trial.")

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = benchmark_settings(args, output)
    make_base_shapes(settings)

    rows = []
    csv_path = output / "gpu_packing.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for width in settings.model.widths:
            single = None
            for trials_per_gpu in args.packing:
                row = measure_packing(settings, width, trials_per_gpu, args.waves, args.steps, args.cpus_per_trial,
                                      args.device)
                single = single or row["trials_per_hour"]
                row["speedup"] = round(row["trials_per_hour"] / single, 2)
                writer.writerow(row)
                handle.flush()
                rows.append(row)
                logger.info("width %d, %d per GPU: %.0f trials/h", width, trials_per_gpu, row["trials_per_hour"])

    print(f"{args.steps}-step trials, {settings.run.precision}, batch {settings.data.batch_size} × "
          f"seq {settings.data.seq_len}, {settings.model.num_layers} layers (speedup: against the first packing level)")
    print_table(rows)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    run_main(main)
