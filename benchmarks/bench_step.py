"""Benchmark the training step of the μP Qwen model and the project's training loop.

Every comparison interleaves its variants (A B, B A, ...) in one run and reports the
median of per-repeat ratios, because absolute times on a shared CPU drift with the load.
Sections: step, loop, adam (optional), memory and threads. BENCHMARKS.md records the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import process_sections
import step_harness as harness
import torch
from mup import MuAdam
from torch.nn import functional as F

from mup_qwen.cli import run_main, setup_logging, widths_arg
from mup_qwen.data import load_corpus, train_batches, val_batches
from mup_qwen.settings import MupQwenError, head_layout, intermediate_size, load_settings, override
from mup_qwen.shapes import make_base_shapes
from mup_qwen.train import evaluate, lm_loss, setup_runtime, train_trial

logger = logging.getLogger("mup_qwen")
SECTIONS = ("step", "loop", "adam", "memory", "threads")
DEFAULT_SECTIONS = ("step", "loop", "memory", "threads")


# ---------------------------------------------------------------------------
# μP step against the plain transformers step


def attention_kernels(model, batch: torch.Tensor) -> tuple[list[str], list[float]]:
    """Run one forward and backward pass and return the SDPA kernels that ran and the scales passed to SDPA."""
    scales = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        scales.append(kwargs.get("scale"))
        return original(*args, **kwargs)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if batch.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    F.scaled_dot_product_attention = recording
    try:
        with torch.profiler.profile(activities=activities) as profile:
            lm_loss(model, batch).backward()
    finally:
        F.scaled_dot_product_attention = original
    model.zero_grad(set_to_none=True)
    names = {event.key for event in profile.key_averages()}
    # Backend kernels are the aten ops below `scaled_dot_product_attention`: flash, efficient, cudnn or math.
    kernels = sorted(name for name in names if name.startswith("aten::_scaled_dot_product")
                     or name.startswith("aten::_efficient_attention") or name.startswith("aten::_flash_attention"))
    return kernels, sorted(set(scales))


def bench_step(settings, corpus, device, args) -> list[dict]:
    rows = []
    for width in settings.model.widths:
        logger.info("step: width %d", width)
        batches = harness.fixed_batches(corpus, settings, 16, device)
        mup_model, mup_optimizer = harness.mup_variant(settings, width, corpus.vocab_size, device)
        plain_model, plain_optimizer = harness.plain_variant(settings, width, corpus.vocab_size, device)

        checks = {}
        for name, model in (("mup", mup_model), ("plain", plain_model)):
            kernels, scales = attention_kernels(model, batches[0])
            checks[name] = {"attn_implementation": model.config._attn_implementation,
                            "kernels": kernels, "scales": scales}
            if any("math" in kernel for kernel in kernels):
                logger.warning("width %d, %s model: SDPA fell back to the math kernel: %s", width, name, kernels)

        runners = {"mup": harness.StepRunner(mup_model, mup_optimizer, batches, device),
                   "plain": harness.StepRunner(plain_model, plain_optimizer, batches, device)}
        for runner in runners.values():
            runner.seconds_per_step(3)
        times = harness.interleave({name: (lambda r=runner: r.seconds_per_step(args.steps))
                                    for name, runner in runners.items()}, args.repeats)

        ffn = intermediate_size(settings.model, width)
        tokens = settings.data.batch_size * settings.data.seq_len
        flops_per_token = harness.train_flops_per_token(mup_model, settings, width)
        seconds = statistics.median(times["mup"])
        rows.append({
            "width": width,
            "parameters": sum(p.numel() for p in mup_model.parameters()),
            "mup_ms": 1000 * seconds,
            "plain_ms": 1000 * statistics.median(times["plain"]),
            "ratios": harness.paired_ratios(times["mup"], times["plain"]),
            "tokens_per_second": tokens / seconds,
            "model_flops_per_second": flops_per_token * tokens / seconds,
            "ffn_matmul_flops_per_second": harness.matmul_flops_per_second(tokens, width, ffn, device),
            "checks": checks,
        })
    return rows


def print_step(rows: list[dict], reference_flops: float) -> None:
    print("\n### μP step against the plain transformers step\n")
    print("| width | parameters | μP ms/step | plain ms/step | μP / plain time | tokens/s "
          "| model GFLOP/s | FFN-shape matmul GFLOP/s | fraction of FFN-shape matmul | fraction of 1024³ matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        model_flops = row["model_flops_per_second"]
        print(f"| {row['width']} | {row['parameters']:,} | {row['mup_ms']:.1f} | {row['plain_ms']:.1f} "
              f"| {harness.summary(row['ratios'])} | {row['tokens_per_second']:,.0f} | {model_flops / 1e9:.1f} "
              f"| {row['ffn_matmul_flops_per_second'] / 1e9:.1f} "
              f"| {model_flops / row['ffn_matmul_flops_per_second']:.2f} | {model_flops / reference_flops:.2f} |")
    print("\nAttention: the implementation in the config, the SDPA kernels that ran in one forward and "
          "backward pass, and the scales passed to SDPA:\n")
    for row in rows:
        parts = [f"{name}: {check['attn_implementation']}, {', '.join(check['kernels'])}, scale {check['scales']}"
                 for name, check in row["checks"].items()]
        print(f"- width {row['width']}: " + "; ".join(parts))


# ---------------------------------------------------------------------------
# train_trial against a minimal loop


def minimal_loop(model, settings, corpus, device, steps: int) -> float:
    """Train with the plainest loop over `train_trial`'s batches and optimizer, and return the first loss."""
    optim = settings.optim
    optimizer = MuAdam(model.parameters(), lr=harness.BENCH_LR, betas=tuple(optim.betas), eps=optim.eps)
    batches = train_batches(corpus, settings.data.batch_size, settings.data.seq_len, harness.BENCH_SEED)
    first = None
    for _ in range(steps):
        loss = lm_loss(model, next(batches).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if first is None:
            first = loss.detach()
    return first.item()


def bench_loop(settings, corpus, device, args) -> list[dict]:
    rows = []
    for width in settings.model.widths:
        logger.info("loop: width %d", width)
        first_losses = {"train_trial": [], "minimal": []}
        build_seconds = []

        def timed(name: str) -> float:
            start = harness.clock()
            model, _ = harness.mup_variant(settings, width, corpus.vocab_size, device)
            build_seconds.append(harness.clock() - start)
            harness.sync(device)
            start = harness.clock()
            if name == "train_trial":
                result = train_trial(settings, width, "mup", harness.BENCH_LR, harness.BENCH_SEED, args.trial_steps,
                                     device=device, corpus=corpus, model=model, evaluate_at_end=False)
                first_losses[name].append(result.train_losses[0][1])
            else:
                first_losses[name].append(minimal_loop(model, settings, corpus, device, args.trial_steps))
            harness.sync(device)
            return harness.clock() - start

        times = harness.interleave({"train_trial": lambda: timed("train_trial"),
                                    "minimal": lambda: timed("minimal")}, args.repeats)
        if first_losses["train_trial"][0] != first_losses["minimal"][0]:
            raise MupQwenError(f"width {width}: train_trial's first loss {first_losses['train_trial'][0]} differs "
                               f"from the minimal loop's {first_losses['minimal'][0]}: they train different "
                               "models or batches, so their times cannot be compared.")

        model, _ = harness.mup_variant(settings, width, corpus.vocab_size, device)
        batches = val_batches(corpus, settings.data.batch_size, settings.data.seq_len, settings.data.val_batches)
        start = harness.clock()
        evaluate(model, batches, device, settings.run.precision)
        evaluate_seconds = harness.clock() - start

        step_seconds = statistics.median(times["minimal"]) / args.trial_steps
        rows.append({"width": width, "speed_ratios": harness.paired_ratios(times["minimal"], times["train_trial"]),
                     "trial_ms_per_step": 1000 * statistics.median(times["train_trial"]) / args.trial_steps,
                     "minimal_ms_per_step": 1000 * step_seconds,
                     "build_seconds": statistics.median(build_seconds), "evaluate_seconds": evaluate_seconds,
                     "sweep_trial_seconds": step_seconds * settings.sweep.steps})
    return rows


def print_loop(rows: list[dict], trial_steps: int, sweep_steps: int) -> None:
    print(f"\n### train_trial against a minimal loop ({trial_steps} steps each, same model, batches and MuAdam)\n")
    print("| width | train_trial ms/step | minimal ms/step | train_trial speed / minimal "
          f"| build_model s | final evaluate s | both as share of a {sweep_steps}-step trial |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        share = (row["build_seconds"] + row["evaluate_seconds"]) / row["sweep_trial_seconds"]
        print(f"| {row['width']} | {row['trial_ms_per_step']:.1f} | {row['minimal_ms_per_step']:.1f} "
              f"| {harness.summary(row['speed_ratios'])} | {row['build_seconds']:.3f} "
              f"| {row['evaluate_seconds']:.3f} | {100 * share:.1f}% |")


# ---------------------------------------------------------------------------
# Adam implementations


ADAM_VARIANTS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def bench_adam(settings, corpus, device, args) -> list[dict]:
    """Time the μP step with torch's three Adam implementations and compare their losses.

    `build_optimizer` passes neither `foreach` nor `fused`, so torch picks the for-loop
    implementation on the CPU and foreach on CUDA.
    """
    rows = []
    for width in settings.model.widths:
        logger.info("adam: width %d", width)
        batches = harness.fixed_batches(corpus, settings, 16, device)
        runners = {}
        for name, options in ADAM_VARIANTS.items():
            model, _ = harness.mup_variant(settings, width, corpus.vocab_size, device)
            optimizer = MuAdam(model.parameters(), lr=harness.BENCH_LR, betas=tuple(settings.optim.betas),
                               eps=settings.optim.eps, **options)
            runners[name] = harness.StepRunner(model, optimizer, batches, device)
        losses = {name: [runner.step().item() for _ in range(3)] for name, runner in runners.items()}
        times = harness.interleave({name: (lambda r=runner: r.seconds_per_step(args.steps))
                                    for name, runner in runners.items()}, args.repeats)
        rows.append({"width": width, **{f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()},
                     "foreach_speed": harness.paired_ratios(times["for-loop"], times["foreach"]),
                     "fused_speed": harness.paired_ratios(times["for-loop"], times["fused"]),
                     "max_loss_difference": max(abs(a - b) for name in ("foreach", "fused")
                                                for a, b in zip(losses[name], losses["for-loop"]))})
    return rows


def print_adam(rows: list[dict]) -> None:
    print("\n### μP step with torch's Adam implementations (MuAdam with foreach or fused)\n")
    print("| width | for-loop ms/step | foreach ms/step | fused ms/step | foreach speed / for-loop "
          "| fused speed / for-loop | max loss difference over 3 steps |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['width']} | {row['for-loop_ms']:.1f} | {row['foreach_ms']:.1f} | {row['fused_ms']:.1f} "
              f"| {harness.summary(row['foreach_speed'])} | {harness.summary(row['fused_speed'])} "
              f"| {row['max_loss_difference']:.2g} |")


# ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="profiles/cpu.yml", help="settings file (default: profiles/cpu.yml)")
    parser.add_argument("--widths", type=widths_arg, help="hidden sizes, e.g. 64,128,256 (default: model.widths)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat of a step comparison (default: 5)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each variant, interleaved (default: 5)")
    parser.add_argument("--trial-steps", type=int, default=10, help="steps of each train_trial repeat (default: 10)")
    parser.add_argument("--memory-steps", type=int, default=5, help="steps of the trial whose peak memory is read (default: 5)")
    parser.add_argument("--thread-steps", type=int, default=2,
                        help="timed steps per repeat of the threads section, where one 2-thread step can take "
                             "seconds (default: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the step, loop and memory sections (default: 1, because with 2 "
                             "threads a busy core slowed steps by up to 80x here; the threads section compares them)")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="clock of the step, loop and adam sections: this process's CPU time, or wall time "
                             "(default auto: CPU time on the CPU with 1 thread, else wall time)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, from {', '.join(SECTIONS)} "
                             f"(default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="device (run.device)")
    parser.add_argument("--json", help="also write the raw numbers to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> list[str]:
    for name in ("steps", "repeats", "trial_steps", "memory_steps", "thread_steps", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise MupQwenError(f"--{name.replace('_', '-')} is {value}, expected a positive integer.")
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise MupQwenError(f"--sections {args.sections!r} names no or unknown sections {unknown}. "
                           f"Choose from {', '.join(SECTIONS)}.")
    return sections


def main() -> None:
    args = parse_args()
    setup_logging(args.verbose)
    sys.stdout.reconfigure(line_buffering=True)
    sections = check_args(args)
    torch.set_num_threads(args.threads)

    settings = load_settings(args.config)
    if args.widths:
        settings = override(settings, "model.widths", args.widths)
    if args.device:
        settings = override(settings, "run.device", args.device)
    # The benchmark sets torch's threads itself, per process.
    settings = override(settings, "run.threads", None)

    with tempfile.TemporaryDirectory(prefix="bench_step_") as folder:
        settings = override(settings, "run.base_shapes", str(Path(folder) / "base_shapes.bsh"))
        make_base_shapes(settings)
        settings_file = Path(folder) / "settings.json"
        settings_file.write_text(json.dumps(settings.to_dict()))
        device = setup_runtime(settings.run)
        corpus = load_corpus(settings.data)
        if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
            raise MupQwenError(f"--clock cpu needs the CPU device and --threads 1, not {device.type} with "
                               f"{args.threads} threads: CPU time would miss GPU work or add up threads. "
                               "Use --clock wall.")
        cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu" and args.threads == 1)
        harness.use_cpu_clock(cpu_clock)
        args.clock = "cpu" if cpu_clock else "wall"

        # Each table is printed as soon as its section ends, so an interrupted run keeps what it measured.
        started = time.perf_counter()
        load_before = harness.load_average()
        results = {"machine": harness.machine_info(device), "command": "python " + " ".join(sys.argv),
                   "clock": args.clock}
        reference = harness.matmul_flops_per_second(1024, 1024, 1024, device)
        results["reference_matmul_flops_per_second"] = reference
        print_machine(results, settings, args)
        if "step" in sections:
            results["step"] = bench_step(settings, corpus, device, args)
            print_step(results["step"], reference)
        if "loop" in sections:
            results["loop"] = bench_loop(settings, corpus, device, args)
            print_loop(results["loop"], args.trial_steps, settings.sweep.steps)
        if "adam" in sections:
            results["adam"] = bench_adam(settings, corpus, device, args)
            print_adam(results["adam"])
        if "memory" in sections:
            results["memory"] = process_sections.bench_memory(settings, settings_file, args)
            process_sections.print_memory(results["memory"], args.memory_steps)
        if "threads" in sections:
            results["threads"] = process_sections.bench_threads(settings, settings_file, args)
            process_sections.print_threads(results["threads"])

    results["seconds"] = time.perf_counter() - started
    results["load_average"] = f"{load_before} at the start, {harness.load_average()} at the end"
    print(f"\nLoad average (1, 5, 15 min): {results['load_average']}. Run time: {results['seconds']:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def print_machine(results: dict, settings, args: argparse.Namespace) -> None:
    print("### Machine and command\n")
    for key, value in results["machine"].items():
        print(f"- {key}: {value}")
    print(f"- float32 1024³ matmul: {results['reference_matmul_flops_per_second'] / 1e9:.1f} GFLOP/s")
    layout = head_layout(settings.model, settings.model.base_width)
    print(f"- settings: {args.config}, batch {settings.data.batch_size} × seq {settings.data.seq_len}, "
          f"{settings.model.num_layers} layers, head_dim {layout.head_dim}, base width {settings.model.base_width}")
    print(f"- command: `{results['command']}`")
    print("- ratios: the median of per-repeat ratios (min-max over repeats; the ratio of the fastest repeats)")
    if args.clock == "cpu":
        print("- clock of the step, loop and adam sections: CPU time of the benchmark process (1 thread), "
              "which leaves out time spent waiting for a core; the threads section uses wall time")
    else:
        print("- clock: wall time")


if __name__ == "__main__":
    run_main(main)
