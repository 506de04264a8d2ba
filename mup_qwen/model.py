"""μP and SP Qwen models built from transformers' own Qwen2/Qwen3 classes.

`build_model` makes a `Qwen2ForCausalLM` or `Qwen3ForCausalLM` at any width and, for
μP, applies the rules in one place each: the attention scale (`apply_attention_scale`),
the readout (`replace_readout`), the base shapes (`mup_qwen.shapes`) and the init
(`init_weights`). SP takes the same path without the μP steps.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal, Optional

import torch
from mup import MuReadout, MuSharedReadout
from torch import nn
from torch.nn import functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm

from mup_qwen import settings as settings_module
from mup_qwen.settings import MupQwenError, Settings, SettingsError

logger = logging.getLogger("mup_qwen")

Parametrization = Literal["mup", "sp"]
PARAMETRIZATIONS = ("mup", "sp")
ATTENTION_CLASSES = (Qwen2Attention, Qwen3Attention)
NORM_CLASSES = (Qwen2RMSNorm, Qwen3RMSNorm)


def check_parametrization(parametrization: str) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise MupQwenError(f"parametrization is {parametrization!r}, expected 'mup' or 'sp'.")


# ---------------------------------------------------------------------------
# Readout


class _FloatWidthMult:
    """Readout forward pass that reads the width multiplier from a plain float.

    mup's `MuReadout.forward` reads `weight.infshape` at every call. `torch.compile`,
    `copy.deepcopy` and `torch.save` drop that attribute, so the multiplier is copied
    into `width_mult_value` once base shapes are set (`refresh_width_mult`).
    """

    width_mult_value: float = 1.0

    def refresh_width_mult(self) -> None:
        self.width_mult_value = float(self.width_mult())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * (self.output_mult / self.width_mult_value), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_mult={self.output_mult}, width_mult={self.width_mult_value}"


class Readout(_FloatWidthMult, MuReadout):
    """μP output head: logits × `output_mult / width_mult`, init constant in width."""


class SharedReadout(_FloatWidthMult, MuSharedReadout):
    """μP output head that shares its weight with the input embedding (tied embeddings)."""


def replace_readout(model: nn.Module, settings: Settings) -> nn.Module:
    """Swap `model.lm_head` for a μP readout (`Readout`, or `SharedReadout` when embeddings are tied)."""
    old = model.lm_head
    options = dict(bias=False, output_mult=settings.model.output_mult)
    if settings.model.tie_embeddings:
        readout = SharedReadout(model.get_input_embeddings().weight, **options)
    else:
        readout = Readout(
            old.in_features, old.out_features, readout_zero_init=settings.model.readout_zero_init, **options
        )
    model.lm_head = readout
    return readout


def refresh_readout(model: nn.Module) -> None:
    """Copy each readout's width multiplier from its parameter's `infshape` into a plain float."""
    for module in model.modules():
        if isinstance(module, _FloatWidthMult):
            module.refresh_width_mult()


# ---------------------------------------------------------------------------
# Attention scale


def apply_attention_scale(model: nn.Module, attn_mult: float) -> None:
    """Set every attention module's softmax scale to `attn_mult / head_dim`.

    Under μP the query and key coordinates become correlated during training, so q·k
    grows like head_dim rather than √head_dim. transformers passes `module.scaling` to
    the eager, SDPA and flash backends alike, so setting it keeps the fused kernels.
    """
    for module in model.modules():
        if isinstance(module, ATTENTION_CLASSES):
            module.scaling = attn_mult / module.head_dim


# ---------------------------------------------------------------------------
# Building


def qwen_config(settings: Settings, width: int, vocab_size: int, parametrization: Parametrization = "sp"):
    """Return the transformers config (`Qwen2Config` or `Qwen3Config`) of one width."""
    model = settings.model
    layout = settings_module.head_layout(model, width)
    config_class = Qwen2Config if model.family == "qwen2" else Qwen3Config
    return config_class(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=settings_module.intermediate_size(model, width),
        num_hidden_layers=model.num_layers,
        num_attention_heads=layout.num_heads,
        num_key_value_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        max_position_embeddings=settings.data.seq_len,
        rope_theta=model.rope_theta,
        attention_dropout=model.dropout,
        tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_std,
        use_cache=False,
        attn_implementation=settings.run.attn_implementation,
    )


def model_class(settings: Settings) -> type:
    return Qwen2ForCausalLM if settings.model.family == "qwen2" else Qwen3ForCausalLM


def build_model(
    settings: Settings,
    width: int,
    parametrization: Parametrization,
    *,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    base_shapes: Optional[str | Path | dict] = None,
    init: bool = True,
) -> nn.Module:
    """Build a Qwen causal LM of hidden size `width` in μP (`"mup"`) or standard (`"sp"`) parametrization.

    The init is drawn from a generator seeded with `seed`, so μP and SP with the same
    seed draw the same numbers and are identical at the base width. `base_shapes`
    defaults to the settings' file; a μP model needs it. `init=False` leaves the weights
    as transformers made them, for loading a checkpoint.
    """
    from mup_qwen import shapes
    from mup_qwen.data import vocab_size_of

    check_parametrization(parametrization)
    if width <= 0:
        raise SettingsError(f"width is {width}, expected a positive integer.")
    if vocab_size is None:
        vocab_size = vocab_size_of(settings.data)
    settings_module.validate(settings_module.override(settings, "model.widths", [width]))

    model = model_class(settings)(qwen_config(settings, width, vocab_size, parametrization))

    if parametrization == "mup":
        apply_attention_scale(model, settings_module.attn_mult(settings.model))
        replace_readout(model, settings)
        if base_shapes is None:
            base_shapes = settings.run.base_shapes
        shapes.apply_base_shapes(model, settings, base_shapes)

    if init:
        init_weights(model, settings, parametrization, seed=seed)
    return model


# ---------------------------------------------------------------------------
# Init


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Map each parameter name to its μP role: "embedding", "hidden", "readout" or "vector".

    "vector" covers biases and RMSNorm gains. A readout tied to the embedding is listed
    once, as "embedding", because `named_parameters` lists a shared tensor once.
    """
    roles: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            roles[id(module.weight)] = "embedding"
    for module in model.modules():
        if isinstance(module, MuReadout) or module is getattr(model, "lm_head", None):
            roles.setdefault(id(module.weight), "readout")
        elif isinstance(module, nn.Linear):
            roles.setdefault(id(module.weight), "hidden")
    return {name: roles.get(id(p), "vector") for name, p in model.named_parameters()}


