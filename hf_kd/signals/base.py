"""The signal abstraction: one distillation term of the loss.

The trainer's loss is ``sum_k w_k(step) * L_k``. A signal is one term: it declares what it needs from the teacher
and the student (:class:`hf_kd.flow.capture.Needs`), computes a *sum* over what it counts from one batch's
:class:`Context` with a pure loss function of tensors, and says which global count divides that sum
(``normalizer``: 'task', 'kd' or 'hidden' positions, 'examples' or micro-'batches'; counted over all
gradient-accumulation micro-batches and processes, so the loss does not depend on how a batch is split). Its
weight is a :class:`hf_kd.flow.schedules.Schedule`. A signal is an ``nn.Module``: its trainable parts (projections,
adapters, discriminators) are trained, clipped, synchronised and checkpointed with the student, and never saved
into the student folder.

A custom signal::

    class LastTokenMSE(Signal):
        normalizer = "examples"
        def needs(self, side):
            return Needs(hidden={-1})  # the last hidden state of both models
        def loss_sum(self, ctx):
            s, t = ctx.student.hidden[-1][:, -1], ctx.teacher.hidden[-1][:, -1]
            return ((s - t) ** 2).mean(-1).sum()

    trainer = DistillationTrainer(..., signals=[LastTokenMSE("last_token", weight=0.5)])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..flow.align import COUNT_KEYS
from ..flow.capture import Captured, Needs
from ..flow.schedules import Schedule

EXTRAS = "hf_kd_signals"  # the student's submodule holding the signals (and their trainable parts); see the trainer


@dataclass
class Context:
    """Everything a signal may read for one micro-batch (read-only by convention)."""

    task: str
    inputs: dict  # the model inputs (no labels)
    labels: torch.Tensor | None
    masks: dict  # hf_kd.flow.align.position_masks
    student: Captured
    teacher: Captured | None  # the default teacher's pass
    step: int = 0
    total_steps: int = 1
    extra: dict = field(default_factory=dict)  # e.g. the teacher cache's columns
    teachers: dict = field(default_factory=dict)  # every teacher's pass, by name (several teachers)
    default_teacher: str = "teacher"

    def teacher_for(self, signal: "Signal") -> Captured | None:
        """The pass of the teacher ``signal`` reads (its ``teacher`` name, else the default teacher)."""
        return self.teachers.get(signal.teacher, self.teacher) if signal.teacher else self.teacher


class Signal(nn.Module):
    """Base class of a distillation term; subclasses set ``normalizer`` and implement needs() and loss_sum()."""

    normalizer: str = "examples"
    logit = False  # True for the terms the logit engine computes (task cross-entropy, logit KD)
    teacher_free = False  # True when the term reads the student alone (the task loss)

    def __init__(self, name: str, weight: float | Schedule = 1.0, teacher: str | None = None):
        super().__init__()
        self.teacher = teacher  # which teacher it reads, by name (None: the default, the first one)
        if self.normalizer not in COUNT_KEYS:
            raise ValueError(f"{type(self).__name__}.normalizer {self.normalizer!r} must be one of {COUNT_KEYS}")
        self.name = name
        self.weight = weight if isinstance(weight, Schedule) else Schedule.constant(weight)
        if self.weight.peak < 0:
            raise ValueError(f"signal {name!r}: weights must be >= 0, got peak {self.weight.peak}")

    def needs(self, side: str) -> Needs:
        """What this signal reads from ``side`` ('teacher' or 'student')."""
        return Needs()

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        """The term summed over what it counts in this micro-batch (divided by the global count afterwards)."""
        raise NotImplementedError

    def check(self, teacher: nn.Module | None, student: nn.Module) -> None:
        """Fail at construction with a message that says what to change (called once by the trainer with the
        teacher this signal reads); build trainable parts here."""

    def teacher_names(self, default: str) -> list[str]:
        """The teachers whose passes this signal reads."""
        return [self.teacher or default]

    def optimizer_groups(self) -> list:
        """Parameters of this signal that train with settings of their own (hf_kd.signals.groups.OwnGroup)."""
        return []

    def log_values(self) -> dict:
        """Extra values to log with the training logs (e.g. learned teacher weights)."""
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}, normalizer={self.normalizer!r}"


def leaves_parameters_unused(signals) -> bool:
    """Whether some training step may leave student parameters without a gradient, so DDP needs
    ``find_unused_parameters=True``: a step at which no logit term (task loss or logit KD, which run the student's
    whole forward through its head) has a weight > 0, e.g. FitNets' hint-only first stage, progressive stages, or
    hidden-state-only runs (the head, a pooler). Every step of the weight schedules is checked on a grid of 101
    points of training. The signals' own parameters are never DDP's concern (the trainer averages them itself)."""
    return not all(any(s.logit and s.weight.value(i, 101) > 0 for s in signals) for i in range(101))
