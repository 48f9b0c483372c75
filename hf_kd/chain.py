"""Teacher-assistant chains (Mirzadeh et al. 2020): when the teacher is much larger than the student, distil
teacher -> assistant -> student in stages, each stage a full distillation whose student teaches the next.

:func:`assistant_layers` sizes a layer-pruned assistant by the seeds' rule, the geometric mean of the teacher's and
the student's parameter counts; :func:`distill_chain` runs the stages, each in its own folder, resumable stage by
stage (a finished stage is loaded, not retrained) and, within a stage, from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from .config import DistillationConfig
from .student import find_layers
from .tasks import base_model_of
from .trainer import DistillationTrainer

DONE = "hf_kd_stage.json"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assistant_layers(teacher: nn.Module, student_parameters: int) -> int:
    """The number of teacher layers n whose ``make_student(teacher, num_layers=n)`` has the parameter count closest to
    sqrt(P_teacher * P_student). A layer-pruned model of n layers has P_T - (L - n) * p parameters, p the
    parameters of one block (blocks of one model have one size)."""
    _, blocks = find_layers(base_model_of(teacher))
    total, per_block = _count(teacher), _count(blocks[0])
    target = math.sqrt(total * student_parameters)
    sizes = {n: total - (len(blocks) - n) * per_block for n in range(1, len(blocks) + 1)}
    return min(sizes, key=lambda n: (abs(sizes[n] - target), n))


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
            from .curriculum import read_weights
            base_model_of(student).load_state_dict(read_weights(folder), strict=False)
            trainers.append(None)
        else:
            stage_args = dataclasses.replace(args, output_dir=folder)
            last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=stage_args, **trainer_kwargs)
            trainer.train(resume_from_checkpoint=last)
            trainer.save_model(folder)
            if trainer.is_world_process_zero():
                with open(marker, "w") as f:
                    json.dump({"stage": i, "steps": trainer.state.global_step,
                               "student_parameters": _count(student)}, f)
            trainers.append(trainer)
        teacher = student
    return trainers


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
