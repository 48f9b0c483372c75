"""The logit signals: the student's own task loss and logit distillation (Hinton et al. 2015). Both are computed
by the logit engine (:mod:`hf_kd.engine`) in one pass over the logits (full, chunked or fused), not by
``loss_sum``."""

from __future__ import annotations

from ..capture import Needs
from ..losses import LOGIT_LOSSES
from ..schedules import Schedule
from .base import Signal


class TaskLoss(Signal):
    """The student's own loss on the labels: cross-entropy (LMs, classifiers), MSE (regression head, num_labels=1)
    or binary cross-entropy (multi-label); summed over labelled positions, normalised by their global count."""

    normalizer = "task"
    logit = True
    teacher_free = True

    def __init__(self, name="task", weight=1.0):
        super().__init__(name, weight)

    def needs(self, side: str) -> Needs:
        return Needs(logits=side == "student")


class LogitKD(Signal):
    """Temperature-scaled logit distillation: T^2 * KL(softmax(z_T/T) || softmax(z_S/T)) per position ('forward_kl',
    Hinton et al. 2015), or reverse KL, generalised JSD (``beta``), or MSE of the logits (no temperature; with a
    regression head this is output matching, ||y_T - y_S||^2). Summed over the positions of the 'kd' mask
    (every non-padding position or example by default: unlabelled examples count), normalised by their count."""

    normalizer = "kd"
    logit = True

    def __init__(self, name="kd", weight=1.0, *, kind="forward_kl", beta=0.5, temperature: float | Schedule = 2.0):
        super().__init__(name, weight)
        if kind not in LOGIT_LOSSES:
            raise ValueError(f"kd_loss {kind!r} unknown; choose one of {sorted(LOGIT_LOSSES)}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {beta}")
        self.kind, self.beta = kind, float(beta)
        self.temperature = temperature if isinstance(temperature, Schedule) else Schedule.constant(temperature)
        if not self.temperature.start > 0 or (self.temperature.end is not None and not self.temperature.end > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def needs(self, side: str) -> Needs:
        return Needs(logits=True)
