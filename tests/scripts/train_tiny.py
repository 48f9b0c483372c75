"""Train a tiny Llama student (hidden loss through trained projections) and append every logged step to a
JSON-lines file. Used by tests/test_resume.py as a real process to interrupt (SIGTERM) and resume.

    python train_tiny.py OUTPUT_DIR LOG_FILE [--resume] [--sleep SECONDS] [--max-steps N]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import tiny  # noqa: E402
from hf_kd import DistillationTrainer  # noqa: E402


class StepLog(TrainerCallback):
    def __init__(self, path, sleep):
        self.path, self.sleep = path, sleep

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.sleep)  # wall time only: leaves the test time to signal mid-run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("log_file")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(1)  # the same kernels in every process: bit-comparable trajectories
    teacher, student = tiny.pair()
    args = tiny.args(a.output_dir, max_steps=a.max_steps, save_strategy="steps", save_steps=10_000,
                     lr_scheduler_type="linear", warmup_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny.rows(),
                                  callbacks=[StepLog(a.log_file, a.sleep)])
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    print(json.dumps({"global_step": trainer.state.global_step,
                      "interrupted": trainer.interrupt.received is not None}), flush=True)


if __name__ == "__main__":
    main()
