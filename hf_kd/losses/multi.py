"""Several teachers as one target: mixtures of their softened output distributions (pure functions of tensors).

With K teachers, per-teacher temperatures T_k and weights w_k (fixed [K], or per position [..., K]), the target
distribution is p = sum_k w_k softmax(z_k / T_k). :func:`mixture_logits` returns it as logits at the student's
temperature T, T * log p, so every logit loss (and every fast path) that takes teacher logits at T takes the
mixture unchanged: softmax((T log p) / T) = p. Weights from the teachers themselves (Du et al. 2020 and others
weight teachers per example by their confidence): :func:`confidence_weights`.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def mixture_logits(teacher_logits: list[Tensor], weights: Tensor, temperature: float,
                   temperatures: list[float] | None = None, vocab_limit: int | None = None) -> Tensor:
    """T * log sum_k w_k softmax(z_k / T_k) over the first ``vocab_limit`` entries; ``weights`` [K] or [..., K]
    (non-negative, summing to 1 over K; they may require grad: the mixture is differentiable in them)."""
    temperatures = temperatures or [temperature] * len(teacher_logits)
    if len(temperatures) != len(teacher_logits):
        raise ValueError(f"{len(teacher_logits)} teachers but {len(temperatures)} temperatures")
    width = vocab_limit or min(z.shape[-1] for z in teacher_logits)
    log_p = torch.stack([torch.log_softmax(z[..., :width].float() / t, dim=-1)
                         for z, t in zip(teacher_logits, temperatures)], dim=-2)  # [..., K, V]
    log_w = torch.log(weights.float().clamp_min(1e-30))
    log_w = log_w.reshape((1,) * (log_p.dim() - 2) + (-1,)) if log_w.dim() == 1 else log_w
    return temperature * torch.logsumexp(log_p + log_w.unsqueeze(-1), dim=-2)


def confidence_weights(teacher_logits: list[Tensor], labels: Tensor | None, kind: str = "true_label") -> Tensor:
    """Per-position teacher weights [..., K] (summing to 1): ``true_label`` = each teacher's probability of the
    true label (positions without one, label -100, fall back to ``entropy``); ``entropy`` = softmax over teachers
    of minus their entropy (a sharper teacher counts more)."""
    log_p = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in teacher_logits], dim=-2)  # [..., K, V]
    entropy = -(log_p.exp() * log_p).sum(-1)
    by_entropy = torch.softmax(-entropy, dim=-1)
    if kind == "entropy" or labels is None:
        return by_entropy
    if kind != "true_label":
        raise ValueError(f"confidence kind must be 'true_label' or 'entropy', got {kind!r}")
    labelled = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1).unsqueeze(-1).expand(*log_p.shape[:-1], 1)
    p_true = log_p.gather(-1, index).squeeze(-1).exp()
    by_label = p_true / p_true.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(labelled.unsqueeze(-1), by_label, by_entropy)
