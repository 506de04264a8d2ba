"""Settings: the shipped files load, and every bad value stops with a message naming field, value and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mup_qwen.settings import Settings, SettingsError, load_settings, settings_from_dict


def test_setting_yml_equals_defaults():
    assert load_settings(ROOT / "setting.yml") == Settings()


def test_cpu_profile_loads():
    cpu = load_settings(ROOT / "profiles" / "cpu.yml")
    assert cpu.model.widths == [64, 128, 256]
    assert cpu.model.base_width == 64


def test_setting_yml_documents_every_field():
    text = (ROOT / "setting.yml").read_text()
    for section, fields in Settings().to_dict().items():
        for name in fields:
            lines = [line for line in text.splitlines() if line.strip().startswith(f"{name}:")]
            assert lines, f"{section}.{name} is missing from setting.yml"
            assert "#" in lines[0], f"{section}.{name} has no comment in setting.yml"


BAD_SETTINGS = [
    # (raw settings, words the message must contain)
    ({"model": {"widht": 64}}, ["model.widht", "Valid fields"]),
    ({"modle": {}}, ["modle", "Valid sections"]),
    ({"model": {"num_layers": "two"}}, ["model.num_layers", "'two'", "integer"]),
    ({"model": {"tie_embeddings": "yes"}}, ["model.tie_embeddings", "true or false"]),
    ({"model": {"family": "llama"}}, ["model.family", "'qwen2'"]),
    ({"model": {"widths": [80, 100]}}, ["width 100", "head_dim", "multiples of 16"]),
    ({"model": {"kv_groups": 3}}, ["width 80", "model.kv_groups = 48"]),
    ({"model": {"head_scaling": "fixed_heads", "head_dim": None, "num_heads": 4, "kv_groups": 3,
                "widths": [96], "base_width": 96}}, ["model.kv_groups", "does not divide model.num_heads 4"]),
    ({"model": {"head_scaling": "fixed_heads", "num_heads": 4}}, ["model.head_dim", "finite fan-out"]),
    ({"model": {"widths": []}}, ["model.widths", "non-empty"]),
    ({"model": {"widths": [-16]}}, ["model.widths[0]", "positive"]),
    ({"sweep": {"steps": 0}}, ["sweep.steps", "0", "positive"]),
    ({"coord": {"steps": -1}}, ["coord.steps", "-1"]),
    ({"sweep": {"num_lrs": 0}}, ["sweep.num_lrs"]),
    ({"sweep": {"log2_lr_min": 0.0, "log2_lr_max": -4.0}}, ["sweep.log2_lr_max", "Swap"]),
    ({"sweep": {"log2_lr_max": 30.0}}, ["sweep.log2_lr_max", "log2"]),
    ({"optim": {"weight_decay": 0.1}}, ["optim.weight_decay", "adamw"]),
    ({"model": {"tie_embeddings": True, "readout_zero_init": True}}, ["model.readout_zero_init"]),
    ({"data": {"source": "files"}}, ["data.path"]),
]


@pytest.mark.parametrize("raw,words", BAD_SETTINGS, ids=[str(i) for i in range(len(BAD_SETTINGS))])
def test_bad_settings_name_field(raw, words):
    with pytest.raises(SettingsError) as caught:
        settings_from_dict(raw)
    for word in words:
        assert word in str(caught.value)


def test_missing_settings_file(tmp_path: Path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nothing.yml")


def test_nonpositive_lr_rejected(settings):
    from mup_qwen.model import build_model
    from mup_qwen.optim import build_optimizer

    model = build_model(settings, 32, "mup")
    with pytest.raises(SettingsError, match="learning rate is 0"):
        build_optimizer(model, settings, 0.0, "mup")


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_script_bad_config_exit_2(tmp_path: Path):
    bad = tmp_path / "bad.yml"
    bad.write_text("model:\n  num_layers: 0\n")
    result = run_script(str(ROOT / "create_base_shapes.py"), "--config", str(bad))
    assert result.returncode == 2
    assert "model.num_layers is 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_script_bad_width_flag_exit_2():
    result = run_script(str(ROOT / "create_base_shapes.py"), "--widths", "80,100")
    assert result.returncode == 2
    assert "width 100" in result.stderr
    assert "Traceback" not in result.stderr
