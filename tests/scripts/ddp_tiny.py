"""Run tiny.train_and_record for several (per-device batch, accumulation) configs in one process group and
write rank 0's results to a JSON file. tests/test_distributed.py launches it on 2 gloo CPU processes:

    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \
        ddp_tiny.py OUT_JSON OUTPUT_DIR --configs 4x1,2x2

Each config trains in OUTPUT_DIR/<config>; the first one also saves checkpoints every 2 steps.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import tiny  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_json")
    p.add_argument("output_dir")
    p.add_argument("--configs", default="4x1")
    a = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    for i, config in enumerate(a.configs.split(",")):
        batch, accumulation = (int(x) for x in config.split("x"))
        world, logs, steps = tiny.train_and_record(os.path.join(a.output_dir, config), batch, accumulation,
                                                   save=i == 0)
        results[config] = {"world_size": world, "logs": logs, "rows": {str(k): v for k, v in steps.items()}}
    results["nan_skip"] = nan_on_one_process(os.path.join(a.output_dir, "nan_skip"))
    results["sigterm"] = sigterm_on_one_process(os.path.join(a.output_dir, "sigterm"))
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump(results, open(a.out_json, "w"))
    if torch.distributed.is_initialized():  # leave together: a process that exits while its peer still works on
        torch.distributed.barrier()  # the group can abort in gloo's teardown (seen once under load)
        torch.distributed.destroy_process_group()


def sigterm_on_one_process(output_dir):
    """SIGTERM reaches process 1 only (at step 2): every process must stop after the same step and save."""
    import signal

    from transformers import TrainerCallback

    from hf_kd import DistillationTrainer

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and args.process_index == 1:
                os.kill(os.getpid(), signal.SIGTERM)
    teacher, student = tiny.pair()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=tiny.rows(), callbacks=[Kill()],
                                  args=tiny.args(output_dir, max_steps=10))
    trainer.train()
    return {"global_step": trainer.state.global_step, "received": trainer.interrupt.received}


def nan_on_one_process(output_dir):
    """nan_policy='skip' when only process 1 sees a NaN teacher (its 2nd micro-batch): the zero loss must keep
    DDP's gradient all-reduce and the projections' manual all-reduce in step (no hang), the count is global."""
    from hf_kd import DistillationTrainer
    teacher, student = tiny.pair()
    calls = [0]

    def corrupt(module, inputs, out):
        calls[0] += 1
        if calls[0] == 2 and int(os.environ.get("RANK", "0")) == 1:
            out.logits = torch.full_like(out.logits, float("nan"))
        return out
    teacher.register_forward_hook(corrupt)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=tiny.rows(),
                                  args=tiny.args(output_dir, max_steps=3, nan_policy="skip"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    finite = all(torch.isfinite(p).all() for p in list(student.parameters()) + list(trainer.projections.parameters()))
    return {"skipped": [h["skipped_batches"] for h in logs], "finite": bool(finite)}


if __name__ == "__main__":
    main()
