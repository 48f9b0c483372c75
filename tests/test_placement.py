"""Teacher placement across processes: teacher_placement='shard' FSDP2-shards the teacher over 2 gloo CPU
processes (each rank holds about half of its weights), gives the trajectory of the replicated teacher, and leaves
the teacher's weights unchanged; in one process it is refused with a clear message."""

import json
import os
import subprocess
import sys

import pytest

from hf_kd import DistillationTrainer

from .scripts import tiny
from .scripts.tiny import one_thread  # noqa: F401  (autouse fixture)
from .test_distributed import ENV, free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "shard_tiny.py")


@pytest.mark.slow
def test_sharded_teacher_holds_half_its_weights_per_rank_and_matches_the_replicated_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), SCRIPT, str(tmp_path / "out.json"),
                           str(tmp_path / "runs")], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.load(open(tmp_path / "out.json"))
    auto, shard = results["auto"], results["shard"]
    assert auto["fractions"] == [1.0, 1.0]  # DDP: a full teacher on every rank
    assert all(0.45 < f < 0.75 for f in shard["fractions"]), shard["fractions"]  # blocks halved, root freed
    assert shard["unchanged"] and auto["unchanged"]
    assert len(auto["logs"]) == 4
    for a, b in zip(auto["logs"], shard["logs"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)


def test_shard_needs_several_processes(tmp_path):
    teacher, student = tiny.pair()
    with pytest.raises(ValueError, match="several processes"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=tiny.rows(),
                            args=tiny.args(tmp_path, teacher_placement="shard"))
