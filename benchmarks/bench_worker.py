"""Subprocess side of `bench_step.py`: peak memory of one trial, and step timing on request.

`memory` runs one `train_trial` in this fresh process and prints its peak resident set.
`serve` reads JSON requests from stdin, one a line, and writes the seconds per training
step for each, so the parent can run two workers at once with one thread each.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import sys
from pathlib import Path
from typing import Optional

import step_harness as harness
import torch

from mup_qwen.data import load_corpus
from mup_qwen.settings import settings_from_dict
from mup_qwen.train import setup_runtime, train_trial


def peak_rss_mib() -> float:
    """Return the peak resident set from ru_maxrss (KiB on Linux), which also counts the parent's before exec."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> Optional[float]:
    """Return a memory field of /proc/self/status ("VmRSS", "VmHWM") in MiB, or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) to the current one, or return False where Linux forbids it.

    Importing torch and reading the corpus reach a higher peak than a small model's
    training, so without the reset the peak would not reflect the trial.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_memory(settings, width: int, steps: int) -> dict:
    """Run one trial of `steps` steps with its final evaluation and return peak memory and one-off costs."""
    device = setup_runtime(settings.run)
    start = harness.clock()
    corpus = load_corpus(settings.data)
    corpus_seconds = harness.clock() - start

    start = harness.clock()
    model = harness.build_model(settings, width, "mup", seed=harness.BENCH_SEED, vocab_size=corpus.vocab_size)
    build_seconds = harness.clock() - start
    parameter_mib = 4 * sum(p.numel() for p in model.parameters()) / 2**20
    del model

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    process_peak = status_mib("VmHWM") or peak_rss_mib()
    baseline = status_mib("VmRSS") if reset_peak_rss() else None
    result = train_trial(settings, width, "mup", harness.BENCH_LR, harness.BENCH_SEED, steps,
                         device=device, corpus=corpus)
    trial_peak = status_mib("VmHWM") if baseline is not None else None
    process_peak = max(process_peak, trial_peak) if trial_peak is not None else peak_rss_mib()
    report = {"width": width, "process_peak_mib": process_peak, "baseline_mib": baseline, "trial_peak_mib": trial_peak,
              "parameter_mib": parameter_mib, "corpus_seconds": corpus_seconds, "build_seconds": build_seconds,
              "val_loss": result.val_loss}
    if device.type == "cuda":
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return report


def serve(settings) -> None:
    """Read `{"width", "threads", "steps"}` requests from stdin and write `{"seconds_per_step"}` for each.

    The first request for a width builds its μP model and runs two untimed warm-up steps.
    """
    device = setup_runtime(settings.run)
    corpus = load_corpus(settings.data)
    runners = {}
    print(json.dumps({"ready": True}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        width = request["width"]
        torch.set_num_threads(request["threads"])
        if width not in runners:
            model, optimizer = harness.mup_variant(settings, width, corpus.vocab_size, device)
            batches = harness.fixed_batches(corpus, settings, 8, device)
            runners[width] = harness.StepRunner(model, optimizer, batches, device)
            runners[width].seconds_per_step(2)
        seconds = runners[width].seconds_per_step(request["steps"])
        print(json.dumps({"seconds_per_step": seconds}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["memory", "serve"])
    parser.add_argument("--settings", required=True, help="JSON file of the settings (Settings.to_dict)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--width", type=int, help="hidden size (memory mode)")
    parser.add_argument("--steps", type=int, default=5, help="training steps of the trial (memory mode)")
    parser.add_argument("--cpu-clock", action="store_true", help="time by CPU time instead of wall time")
    args = parser.parse_args()

    with open(args.settings) as file:
        settings = settings_from_dict(json.load(file))
    torch.set_num_threads(args.threads)
    harness.use_cpu_clock(args.cpu_clock)
    if args.mode == "memory":
        print(json.dumps(measure_memory(settings, args.width, args.steps)), flush=True)
    else:
        serve(settings)


if __name__ == "__main__":
    main()
