"""A distillation experiment end to end, as the recipes run it: distil, train the same student without a teacher
for the same steps (the baseline KD must beat), then save the student with a report and a model card.

    metrics = {"teacher": evaluate(teacher, batches, task), "student_before": evaluate(student, batches, task, teacher)}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train)
    seconds = {"distillation": train(trainer)}             # stops cleanly on SIGINT/SIGTERM (Interrupted)
    metrics["student_after"] = evaluate(student, batches, task, teacher)
    metrics["baseline_no_teacher"], seconds["baseline"], history = train_baseline(args, copy_of_initial_student, ...)
    report = save_and_report(trainer, teacher=teacher, task=task, metrics=metrics, seconds=seconds, ...)

``report`` is also written as report.json / report.md / learning_curves.png / README.md (model card) in
``args.output_dir``, next to the saved student.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
import time

import torch
from transformers import TrainingArguments

from ..config import DistillationConfig
from ..tools.curves import crossover, plot_curves
from ..tools.report import (evaluate, latency, machine, model_card, num_parameters, push_or_dry_run, teacher_warnings,
                     write_report)
from ..trainer import DistillationTrainer

__all__ = ["Interrupted", "REPORTED_CONFIG", "baseline_args", "heldout_curves", "save_and_report", "torch_threads",
           "train", "train_baseline"]

log = logging.getLogger("hf_kd")
REPORTED_CONFIG = ("temperature", "alpha_task", "kd_weight", "kd_loss", "hidden_weight", "hidden_loss", "learning_rate",
                   "max_steps", "seed", "per_device_train_batch_size", "gradient_accumulation_steps")


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


def train(trainer: DistillationTrainer) -> float:
    """``trainer.train()``, resuming from ``args.resume_from_checkpoint``; returns its wall time in seconds.

    Raises :class:`Interrupted` (a ``SystemExit``) when a signal stopped training: the trainer saved a checkpoint,
    which ``--resume_from_checkpoint true`` continues from.
    """
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    if trainer.interrupt.received is not None:  # checkpoint saved by the trainer; keep it, report nothing
        raise Interrupted(f"interrupted at step {trainer.state.global_step}: checkpoint saved in "
                          f"{trainer.args.output_dir}; continue with --resume_from_checkpoint true")
    return time.perf_counter() - start


def baseline_args(args: DistillationConfig, output_dir: str) -> DistillationConfig:
    """``args`` for the no-teacher baseline: the task loss alone (``alpha_task=1``), every teacher term's weight 0
    (logits, hidden states, relations, hints, attention, gradients: each ``*_weight`` field of DistillationConfig),
    no weight or temperature schedule, no hint-only first stage or progressive stages, one teacher's mixing
    defaults, no teacher route, cache or server; no push, no checkpoints, a fresh run in
    ``output_dir``. Data, steps, optimiser, learning-rate schedule and seed are unchanged."""
    own = ({f.name for f in dataclasses.fields(DistillationConfig)}
           - {f.name for f in dataclasses.fields(TrainingArguments)})  # the distillation fields
    weights = {n: 0.0 for n in own if n.endswith("_weight")}
    scheduled = {*weights, "alpha_task", "temperature"}
    ends = {n: None for n in own if n.endswith("_end") and n[:-len("_end")] in scheduled}
    return dataclasses.replace(args, output_dir=output_dir, **weights, **ends, alpha_task=1.0,
                               weight_schedule="constant", hint_first_stage=0.0, progressive=False,
                               teacher_weights="uniform", teacher_temperatures=None, teacher_checkpoints=None,
                               teacher_cache=None, teacher_url=None, push_to_hub=False,
                               save_strategy="no", resume_from_checkpoint=None)


def train_baseline(args: DistillationConfig, student, *, teacher, train_dataset, eval_batches: list, task: str,
                   data_collator=None, processing_class=None, callbacks=None) -> tuple[dict, float, list[dict]]:
    """Train ``student`` (a fresh copy of the initial student) for the same steps on its task loss alone
    (:func:`baseline_args`; no teacher in the trainer), in a temporary folder; returns its held-out ``(metrics,
    train seconds, log history)``. ``teacher`` only adds agreement with it to the metrics."""
    tmp = tempfile.mkdtemp(prefix="hf_kd_baseline_")
    try:
        trainer = DistillationTrainer(model=student, args=baseline_args(args, tmp), train_dataset=train_dataset,
                                      data_collator=data_collator, processing_class=processing_class,
                                      callbacks=callbacks)
        seconds = train(trainer)
        metrics = evaluate(student, eval_batches, task, teacher, desc="eval baseline")
        return metrics, seconds, trainer.state.log_history
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_and_report(trainer: DistillationTrainer, *, teacher, task: str, teacher_name: str, data: str,
                    speed_inputs: dict, metrics: dict, seconds: dict, histories: dict[str, list[dict]],
                    notes: list[str] | None = None, processing_class=None, keep_checkpoints: bool = False,
                    push: bool = False, dry_run: bool = False, curves: dict[str, list[dict]] | None = None) -> dict:
    """Save the distilled student (``trainer.model``) to ``args.output_dir`` with its processor, time teacher and
    student on ``speed_inputs``, and write the report and model card; returns the report (``{}`` on processes
    other than the main one, which write nothing).

    ``metrics``: rows of held-out metrics ("teacher", "student_before", "student_after", "baseline_no_teacher");
    ``seconds`` and ``histories``: training wall times and ``log_history`` per run, plotted as learning curves.
    ``curves``: :class:`hf_kd.tools.curves.HeldOutCurve` points per arm ("distilled", "no teacher"), plotted against steps
    and seconds (heldout_curves.png) with the crossovers in the report. ``keep_checkpoints=False`` removes the ``checkpoint-*`` folders (they exist to survive a crash).
    ``push``: push the folder to the Hub through the trainer, or with ``dry_run`` write push_dry_run.json listing
    what would be pushed (build the trainer with ``push_to_hub=False`` then: it creates the Hub repo at init).
    """
    args, student = trainer.args, trainer.model
    out = args.output_dir
    trainer.save_model(out)
    if not trainer.is_world_process_zero():  # under accelerate launch one process writes the folder and report
        return {}
    if not keep_checkpoints:
        for name in os.listdir(out):
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    if processing_class is not None:
        processing_class.save_pretrained(out)
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
        "config": {k: getattr(args, k) for k in REPORTED_CONFIG},
        "notes": notes or [], "warnings": teacher_warnings(metrics),
    }
    if curves:
        report["heldout_curves"] = heldout_curves(out, curves, task)
        report["notes"].append(report["heldout_curves"]["summary"])
    for warning in report["warnings"]:
        log.warning(warning)
    write_report(out, report, histories)
    model_card(out, report, args)
    if push:
        push_or_dry_run(trainer, out, dry_run)
    torch.set_grad_enabled(True)
    return report


def heldout_curves(out_dir: str, curves: dict[str, list[dict]], task: str) -> dict:
    """Plot the arms' held-out curves (heldout_curves.png) and say where the distilled one overtakes the baseline,
    in steps and in seconds (teacher costs included in its seconds)."""
    metric = "perplexity" if task == "causal_lm" else "accuracy"
    png = plot_curves(curves, os.path.join(out_dir, "heldout_curves.png"), metric)
    out = {"png": os.path.basename(png) if png else None, "metric": metric, "points": curves}
    if {"distilled", "no teacher"} <= set(curves):
        for x in ("step", "seconds"):
            out[f"crossover_{x}"] = crossover(curves["distilled"], curves["no teacher"], metric, x=x)
        said = [f"from {x} {out[f'crossover_{x}']:.0f}" for x in ("step", "seconds") if out[f"crossover_{x}"] is not None]
        out["summary"] = (f"held-out {metric}: the distilled student leads the no-teacher baseline " + " / ".join(said)
                          if said else f"held-out {metric}: the distilled student never leads the no-teacher baseline")
    else:
        out["summary"] = f"held-out {metric} curves in heldout_curves.png"
    return out
