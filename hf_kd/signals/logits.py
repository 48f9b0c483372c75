"""The logit signals: the student's own task loss and logit distillation (Hinton et al. 2015), from one teacher or a
mixture of several. Both are computed by the logit engine (:mod:`hf_kd.engine`) in one pass over the logits (full,
chunked or fused), not by ``loss_sum``."""

from __future__ import annotations

import torch
from torch import nn

from ..flow.align import padded_to_length, targets
from ..flow.capture import Needs
from ..losses import LOGIT_LOSSES
from ..losses.multi import confidence_weights, mixture_logits
from ..flow.schedules import Schedule
from .base import Context, Signal

MIXINGS = ("fixed", "learned", "confidence", "entropy")


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
    Hinton et al. 2015), or reverse KL, generalised JSD (``beta``), the skew KLs (``skew_alpha``), total variation,
    the teacher-entropy mix of forward and reverse KL (:data:`hf_kd.losses.LOGIT_LOSSES`), or MSE of the logits (no
    temperature; with a regression head this is output matching, ||y_T - y_S||^2). Summed over the positions of the
    'kd' mask (every non-padding position or example by default: unlabelled examples count), normalised by their
    count.

    Several ``teachers`` (names): the target is the mixture sum_k w_k softmax(z_k / T_k) (``teacher_temperatures``
    T_k, default T), with ``mixing``: 'fixed' (``teacher_weights``, default uniform), 'learned' (w = softmax of
    trainable logits, updated by the optimizer through the KD loss, logged every step; needs kd_impl='full', as
    the fast paths treat the target as a constant), 'confidence' (per example, each teacher's probability of the
    true label; unlabelled positions use 'entropy') or 'entropy' (per example, softmax of minus the teachers'
    entropies).
    """

    normalizer = "kd"
    logit = True

    def __init__(self, name="kd", weight=1.0, *, kind="forward_kl", beta=0.5, temperature: float | Schedule = 2.0,
                 teachers: list[str] | None = None, mixing: str = "fixed", teacher_weights=None,
                 teacher_temperatures=None, skew_alpha: float = 0.1):
        super().__init__(name, weight)
        if kind not in LOGIT_LOSSES:
            raise ValueError(f"kd_loss {kind!r} unknown; choose one of {sorted(LOGIT_LOSSES)}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {beta}")
        if not 0.0 <= skew_alpha < 1.0:
            raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")
        self.kind, self.beta, self.skew_alpha = kind, float(beta), float(skew_alpha)
        self.temperature = temperature if isinstance(temperature, Schedule) else Schedule.constant(temperature)
        if not self.temperature.start > 0 or (self.temperature.end is not None and not self.temperature.end > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self._mixture(teachers, mixing, teacher_weights, teacher_temperatures)

    def _mixture(self, teachers, mixing, weights, temperatures) -> None:
        self.teachers = list(teachers) if teachers else None
        k = len(self.teachers or [None])
        if mixing not in MIXINGS:
            raise ValueError(f"teacher mixing {mixing!r} unknown; choose one of {list(MIXINGS)}")
        if weights is not None and (len(weights) != k or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"teacher_weights {weights}: give {k} non-negative weights, not all 0")
        if temperatures is not None and (len(temperatures) != k or any(t <= 0 for t in temperatures)):
            raise ValueError(f"teacher_temperatures {temperatures}: give {k} temperatures > 0")
        self.mixing, self.teacher_temperatures = mixing, temperatures
        fixed = torch.tensor(weights or [1.0] * k, dtype=torch.float32)
        self.register_buffer("fixed_weights", fixed / fixed.sum(), persistent=False)
        self.mix_logits = nn.Parameter(torch.zeros(k)) if mixing == "learned" else None

    def teacher_names(self, default: str) -> list[str]:
        return self.teachers or [self.teacher or default]

    def needs(self, side: str) -> Needs:
        return Needs(logits=True)

    def target_logits(self, ctx: Context, vocab_limit: int | None = None) -> torch.Tensor:
        """The teacher logits to match at this step's temperature: one teacher's, or the mixture's T log p."""
        names = self.teacher_names(ctx.default_teacher)
        logits = [ctx.teachers[n].logits for n in names]
        if len(logits) == 1:
            return logits[0]
        temperature = self.temperature.value(ctx.step, ctx.total_steps)
        return mixture_logits(logits, self.mixture_weights(ctx, logits), temperature, self.teacher_temperatures,
                              vocab_limit)

    def mixture_weights(self, ctx: Context, logits: list) -> torch.Tensor:
        if self.mixing == "learned":
            return torch.softmax(self.mix_logits, dim=0)
        if self.mixing == "fixed":
            return self.fixed_weights
        labels = ctx.labels
        if labels is not None and ctx.task == "causal_lm":  # position i is scored against token i+1
            labels = padded_to_length(targets(labels, ctx.task), -100)
        if labels is not None and labels.dim() > 1 and labels.shape != logits[0].shape[:-1]:
            labels = None  # multi-label targets: weigh by entropy
        return confidence_weights(logits, labels, "true_label" if self.mixing == "confidence" else "entropy")

    def log_values(self) -> dict:
        if self.mix_logits is None:
            return {}
        weights = torch.softmax(self.mix_logits.detach(), dim=0).tolist()
        return {f"{self.name}_weight_{n}": round(w, 6) for n, w in zip(self.teachers, weights)}
