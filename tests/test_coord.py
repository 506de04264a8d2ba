"""Coordinate check on tiny real models trained on Shakespeare: μP passes and SP fails on the same
data, each known μP mistake fails, and bad input stops the script with exit status 2.
"""

from __future__ import annotations

import math
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT, execute_notebook, tiny_settings
from mup_qwen.coord import (
    MUP_MISTAKES, STATISTICS, attention_logits, keep_readout_unscaled, keep_sqrt_attention_scale, coord_tasks,
    module_types_of, read_coord_results, run_coord_check,
)
from mup_qwen.coord_verdict import MODULE_TYPES, judge
from mup_qwen.model import ATTENTION_CLASSES, build_model
from mup_qwen.settings import MupQwenError
from mup_qwen.shapes import make_base_shapes

# Three seeds and a batch of 8 x 64 tokens: with two seeds of 4 x 64 tokens the seed-mean μP slope
# of o_proj reached 0.25 at step 2 at these widths (32, 64, 128).
COORD = {"steps": 5, "seeds": [0, 1, 2], "batch_size": 8}
HIDDEN_MATRICES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLAT_IN_BOTH = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "final_norm"]


def coord_settings(tmp_path, **sections):
    """Return tiny settings (widths 32/64/128, base 32, 2 layers) for the check, with base shapes written."""
    sections.setdefault("coord", COORD)
    sections.setdefault("data", {"seq_len": 64})
    settings = tiny_settings(tmp_path, **sections)
    make_base_shapes(settings)
    return settings


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "coord_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """The tiny check through `coord_check.py --strict`: 3 widths x 3 seeds x (μP, SP), 5 steps."""
    tmp_path = tmp_path_factory.mktemp("coord_check")
    settings = coord_settings(tmp_path)
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(settings.to_dict()))
    return tmp_path, config, run_script("--config", str(config), "--strict")


def test_script_writes_csvs_and_plots(script_run):
    tmp_path, _, result = script_run
    assert result.returncode == 0, result.stderr
    results = tmp_path / "results"
    for name in ["coord_mup.csv", "coord_sp.csv", "coord_verdict.csv"]:
        assert (results / name).is_file(), name
    for name in ["coord_mup.png", "coord_sp.png", "coord_slopes.png"]:
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "μP: pass" in result.stdout
    assert "widths [32, 64, 128], 5 steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_csv_holds_one_row_per_record(script_run):
    tmp_path, _, _ = script_run
    frames = read_coord_results(tmp_path / "results")
    assert set(frames) == {"mup", "sp"}
    for parametrization, frame in frames.items():
        key = ["width", "module", "step", "seed", "statistic"]
        assert not frame.duplicated(key).any()
        assert set(frame["parametrization"]) == {parametrization}
        assert sorted(frame["width"].unique()) == [32, 64, 128]
        assert sorted(frame["step"].unique()) == [1, 2, 3, 4, 5]
        assert sorted(frame["seed"].unique()) == [0, 1, 2]
        assert set(frame["statistic"]) == set(STATISTICS)
        assert set(frame["module_type"]) == set(MODULE_TYPES) - {"q_norm", "k_norm"}
        # 2 layers x 10 per-layer module types, plus embed_tokens, final_norm and lm_head.
        assert frame["module"].nunique() == 2 * 10 + 3
        assert len(frame) == 3 * 5 * 3 * len(STATISTICS) * (2 * 10 + 3)


def test_statistics_are_consistent(script_run):
    tmp_path, _, _ = script_run
    frame = read_coord_results(tmp_path / "results")["mup"]
    wide = frame.pivot_table(index=["width", "module", "step", "seed"], columns="statistic", values="value")
    assert (wide["rms"] >= wide["l1"] * (1 - 1e-6)).all()
    assert (wide["max_abs"] >= wide["rms"] * (1 - 1e-6)).all()
    # RMSNorm with gains at 1 outputs rows of rms 1 at the init, at every width, less 0.13% because
    # its eps of 1e-6 is added to the embedding's variance σ² = 4e-4.
    norms = wide.reset_index()
    norms = norms[(norms["step"] == 1) & norms["module"].str.endswith("input_layernorm")]
    assert np.allclose(norms["rms"], 1.0, atol=2e-3)


def test_verdict_passes_mup_and_fails_sp(script_run):
    tmp_path, _, _ = script_run
    verdict = pd.read_csv(tmp_path / "results" / "coord_verdict.csv").set_index("module_type")
    for kind in verdict.index:
        assert verdict.loc[kind, "mup_passed"], (kind, verdict.loc[kind, "mup_slope"])
    for kind in HIDDEN_MATRICES + ["attn_logits", "lm_head"]:
        assert not verdict.loc[kind, "sp_passed"], kind
        assert verdict.loc[kind, "sp_slope"] > 0.45, kind
    for kind in FLAT_IN_BOTH:
        assert verdict.loc[kind, "sp_passed"], kind


def test_verdict_recomputed_from_csvs_matches(script_run):
    tmp_path, _, _ = script_run
    written = pd.read_csv(tmp_path / "results" / "coord_verdict.csv")
    recomputed = judge(read_coord_results(tmp_path / "results"))
    assert list(recomputed["module_type"]) == list(written["module_type"])
    assert np.allclose(recomputed["mup_slope"], written["mup_slope"])
    assert list(recomputed["sp_passed"]) == list(written["sp_passed"])


@pytest.mark.parametrize(("family", "kv_groups"), [("qwen2", 1), ("qwen3", 2)])
def test_attention_logits_match_eager_weights(tmp_path, family, kv_groups):
    settings = tiny_settings(tmp_path, model={"family": family, "kv_groups": kv_groups, "widths": [64]},
                             run={"attn_implementation": "eager", "base_shapes": str(tmp_path / "shapes.bsh")})
    make_base_shapes(settings)
    model = build_model(settings, 64, "mup", seed=0)
    captured = []

    def hook(module, args, kwargs, output):
        logits = attention_logits(module, kwargs["hidden_states"], kwargs["position_embeddings"])
        captured.append((logits, output[1]))

    attention = next(m for m in model.modules() if isinstance(m, ATTENTION_CLASSES))
    attention.register_forward_hook(hook, with_kwargs=True)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=tokens)

    logits, weights = captured[0]
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    probabilities = logits.masked_fill(~causal, -math.inf).softmax(dim=-1)
    assert torch.allclose(probabilities, weights, atol=1e-6)


FIXED_HEADS = {"head_scaling": "fixed_heads", "num_heads": 2, "head_dim": None}


def test_mup_passes_with_fixed_heads(tmp_path):
    settings = coord_settings(tmp_path, model=FIXED_HEADS)
    _, verdict = run_coord_check(settings, parametrizations=("mup",), progress=False)
    verdict = verdict.set_index("module_type")
    for kind in verdict.index:
        assert verdict.loc[kind, "mup_passed"], (kind, verdict.loc[kind, "mup_slope"])
    # head_dim grows like width, so attn_mult / head_dim makes the init logits fall like width^-1/2.
    assert verdict.loc["attn_logits", "mup_min_step"] == 1
    assert verdict.loc["attn_logits", "mup_min_slope"] == pytest.approx(-0.5, abs=0.05)


@pytest.mark.parametrize(("mistake", "model", "caught"), [
    ("readout", {}, ["lm_head"]),
    ("hidden_init", {}, HIDDEN_MATRICES),
    # head_dim grows with width (16, 32, 64) only under fixed_heads.
    ("attention_scale", FIXED_HEADS, ["attn_logits"]),
])
def test_mistake_fails_check(tmp_path, mistake, model, caught):
    settings = coord_settings(tmp_path, model=model)
    _, verdict = run_coord_check(settings, parametrizations=("mup",), model_transform=MUP_MISTAKES[mistake],
                                 progress=False)
    verdict = verdict.set_index("module_type")
    for kind in caught:
        assert not verdict.loc[kind, "mup_passed"], (kind, verdict.loc[kind, "mup_slope"])


def test_fixed_head_dim_hides_scale_mistake(settings):
    # attn_mult defaults to √(base head_dim), and head_dim is the same at every width, so
    # attn_mult / head_dim equals 1/√head_dim: the mistake changes nothing to catch.
    for width in settings.model.widths:
        model = build_model(settings, width, "mup", seed=0)
        before = [m.scaling for m in model.modules() if isinstance(m, ATTENTION_CLASSES)]
        keep_sqrt_attention_scale(model, settings)
        after = [m.scaling for m in model.modules() if isinstance(m, ATTENTION_CLASSES)]
        assert after == pytest.approx(before, rel=1e-12)


def run_script_here(monkeypatch, *args: str) -> int:
    """Run `coord_check.py` in this process and return its exit status."""
    monkeypatch.setattr(sys, "argv", ["coord_check.py", *args])
    try:
        runpy.run_path(str(ROOT / "coord_check.py"), run_name="__main__")
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def test_strict_exits_1_when_mup_fails(script_run, monkeypatch, capsys):
    tmp_path, config, _ = script_run
    status = run_script_here(monkeypatch, "--config", str(config), "--mistake", "readout", "--modules", "lm_head",
                             "--steps", "2", "--strict")
    output = capsys.readouterr().out
    assert status == 1
    assert "μP: FAIL (0 of 1 module types within bounds: failed lm_head)" in output
    assert (tmp_path / "results" / "mistake_readout" / "coord_verdict.csv").is_file()


def test_single_width_exits_2(script_run):
    _, config, _ = script_run
    result = run_script("--config", str(config), "--widths", "64")
    assert result.returncode == 2
    assert "model.widths is [64]" in result.stderr
    assert "--widths 64,128,256" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--modules", "q_proj,qkv"], "unknown module type 'qkv' in --modules"),
    (["--modules", "q_norm"], "unknown module type 'q_norm'"),
    (["--steps", "0"], "coord.steps is 0, expected a positive integer"),
])
def test_bad_input_exits_2(script_run, monkeypatch, capsys, flags, message):
    _, config, _ = script_run
    assert run_script_here(monkeypatch, "--config", str(config), *flags) == 2
    assert message in capsys.readouterr().err


def test_module_filter_limits_records(tmp_path):
    settings = coord_settings(tmp_path, model={"widths": [32, 64]}, coord={"steps": 2, "seeds": [0]})
    frames, verdict = run_coord_check(settings, module_types=["lm_head", "attn_logits"], progress=False)
    assert set(frames["mup"]["module_type"]) == {"attn_logits", "lm_head"}
    assert list(verdict["module_type"]) == ["attn_logits", "lm_head"]
    assert module_types_of(settings)[-1] == "lm_head"


def fail_at_width_64(model, settings):
    if model.config.hidden_size == 64:
        raise ValueError("deliberate failure at width 64")


def test_failed_run_keeps_previous_results(tmp_path):
    settings = coord_settings(tmp_path, model={"widths": [32, 64]}, coord={"steps": 1, "seeds": [0]})
    results = tmp_path / "results"
    results.mkdir()
    (results / "coord_mup.csv").write_text("previous results\n")

    with pytest.raises(MupQwenError, match="1 of 4 coordinate-check runs failed, the first at width 64, mup"):
        run_coord_check(settings, model_transform=fail_at_width_64, results_dir=results, progress=False)
    assert (results / "coord_mup.csv").read_text() == "previous results\n"
    assert set(pd.read_csv(results / "coord_mup.partial.csv")["width"]) == {32}
    assert set(pd.read_csv(results / "coord_sp.partial.csv")["width"]) == {32, 64}
    assert not (results / "coord_verdict.csv").exists()


def test_tasks_survive_pickling(tmp_path):
    # The Ray executor sends each task to another process, so its function, settings and mistake
    # must round-trip through pickle.
    settings = coord_settings(tmp_path, model={"widths": [32, 64]}, coord={"steps": 1, "seeds": [0]})
    tasks = coord_tasks(settings, ("mup", "sp"), module_types_of(settings), keep_readout_unscaled)
    copies = pickle.loads(pickle.dumps(tasks))
    assert [task.key for task in copies] == [task.key for task in tasks]
    assert copies[0].kwargs["model_transform"] is keep_readout_unscaled
    assert copies[-1].kwargs["model_transform"] is None
    frame = copies[0].function(**copies[0].kwargs)
    assert set(frame["width"]) == {32}


def test_notebook_runs_on_script_results(script_run):
    tmp_path, _, _ = script_run
    text, outputs = execute_notebook("coord_check.ipynb", tmp_path / "results")
    assert "mup: widths [32, 64, 128], 5 steps" in text
    assert "lm_head" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 3
