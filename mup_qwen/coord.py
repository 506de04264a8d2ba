"""Coordinate check: how each module's output scale changes with width over a few training steps.

`coord_run` trains one model and records, at every step, statistics of each module's output
in that step's forward pass (step 1 is the init). `mup_qwen.coord_verdict` fits log(l1)
against log(width) per module type and decides whether each type stays width-independent.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv

from mup_qwen.coord_verdict import MODULE_TYPES, judge
from mup_qwen.data import load_corpus, train_batches
from mup_qwen.executor import Task, TaskFailure, run_tasks
from mup_qwen.model import ATTENTION_CLASSES, PARAMETRIZATIONS, Parametrization, build_model, parameter_roles
from mup_qwen.optim import build_optimizer
from mup_qwen.settings import MupQwenError, Settings
from mup_qwen.shapes import check_base_shapes_file
from mup_qwen.train import setup_runtime, train_step

logger = logging.getLogger("mup_qwen")

STATISTICS = ("l1", "mean", "std", "rms", "max_abs")
QWEN3_ONLY_TYPES = ("q_norm", "k_norm")

ModelTransform = Callable[[nn.Module, Settings], None]


def module_types_of(settings: Settings) -> list[str]:
    """Return the module types the coordinate check records for the settings' model family."""
    if settings.model.family == "qwen3":
        return list(MODULE_TYPES)
    return [name for name in MODULE_TYPES if name not in QWEN3_ONLY_TYPES]


def check_coord_settings(settings: Settings, modules: Optional[list[str]] = None) -> list[str]:
    """Return the module types to record, or raise `MupQwenError` for settings the check cannot judge."""
    widths = settings.model.widths
    if len(widths) < 2:
        raise MupQwenError(
            f"model.widths is {widths}: the coordinate check fits a slope across widths and needs at least two. "
            "Pass --widths with two or more widths, such as --widths 64,128,256."
        )
    if len(widths) == 2:
        logger.warning("model.widths has two widths, %s: a slope through two points is noisy, and correct μP "
                       "can fail the check. Use three or more widths, such as 64,128,256.", widths)
    known = module_types_of(settings)
    if modules is None:
        return known
    if not modules:
        raise MupQwenError(f"--modules is empty. Name one or more module types: {', '.join(known)}.")
    unknown = [name for name in modules if name not in known]
    if unknown:
        raise MupQwenError(
            f"unknown module type {unknown[0]!r} in --modules. Valid module types "
            f"({settings.model.family}): {', '.join(known)}."
        )
    return [name for name in known if name in modules]


def module_type(name: str) -> Optional[str]:
    """Return the module type of a module name (`model.layers.0.self_attn.q_proj` is "q_proj"), or None."""
    if name == "model.embed_tokens":
        return "embed_tokens"
    if name == "model.norm":
        return "final_norm"
    if name == "lm_head":
        return "lm_head"
    if re.fullmatch(r"model\.layers\.\d+\.self_attn", name):
        return "attn_logits"
    last = name.rsplit(".", 1)[-1]
    if re.fullmatch(r"model\.layers\.\d+\..+", name) and last in MODULE_TYPES:
        return last
    return None


# ---------------------------------------------------------------------------
# Recording


def coord_statistics(values: torch.Tensor) -> torch.Tensor:
    """Return the statistics named in `STATISTICS` of a tensor, as one float32 vector on its device."""
    values = values.detach().float().reshape(-1)
    absolute = values.abs()
    return torch.stack([absolute.mean(), values.mean(), values.std(), values.pow(2).mean().sqrt(), absolute.max()])


