"""μP for Hugging Face transformers' Qwen2 and Qwen3 models.

Build a model at any width in μP or SP, train it with the matching optimizer, and
check that hyperparameters transfer across widths.
"""

from mup_qwen.data import load_corpus, train_batches, val_batches
from mup_qwen.model import (
    Readout,
    SharedReadout,
    apply_attention_scale,
    build_model,
    init_weights,
    load_model,
    parameter_roles,
    replace_readout,
    save_model,
)
from mup_qwen.optim import build_optimizer, build_scheduler
from mup_qwen.settings import MupQwenError, Settings, SettingsError, load_settings
from mup_qwen.shapes import BaseShapesError, make_base_shapes, restore_base_shapes
from mup_qwen.train import TrialResult, evaluate, resolve_device, train_trial

__all__ = [
    "BaseShapesError", "MupQwenError", "Readout", "Settings", "SettingsError", "SharedReadout", "TrialResult",
    "apply_attention_scale", "build_model", "build_optimizer", "build_scheduler", "evaluate", "init_weights",
    "load_corpus", "load_model", "load_settings", "make_base_shapes", "parameter_roles", "replace_readout",
    "resolve_device", "restore_base_shapes", "save_model", "train_batches", "train_trial", "val_batches",
]
