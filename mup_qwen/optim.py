"""Optimizers: mup's `MuAdam`/`MuAdamW`/`MuSGD` for μP, torch's own for SP.

Under μP with Adam, a hidden matrix with fan-in width multiplier `m` gets LR `η/m` and
weight decay `wd × m`, so `lr × wd` stays constant in width. Embeddings, biases,
norm gains and the readout keep `η`. The warm-up schedule scales each group's own LR.
"""

from __future__ import annotations

import torch
from mup import MuAdam, MuAdamW, MuSGD
from torch import nn

from mup_qwen.model import Parametrization, check_parametrization
from mup_qwen.settings import Settings, SettingsError

MUP_OPTIMIZERS = {"adam": MuAdam, "adamw": MuAdamW, "sgd": MuSGD}
SP_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(model: nn.Module, settings: Settings, lr: float, parametrization: Parametrization):
    """Return the configured optimizer (`optim.optimizer`) with base learning rate `lr`."""
    check_parametrization(parametrization)
    if not lr > 0:
        raise SettingsError(f"learning rate is {lr}, expected a positive number. Pass a positive lr (2**log2_lr).")
    optim = settings.optim
    kwargs = dict(lr=lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "sgd":
        kwargs["momentum"] = optim.momentum
    else:
        kwargs.update(betas=tuple(optim.betas), eps=optim.eps)
    table = MUP_OPTIMIZERS if parametrization == "mup" else SP_OPTIMIZERS
    return table[optim.optimizer](model.parameters(), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a linear warm-up over `warmup_steps`, then a constant LR.

    `LambdaLR` multiplies each group's own initial LR, so μP's per-group LRs keep their ratios.
    """
    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
