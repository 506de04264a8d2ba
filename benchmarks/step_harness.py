"""Shared pieces of the training-step benchmarks: models, timed steps, the clock and FLOP counts.

`bench_step.py` and its subprocess worker `bench_worker.py` import this module, so both
time the same step (forward, cross-entropy, backward, optimizer step) on the same batches.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mup_qwen.data import Corpus, train_batches  # noqa: E402
from mup_qwen.model import build_model, model_class, qwen_config  # noqa: E402
from mup_qwen.optim import build_optimizer  # noqa: E402
from mup_qwen.settings import Settings, head_layout  # noqa: E402
from mup_qwen.train import lm_loss  # noqa: E402

# The benchmarks train at the base LR 2^-9, inside the useful range of the CPU sweep.
BENCH_LR = 2.0 ** -9
BENCH_SEED = 0


_clock = time.perf_counter


def use_cpu_clock(enabled: bool) -> None:
    """Time steps by this process's CPU time (`time.process_time`) instead of the wall clock.

    With one torch thread, CPU time leaves out the time the process waited for a core,
    which on a shared machine is most of the noise. With more threads it adds the threads
    up and counts spinning at barriers, so it is only meaningful with one.
    """
    global _clock
    _clock = time.process_time if enabled else time.perf_counter


def clock() -> float:
    """Return the current time of the clock chosen by `use_cpu_clock`, in seconds."""
    return _clock()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock brackets the whole step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_batches(corpus: Corpus, settings: Settings, count: int, device: torch.device) -> list[torch.Tensor]:
    """Return the first `count` training batches of `BENCH_SEED`, already on `device`."""
    batches = train_batches(corpus, settings.data.batch_size, settings.data.seq_len, BENCH_SEED)
    return [next(batches).to(device) for _ in range(count)]


def mup_variant(settings: Settings, width: int, vocab_size: int, device: torch.device):
    """Return the μP model of `build_model` and its `MuAdam` (the project's path)."""
    model = build_model(settings, width, "mup", seed=BENCH_SEED, vocab_size=vocab_size).to(device).train()
    return model, build_optimizer(model, settings, BENCH_LR, "mup")


def plain_variant(settings: Settings, width: int, vocab_size: int, device: torch.device):
    """Return transformers' own Qwen model with its own init and torch's `Adam`: no μP patch at all."""
    torch.manual_seed(BENCH_SEED)
    model = model_class(settings)(qwen_config(settings, width, vocab_size)).to(device).train()
    optim = settings.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=BENCH_LR, betas=tuple(optim.betas), eps=optim.eps)
    return model, optimizer


class StepRunner:
    """Runs training steps (forward, loss, backward, optimizer step) of one model over fixed batches."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
                 device: torch.device):
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.device = device
        self.position = 0

    def step(self) -> torch.Tensor:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        loss = lm_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def seconds_per_step(self, steps: int) -> float:
        """Run `steps` steps and return the mean seconds of one, by `clock()`."""
        sync(self.device)
        start = clock()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (clock() - start) / steps


# ---------------------------------------------------------------------------
# Interleaved repeats


def interleave(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each variant once per repeat, reversing the order every other repeat (A B, B A, ...).

    On a shared machine the load drifts. Alternating the order spreads the drift over all
    variants, and a ratio taken within one repeat compares runs made seconds apart.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(variants[name]())
    return times


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict:
    """Return the per-repeat ratios of two variants' times and the ratio of their fastest repeats.

    Load on a shared machine only ever slows a run, so the fastest repeats are the
    least disturbed ones. The median of per-repeat ratios uses every repeat.
    """
    return {"per_repeat": [a / b for a, b in zip(numerators, denominators)],
            "of_fastest": min(numerators) / min(denominators)}


def summary(ratios: dict) -> str:
    """Format a `paired_ratios` result as `median (min-max; fastest)`, e.g. `1.012 (0.990-1.030; 1.004)`."""
    per_repeat = ratios["per_repeat"]
    return (f"{statistics.median(per_repeat):.3f} ({min(per_repeat):.3f}-{max(per_repeat):.3f}; "
            f"{ratios['of_fastest']:.3f})")


# ---------------------------------------------------------------------------
# FLOPs


def matmul_parameters(model: nn.Module) -> int:
    """Return the weight entries that take part in a matmul: every `nn.Linear`, the readout included."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))


def train_flops_per_token(model: nn.Module, settings: Settings, width: int) -> float:
    """Return the model FLOPs of one training token: 6 N + 12 L T d_attn.

    N counts the matmul weights (embedding lookups are not matmuls). The attention term
    counts q·kᵀ and the weighted sum of v over the full T × T matrix, with no saving for the
    causal mask, as PaLM's model FLOPs utilisation counts it. Backward costs twice forward.
    """
    layout = head_layout(settings.model, width)
    attention = 12 * settings.model.num_layers * settings.data.seq_len * layout.num_heads * layout.head_dim
    return 6 * matmul_parameters(model) + attention


def matmul_flops_per_second(rows: int, inner: int, cols: int, device: torch.device,
                            min_seconds: float = 0.2, repeats: int = 5) -> float:
    """Return the median float32 FLOP/s of `(rows × inner) @ (inner × cols)` over `repeats` timed blocks."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(rows, inner, generator=generator).to(device)
    right = torch.randn(inner, cols, generator=generator).to(device)
    flops = 2.0 * rows * inner * cols

    torch.mm(left, right)
    sync(device)
    start = clock()
    torch.mm(left, right)
    sync(device)
    calls_per_block = max(1, int(min_seconds / max(clock() - start, 1e-7)))

    rates = []
    for _ in range(repeats):
        sync(device)
        start = clock()
        for _ in range(calls_per_block):
            torch.mm(left, right)
        sync(device)
        rates.append(flops * calls_per_block / (clock() - start))
    return statistics.median(rates)


# ---------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    """Return lscpu's "Model name", or the platform's processor string where lscpu is missing."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch threads": str(torch.get_num_threads()),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> Optional[str]:
    if not hasattr(os, "getloadavg"):
        return None
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
