"""Train the tiny pair on 2 processes with the teacher replicated ('auto') and FSDP2-sharded ('shard'); rank 0
writes each run's logged trajectory and the share of the teacher's parameters each rank holds. Launched by
tests/test_placement.py: torchrun --nproc_per_node 2 shard_tiny.py OUT_JSON OUTPUT_DIR"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tiny  # noqa: E402
from hf_kd import DistillationTrainer  # noqa: E402
from hf_kd.teachers.placement import local_fraction  # noqa: E402


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def run(output_dir, placement):
    teacher, student = tiny.pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=tiny.rows(),
                                  args=tiny.args(output_dir, max_steps=4, per_device_train_batch_size=2,
                                                 teacher_placement=placement, use_cpu=not torch.cuda.is_available()))
    trainer.train()
    fractions = [local_fraction(trainer.teacher)] * world()
    if world() > 1:
        dist.all_gather_object(fractions, fractions[0])
    from torch.distributed.tensor import DTensor  # gather any shards back: the teacher's weights are unchanged
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu().float()
            for k, v in getattr(trainer.teacher, "module", trainer.teacher).state_dict().items()}  # DeepSpeed: .module
    unchanged = all(torch.equal(full[k], v.float()) for k, v in before.items())
    return {"logs": tiny.losses(trainer), "fractions": fractions, "unchanged": unchanged}


def main():
    out_json, output_dir = sys.argv[1], sys.argv[2]
    placements = sys.argv[sys.argv.index("--placements") + 1].split(",") if "--placements" in sys.argv else \
        ["auto", "shard"]
    torch.set_num_threads(1)
    results = {p: run(os.path.join(output_dir, p), p) for p in placements}
    if world() > 1 and not torch.cuda.is_available():  # CPU offload of a teacher already on the CPU: refused
        try:
            run(os.path.join(output_dir, "offload"), "offload")
        except ValueError as e:
            results["offload_error"] = str(e)
    if not dist.is_initialized() or dist.get_rank() == 0:
        json.dump(results, open(out_json, "w"))


if __name__ == "__main__":
    main()