def fan_in_width_mult(parameter: torch.Tensor) -> float:
    """Return the fan-in width multiplier `m` of a matrix parameter (1 without base shapes)."""
    infshape = getattr(parameter, "infshape", None)
    if infshape is None:
        return 1.0
    return float(infshape[1].width_mult())


@torch.no_grad()
def init_weights(model: nn.Module, settings: Settings, parametrization: Parametrization, *, seed: int = 0) -> None:
    """Draw the initial weights: the μP init for `"mup"`, transformers' constant-std init for `"sp"`.

    | role      | SP          | μP                                             |
    | embedding | N(0, σ)     | N(0, σ)                                        |
    | hidden    | N(0, σ)     | N(0, σ/√m), q_proj zero if query_zero_init     |
    | readout   | N(0, σ)     | N(0, σ), or zero if readout_zero_init          |
    | vector    | 0 (bias), 1 (norm gain) in both                              |

    transformers initialises once at construction and marks modules as done, so this
    runs explicitly after `set_base_shapes(..., rescale_params=False)`.
    """
    check_parametrization(parametrization)
    sigma = settings.model.init_std
    mup = parametrization == "mup"
    generator = torch.Generator(device="cpu").manual_seed(seed)
    roles = parameter_roles(model)

    for name, parameter in model.named_parameters():
        role = roles[name]
        if role == "vector":
            is_norm_gain = name.endswith("norm.weight")
            parameter.fill_(1.0 if is_norm_gain else 0.0)
            continue

        std = sigma
        zero = False
        if mup and role == "hidden":
            std = sigma / math.sqrt(fan_in_width_mult(parameter))
            zero = settings.model.query_zero_init and name.endswith("q_proj.weight")
        if mup and role == "readout":
            zero = settings.model.readout_zero_init
        if zero:
            parameter.zero_()
            continue
        values = torch.empty(parameter.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        parameter.copy_(values)


# ---------------------------------------------------------------------------
# Save and load


def save_model(model: nn.Module, path: str | Path, settings: Settings, width: int, parametrization: str) -> None:
    """Write the weights (safetensors) and what `load_model` needs to rebuild the model into folder `path`."""
    from safetensors.torch import save_model as save_safetensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, str(path / "model.safetensors"))
    meta = {"settings": settings.to_dict(), "width": width, "parametrization": parametrization,
            "vocab_size": model.config.vocab_size}
    (path / "mup_qwen.json").write_text(json.dumps(meta, indent=2))


def load_model(path: str | Path, base_shapes: Optional[str | Path] = None) -> nn.Module:
    """Load a model written by `save_model`, with base shapes applied again and the readout not rescaled.

    `base_shapes` defaults to the file named in the saved settings.
    """
    from safetensors.torch import load_model as load_safetensors

    path = Path(path)
    meta_file = path / "mup_qwen.json"
    if not meta_file.is_file():
        raise MupQwenError(f"{str(meta_file)!r} not found: {str(path)!r} is not a folder written by save_model.")
    meta = json.loads(meta_file.read_text())
    settings = settings_module.settings_from_dict(meta["settings"])
    model = build_model(settings, meta["width"], meta["parametrization"], vocab_size=meta["vocab_size"],
                        base_shapes=base_shapes, init=False)
    load_safetensors(model, str(path / "model.safetensors"))
    return model
