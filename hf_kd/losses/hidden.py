"""Losses between hidden states (after any projection of the student's): pure functions of tensors.

Inputs are [..., D] with an optional boolean mask over the leading shape; ``reduction`` as in
:mod:`hf_kd.losses.logits`. Computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logits import reduce

Tensor = torch.Tensor


def hidden_cosine(student_hidden: Tensor, teacher_hidden: Tensor, *, mask: Tensor | None = None,
                  reduction: str = "mean") -> Tensor:
    """DistilBERT's cosine embedding loss (Sanh et al. 2019): 1 - cos(h_S, h_T) per position."""
    per_pos = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)
    return reduce(per_pos, mask, reduction)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, *, mask: Tensor | None = None,
               reduction: str = "mean") -> Tensor:
    """FitNets hint loss (Romero et al. 2015): mean over features of (h_S - h_T)^2 per position."""
    per_pos = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return reduce(per_pos, mask, reduction)
