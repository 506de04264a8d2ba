"""Typed, validated settings read from `setting.yml`.

Every knob of the μP experiments lives in one `Settings` object made of sections
(`model`, `data`, `optim`, `coord`, `sweep`, `run`). A bad value raises
`SettingsError` with the field's dotted name, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class MupQwenError(Exception):
    """An error the scripts report as one line, with exit status 2."""


class SettingsError(MupQwenError):
    """An invalid or unknown field in a settings file or on the command line."""


@dataclass
class ModelSettings:
    """Qwen architecture and the μP width recipe."""

    family: Literal["qwen2", "qwen3"] = "qwen2"
    widths: list[int] = field(default_factory=lambda: [80, 160, 320, 640])
    base_width: int = 80
    num_layers: int = 2
    head_scaling: Literal["fixed_head_dim", "fixed_heads"] = "fixed_head_dim"
    head_dim: Optional[int] = 16
    num_heads: Optional[int] = None
    kv_groups: int = 1
    ffn_ratio: float = 4.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_mult: Optional[float] = None
    output_mult: float = 1.0
    readout_zero_init: bool = False
    query_zero_init: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0


@dataclass
class DataSettings:
    """Text source, tokenizer and batch shape."""

    source: Literal["shakespeare", "files", "huggingface"] = "shakespeare"
    path: Optional[str] = None
    hf_dataset: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    val_batches: int = 20
    batch_size: int = 8
    seq_len: int = 128


@dataclass
class OptimSettings:
    """Optimizer and learning-rate schedule shared by the coordinate check and the sweep."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    warmup_steps: int = 20
    grad_clip: Optional[float] = None


@dataclass
class CoordSettings:
    """Coordinate check: short training runs whose activation scale is compared across widths."""

    steps: int = 10
    log2_lr: float = -7.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 8


@dataclass
class SweepSettings:
    """Learning-rate sweep over a grid of log2 LR values at every width."""

    steps: int = 3000
    log2_lr_min: float = -16.0
    log2_lr_max: float = 0.0
    num_lrs: int = 17
    seeds: list[int] = field(default_factory=lambda: [0])
    divergence_factor: float = 1.5
    log_every: int = 10


@dataclass
class RunSettings:
    """Device, precision, threads and output paths of a run."""

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["float32", "bfloat16"] = "float32"
    tf32: bool = True
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    threads: Optional[int] = None
    base_shapes: str = "base_shapes.bsh"
    results_dir: str = "results"


@dataclass
class Settings:
    """All settings of one experiment, as read from `setting.yml`."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    coord: CoordSettings = field(default_factory=CoordSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HeadLayout:
    """Attention head counts at one width."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def head_layout(model: ModelSettings, width: int) -> HeadLayout:
    """Return the head counts and head_dim of `width` under the settings' head-scaling recipe."""
    if model.head_scaling == "fixed_head_dim":
        head_dim = model.head_dim
        num_heads = width // head_dim
    else:
        num_heads = model.num_heads
        head_dim = width // num_heads
    return HeadLayout(num_heads=num_heads, num_kv_heads=num_heads // model.kv_groups, head_dim=head_dim)


def attn_mult(model: ModelSettings) -> float:
    """Return the attention multiplier: the setting, or √(base head_dim) so that μP equals SP at the base width."""
    if model.attn_mult is not None:
        return float(model.attn_mult)
    return math.sqrt(head_layout(model, model.base_width).head_dim)


def intermediate_size(model: ModelSettings, width: int) -> int:
    """Return the FFN hidden size at `width`: `ffn_ratio × width`, rounded to an integer."""
    return int(round(model.ffn_ratio * width))


# ---------------------------------------------------------------------------
# Reading and type checking


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(names) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against `annotation` and return it converted (int to float where a float is expected)."""
    origin = typing.get_origin(annotation)
    expected = _type_name(annotation)

    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _coerce(name, value, inner)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise SettingsError(f"{name} is {value!r}, expected {expected}. Set it to one of those values.")
        return value
    if origin is list:
        if not isinstance(value, list) or not value:
            raise SettingsError(f"{name} is {value!r}, expected a non-empty list. Write it as [a, b, ...].")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{name} is {value!r}, expected true or false.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{name} is {value!r}, expected an integer.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{name} is {value!r}, expected a number.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SettingsError(f"{name} is {value!r}, expected a string.")
        return value
    raise TypeError(f"unsupported settings type {annotation!r} for {name}")


def _build_section(cls: type, name: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{name} is {raw!r}, expected a mapping of fields. See setting.yml for the layout.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise SettingsError(
                f"unknown field {name}.{key}. Valid fields of {name}: {', '.join(sorted(known))}."
            )
    values = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in raw.items()}
    return cls(**values)


def settings_from_dict(raw: Any) -> Settings:
    """Build and validate `Settings` from a parsed YAML mapping; missing fields keep their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"the settings file contains {type(raw).__name__}, expected a mapping of sections.")
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    for key in raw:
        if key not in sections:
            raise SettingsError(f"unknown section {key!r}. Valid sections: {', '.join(sections)}.")
    hints = typing.get_type_hints(Settings)
    built = {key: _build_section(hints[key], key, raw.get(key)) for key in sections}
    settings = Settings(**built)
    validate(settings)
    return settings


