"""Teacher placement across processes: teacher_placement='shard' FSDP2-shards the teacher over 2 gloo CPU
processes (each rank holds about half of its weights), gives the trajectory of the replicated teacher, and leaves
the teacher's weights unchanged; in one process it is refused with a clear message."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from hf_kd import DistillationTrainer

from .scripts import tiny
from .scripts.tiny import one_thread  # noqa: F401  (autouse fixture)
from .test_distributed import ENV, free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "shard_tiny.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "recipes", "accelerate", "cpu_2proc.yaml")


@pytest.mark.slow
def test_sharded_teacher_holds_half_its_weights_per_rank_and_matches_the_replicated_run(tmp_path):
    # a real `accelerate launch` with the shipped 2-process CPU config (gloo)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
                           "--main_process_port", str(free_port()), SCRIPT, str(tmp_path / "out.json"),
                           str(tmp_path / "runs")], env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.load(open(tmp_path / "out.json"))
    auto, shard = results["auto"], results["shard"]
    assert auto["fractions"] == [1.0, 1.0]  # DDP: a full teacher on every rank
    assert all(0.45 < f < 0.75 for f in shard["fractions"]), shard["fractions"]  # blocks halved, root freed
    assert shard["unchanged"] and auto["unchanged"]
    assert "on the CPU the teacher is there already" in results["offload_error"]
    assert len(auto["logs"]) == 4
    for a, b in zip(auto["logs"], shard["logs"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)


def test_shard_needs_several_processes(tmp_path):
    teacher, student = tiny.pair()
    with pytest.raises(ValueError, match="several processes"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=tiny.rows(),
                            args=tiny.args(tmp_path, teacher_placement="shard"))


def test_fsdp_on_one_process_places_the_teacher_whole(tmp_path):
    """Under FSDP with one process there is nothing to shard over: 'auto' places the teacher whole (it used to call
    shard_teacher, which refuses one process, so the shipped FSDP2 config failed on one GPU)."""
    from accelerate import Accelerator
    from hf_kd.teachers.placement import local_fraction, prepare_teacher
    teacher, _ = tiny.pair()
    args = tiny.args(tmp_path)  # before the Accelerator: TrainingArguments resets the accelerate state
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    placed = prepare_teacher(teacher, args, accelerator, deepspeed=False, fsdp=True)
    assert local_fraction(placed) == 1.0 and not placed.training


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "recipes", "accelerate"))))
def test_shipped_accelerate_configs_load(name):
    path = os.path.join(ROOT, "recipes", "accelerate", name)
    config = load_config_from_file(path)  # what `accelerate launch --config_file` parses
    raw = yaml.safe_load(open(path))
    assert config.distributed_type.value == raw["distributed_type"] and config.num_processes == raw["num_processes"]
    if raw["distributed_type"] == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
