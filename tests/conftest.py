"""Shared fixtures: tiny settings and base shapes files written to a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mup_qwen.settings import Settings, settings_from_dict  # noqa: E402
from mup_qwen.shapes import make_base_shapes  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_settings(tmp_path: Path, **sections) -> Settings:
    """Return settings for tiny models (widths 32 to 128, base 32, 2 layers, seq 32) with files under `tmp_path`.

    Keyword arguments are sections whose fields replace the tiny defaults, e.g. `model={"family": "qwen3"}`.
    """
    raw = {
        "model": {"widths": [32, 64, 128], "base_width": 32, "num_layers": 2, "head_dim": 8},
        "data": {"seq_len": 32, "batch_size": 4, "val_batches": 2},
        "optim": {"warmup_steps": 0},
        "coord": {"steps": 3, "seeds": [0, 1]},
        "sweep": {"steps": 20, "log2_lr_min": -10.0, "log2_lr_max": -6.0, "num_lrs": 3, "log_every": 5},
        "run": {"device": "cpu", "threads": 1, "base_shapes": str(tmp_path / "base_shapes.bsh"),
                "results_dir": str(tmp_path / "results")},
    }
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    return settings_from_dict(raw)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Tiny Qwen2 settings with their base shapes file already written."""
    tiny = tiny_settings(tmp_path)
    make_base_shapes(tiny)
    return tiny


@pytest.fixture
def make_settings(tmp_path: Path):
    """Factory: tiny settings with section overrides, base shapes written to a fresh file."""
    counter = iter(range(1000))

    def factory(**sections) -> Settings:
        run = dict(sections.pop("run", {}))
        run.setdefault("base_shapes", str(tmp_path / f"base_shapes_{next(counter)}.bsh"))
        tiny = tiny_settings(tmp_path, run=run, **sections)
        make_base_shapes(tiny)
        return tiny

    return factory


def execute_notebook(name: str, results_dir: Path) -> tuple[str, list[dict]]:
    """Run `notebooks/<name>` headlessly on `results_dir` and return its printed text and outputs.

    The notebook must be saved without outputs, and reads its folder from MUP_QWEN_RESULTS.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")

    previous = os.environ.get("MUP_QWEN_RESULTS")
    os.environ["MUP_QWEN_RESULTS"] = str(results_dir)
    try:
        client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}})
        client.execute()
    finally:
        if previous is None:
            del os.environ["MUP_QWEN_RESULTS"]
        else:
            os.environ["MUP_QWEN_RESULTS"] = previous

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    return text, outputs
