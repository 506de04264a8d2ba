"""Device selection and the training loop shared by the coordinate check and the LR sweep."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from mup_qwen.data import Corpus, load_corpus, train_batches, val_batches
from mup_qwen.model import Parametrization, build_model
from mup_qwen.optim import build_optimizer, build_scheduler
from mup_qwen.settings import MupQwenError, RunSettings, Settings

logger = logging.getLogger("mup_qwen")


# ---------------------------------------------------------------------------
# Device and precision


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for `run.device`: "auto" picks CUDA, then MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MupQwenError("run.device is 'cuda' but no CUDA device is available. Use --device auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MupQwenError("run.device is 'mps' but MPS is not available. Use --device auto or cpu.")
    return torch.device(name)


def setup_runtime(run: RunSettings) -> torch.device:
    """Apply thread count and TF32 settings, and return the device."""
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = run.tf32
        torch.backends.cudnn.allow_tf32 = run.tf32
    return resolve_device(run.device)


def autocast(device: torch.device, precision: str):
    """Return a bf16 autocast context for `run.precision` "bfloat16", else a no-op context."""
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Steps


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Return the mean next-token cross-entropy of a batch of `seq_len + 1` tokens."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Run one forward pass, backward pass and optimizer step on a batch, and return the detached loss."""
    with autocast(batch.device, settings.run.precision):
        loss = lm_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.optim.grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device, precision: str = "float32") -> float:
    """Return the mean loss over fixed batches, in eval mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with autocast(device, precision):
        for batch in batches:
            total += lm_loss(model, batch.to(device))
    model.train(was_training)
    return float(total) / len(batches)


@dataclass
class TrialResult:
    """Outcome of one training run."""

    steps_done: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    final_train_loss: float = math.nan
    val_loss: float = math.nan
    diverged: bool = False
    seconds: float = 0.0


def is_diverged(loss: float, initial_loss: float, factor: float) -> bool:
    """Return True for a NaN or infinite loss, or one above `factor` × the initial loss."""
    return not math.isfinite(loss) or loss > factor * initial_loss


def train_trial(
    settings: Settings,
    width: int,
    parametrization: Parametrization,
    lr: float,
    seed: int,
    steps: int,
    *,
    device: Optional[torch.device] = None,
    corpus: Optional[Corpus] = None,
    batch_size: Optional[int] = None,
    divergence_factor: Optional[float] = None,
    log_every: Optional[int] = None,
    evaluate_at_end: bool = True,
    on_log: Optional[Callable[[int, float], None]] = None,
    model: Optional[nn.Module] = None,
) -> TrialResult:
    """Train one model for `steps` steps and return its losses.

    The loss is read back every `log_every` steps. A NaN, an infinite loss, or one above
    `divergence_factor` × the first step's loss stops the run early as diverged.
    `on_log(step, loss)` is called at each read-back, for progress bars.
    """
    start = time.perf_counter()
    device = device or setup_runtime(settings.run)
    corpus = corpus or load_corpus(settings.data)
    batch_size = batch_size or settings.data.batch_size
    factor = divergence_factor or settings.sweep.divergence_factor
    log_every = log_every or settings.sweep.log_every

    if model is None:
        model = build_model(settings, width, parametrization, seed=seed, vocab_size=corpus.vocab_size)
    model.to(device).train()
    optimizer = build_optimizer(model, settings, lr, parametrization)
    scheduler = build_scheduler(optimizer, settings.optim.warmup_steps)
    batches = train_batches(corpus, batch_size, settings.data.seq_len, seed)

    result = TrialResult(steps_done=0)
    pending: list[torch.Tensor] = []
    initial_loss: Optional[float] = None
    for step in range(1, steps + 1):
        batch = next(batches).to(device, non_blocking=True)
        pending.append(train_step(model, optimizer, batch, settings))
        scheduler.step()
        result.steps_done = step

        if step == 1 or step % log_every == 0 or step == steps:
            # One host read-back per `log_every` steps keeps the GPU from waiting on the CPU.
            values = torch.stack(pending).float().cpu().tolist()
            pending.clear()
            if initial_loss is None:
                initial_loss = values[0]
            window_mean = sum(values) / len(values)
            result.train_losses.append((step, window_mean))
            if on_log is not None:
                on_log(step, window_mean)
            if any(is_diverged(v, initial_loss, factor) for v in values):
                result.diverged = True
                break

    tail = [loss for _, loss in result.train_losses[-max(1, len(result.train_losses) // 10):]]
    result.final_train_loss = sum(tail) / len(tail)
    if evaluate_at_end and not result.diverged:
        batches_val = val_batches(corpus, batch_size, settings.data.seq_len, settings.data.val_batches)
        result.val_loss = evaluate(model, batches_val, device, settings.run.precision)
        if not math.isfinite(result.val_loss):
            result.diverged = True
    result.seconds = time.perf_counter() - start
    return result
