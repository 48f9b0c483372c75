"""Invariants across processes and runs: 2 gloo CPU processes give the trajectory of 1 process with the same
global batch (with and without gradient accumulation), checkpoints stay atomic with per-process RNG files, a
NaN skipped or a SIGTERM received on one process neither hangs nor desynchronises the others, and the same seed
and config give the same trajectory."""

import json
import os
import socket
import subprocess
import sys

import pytest

from .scripts import tiny
from .scripts.tiny import one_thread  # noqa: F401  (autouse fixture)

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_tiny.py")
CPU_2PROC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "accelerate",
                         "cpu_2proc.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # CPU only: `accelerate launch` with the shipped 2-process config starts 2 gloo processes (ACCELERATE_USE_CPU;
    # `accelerate launch --cpu --num_processes 2` would start a single process).
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
                             "--main_process_port", str(free_port()), SCRIPT, str(tmp_path / "ddp.json"),
                             str(tmp_path / "ddp"), "--configs", "4x1,2x2"],
                            env={**ENV, "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    world, ref_logs, ref_rows = tiny.train_and_record(tmp_path / "one", 8)  # meanwhile: 1 process, batch 8
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    assert world == 1
    results = json.load(open(tmp_path / "ddp.json"))
    assert results.pop("nan_skip") == {"skipped": [0, 1, 1], "finite": True}  # one process skipped, none hung
    assert results.pop("sigterm") == {"global_step": 2, "received": None}  # rank 0 stopped too, at the same step
    assert sorted(os.listdir(tmp_path / "ddp" / "sigterm")) == ["checkpoint-2"]
    for name, run in results.items():  # 2 x 4, and 2 x 2 x 2 accumulation
        assert run["world_size"] == 2
        assert run["rows"] == {str(k): v for k, v in ref_rows.items()}, f"{name}: the global batches differ"
        assert [x[0] for x in run["logs"]] == [1, 2, 3, 4]
        for a, b in zip(ref_logs, run["logs"]):  # step, loss, kd_loss, task_loss, hidden_loss, grad_norm
            assert b == pytest.approx(list(a), rel=2e-5, abs=1e-6), name
    out = tmp_path / "ddp" / "4x1"
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]  # nothing staged left behind
    for name in ("rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "hf_kd_extras.pt", "model.safetensors"):
        assert (out / "checkpoint-4" / name).is_file(), name


def test_same_seed_same_trajectory(tmp_path):
    first, second = tiny.train_and_record(tmp_path / "a", 4)[1], tiny.train_and_record(tmp_path / "b", 4)[1]
    assert len(first) == 4 and first == second  # bit-identical on CPU
