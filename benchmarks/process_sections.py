"""Benchmark sections that run in subprocesses: peak memory per width, and torch threads.

Peak memory needs a fresh process per width. The thread comparison needs processes of
their own because two 1-thread trials at once is one of the variants.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import step_harness as harness

from mup_qwen.settings import MupQwenError

logger = logging.getLogger("mup_qwen")
WORKER = Path(__file__).resolve().with_name("bench_worker.py")


def worker_command(mode: str, settings_file: Path, threads: int, *extra: str) -> list[str]:
    return [sys.executable, str(WORKER), mode, "--settings", str(settings_file), "--threads", str(threads), *extra]


def bench_memory(settings, settings_file: Path, args) -> list[dict]:
    rows = []
    for width in settings.model.widths:
        logger.info("memory: width %d", width)
        command = worker_command("memory", settings_file, args.threads, "--width", str(width),
                                 "--steps", str(args.memory_steps), *(["--cpu-clock"] if args.clock == "cpu" else []))
        output = subprocess.run(command, capture_output=True, text=True)
        if output.returncode != 0:
            raise MupQwenError(f"memory worker for width {width} failed: {output.stderr.strip()[-2000:]}")
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    return rows


def print_memory(rows: list[dict], steps: int) -> None:
    print(f"\n### Peak memory of one train_trial ({steps} steps and the final evaluation, fresh process each)\n")
    print("Trial MiB is the peak resident set during `train_trial` minus the resident set before it "
          "(Linux VmHWM after a reset through /proc/self/clear_refs); the process peak includes "
          "importing torch and reading the corpus.\n")
    print("| width | trial MiB | float32 parameters MiB | RSS before the trial MiB | process peak RSS MiB "
          "| cold load_corpus s | build_model s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        trial = "n/a" if row["baseline_mib"] is None else f"{row['trial_peak_mib'] - row['baseline_mib']:.0f}"
        baseline = "n/a" if row["baseline_mib"] is None else f"{row['baseline_mib']:.0f}"
        cuda = f" (CUDA peak {row['cuda_peak_mib']:.0f})" if "cuda_peak_mib" in row else ""
        print(f"| {row['width']} | {trial}{cuda} | {row['parameter_mib']:.1f} | {baseline} "
              f"| {row['process_peak_mib']:.0f} | {row['corpus_seconds']:.3f} | {row['build_seconds']:.3f} |")


class Worker:
    """A `bench_worker.py serve` subprocess that times training steps on request."""

    def __init__(self, settings_file: Path, environment: Optional[dict] = None):
        self.process = subprocess.Popen(worker_command("serve", settings_file, 1), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=environment)
        self.receive()

    def send(self, width: int, threads: int, steps: int) -> None:
        self.process.stdin.write(json.dumps({"width": width, "threads": threads, "steps": steps}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise MupQwenError(f"step worker failed with exit status {self.process.wait()}. "
                               "Its traceback is printed above.")
        return json.loads(line)

    def seconds_per_step(self, width: int, threads: int, steps: int) -> float:
        self.send(width, threads, steps)
        return self.receive()["seconds_per_step"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def bench_threads(settings, settings_file: Path, args) -> list[dict]:
    """Time one process with 2 threads, with 2 passively waiting threads, with 1 thread, and 2 processes at once.

    torch's CPU build uses libgomp, whose threads spin at each barrier for a while
    (GOMP_SPINCOUNT) before sleeping. When the other core is busy, a spinning thread burns
    its core waiting for a descheduled one. OMP_WAIT_POLICY=PASSIVE makes waiting threads
    sleep at once; the third worker measures that setting.
    """
    passive = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    workers = [Worker(settings_file), Worker(settings_file), Worker(settings_file, passive)]
    rows = []
    try:
        for width in settings.model.widths:
            logger.info("threads: width %d", width)

            def pair() -> float:
                for worker in workers[:2]:
                    worker.send(width, 1, args.thread_steps)
                seconds = [worker.receive()["seconds_per_step"] for worker in workers[:2]]
                # Seconds per step of the pair's combined throughput.
                return 1 / sum(1 / s for s in seconds)

            for worker in workers:
                worker.seconds_per_step(width, 1, 1)
            times = harness.interleave({
                "two": lambda: workers[0].seconds_per_step(width, 2, args.thread_steps),
                "two_passive": lambda: workers[2].seconds_per_step(width, 2, args.thread_steps),
                "one": lambda: workers[0].seconds_per_step(width, 1, args.thread_steps),
                "pair": pair,
            }, args.repeats)
            row = {"width": width, **{f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}}
            row["two_over_one"] = harness.paired_ratios(times["one"], times["two"])
            row["two_passive_over_one"] = harness.paired_ratios(times["one"], times["two_passive"])
            row["pair_over_two"] = harness.paired_ratios(times["two"], times["pair"])
            row["pair_over_one"] = harness.paired_ratios(times["one"], times["pair"])
            rows.append(row)
    finally:
        for worker in workers:
            worker.close()
    return rows


def print_threads(rows: list[dict]) -> None:
    print("\n### Torch threads: one process with 2 or 1 threads, and 2 processes with 1 thread each\n")
    print("Pair ms/step is the time per step of the two processes' combined throughput. "
          "Ratios are speeds (higher is faster), timed by wall clock.\n")
    print("| width | 2 threads ms/step | 2 threads, OMP_WAIT_POLICY=PASSIVE | 1 thread | pair of 1-thread processes "
          "| 2 threads / 1 thread | 2 threads passive / 1 thread | pair / 1 process × 2 threads "
          "| pair / 1 process × 1 thread |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['width']} | {row['two_ms']:.1f} | {row['two_passive_ms']:.1f} | {row['one_ms']:.1f} "
              f"| {row['pair_ms']:.1f} | {harness.summary(row['two_over_one'])} "
              f"| {harness.summary(row['two_passive_over_one'])} | {harness.summary(row['pair_over_two'])} "
              f"| {harness.summary(row['pair_over_one'])} |")
