"""Losses between student and teacher logits: pure functions of tensors.

Every function takes logits of shape [..., V] (any leading shape: tokens, or batch x sequence, or batch
for classification), an optional boolean ``mask`` of the leading shape (True = counted), and a
``reduction``: "mean" (over counted positions), "sum" (the trainer divides by a global count) or "none"
(per position, zero where masked). Probabilities are computed in float32 whatever the input dtype.

hf_kd keeps Hinton's T^2 factor on every temperature-scaled loss: the gradient of a softened loss shrinks
like 1/T^2, so T^2 keeps the loss's gradient scale comparable across temperatures and with the task loss.
"""

from __future__ import annotations

import math

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


# ---- divergences for LLM distillation (issue #11) -----------------------------------------------------------------
# The skew KLs and the entropy mix are KL-type: times T^2 like the losses above. Total variation is a bounded distance,
# not a KL; it is also multiplied by T^2, so that one rule holds for every temperature-scaled loss of the library (and
# switching kd_loss never changes the factor). Its gradient shrinks more slowly than a KL's as T grows (measured on
# random [64, 1000] logits: without the factor ~1/T against ~1/T^2), so with T^2 it grows roughly linearly in T past
# T ~ 2 where the KLs' stay flat; at T = 1 (DistiLLM's setting) the factor is 1 and the question does not arise.

def check_skew_alpha(skew_alpha: float) -> None:
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1) (0 = the plain KL; at 1 the skew KLs are 0 for every "
                         f"student), got {skew_alpha}")


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b); entries where both are 0 get log(tiny) (their terms count 0 and get no gradient)."""
    mix = weight_a * log_a.exp() + (1.0 - weight_a) * log_b.exp()
    return mix.clamp_min(torch.finfo(mix.dtype).tiny).log()


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew_alpha: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024), times T^2: KL(p_T || a p_T + (1 - a) p_S), a = ``skew_alpha``.

    DistiLLM defines the alpha-skew KL as the KL from the teacher to a mixture that keeps a fraction a of the teacher,
    so the ratio p_T / mixture stays below 1 / a where the student puts almost no mass (a bounded, steadier gradient);
    its default is a = 0.1. a = 0 is the plain forward KL. (DistiLLM's released code drops the teacher's own entropy
    from this loss, a constant for the student: same gradient; here the value is the KL itself, 0 when p_S = p_T.)
    """
    check_skew_alpha(skew_alpha)
    if skew_alpha == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    per_pos = _kl(log_t, _log_mixture(log_t, log_s, skew_alpha))
    return reduce(per_pos * temperature**2, mask, reduction)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew_alpha: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024), times T^2: KL(p_S || (1 - a) p_T + a p_S), a = ``skew_alpha``.

    The mirror of :func:`skew_forward_kl`: DistiLLM's alpha-skew reverse KL mixes a fraction a of the *student* into
    the teacher, so the ratio p_S / mixture stays below 1 / a where the teacher has almost no mass. a = 0 is the plain
    reverse KL; DistiLLM's default is a = 0.1.
    """
    check_skew_alpha(skew_alpha)
    if skew_alpha == 0.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    per_pos = _kl(log_s, _log_mixture(log_s, log_t, skew_alpha))
    return reduce(per_pos * temperature**2, mask, reduction)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                    mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Total variation distance, times T^2: 0.5 * sum_v |p_T - p_S| (in [0, 1] before the factor).

    Symmetric and bounded (one of the divergences DistiLLM, Ko et al. 2024, compares; Wen et al. 2023's f-divergence
    distillation uses it too). Its gradient is a sign, so it does not vanish as the student nears the teacher; where
    p_S = p_T exactly the (sub)gradient taken is 0. On T^2 for a distance that is not a KL see the note above.
    """
    p_s, p_t = _log_probs(student_logits, temperature).exp(), _log_probs(teacher_logits, temperature).exp()
    per_pos = 0.5 * (p_s - p_t).abs().sum(-1)
    return reduce(per_pos * temperature**2, mask, reduction)


def teacher_entropy_weight(log_p: Tensor) -> Tensor:
    """h = H(p) / log V per position, in [0, 1] (V = the last dimension; 1 for V = 1), 0 log 0 = 0."""
    vocab = log_p.shape[-1]
    if vocab < 2:
        return log_p.new_ones(log_p.shape[:-1])
    entropy = -_kl(log_p, torch.zeros_like(log_p))  # sum p (log p - 0) = -H(p)
    return (entropy / math.log(vocab)).clamp(0.0, 1.0)


def entropy_weighted_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                        mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Per position T^2 [h KL(p_T || p_S) + (1 - h) KL(p_S || p_T)], h = H(p_T) / log V the teacher's normalised
    entropy at temperature T (V: the number of vocabulary entries compared; h is a constant, no gradient flows into it).

    Forward KL (mode-covering) where the teacher is uncertain (high entropy, several plausible tokens: the student
    should cover them), reverse KL (mode-seeking) where it is confident (low entropy: concentrate on its mode). hf_kd's
    own mix, not a published method: AKL (Wu et al., COLING 2025) also mixes forward and reverse KL per position, but
    weighs them by the teacher-student gap on the head and the tail of the distribution (student dependent); EA-KD
    (Su et al.) uses teacher and student entropies to reweight samples, not to choose a KL direction.
    """
    log_s, log_t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    h = teacher_entropy_weight(log_t)
    per_pos = h * _kl(log_t, log_s) + (1.0 - h) * _kl(log_s, log_t)
    return reduce(per_pos * temperature**2, mask, reduction)


SKEW_KINDS = ("skew_forward_kl", "skew_reverse_kl")


def loss_kwargs(kind: str, *, beta: float = 0.5, skew_alpha: float = 0.1) -> dict:
    """The extra keyword arguments the reference function of ``kind`` takes: beta (jsd), skew_alpha (skew KLs)."""
    if kind == "jsd":
        return {"beta": beta}
    return {"skew_alpha": skew_alpha} if kind in SKEW_KINDS else {}
