"""Losses on gradients: the student matches the teacher's input gradients, directly or adversarially.

Pure functions of tensors; ``reduction`` as in :mod:`hf_kd.losses.logits` ("sum", "mean", "none"). Computed in
float32 (float64 inputs stay float64). The gradients themselves are the caller's (e.g. torch.autograd.grad of the
output with create_graph=True for the student, so that the loss trains it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logits import reduce

Tensor = torch.Tensor


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _per_example(x: Tensor) -> Tensor:
    """[B, ...] -> [B]: the sum over every non-batch dimension (a [B] tensor is returned as is)."""
    return x.reshape(x.shape[0], -1).sum(1)


def input_gradient_matching(student_grad: Tensor, teacher_grad: Tensor, *, mask: Tensor | None = None,
                            reduction: str = "sum") -> Tensor:
    """Sobolev training (Czarnecki et al., NeurIPS 2017): ||g_T - g_S||^2 of the gradients w.r.t. the input.

    Without ``mask``, or with a [B] mask: one value per example, the sum over all non-batch dimensions.
    Per-token variant: for gradients w.r.t. token embeddings [B, T, D] and a [B, T] ``mask``, one value per
    position (the squared norm over D), masked positions left out; "sum" then equals the per-example form's sum
    over the kept positions, while "mean" divides by the number of kept positions instead of examples.
    """
    if student_grad.shape != teacher_grad.shape:
        raise ValueError(f"input_gradient_matching: student {tuple(student_grad.shape)} and teacher "
                         f"{tuple(teacher_grad.shape)} gradients must have the same shape")
    sq = (_wide(student_grad) - _wide(teacher_grad)).pow(2)
    if mask is not None and mask.dim() == 2 and sq.dim() == 3:
        if tuple(mask.shape) != tuple(sq.shape[:2]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match the token positions {tuple(sq.shape[:2])}")
        return reduce(sq.sum(-1), mask, reduction)
    return reduce(_per_example(sq), mask, reduction)


def great_discriminator_loss(d_on_teacher: Tensor, d_on_student: Tensor, reduction: str = "sum") -> Tensor:
    """GREAT (Sinha et al. 2018, gradient adversarial training): the discriminator's binary cross-entropy.

    Inputs are the discriminator's logits [B] (or [B, ...], summed per example) on teacher gradients, labelled
    real (1), and on student gradients, labelled fake (0): per example
    -log sigmoid(d_T) - log(1 - sigmoid(d_S)) = softplus(-d_T) + softplus(d_S).
    """
    if d_on_teacher.shape[0] != d_on_student.shape[0]:
        raise ValueError(f"great_discriminator_loss: {d_on_teacher.shape[0]} teacher and {d_on_student.shape[0]} "
                         "student examples")
    per_example = _per_example(F.softplus(-_wide(d_on_teacher))) + _per_example(F.softplus(_wide(d_on_student)))
    return reduce(per_example, None, reduction)


def great_generator_loss(d_on_student: Tensor, reduction: str = "sum") -> Tensor:
    """GREAT's loss for the student (the generator): -log sigmoid(d_S) = softplus(-d_S) per example, low when
    the discriminator takes the student's gradients for the teacher's. Stable for logits of any size."""
    return reduce(_per_example(F.softplus(-_wide(d_on_student))), None, reduction)
