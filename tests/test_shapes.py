"""Base shapes files, head-scaling recipes, and saving and loading μP models."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import mup
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import ROOT, tiny_settings
from mup_qwen.model import build_model, load_model, save_model
from mup_qwen.optim import build_optimizer
from mup_qwen.settings import SettingsError, override, settings_from_dict
from mup_qwen.shapes import BaseShapesError, make_base_shapes, restore_base_shapes

RECIPES = {
    "fixed_head_dim": {"head_scaling": "fixed_head_dim", "head_dim": 8},
    "fixed_head_dim_gqa": {"head_scaling": "fixed_head_dim", "head_dim": 8, "kv_groups": 2},
    "fixed_heads": {"head_scaling": "fixed_heads", "head_dim": None, "num_heads": 2},
    "fixed_heads_gqa": {"head_scaling": "fixed_heads", "head_dim": None, "num_heads": 4, "kv_groups": 2},
    "tied": {"tie_embeddings": True},
}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_builds_base_shapes(make_settings, family, recipe):
    settings = make_settings(model={"family": family, **RECIPES[recipe]})
    for width in settings.model.widths:
        model = build_model(settings, width, "mup", seed=0)
        for name, parameter in model.named_parameters():
            assert parameter.infshape.ninf() >= 1 or "norm" in name, name


def test_rejected_recipe_raises_mup_error():
    """The recipe that validation rejects really does break mup: q_proj's fan-out stays finite."""
    def model_at(width: int):
        config = Qwen2Config(vocab_size=16, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=8)
        return Qwen2ForCausalLM(config)

    with pytest.raises(AssertionError, match="infinite fan-in and finite fan-out"):
        mup.set_base_shapes(model_at(64), model_at(32), delta=model_at(48), rescale_params=False)


def test_validation_rejects_that_recipe(tmp_path: Path):
    with pytest.raises(SettingsError, match="model.head_dim"):
        tiny_settings(tmp_path, model={"head_scaling": "fixed_heads", "num_heads": 2, "head_dim": 8})


def test_base_shapes_file_records_widths(settings):
    text = Path(settings.run.base_shapes).read_text()
    assert text.startswith("# mup-qwen: ")
    loaded = mup.load_base_shapes(settings.run.base_shapes)
    assert loaded["model.layers.0.self_attn.q_proj.weight"].base_shape() == [32, 32]
    assert loaded["model.layers.0.mlp.down_proj.weight"].base_shape() == [32, 128]
    assert loaded["model.embed_tokens.weight"].base_shape() == [None, 32]


def test_missing_base_shapes_file(tmp_path: Path):
    settings = tiny_settings(tmp_path)
    with pytest.raises(BaseShapesError, match="create_base_shapes.py"):
        build_model(settings, 64, "mup")


def test_sp_needs_no_base_shapes(tmp_path: Path):
    settings = tiny_settings(tmp_path)
    build_model(settings, 64, "sp")


@pytest.mark.parametrize("field,value,word", [
    ("model.num_layers", 3, "model.num_layers"),
    ("model.head_dim", 16, "model.head_dim"),
    ("model.family", "qwen3", "model.family"),
    ("model.tie_embeddings", True, "model.tie_embeddings"),
])
def test_mismatched_base_shapes_rejected(settings, field, value, word):
    other = override(settings, field, value)
    with pytest.raises(BaseShapesError) as caught:
        build_model(other, 64, "mup")
    assert word in str(caught.value)
    assert "create_base_shapes.py" in str(caught.value)


def test_foreign_base_shapes_file_rejected_by_names(settings, tmp_path: Path):
    """A file written by mup directly has no settings line; the parameter names are still checked."""
    deeper = override(settings, "model.num_layers", 3)
    foreign = tmp_path / "foreign.bsh"
    mup.make_base_shapes(build_model(deeper, 32, "sp", init=False), build_model(deeper, 64, "sp", init=False),
                         savefile=str(foreign))
    with pytest.raises(BaseShapesError, match="does not match the model"):
        build_model(settings, 64, "mup", base_shapes=foreign)


def test_save_load_round_trip(settings, tmp_path: Path):
    model = build_model(settings, 128, "mup", seed=0)
    for parameter in model.parameters():
        parameter.data.add_(0.01 * torch.randn_like(parameter))
    save_model(model, tmp_path / "checkpoint", settings, 128, "mup")
    loaded = load_model(tmp_path / "checkpoint")

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=tokens).logits, loaded(input_ids=tokens).logits)
    assert loaded.lm_head.width_mult_value == 4.0
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert all(hasattr(p, "infshape") for p in loaded.parameters())
    build_optimizer(loaded, settings, 0.01, "mup")


def test_restore_after_deepcopy_does_not_rescale(settings):
    model = build_model(settings, 128, "mup", seed=0)
    clone = copy.deepcopy(model)
    for parameter in clone.parameters():
        parameter.infshape = None
        del parameter.infshape
    restore_base_shapes(clone, settings)
    restore_base_shapes(clone, settings)
    assert torch.equal(clone.lm_head.weight, model.lm_head.weight)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clone(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_create_base_shapes_script(tmp_path: Path):
    config = tmp_path / "setting.yml"
    shapes = tmp_path / "shapes" / "base.bsh"
    config.write_text(f"model:\n  widths: [32, 64]\n  base_width: 32\n  head_dim: 8\nrun:\n  base_shapes: {shapes}\n")
    result = subprocess.run([sys.executable, str(ROOT / "create_base_shapes.py"), "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert shapes.is_file()
    assert str(shapes) in result.stderr
    settings = settings_from_dict({"model": {"widths": [32, 64], "base_width": 32, "head_dim": 8},
                                   "run": {"base_shapes": str(shapes)}})
    build_model(settings, 64, "mup")


def test_make_base_shapes_returns_infshapes(tmp_path: Path):
    settings = tiny_settings(tmp_path)
    shapes = make_base_shapes(settings)
    assert shapes["model.layers.1.self_attn.o_proj.weight"].ninf() == 2
