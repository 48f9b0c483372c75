"""What every main job shares: argument parsing (defaults < --quick < YAML < CLI), the distil-and-baseline
run, and the report."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import torch
import yaml
from transformers import HfArgumentParser

from ..config import DistillationConfig
from ..report import evaluate, latency, machine, model_card, num_parameters, push_or_dry_run, write_report
from ..trainer import DistillationTrainer

log = logging.getLogger("hf_kd")


@dataclasses.dataclass
class JobArguments:
    """Fields every job has (the job-specific dataclasses extend it)."""

    quick: bool = dataclasses.field(default=False, metadata={"help": "Smoke-test preset: a tiny run in ~1 minute."})
    baseline: bool = dataclasses.field(default=True, metadata={"help": "Also train the same student for the same "
                                       "steps on the task loss alone (no teacher) and report it."})
    keep_checkpoints: bool = dataclasses.field(default=False, metadata={"help": "Keep checkpoint-* folders "
                                               "after a successful run (they are removed by default)."})
    dry_run: bool = dataclasses.field(default=False, metadata={"help": "With --push_to_hub: write "
                                      "push_dry_run.json listing what would be pushed instead of pushing."})


def _as_args(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def parse(job_cls, argv: list[str] | None, defaults: dict, quick: dict):
    """Parse ``job_cls`` + DistillationConfig from defaults, the quick preset, ``--config X.yaml`` and flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from_yaml = {}
    if "--config" in argv:
        i = argv.index("--config")
        with open(argv[i + 1]) as f:
            from_yaml = yaml.safe_load(f) or {}
        del argv[i:i + 2]
    wants_quick = from_yaml.get("quick") is True or any(a == "--quick" and (j + 1 == len(argv) or argv[j + 1]
                                                        .lower() not in ("false", "0")) for j, a in enumerate(argv))
    values = {**defaults, **(quick if wants_quick else {}), **from_yaml}
    parser = HfArgumentParser((job_cls, DistillationConfig))
    return parser.parse_args_into_dataclasses(args=_as_args(values) + argv)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch threads (unchanged when 0/None), restoring the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Interrupted(SystemExit):
    """Training was stopped by SIGINT/SIGTERM after saving a checkpoint: the job ends without a report."""


def _train(trainer) -> float:
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    if trainer.interrupt.received is not None:  # checkpoint saved by the trainer; keep it, report nothing
        raise Interrupted(f"interrupted at step {trainer.state.global_step}: checkpoint saved in "
                          f"{trainer.args.output_dir}; continue with --resume_from_checkpoint true")
    return time.perf_counter() - start


