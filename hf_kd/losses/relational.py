"""Relational losses: what the student should preserve is how examples relate, not their features.

Similarity-preserving KD (Tung & Mori, ICCV 2019): for a batch of b examples with features F [b, D] (any D, so
teacher and student widths may differ and no projection is needed), G = F F^T, each row L2-normalised; the loss
is ||G_S - G_T||_F^2 / b^2. It depends on which examples share a batch, so unlike the token losses it is not
invariant to how a global batch is split (each micro-batch contributes its own b x b matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def pooled(states: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-example features [b, D] from hidden states [b, T, D]: the mean over positions with ``mask`` [b, T] True
    (all if None; an example with none counted gets zeros). [b, D] passes through."""
    if states.dim() == 2:
        return states.float()
    if states.dim() != 3:
        raise ValueError(f"expected hidden states [batch, tokens, width] or [batch, width], got {tuple(states.shape)}")
    if mask is None or mask.dim() != 2:
        return states.float().mean(1)
    weights = mask.to(states.device, torch.float32).unsqueeze(-1)
    return (states.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def similarity_preserving(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """||norm(F_S F_S^T) - norm(F_T F_T^T)||_F^2 / b^2 for features [b, ...] (flattened per example)."""
    b = student_features.shape[0]
    if teacher_features.shape[0] != b:
        raise ValueError(f"student has {b} examples, teacher {teacher_features.shape[0]}: the batches must match")
    fs, ft = student_features.reshape(b, -1).float(), teacher_features.reshape(b, -1).float()
    gs, gt = F.normalize(fs @ fs.t(), dim=1), F.normalize(ft @ ft.t(), dim=1)
    return (gs - gt).pow(2).sum() / (b * b)
