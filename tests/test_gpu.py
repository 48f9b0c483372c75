"""GPU-only paths (skipped without CUDA, with that reason): fp16 with the Trainer's grad scaler, bf16, the fused
logit loss against the chunked one on the GPU, and real `accelerate launch` runs of the shipped FSDP2 and DeepSpeed
configs on one GPU. scripts/gpu_check.sh runs this file on a GPU machine."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_kd import DistillationTrainer

from .scripts.tiny import args, losses, pair, rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "shard_tiny.py")


def gpu_args(path, **kw):
    return args(path, use_cpu=False, **kw)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_finite(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    teacher, student = pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                  args=gpu_args(tmp_path, max_steps=4, **{precision: True}))
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 4 and all(math.isfinite(v) for row in logged for v in row[1:] if v is not None)
    assert next(student.parameters()).device.type == "cuda"


def test_fused_equals_chunked_on_the_gpu(tmp_path):
    runs = {}
    for impl in ("chunked", "fused"):
        teacher, student = pair()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(),
                                      args=gpu_args(tmp_path / impl, max_steps=2, kd_impl=impl, hidden_weight=0.0))
        trainer.train()
        runs[impl] = losses(trainer)
    for a, b in zip(runs["chunked"], runs["fused"]):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


def launch(tmp_path, config, processes=1):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           os.path.join(ROOT, "recipes", "accelerate", config), "--num_processes", str(processes),
                           SCRIPT, str(out), str(tmp_path / "runs"), "--placements", "auto"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(out))["auto"]


def trained_cleanly(result) -> bool:
    """4 logged steps, every logged value finite, the teacher's weights bit-identical after training."""
    finite = all(math.isfinite(v) for row in result["logs"] for v in row[1:] if v is not None)
    return len(result["logs"]) == 4 and finite and result["unchanged"]


def test_fsdp2_config_on_one_gpu_places_the_teacher_whole(tmp_path):
    result = launch(tmp_path, "fsdp.yaml")
    assert trained_cleanly(result) and result["fractions"] == [1.0]  # nothing to shard over on one process


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sharding the teacher needs 2 GPUs (one process each)")
def test_fsdp2_config_on_two_gpus_shards_the_teacher(tmp_path):
    result = launch(tmp_path, "fsdp.yaml", processes=2)
    assert trained_cleanly(result) and all(0.4 < f < 0.6 for f in result["fractions"])


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_configs_train(tmp_path, config):
    assert trained_cleanly(launch(tmp_path, config))
