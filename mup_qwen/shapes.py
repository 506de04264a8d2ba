"""Base shapes: which dimensions are widths, and their size at the base width.

`make_base_shapes` builds a base model (at `model.base_width`) and a delta model (at twice
that) with the target's depth and head recipe, and writes mup's base shapes file. The
file's first line records the settings it was made from, so a model built from other
settings is rejected with a clear message instead of getting wrong multipliers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mup
import yaml
from torch import nn

from mup_qwen.settings import MupQwenError, Settings

logger = logging.getLogger("mup_qwen")

HEADER_PREFIX = "# mup-qwen: "
# Settings that change which dimensions are widths or their base size.
SIGNATURE_FIELDS = ("family", "num_layers", "base_width", "head_scaling", "head_dim", "num_heads",
                    "kv_groups", "ffn_ratio", "tie_embeddings")


class BaseShapesError(MupQwenError):
    """A base shapes file that is missing, unreadable, or made for other settings."""


def rerun_hint(settings: Settings) -> str:
    return (f"Run `python create_base_shapes.py --config SETTINGS_FILE` with the settings file in use to write "
            f"{settings.run.base_shapes!r} again.")


def shape_signature(settings: Settings) -> dict[str, Any]:
    """Return the model settings that a base shapes file depends on."""
    return {name: getattr(settings.model, name) for name in SIGNATURE_FIELDS}


def make_base_shapes(settings: Settings, path: str | Path | None = None) -> dict:
    """Build the base and delta models, write the base shapes file (default: `run.base_shapes`) and return it.

    Both models use the target's depth, family and head recipe, so parameter names match.
    """
    from mup_qwen.model import build_model

    path = Path(path or settings.run.base_shapes)
    base_width = settings.model.base_width
    base = build_model(settings, base_width, "sp", vocab_size=8, init=False)
    delta = build_model(settings, 2 * base_width, "sp", vocab_size=8, init=False)
    # SP models need no base shapes themselves. Their lm_head has the same name and shape as the
    # μP readout, so they give the same shapes.
    path.parent.mkdir(parents=True, exist_ok=True)
    base_shapes = mup.make_base_shapes(base, delta, savefile=str(path))
    body = path.read_text()
    path.write_text(HEADER_PREFIX + json.dumps(shape_signature(settings), sort_keys=True) + "\n" + body)
    return base_shapes


def read_signature(path: Path) -> dict[str, Any] | None:
    first = path.read_text().splitlines()[:1]
    if not first or not first[0].startswith(HEADER_PREFIX):
        return None
    return json.loads(first[0][len(HEADER_PREFIX):])


def check_base_shapes_file(settings: Settings, path: str | Path) -> dict[str, list]:
    """Return the raw base shapes of `path` after checking they were made from these settings."""
    path = Path(path)
    if not path.is_file():
        raise BaseShapesError(f"base shapes file {str(path)!r} not found. {rerun_hint(settings)}")
    try:
        raw = yaml.safe_load(path.read_text())
        signature = read_signature(path)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise BaseShapesError(f"base shapes file {str(path)!r} could not be read ({error}). {rerun_hint(settings)}") from None
    if not isinstance(raw, dict):
        raise BaseShapesError(f"base shapes file {str(path)!r} contains no shapes. {rerun_hint(settings)}")

    if signature is not None:
        expected = shape_signature(settings)
        for name, value in expected.items():
            if name in signature and signature[name] != value:
                raise BaseShapesError(
                    f"base shapes file {str(path)!r} was made with model.{name} = {signature[name]!r}, "
                    f"but the settings have {value!r}. {rerun_hint(settings)}"
                )
    return raw


def apply_base_shapes(model: nn.Module, settings: Settings, base_shapes: str | Path | dict) -> nn.Module:
    """Set each parameter's `infshape` from the base shapes, without rescaling any weight.

    `rescale_params=False` because `init_weights` draws the μP init itself and because a
    loaded checkpoint is already μP-scaled: mup's default would rescale the readout again.
    """
    from mup_qwen.model import refresh_readout

    if isinstance(base_shapes, dict):
        raw_shapes = base_shapes
        source = "the base shapes passed in"
    else:
        raw_shapes = check_base_shapes_file(settings, base_shapes)
        source = f"base shapes file {str(base_shapes)!r}"

    names = {name for name, _ in model.named_parameters()}
    listed = set(raw_shapes)
    if names != listed:
        missing = sorted(names - listed)[:3]
        extra = sorted(listed - names)[:3]
        raise BaseShapesError(
            f"{source} does not match the model (other depth, family or tied embeddings?): "
            f"model parameters missing from it: {missing}; entries the model lacks: {extra}. {rerun_hint(settings)}"
        )
    if not isinstance(base_shapes, dict):
        base_shapes = mup.load_base_shapes(str(base_shapes))

    try:
        mup.set_base_shapes(model, base_shapes, rescale_params=False)
    except AssertionError as error:
        raise BaseShapesError(f"{error} {rerun_hint(settings)}") from None
    refresh_readout(model)
    return model


def restore_base_shapes(model: nn.Module, settings: Settings, base_shapes: str | Path | None = None) -> nn.Module:
    """Set base shapes again on a μP model whose parameters lost `infshape` (after `torch.load`, `deepcopy`).

    Weights are not rescaled, so calling this on a trained or loaded model is safe.
    """
    return apply_base_shapes(model, settings, base_shapes or settings.run.base_shapes)
