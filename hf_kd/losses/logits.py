"""Losses between student and teacher logits: pure functions of tensors.

Every function takes logits of shape [..., V] (any leading shape: tokens, or batch x sequence, or batch
for classification), an optional boolean ``mask`` of the leading shape (True = counted), and a
``reduction``: "mean" (over counted positions), "sum" (the trainer divides by a global count) or "none"
(per position, zero where masked). Probabilities are computed in float32 whatever the input dtype.

hf_kd keeps Hinton's T^2 factor on every temperature-scaled loss: the gradient of a softened loss shrinks
like 1/T^2, so T^2 keeps the loss's gradient scale comparable across temperatures and with the task loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_v p * (log p - log q), with 0 * log 0 = 0 (so -inf entries of p contribute nothing)."""
    p = log_p.exp()
    diff = log_p - log_q
    return (p * torch.where(p > 0, diff, torch.zeros_like(diff))).sum(-1)


def reduce(per_position: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Apply ``mask`` and ``reduction`` to a per-position loss of the leading shape."""
    if mask is not None:
        mask = mask.to(per_position.device, torch.bool)
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
        count = mask.sum()
    else:
        count = per_position.numel()
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(int(count), 1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Hinton et al. 2015 soft-target loss: T^2 * KL(p_T || p_S), p = softmax(logits / T).

    Mean (or sum) over unmasked positions. Mode-covering: the student is pushed to put mass wherever the
    teacher does.
    """
    per_pos = _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))
    return reduce(per_pos * temperature**2, mask, reduction)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """T^2 * KL(p_S || p_T): mode-seeking (MiniLLM, Gu et al. 2023, uses this direction)."""
    per_pos = _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))
    return reduce(per_pos * temperature**2, mask, reduction)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
                    temperature: float = 1.0, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), times T^2.

    JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M), with M = beta * p_T + (1 - beta) * p_S.
    By convention beta = 0 is the forward KL(p_T || p_S) and beta = 1 the reverse KL(p_S || p_T) (the
    mixture formula itself tends to 0 at both ends, so the ends are defined separately, as TRL does).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    mix = beta * log_t.exp() + (1.0 - beta) * log_s.exp()
    log_m = mix.clamp_min(torch.finfo(mix.dtype).tiny).log()  # where mix = 0 both p are 0: the term is dropped
    per_pos = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return reduce(per_pos * temperature**2, mask, reduction)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
              mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Logit matching (Bucilua et al. 2006; Ba & Caruana 2014): mean over classes of (z_S - z_T)^2.

    Raw logits, no softmax; ``temperature`` is accepted for a uniform signature and ignored. Also the
    output-matching loss for regression heads (one "class").
    """
    diff = student_logits.float() - teacher_logits.float()
    diff = torch.where(student_logits == teacher_logits, torch.zeros_like(diff), diff)  # -inf - -inf is not NaN
    per_pos = diff.pow(2).mean(-1)
    return reduce(per_pos, mask, reduction)
