"""CUDA checks: fused attention kernels with the μP scale, bf16 training, and Ray trials sharing one GPU.

The CUDA tests skip without a CUDA device, where only the check that `scripts/gpu_check.sh`
and the packing benchmark skip cleanly runs. `scripts/gpu_check.sh` runs them on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mup_qwen.data import load_corpus, train_batches
from mup_qwen.model import ATTENTION_CLASSES, build_model
from mup_qwen.settings import attn_mult, override
from mup_qwen.train import train_trial

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# head_dim grows with width (width / 2), so the μP scale attn_mult / head_dim differs from 1/√head_dim.
FIXED_HEADS = {"head_scaling": "fixed_heads", "head_dim": None, "num_heads": 2}
# Query and key weights × 10 make attention peaked, so a wrong softmax scale changes the logits
# by far more than rounding does. On the CPU the wrong scale moved them by 5e-3 on average, bf16 by 3e-4.
QK_GAIN = 10.0


@pytest.fixture
def no_tf32():
    """Turn TF32 off so float32 kernels are compared at float32 precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def cuda_settings(make_settings):
    return make_settings(model=FIXED_HEADS, run={"device": "cuda", "tf32": False})


def attention_logits(settings, implementation: str, width: int, batch: torch.Tensor,
                     dtype: torch.dtype = torch.float32, softmax_scale=None) -> torch.Tensor:
    """Return the float32 logits of a μP model built with the given attention backend, on CUDA."""
    model = build_model(override(settings, "run.attn_implementation", implementation), width, "mup", seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(QK_GAIN)
    model = model.to(device="cuda", dtype=dtype).eval()
    if softmax_scale is not None:
        for module in model.modules():
            if isinstance(module, ATTENTION_CLASSES):
                module.scaling = softmax_scale(module)
    with torch.no_grad():
        return model(input_ids=batch.cuda()).logits.float()


def first_batch(settings) -> torch.Tensor:
    corpus = load_corpus(settings.data)
    return next(train_batches(corpus, settings.data.batch_size, settings.data.seq_len, seed=0))[:, :-1]


@requires_cuda
def test_mup_scale_set_on_every_attention(cuda_settings):
    model = build_model(override(cuda_settings, "run.attn_implementation", "sdpa"), 128, "mup", seed=0)
    modules = [module for module in model.modules() if isinstance(module, ATTENTION_CLASSES)]
    assert len(modules) == cuda_settings.model.num_layers
    for module in modules:
        assert module.scaling == attn_mult(cuda_settings.model) / module.head_dim
        assert module.scaling != pytest.approx(module.head_dim ** -0.5)


@requires_cuda
@pytest.mark.parametrize("width", [64, 128])
def test_sdpa_matches_eager_on_cuda(cuda_settings, no_tf32, width):
    batch = first_batch(cuda_settings)
    eager = attention_logits(cuda_settings, "eager", width, batch)
    sdpa = attention_logits(cuda_settings, "sdpa", width, batch)
    wrong_scale = attention_logits(cuda_settings, "sdpa", width, batch, softmax_scale=lambda m: m.head_dim ** -0.5)

    error = (sdpa - eager).abs().max().item()
    scale_effect = (wrong_scale - eager).abs().max().item()
    assert error < 1e-4, f"SDPA differs from eager by {error:.2e}"
    assert scale_effect > 10 * error, f"the softmax scale changes logits by only {scale_effect:.2e}"


@requires_cuda
@pytest.mark.parametrize("width", [64, 128])
def test_flash_attention_matches_eager(cuda_settings, no_tf32, width):
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash attention 2 needs an Ampere or newer GPU")
    batch = first_batch(cuda_settings)
    eager = attention_logits(cuda_settings, "eager", width, batch)
    flash = attention_logits(cuda_settings, "flash_attention_2", width, batch, dtype=torch.bfloat16)
    wrong_scale = attention_logits(cuda_settings, "eager", width, batch, softmax_scale=lambda m: m.head_dim ** -0.5)

    error = (flash - eager).abs().mean().item()
    scale_effect = (wrong_scale - eager).abs().mean().item()
    # NOTE: the bound is an estimate, not measured on a GPU. bf16 moved these logits by 3e-4 on average on the CPU.
    assert error < 2e-3, f"flash attention differs from eager by {error:.2e} on average"
    assert error < scale_effect / 3, f"flash error {error:.2e} is not small against the scale's effect {scale_effect:.2e}"


@requires_cuda
def test_bf16_training_close_to_fp32(cuda_settings):
    float32 = train_trial(cuda_settings, 64, "mup", 2.0 ** -8, seed=0, steps=20)
    bfloat16 = train_trial(override(cuda_settings, "run.precision", "bfloat16"), 64, "mup", 2.0 ** -8, seed=0,
                           steps=20)

    assert bfloat16.steps_done == 20
    assert not bfloat16.diverged
    assert all(math.isfinite(loss) for _, loss in bfloat16.train_losses)
    assert math.isfinite(bfloat16.val_loss)
    steps = [step for step, _ in float32.train_losses]
    assert steps == [step for step, _ in bfloat16.train_losses]
    # NOTE: the bounds are estimates, not measured on a GPU. Autocast keeps the weights, the loss and
    # the optimizer in float32, and on the CPU bf16 moved these losses by under 1e-3.
    first_gap = abs(float32.train_losses[0][1] - bfloat16.train_losses[0][1])
    assert first_gap < 0.02, f"first-step loss differs by {first_gap:.4f}"
    for (step, loss32), (_, loss16) in zip(float32.train_losses, bfloat16.train_losses):
        assert abs(loss32 - loss16) < 0.05, f"step {step}: float32 {loss32:.4f}, bfloat16 {loss16:.4f}"
    assert abs(float32.val_loss - bfloat16.val_loss) < 0.05
    assert float32.train_losses[-1][1] < float32.train_losses[0][1] - 0.5, "the model did not train"


@requires_cuda
def test_ray_packs_four_trials_on_one_gpu(cuda_settings, tmp_path):
    pytest.importorskip("ray")
    from benchmarks.gpu_packing import timed_trial, warm_worker
    from mup_qwen.executor import Task, TaskFailure, run_tasks

    cpus_per_trial = min(1.0, (os.cpu_count() or 1) / 4)
    options = dict(executor="ray", cpus_per_trial=cpus_per_trial, gpus_per_trial=0.25)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # Each task waits until all four have started, so four workers hold a quarter GPU each at once.
    warm = [Task(index, warm_worker, dict(settings=cuda_settings, width=64, barrier=str(barrier), count=4,
                                          timeout=120.0)) for index in range(4)]
    pids = dict(run_tasks(warm, **options))
    for index, pid in pids.items():
        assert not isinstance(pid, TaskFailure), f"warm-up task {index}: {pid}"
    assert len(set(pids.values())) == 4

    trials = [Task(seed, timed_trial, dict(settings=cuda_settings, width=64, steps=20, seed=seed))
              for seed in range(4)]
    results = dict(run_tasks(trials, **options))
    for seed, result in results.items():
        assert not isinstance(result, TaskFailure), f"trial {seed}: {result}"
        assert result["steps"] == 20
        assert math.isfinite(result["final_train_loss"])
    visible = {result["visible_devices"] for result in results.values()}
    assert len(visible) == 1, f"trials saw different GPUs: {visible}"
    (devices,) = visible
    assert devices is not None and len(devices.split(",")) == 1, f"CUDA_VISIBLE_DEVICES is {devices!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("command", [["bash", "scripts/gpu_check.sh"], [sys.executable, "benchmarks/gpu_packing.py"]])
def test_gpu_check_skips_without_cuda(command):
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "no CUDA device: skipped"


@pytest.fixture(scope="module", autouse=True)
def shutdown_ray():
    """Stop a Ray instance that this module's tests started."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
