"""μP rules of the model: equality with SP at the base width, init scaling, readout, attention scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from mup_qwen.data import load_corpus, train_batches
from mup_qwen.model import Readout, SharedReadout, build_model, parameter_roles
from mup_qwen.optim import build_optimizer
from mup_qwen.settings import attn_mult
from mup_qwen.train import lm_loss


def first_losses(settings, parametrization: str, steps: int = 2) -> list[float]:
    """Return the training losses of the first `steps` Adam steps at the base width."""
    model = build_model(settings, settings.model.base_width, parametrization, seed=0)
    optimizer = build_optimizer(model, settings, 2**-8, parametrization)
    batches = train_batches(load_corpus(settings.data), 4, settings.data.seq_len, seed=0)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_base_width_mup_equals_sp(make_settings, family):
    settings = make_settings(model={"family": family})
    mup_model = build_model(settings, 32, "mup", seed=3)
    sp_model = build_model(settings, 32, "sp", seed=3)

    mup_state, sp_state = mup_model.state_dict(), sp_model.state_dict()
    assert mup_state.keys() == sp_state.keys()
    for name in mup_state:
        assert torch.equal(mup_state[name], sp_state[name]), name

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mup_model(input_ids=tokens).logits, sp_model(input_ids=tokens).logits)
    assert first_losses(settings, "mup") == first_losses(settings, "sp")


def measured_std(model, suffix: str) -> float:
    values = [p.detach().flatten() for name, p in model.named_parameters() if name.endswith(suffix)]
    return torch.cat(values).std().item()


def test_hidden_init_scales_inverse_sqrt_width(settings):
    sigma = settings.model.init_std
    for width in (32, 128, 512):
        m = width / settings.model.base_width
        model = build_model(settings, width, "mup", seed=0)
        for suffix in ("q_proj.weight", "o_proj.weight", "gate_proj.weight"):
            assert measured_std(model, suffix) == pytest.approx(sigma / math.sqrt(m), rel=0.05), (width, suffix)
        # down_proj's fan-in is the FFN width, whose multiplier is the same m.
        assert measured_std(model, "down_proj.weight") == pytest.approx(sigma / math.sqrt(m), rel=0.05)
        assert measured_std(model, "embed_tokens.weight") == pytest.approx(sigma, rel=0.05)
        assert measured_std(model, "lm_head.weight") == pytest.approx(sigma, rel=0.05)


def test_sp_init_constant_in_width(settings):
    for width in (32, 256):
        model = build_model(settings, width, "sp", seed=0)
        assert measured_std(model, "q_proj.weight") == pytest.approx(settings.model.init_std, rel=0.05)


def test_vector_like_init(settings):
    model = build_model(settings, 64, "mup", seed=0)
    roles = parameter_roles(model)
    for name, parameter in model.named_parameters():
        if roles[name] != "vector":
            continue
        expected = 1.0 if name.endswith("norm.weight") else 0.0
        assert torch.all(parameter == expected), name


def test_zero_init_options(make_settings):
    settings = make_settings(model={"readout_zero_init": True, "query_zero_init": True})
    model = build_model(settings, 64, "mup", seed=0)
    assert torch.all(model.lm_head.weight == 0)
    for layer in model.model.layers:
        assert torch.all(layer.self_attn.q_proj.weight == 0)
        assert layer.self_attn.k_proj.weight.abs().sum() > 0


def test_readout_divides_by_width_mult(settings):
    model = build_model(settings, 128, "mup", seed=0)
    readout = model.lm_head
    assert isinstance(readout, Readout)
    assert readout.width_mult_value == 4.0
    hidden = torch.randn(3, 128)
    expected = F.linear(hidden, readout.weight) * settings.model.output_mult / 4.0
    assert torch.allclose(readout(hidden), expected)


def test_optimizer_lr_per_group(settings):
    base_lr = 0.01
    model = build_model(settings, 128, "mup", seed=0)
    optimizer = build_optimizer(model, settings, base_lr, "mup")
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    roles = parameter_roles(model)
    for name, parameter in model.named_parameters():
        m = 128 / 32
        expected = base_lr / m if roles[name] == "hidden" else base_lr
        assert lr_of[id(parameter)] == pytest.approx(expected), name


def test_sp_optimizer_single_lr(settings):
    model = build_model(settings, 128, "sp", seed=0)
    optimizer = build_optimizer(model, settings, 0.01, "sp")
    assert {group["lr"] for group in optimizer.param_groups} == {0.01}
    assert type(optimizer) is torch.optim.Adam


def test_adamw_weight_decay_scaled_by_width_mult(make_settings):
    settings = make_settings(optim={"optimizer": "adamw", "weight_decay": 0.1})
    model = build_model(settings, 128, "mup", seed=0)
    optimizer = build_optimizer(model, settings, 0.01, "mup")
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        # lr × wd stays constant in width: hidden groups have lr/m and wd×m.
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.01 * 0.1)


@pytest.mark.parametrize("width", [32, 128])
def test_attention_scale_is_attn_mult_over_head_dim(settings, width):
    model = build_model(settings, width, "mup", seed=0)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.scaling == attn_mult(settings.model) / attention.head_dim
    sp_model = build_model(settings, width, "sp", seed=0)
    assert sp_model.model.layers[0].self_attn.scaling == sp_model.model.layers[0].self_attn.head_dim**-0.5


def test_fixed_heads_attention_scale(make_settings):
    settings = make_settings(model={"head_scaling": "fixed_heads", "head_dim": None, "num_heads": 2})
    small = build_model(settings, 32, "mup").model.layers[0].self_attn
    large = build_model(settings, 128, "mup").model.layers[0].self_attn
    assert large.head_dim == 4 * small.head_dim
    assert small.scaling / large.scaling == pytest.approx(4.0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_eager_and_sdpa_logits_match(make_settings, family):
    settings = make_settings(model={"family": family})
    model = build_model(settings, 128, "mup", seed=1)
    assert model.config._attn_implementation == "sdpa"

    # Train a few steps so that attention is not uniform and the scale matters.
    optimizer = build_optimizer(model, settings, 2**-6, "mup")
    batches = train_batches(load_corpus(settings.data), 4, 32, seed=0)
    for _ in range(3):
        loss = lm_loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa_logits = model(input_ids=tokens).logits
        model.set_attn_implementation("eager")
        assert model.model.layers[0].self_attn.config._attn_implementation == "eager"
        eager_logits = model(input_ids=tokens).logits
    assert torch.allclose(eager_logits, sdpa_logits, atol=1e-5)


def test_sdpa_reads_module_scaling(settings):
    model = build_model(settings, 64, "mup", seed=0)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.3)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=tokens).logits
    for layer in model.model.layers:
        layer.self_attn.scaling *= 4
    after = model(input_ids=tokens).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_tied_embeddings_use_shared_readout(make_settings):
    settings = make_settings(model={"tie_embeddings": True})
    stds = []
    for width in (32, 256):
        model = build_model(settings, width, "mup", seed=0)
        assert isinstance(model.lm_head, SharedReadout)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        stds.append(model.model.embed_tokens.weight.std().item())
        optimizer = build_optimizer(model, settings, 0.01, "mup")
        shared = model.model.embed_tokens.weight
        groups = [g for g in optimizer.param_groups if any(p is shared for p in g["params"])]
        assert len(groups) == 1
        assert groups[0]["lr"] == 0.01
    assert stds[0] == pytest.approx(settings.model.init_std, rel=0.05)
    assert stds[1] == pytest.approx(settings.model.init_std, rel=0.05)


def test_tied_base_width_mup_equals_sp(make_settings):
    settings = make_settings(model={"tie_embeddings": True})
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mup_logits = build_model(settings, 32, "mup", seed=0)(input_ids=tokens).logits
    sp_logits = build_model(settings, 32, "sp", seed=0)(input_ids=tokens).logits
    assert torch.equal(mup_logits, sp_logits)


def test_qwen3_norm_gains_are_vector_like(make_settings):
    settings = make_settings(model={"family": "qwen3"})
    model = build_model(settings, 64, "mup", seed=0)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    roles = parameter_roles(model)
    assert roles["model.layers.0.self_attn.q_norm.weight"] == "vector"
    assert model.model.layers[0].self_attn.q_norm.weight.infshape.ninf() == 0