def distill_and_report(job, args: DistillationConfig, *, teacher, new_student, train_dataset, eval_batches: list,
                       task: str, collator=None, processing_class=None, data: str, teacher_name: str,
                       speed_inputs: dict, save_extra=None, notes: list[str] | None = None,
                       baseline_metrics: dict | None = None) -> dict:
    """Evaluate teacher and fresh student, distil, train the no-teacher baseline, evaluate, save, report.

    ``new_student()`` must build the same initial student every call (the baseline starts where KD started).
    ``baseline_metrics``: the caller's own baseline row, used instead of a trained one (for a job with no task
    loss, where a no-teacher run has nothing to train on).
    """
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    push = args.push_to_hub
    if push and job.dry_run:  # the Trainer creates the Hub repo at init when push_to_hub is on: not in a dry run
        args = dataclasses.replace(args, push_to_hub=False)
    student = new_student()
    metrics = {"teacher": evaluate(teacher, eval_batches, task, desc="eval teacher"),
               "student_before": evaluate(student, eval_batches, task, teacher, desc="eval student before")}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_dataset,
                                  data_collator=collator, processing_class=processing_class)
    seconds = {"distillation": _train(trainer)}
    metrics["student_after"] = evaluate(student, eval_batches, task, teacher, desc="eval student after")
    histories = {"distillation": trainer.state.log_history}
    if baseline_metrics is not None:
        metrics["baseline_no_teacher"] = baseline_metrics
    elif job.baseline:
        tmp = tempfile.mkdtemp(prefix="hf_kd_baseline_")
        try:
            base_args = dataclasses.replace(args, output_dir=tmp, kd_weight=0.0, hidden_weight=0.0, alpha_task=1.0,
                                            push_to_hub=False, save_strategy="no", resume_from_checkpoint=None)
            baseline = new_student()
            base_trainer = DistillationTrainer(model=baseline, teacher_model=teacher, args=base_args,
                                               train_dataset=train_dataset, data_collator=collator,
                                               processing_class=processing_class)
            seconds["baseline"] = _train(base_trainer)
            metrics["baseline_no_teacher"] = evaluate(baseline, eval_batches, task, teacher, desc="eval baseline")
            histories["baseline (no teacher)"] = base_trainer.state.log_history
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(out)
    if not trainer.is_world_process_zero():  # under accelerate launch one process writes the folder and report
        return {}
    if not job.keep_checkpoints:  # they exist to survive a crash; the finished student is saved above
        for name in os.listdir(out):
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    if processing_class is not None:
        processing_class.save_pretrained(out)
    if save_extra is not None:
        save_extra(out)
    dtype = next(student.parameters()).dtype  # the trainer may have cast the teacher (teacher_dtype): time both alike
    same = teacher if next(teacher.parameters()).dtype == dtype else copy.deepcopy(teacher).to(dtype)
    t_time, s_time = latency(same, speed_inputs), latency(student, speed_inputs)
    del same
    shape = "x".join(str(d) for d in next(iter(speed_inputs.values())).shape) + f" {str(dtype).replace('torch.', '')}"
    report = {
        "task": task, "teacher": teacher_name, "data": data, "machine": machine(),
        "teacher_parameters": num_parameters(teacher), "student_parameters": num_parameters(student),
        "compression_ratio": num_parameters(teacher) / num_parameters(student),
        "speedup": t_time / s_time, "speed_input": f"input {shape}, teacher {t_time * 1e3:.1f} ms, "
                                                   f"student {s_time * 1e3:.1f} ms",
        "metrics": metrics, "train_seconds": seconds, "steps": trainer.state.global_step,
        "student_layers": getattr(student.config, "hf_kd_teacher_layers", None),
        "layer_scores": getattr(student.config, "hf_kd_layer_scores", None),
        "config": {k: getattr(args, k) for k in ("temperature", "alpha_task", "kd_weight", "kd_loss", "hidden_weight",
                                                 "hidden_loss", "learning_rate", "max_steps", "seed",
                                                 "per_device_train_batch_size", "gradient_accumulation_steps")},
        "notes": notes or [],
    }
    write_report(out, report, histories)
    model_card(out, report, args)
    if push:
        push_or_dry_run(trainer, out, job.dry_run)
    torch.set_grad_enabled(True)
    return report


def cached_folder(name: str, recipe: dict, build) -> str:
    """``cache_dir()/name``, built once by ``build(tmp_folder) -> info dict`` into a temporary folder that is then
    renamed into place (atomic); rebuilt when ``recipe`` differs from the one recorded in hf_kd_prepared.json."""
    from ..assets import cache_dir
    final = cache_dir() / name
    record = final / "hf_kd_prepared.json"

    def ready() -> bool:
        try:
            return json.loads(record.read_text()).get("recipe") == recipe
        except (OSError, ValueError):
            return False
    if ready():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent)
    try:
        info = build(tmp)
        with open(os.path.join(tmp, "hf_kd_prepared.json"), "w") as f:
            json.dump({"recipe": recipe, **info}, f, indent=2)
        if not ready():  # nobody else finished meanwhile
            if final.exists():  # a stale recipe or an incomplete leftover
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another process won the race
                if not ready():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def prepared_info(folder: str) -> dict:
    """What :func:`cached_folder` recorded about a prepared folder."""
    with open(os.path.join(folder, "hf_kd_prepared.json")) as f:
        return json.load(f)
