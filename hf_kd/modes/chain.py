"""Teacher-assistant chains (Mirzadeh et al. 2020): when the teacher is much larger than the student, distil
teacher -> assistant -> student in stages, each stage a full distillation whose student teaches the next.

:func:`assistant_layers` sizes a layer-pruned assistant by the seeds' rule, the geometric mean of the teacher's and
the student's parameter counts; :func:`distill_chain` runs the stages, each in its own folder, resumable stage by
stage (a finished stage is loaded, not retrained) and, within a stage, from its last checkpoint;
:func:`chain_vs_direct` compares the chained student with the same student distilled straight from the teacher
at equal total steps, in a report that shows every stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from ..config import DistillationConfig
from ..teachers.curriculum import load_weights
from .experiment import Interrupted, baseline_args
from ..tools.report import num_parameters
from ..flow.layers import find_layers
from ..tools.student import make_student
from ..flow.tasks import base_model_of
from ..trainer import DistillationTrainer

DONE = "hf_kd_stage.json"


def assistant_layers(teacher: nn.Module, student_parameters: int) -> int:
    """The number of teacher layers n whose ``make_student(teacher, num_layers=n)`` has the parameter count closest to
    sqrt(P_teacher * P_student). A layer-pruned model of n layers has P_T - (L - n) * p parameters, p the
    parameters of one block (blocks of one model have one size)."""
    _, blocks = find_layers(base_model_of(teacher))
    total, per_block = num_parameters(teacher), num_parameters(blocks[0])
    target = math.sqrt(total * student_parameters)
    sizes = {n: total - (len(blocks) - n) * per_block for n in range(1, len(blocks) + 1)}
    return min(sizes, key=lambda n: (abs(sizes[n] - target), n))


def make_assistant(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """The assistant between ``teacher`` and ``student``: ``make_student(teacher)`` with the number of layers
    :func:`assistant_layers` gives for the student's parameter count."""
    return make_student(teacher, num_layers=assistant_layers(teacher, num_parameters(student)))


def distill_chain(teacher: nn.Module, students: list[nn.Module], args: DistillationConfig, **trainer_kwargs) -> list:
    """Distil ``teacher`` into ``students[0]``, that into ``students[1]``, ...; stage i trains in
    ``args.output_dir/stage_<i>`` with the same config (steps, weights, data: ``trainer_kwargs`` such as
    train_dataset, data_collator) and saves its student there. Returns the stages' trainers (None for stages
    found finished, whose saved weights are loaded into the given student instead)."""
    trainers = []
    for i, student in enumerate(students):
        folder = os.path.join(args.output_dir, f"stage_{i}")
        marker = os.path.join(folder, DONE)
        if os.path.isfile(marker):  # finished earlier: reuse the saved student as the next teacher
            load_weights(base_model_of(student), folder)
            trainers.append(None)
        else:
            stage_args = dataclasses.replace(args, output_dir=folder)
            last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=stage_args, **trainer_kwargs)
            trainer.train(resume_from_checkpoint=last)
            if trainer.interrupt.received is not None:  # a checkpoint was saved: the stage is not done
                raise Interrupted(f"chain stage {i} interrupted at step {trainer.state.global_step}: checkpoint "
                                  f"saved in {folder}; run the chain again to continue")
            trainer.save_model(folder)
            if trainer.is_world_process_zero():
                with open(marker, "w") as f:
                    json.dump({"stage": i, "steps": trainer.state.global_step,
                               "student_parameters": num_parameters(student)}, f)
            trainers.append(trainer)
        teacher = student
    return trainers


def chain_vs_direct(teacher: nn.Module, assistants: list[nn.Module], new_student, args: DistillationConfig,
                    score, **trainer_kwargs) -> dict:
    """The teacher-assistant chain's report: ``teacher -> assistants -> new_student()`` (``args.max_steps`` per
    stage, :func:`distill_chain` in ``output_dir/chain``) against ``new_student()`` (the same initial weights if
    ``new_student`` makes them so) distilled straight from the teacher for the chain's total steps (in
    ``output_dir/direct``); both resumable. ``score(model) -> {metric: value}`` on held-out data. Writes
    ``chain_report.json`` and ``chain_report.md`` in ``output_dir`` and returns the report."""
    chained, direct = new_student(), new_student()
    total = args.max_steps * (len(assistants) + 1)
    distill_chain(teacher, [*assistants, chained], dataclasses.replace(args, output_dir=os.path.join(
        args.output_dir, "chain")), **trainer_kwargs)
    distill_chain(teacher, [direct], dataclasses.replace(args, output_dir=os.path.join(args.output_dir, "direct"),
                                                         max_steps=total), **trainer_kwargs)
    rows = [("teacher", teacher, 0)] + [(f"assistant {i + 1}", a, args.max_steps) for i, a in enumerate(assistants)]
    rows += [("student, chained", chained, total), ("student, direct", direct, total)]
    report = {"steps_per_stage": args.max_steps, "total_steps": total,
              "models": [{"model": name, "parameters": num_parameters(m), "steps": steps, **score(m)}
                         for name, m, steps in rows]}
    metrics = [k for k in report["models"][0] if k not in ("model", "parameters", "steps")]
    lines = [f"# Teacher-assistant chain vs direct distillation ({total} student-side steps each)", "",
             "| model | parameters | steps | " + " | ".join(metrics) + " |", "|---" * (3 + len(metrics)) + "|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['steps']} | "
              + " | ".join(f"{r[k]:.4f}" for k in metrics) + " |" for r in report["models"]]
    lines += ["", "Steps: the chained student's column counts its assistants' stages too (equal total steps)."]
    if args.should_save:
        with open(os.path.join(args.output_dir, "chain_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.output_dir, "chain_report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return report


def born_again(teacher: nn.Module, new_model, generations: int, args: DistillationConfig, **trainer_kwargs) -> list:
    """Born-again networks (Furlanello et al. 2018): generation k+1, a fresh model of the same architecture
    (``new_model()``), learns from generation k, for ``generations`` generations starting from ``teacher``; a
    :func:`distill_chain` whose students are all ``new_model()``. Returns (students, trainers)."""
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    students = [new_model() for _ in range(generations)]
    shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in [teacher, *students]}
    if len(shapes) != 1:
        raise ValueError("born-again generations share the teacher's architecture: new_model() must build a model "
                         "shaped like the teacher")
    return students, distill_chain(teacher, students, args, **trainer_kwargs)


def born_again_from_labels(teacher: nn.Module, new_model, generations: int, args: DistillationConfig,
                           **trainer_kwargs) -> list:
    """Born-again networks with no outside teacher: generation 0 (``new_model()``) trained on its labels alone
    (:func:`hf_kd.modes.experiment.baseline_args`: every teacher term 0; ``teacher`` is passed but not read) in
    ``output_dir/generation_0``, then :func:`born_again` from it. Resumable like any chain. Returns
    [generation 0, generation 1, ...]."""
    first = new_model()
    plain = dataclasses.replace(baseline_args(args, os.path.join(args.output_dir, "generation_0")),
                                save_strategy=args.save_strategy)
    distill_chain(teacher, [first], plain, **trainer_kwargs)
    students, _ = born_again(first, new_model, generations, args, **trainer_kwargs)
    return [first, *students]