def load_settings(path: str | Path = "setting.yml") -> Settings:
    """Read a settings file and return validated `Settings`, or raise `SettingsError` naming the bad field."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file {str(path)!r} not found. Pass --config PATH, or copy setting.yml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SettingsError(f"settings file {str(path)!r} is not valid YAML: {error}") from None
    return settings_from_dict(raw)


def override(settings: Settings, dotted: str, value: Any) -> Settings:
    """Return a copy of `settings` with one field (`section.field`) replaced, validated again."""
    raw = settings.to_dict()
    section, _, key = dotted.partition(".")
    raw[section][key] = value
    return settings_from_dict(raw)


# ---------------------------------------------------------------------------
# Validation across fields


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


def validate(settings: Settings) -> None:
    """Raise `SettingsError` for the first value that cannot run, naming the field and the fix."""
    model, data, optim, coord, sweep = settings.model, settings.data, settings.optim, settings.coord, settings.sweep

    for i, width in enumerate(model.widths):
        _require(width > 0, f"model.widths[{i}] is {width}, expected a positive integer.")
    _require(
        len(set(model.widths)) == len(model.widths),
        f"model.widths is {model.widths}, which repeats a width. List each width once.",
    )
    _require(model.base_width > 0, f"model.base_width is {model.base_width}, expected a positive integer.")
    _require(model.num_layers > 0, f"model.num_layers is {model.num_layers}, expected a positive integer.")
    _require(model.kv_groups > 0, f"model.kv_groups is {model.kv_groups}, expected a positive integer.")
    _require(model.ffn_ratio > 0, f"model.ffn_ratio is {model.ffn_ratio}, expected a positive number.")
    _require(model.init_std > 0, f"model.init_std is {model.init_std}, expected a positive number.")
    _require(model.output_mult > 0, f"model.output_mult is {model.output_mult}, expected a positive number.")
    _require(
        model.attn_mult is None or model.attn_mult > 0,
        f"model.attn_mult is {model.attn_mult}, expected a positive number, or null for √(base head_dim).",
    )
    _require(0 <= model.dropout < 1, f"model.dropout is {model.dropout}, expected a value in [0, 1).")
    _require(not (model.tie_embeddings and model.readout_zero_init),
             "model.readout_zero_init is true with model.tie_embeddings true: zeroing the shared readout would "
             "zero the input embedding too. Set one of them to false.")
    _validate_heads(model)

    _require(data.batch_size > 0, f"data.batch_size is {data.batch_size}, expected a positive integer.")
    _require(data.seq_len > 1, f"data.seq_len is {data.seq_len}, expected an integer above 1.")
    _require(0 < data.val_fraction < 1, f"data.val_fraction is {data.val_fraction}, expected a value in (0, 1).")
    _require(data.val_batches > 0, f"data.val_batches is {data.val_batches}, expected a positive integer.")
    _require(
        data.source != "files" or data.path,
        "data.source is 'files' but data.path is empty. Set data.path to a text file, a folder or a glob.",
    )
    _require(
        data.source != "huggingface" or data.hf_dataset,
        "data.source is 'huggingface' but data.hf_dataset is empty. Set it to a dataset name such as 'roneneldan/TinyStories'.",
    )

    _require(optim.weight_decay >= 0, f"optim.weight_decay is {optim.weight_decay}, expected a number >= 0.")
    _require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
             f"optim.betas is {optim.betas}, expected two numbers in [0, 1) such as [0.9, 0.999].")
    _require(optim.eps > 0, f"optim.eps is {optim.eps}, expected a positive number.")
    _require(optim.warmup_steps >= 0, f"optim.warmup_steps is {optim.warmup_steps}, expected an integer >= 0.")
    _require(optim.grad_clip is None or optim.grad_clip > 0,
             f"optim.grad_clip is {optim.grad_clip}, expected a positive number, or null to turn clipping off.")
    _require(optim.optimizer != "adam" or optim.weight_decay == 0,
             f"optim.weight_decay is {optim.weight_decay} with optim.optimizer 'adam': L2 decay through Adam "
             "is not μP-correct. Use optim.optimizer 'adamw', or set optim.weight_decay to 0.")

    _require(coord.steps > 0, f"coord.steps is {coord.steps}, expected a positive integer.")
    _require(coord.batch_size > 0, f"coord.batch_size is {coord.batch_size}, expected a positive integer.")
    _require(sweep.steps > 0, f"sweep.steps is {sweep.steps}, expected a positive integer.")
    _require(sweep.num_lrs > 0, f"sweep.num_lrs is {sweep.num_lrs}, expected a positive integer.")
    _require(
        sweep.log2_lr_max >= sweep.log2_lr_min,
        f"sweep.log2_lr_max is {sweep.log2_lr_max}, below sweep.log2_lr_min {sweep.log2_lr_min}. Swap them.",
    )
    _require(sweep.log2_lr_max <= 10,
             f"sweep.log2_lr_max is {sweep.log2_lr_max}, an LR of 2^{sweep.log2_lr_max}. "
             "LRs are given as log2 values: use a value such as 0 (LR 1) or below.")
    _require(sweep.divergence_factor > 1,
             f"sweep.divergence_factor is {sweep.divergence_factor}, expected a number above 1.")
    _require(sweep.log_every > 0, f"sweep.log_every is {sweep.log_every}, expected a positive integer.")
    _require(settings.run.threads is None or settings.run.threads > 0,
             f"run.threads is {settings.run.threads}, expected a positive integer, or null for torch's default.")


def _validate_heads(model: ModelSettings) -> None:
    """Reject head layouts that a width cannot divide, or that leave an attention dimension finite."""
    widths = sorted(set(model.widths) | {model.base_width})
    if model.head_scaling == "fixed_head_dim":
        _require(model.head_dim is not None and model.head_dim > 0,
                 f"model.head_dim is {model.head_dim}, expected a positive integer under head_scaling 'fixed_head_dim'.")
        _require(model.num_heads is None,
                 f"model.num_heads is {model.num_heads}, but under head_scaling 'fixed_head_dim' the head count "
                 "grows with width (width / head_dim). Remove model.num_heads, or use head_scaling 'fixed_heads'.")
        step = model.head_dim * model.kv_groups
        for width in widths:
            _require(width % step == 0,
                     f"width {width} is not divisible by model.head_dim × model.kv_groups = {step}. "
                     f"Use widths that are multiples of {step}.")
    else:
        _require(model.num_heads is not None and model.num_heads > 0,
                 f"model.num_heads is {model.num_heads}, expected a positive integer under head_scaling 'fixed_heads'.")
        # A fixed head_dim with a fixed head count makes q_proj's fan-out finite while its fan-in grows,
        # which mup rejects as "infinite fan-in and finite fan-out".
        _require(model.head_dim is None,
                 f"model.head_dim is {model.head_dim}, but under head_scaling 'fixed_heads' head_dim must grow "
                 "with width (width / num_heads), else q/k/v projections have a finite fan-out and an infinite "
                 "fan-in. Set model.head_dim to null, or use head_scaling 'fixed_head_dim'.")
        _require(model.num_heads % model.kv_groups == 0,
                 f"model.kv_groups is {model.kv_groups}, which does not divide model.num_heads {model.num_heads}. "
                 "Pick a divisor of num_heads.")
        for width in widths:
            _require(width % model.num_heads == 0,
                     f"width {width} is not divisible by model.num_heads {model.num_heads}. "
                     f"Use widths that are multiples of {model.num_heads}.")
    for width in widths:
        layout = head_layout(model, width)
        _require(layout.head_dim % 2 == 0,
                 f"width {width} gives head_dim {layout.head_dim}, which is odd. Rotary embeddings need an even "
                 "head_dim: change model.widths or model.num_heads.")
