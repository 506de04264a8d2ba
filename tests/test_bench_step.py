"""Tests of the training-step benchmark script: it runs on tiny models and checks what it claims.

The script runs in a subprocess, as a user runs it, with one repeat of a few steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_settings

SCRIPT = ROOT / "benchmarks" / "bench_step.py"


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run the step, loop and memory sections at width 32 with attn_mult 1, and return the JSON."""
    folder = tmp_path_factory.mktemp("bench")
    settings = tiny_settings(folder, model={"attn_mult": 1.0})
    config = folder / "tiny.yml"
    config.write_text(yaml.safe_dump(settings.to_dict()))
    output = folder / "results.json"
    completed = run_script("--config", str(config), "--widths", "32", "--steps", "1", "--repeats", "1",
                           "--trial-steps", "2", "--memory-steps", "1", "--sections", "step,loop,memory",
                           "--json", str(output))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "### μP step against the plain transformers step" in completed.stdout
    return json.loads(output.read_text())


def test_step_rows_per_width(results):
    assert [row["width"] for row in results["step"]] == [32]
    for row in results["step"]:
        assert row["mup_ms"] > 0
        assert row["plain_ms"] > 0
        assert row["model_flops_per_second"] > 0


def test_step_attention_stays_sdpa(results):
    for row in results["step"]:
        for name in ("mup", "plain"):
            check = row["checks"][name]
            assert check["attn_implementation"] == "sdpa"
            assert check["kernels"], f"width {row['width']}, {name}: no SDPA kernel recorded"
            assert not any("math" in kernel for kernel in check["kernels"]), check["kernels"]


def test_step_records_mup_scale(results):
    # head_dim 8: μP passes attn_mult / head_dim = 1/8, the plain model 1/√8.
    for row in results["step"]:
        assert row["checks"]["mup"]["scales"] == [1.0 / 8]
        assert row["checks"]["plain"]["scales"] == [pytest.approx(1 / math.sqrt(8))]


def test_loop_rows_per_width(results):
    assert [row["width"] for row in results["loop"]] == [32]
    for row in results["loop"]:
        assert all(ratio > 0 for ratio in row["speed_ratios"]["per_repeat"])
        assert row["speed_ratios"]["of_fastest"] > 0
        assert row["evaluate_seconds"] > 0


def test_memory_peak_above_baseline(results):
    for row in results["memory"]:
        assert row["trial_peak_mib"] >= row["baseline_mib"]
        assert math.isfinite(row["val_loss"])


def test_invalid_section_exits_2(tmp_path: Path):
    completed = run_script("--sections", "step,warp")
    assert completed.returncode == 2
    assert "--sections" in completed.stderr
    assert "Traceback" not in completed.stderr