def attention_logits(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Return the pre-softmax attention logits q·kᵀ × `module.scaling`, shape (batch, heads, seq, seq), unmasked.

    The fused attention kernels never materialise the logits, so they are recomputed from the
    attention module's input with the module's own weights. Calling `.forward` directly keeps
    the projections' hooks from recording the recomputation.
    """
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    query = module.q_proj.forward(hidden_states).view(shape)
    key = module.k_proj.forward(hidden_states).view(shape)
    if hasattr(module, "q_norm"):  # Qwen3 normalises each head's query and key before the rotary embedding
        query, key = module.q_norm.forward(query), module.k_norm.forward(key)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    key = repeat_kv(key, module.num_key_value_groups)
    return torch.matmul(query, key.transpose(2, 3)) * module.scaling


def causal_entries(logits: torch.Tensor) -> torch.Tensor:
    """Return the entries of (..., seq, seq) attention logits that a causal mask keeps, flattened."""
    seq_len = logits.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=logits.device).tril()
    return logits[..., causal]


class CoordRecorder:
    """Forward hooks that store `coord_statistics` of chosen modules' outputs, per step.

    Use as a context manager around the training loop and set `step` before each forward pass.
    """

    def __init__(self, model: nn.Module, module_types: list[str]):
        self.model = model
        self.module_types = set(module_types)
        self.step = 0
        self.records: list[tuple[str, str, int, torch.Tensor]] = []
        self.handles: list = []

    def __enter__(self) -> "CoordRecorder":
        for name, module in self.model.named_modules():
            kind = module_type(name)
            if kind is None or kind not in self.module_types:
                continue
            if kind == "attn_logits":
                if not isinstance(module, ATTENTION_CLASSES):
                    continue
                hook = self._attention_hook(name)
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(self._output_hook(name, kind)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _output_hook(self, name: str, kind: str):
        def hook(module, args, output):
            self.records.append((name, kind, self.step, coord_statistics(output)))
        return hook

    def _attention_hook(self, name: str):
        def hook(module, args, kwargs, output):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            position_embeddings = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            with torch.no_grad():
                logits = attention_logits(module, hidden_states.detach(), position_embeddings)
                stats = coord_statistics(causal_entries(logits))
            self.records.append((name, "attn_logits", self.step, stats))
        return hook

    def frame(self) -> pd.DataFrame:
        """Return the records in long format: module, module_type, step, statistic, value."""
        if not self.records:
            return pd.DataFrame(columns=["module", "module_type", "step", "statistic", "value"])
        values = torch.stack([stats for *_, stats in self.records]).cpu().numpy()
        rows = []
        for (name, kind, step, _), stats in zip(self.records, values):
            for statistic, value in zip(STATISTICS, stats):
                rows.append((name, kind, step, statistic, float(value)))
        return pd.DataFrame(rows, columns=["module", "module_type", "step", "statistic", "value"])


def coord_run(
    settings: Settings,
    width: int,
    parametrization: Parametrization,
    seed: int,
    module_types: Optional[list[str]] = None,
    model_transform: Optional[ModelTransform] = None,
) -> pd.DataFrame:
    """Train one model for `coord.steps` steps and return its module statistics in long format.

    The row of step t contains the activations of the forward pass that computes step t's loss, so
    step 1 is the init. The LR is 2**`coord.log2_lr`, held constant: a warm-up would shrink the
    first updates and hide the growth the check is looking for. `model_transform(model,
    settings)` runs after `build_model`, to check a model with a rule deliberately broken. It
    must be a module-level function, because the Ray executor pickles it into another process.
    """
    device = setup_runtime(settings.run)
    torch.manual_seed(seed)
    corpus = load_corpus(settings.data)
    model = build_model(settings, width, parametrization, seed=seed, vocab_size=corpus.vocab_size)
    if model_transform is not None:
        model_transform(model, settings)
    model.to(device).train()
    optimizer = build_optimizer(model, settings, 2.0 ** settings.coord.log2_lr, parametrization)
    batches = train_batches(corpus, settings.coord.batch_size, settings.data.seq_len, seed)

    with CoordRecorder(model, module_types or module_types_of(settings)) as recorder:
        for step in range(1, settings.coord.steps + 1):
            recorder.step = step
            train_step(model, optimizer, next(batches).to(device), settings)

    frame = recorder.frame()
    frame.insert(0, "seed", seed)
    frame.insert(0, "width", width)
    frame.insert(0, "parametrization", parametrization)
    return frame


# ---------------------------------------------------------------------------
# Known μP mistakes, applied to a built μP model to show that the check catches them


def keep_sqrt_attention_scale(model: nn.Module, settings: Settings) -> None:
    """Set the attention scale back to SP's 1/√head_dim in place of μP's attn_mult / head_dim.

    Under head_scaling "fixed_head_dim" both scales are the same constant at every width
    (attn_mult defaults to √head_dim), so the mistake only shows under "fixed_heads".
    """
    for module in model.modules():
        if isinstance(module, ATTENTION_CLASSES):
            module.scaling = module.head_dim ** -0.5


def keep_readout_unscaled(model: nn.Module, settings: Settings) -> None:
    """Drop the readout's division by the width multiplier, so logits are x·W × output_mult."""
    if hasattr(model.lm_head, "width_mult_value"):
        model.lm_head.width_mult_value = 1.0


def keep_hidden_init_unscaled(model: nn.Module, settings: Settings) -> None:
    """Redraw every hidden matrix from SP's N(0, σ) in place of μP's N(0, σ/√m), from torch's global RNG."""
    roles = parameter_roles(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if roles[name] == "hidden":
                parameter.normal_(0.0, settings.model.init_std)


MUP_MISTAKES: dict[str, ModelTransform] = {
    "attention_scale": keep_sqrt_attention_scale,
    "readout": keep_readout_unscaled,
    "hidden_init": keep_hidden_init_unscaled,
}


# ---------------------------------------------------------------------------
# The whole check


def read_coord_results(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Read the `coord_mup.csv` and `coord_sp.csv` records that `run_coord_check` wrote into `results_dir`."""
    results_dir = Path(results_dir)
    frames = {}
    for parametrization in PARAMETRIZATIONS:
        path = results_dir / f"coord_{parametrization}.csv"
        if path.is_file():
            frames[parametrization] = pd.read_csv(path)
    if not frames:
        raise MupQwenError(f"no coord_mup.csv or coord_sp.csv in {str(results_dir)!r}. "
                           "Run `python coord_check.py` first, or point to the folder it wrote.")
    return frames


def coord_tasks(
    settings: Settings,
    parametrizations: tuple[str, ...],
    module_types: list[str],
    model_transform: Optional[ModelTransform] = None,
) -> list[Task]:
    """Return one `coord_run` task per (parametrization, width, seed), keyed by that triple.

    `model_transform` applies to the μP models only.
    """
    return [
        Task(key=(parametrization, width, seed), function=coord_run,
             kwargs=dict(settings=settings, width=width, parametrization=parametrization, seed=seed,
                         module_types=module_types,
                         model_transform=model_transform if parametrization == "mup" else None))
        for parametrization in parametrizations
        for width in settings.model.widths
        for seed in settings.coord.seeds
    ]


def run_coord_check(
    settings: Settings,
    *,
    module_types: Optional[list[str]] = None,
    parametrizations: tuple[str, ...] = PARAMETRIZATIONS,
    model_transform: Optional[ModelTransform] = None,
    executor_options: Optional[dict] = None,
    results_dir: Optional[str | Path] = None,
    progress: bool = True,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Run every (parametrization, width, seed) of the coordinate check and return the records and verdict.

    With `results_dir`, each finished run is added to `coord_<parametrization>.partial.csv` at
    once. Only when every run has finished do the partial files replace `coord_mup.csv` and
    `coord_sp.csv`, next to a new `coord_verdict.csv`, so an interrupted or failed check keeps
    both its finished runs and the previous complete results. A failed run raises `MupQwenError`
    once the others have finished.
    """
    module_types = check_coord_settings(settings, module_types)
    if "mup" in parametrizations:
        check_base_shapes_file(settings, settings.run.base_shapes)
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)

    tasks = coord_tasks(settings, parametrizations, module_types, model_transform)
    parts: dict[str, list[pd.DataFrame]] = {parametrization: [] for parametrization in parametrizations}
    failures: list[tuple[tuple, TaskFailure]] = []
    with tqdm(total=len(tasks), desc="coord runs", unit="run", disable=not progress) as bar:
        for key, result in run_tasks(tasks, **(executor_options or {})):
            bar.update()
            if isinstance(result, TaskFailure):
                failures.append((key, result))
                continue
            parametrization = key[0]
            parts[parametrization].append(result)
            logger.debug("coordinate-check run %s finished: %d records", key, len(result))
            if results_dir is not None:
                frame = pd.concat(parts[parametrization], ignore_index=True)
                frame.to_csv(results_dir / f"coord_{parametrization}.partial.csv", index=False)

    if failures:
        (parametrization, width, seed), failure = failures[0]
        finished_note = ""
        if results_dir is not None:
            finished_note = f" The runs that finished are in {str(results_dir)!r}, coord_*.partial.csv."
        raise MupQwenError(
            f"{len(failures)} of {len(tasks)} coordinate-check runs failed, the first at width {width}, "
            f"{parametrization}, seed {seed}: {failure.error.rstrip('.')}.{finished_note}"
        )
    frames = {name: pd.concat(frame_parts, ignore_index=True) for name, frame_parts in parts.items()}
    verdict = judge(frames)
    if results_dir is not None:
        for parametrization in frames:
            os.replace(results_dir / f"coord_{parametrization}.partial.csv", results_dir / f"coord_{parametrization}.csv")
        verdict.to_csv(results_dir / "coord_verdict.csv", index=False)
    return frames, verdict

