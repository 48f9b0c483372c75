"""Distillation and the student's own cross-entropy from logits in one chunked pass (the trainer's default).

The trainer's loss on a language model reads the student logits twice: once for the task cross-entropy
(at T = 1) and once for the distillation loss (at T). Done separately, each builds float32 [N, V]
tensors and autograd adds two [N, V] gradients at the end. Here one ``torch.autograd.Function`` walks the
positions ``chunk_size`` rows at a time (default: chunks of 8 MiB, see ``resolve_chunk_size``) and, per chunk, computes both sums and the single gradient

    G = kd_coef * dKD/dz_S + ce_coef * dCE/dz_S          (dCE/dz_S = softmax(z_S) - onehot(y))

straight into one buffer in the logits' dtype. The coefficients (the caller's loss weights over their counts)
are known before the forward pass, so the function returns the weighted loss itself, kd_coef * KD + ce_coef * CE,
whose backward scales that buffer by the incoming gradient, plus the two sums detached for logging: there is no
later combination to get wrong. This is the one chunk loop over logits: the public ``chunked_logit_loss`` (KD alone,
any leading shape) runs through it too. The fused path (:mod:`hf_kd.losses.fused`) shares the per-chunk math.

The teacher is either dense logits [N, V_T] (any ``kind`` of :mod:`hf_kd.losses.chunked`) or an offline
top-k cache (ids [N, k], log-probabilities [N, k] at T, log tail mass [N]; forward KL with the tail as one
bucket, :mod:`hf_kd.teachers.cache`). For the cache, with q = softmax(z_S / T), K the cached ids, p their
teacher probabilities, r the teacher's tail mass and q_rest = 1 - sum_K q:

    dKD/dz_S = T (q - p~),   p~_v = p_v for v in K,   p~_v = q_v r / q_rest otherwise

(with sum_K p + r = 1; the code uses the cached values' actual sum s, which rounding moves off 1)

(the teacher's tail mass spread in proportion to the student's own tail), so no full-vocabulary teacher
distribution is ever needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .chunked import _log_softmax, check_kind, kd_rows, resolve_chunk_size
from . import logits as reference

Tensor = torch.Tensor


@dataclass(frozen=True)
class Options:
    kind: str
    beta: float
    temperature: float
    chunk_size: int
    vocab_limit: int | None
    kd_coef: float
    ce_coef: float
    skew_alpha: float = 0.1


def ce_rows(z: Tensor, labels: Tensor, need_grad: bool):
    """Cross-entropy per row, logsumexp(z) - z[y], and its gradient softmax(z) - onehot(y) (overwrites z).

    z is shifted by its row max first, so softmax(z) = exp(z - lse) is accurate to the rounding of the result.
    """
    z.sub_(z.amax(dim=-1, keepdim=True))
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    if not need_grad:
        return loss, None
    grad = z.sub_(lse.unsqueeze(1)).exp_()
    grad[torch.arange(len(labels), device=z.device), labels] -= 1.0
    return loss, grad


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable. Masses below float32's resolution (x > -1e-7) floor at 1e-7 so that
    neither branch of the where has an infinite gradient (which would turn into NaN)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_rows(zs: Tensor, ids: Tensor, log_p_k: Tensor, log_r: Tensor, temperature: float, need_grad: bool):
    """T^2 KL_k(p_T || q) per row against a cached top-k teacher, and dL/dz_S (module doc); overwrites zs."""
    log_q = _log_softmax(zs, temperature)
    log_q_k = log_q.gather(1, ids)
    log_q_rest = log1mexp(torch.logsumexp(log_q_k, dim=-1))
    p_k, r = log_p_k.exp(), log_r.exp()
    loss = ((p_k * (log_p_k - log_q_k)).sum(-1) + r * (log_r - log_q_rest)) * temperature ** 2
    if not need_grad:
        return loss, None
    # s = sum_K p + r is 1 up to the cache's rounding; using it keeps G the exact gradient of the loss above
    s = (p_k.sum(-1) + r).unsqueeze(1)
    q = torch.exp(log_q, out=zs)
    q_k = q.gather(1, ids)
    q.mul_(s - (log_r - log_q_rest).exp().unsqueeze(1))  # outside K: q (s - r / q_rest)
    q.scatter_(1, ids, q_k * s - p_k)  # inside K: s q - p
    return loss, q.mul_(temperature)


def chunk_kd_ce(zs: Tensor, teacher, labels: Tensor | None, kd_counted: Tensor | None, o: Options,
                coefs: tuple[float, float], need: bool):
    """KD and CE sums of one chunk and G = coefs[0] dKD/dz_S + coefs[1] dCE/dz_S [c, V] (or None).

    ``zs``: a float32 scratch copy of the student's chunk logits (reused: G is left in it when possible).
    ``teacher``: float32 teacher logits [c, >= width] (also scratch), a top-k triple (ids, log p, log tail),
    or None (no KD). ``labels``: [c] with -100 for uncounted rows, or None (no CE).
    """
    vocab = zs.shape[1]
    width = o.vocab_limit or vocab
    kd_sum = ce_sum = zs.new_zeros((), dtype=torch.float64)
    grad = None
    if teacher is not None:  # KD overwrites its input: a copy when CE still needs zs (CE's G then lands in zs)
        student = zs[:, :width].clone() if labels is not None or width != vocab else zs
        if isinstance(teacher, tuple):
            loss, g = topk_rows(student, *teacher, o.temperature, need)
        else:
            loss, g = kd_rows(student, teacher[:, :width], o.kind, beta=o.beta, skew_alpha=o.skew_alpha,
                              temperature=o.temperature, need_grad=need, overwrite=True)
        del student
        kd_sum = torch.where(kd_counted, loss, 0.0).sum(dtype=torch.float64)
        if need:
            g = g.mul_(coefs[0]).masked_fill_(~kd_counted.unsqueeze(1), 0.0)
            grad = g if width == vocab else F.pad(g, (0, vocab - width))
    if labels is not None:
        counted = labels != -100
        loss, g = ce_rows(zs, labels.clamp(min=0), need)
        ce_sum = torch.where(counted, loss, 0.0).sum(dtype=torch.float64)
        if need:
            g = g.mul_(coefs[1]).masked_fill_(~counted.unsqueeze(1), 0.0)
            grad = g if grad is None else g.add_(grad)
    return kd_sum, ce_sum, grad


class _ChunkedKdCe(torch.autograd.Function):
    """forward -> (loss, KD sum, CE sum): loss = kd_coef * KD + ce_coef * CE carries the stored gradient; the two
    sums are detached values for logging."""

    @staticmethod
    def forward(ctx, zs_all, zt_all, ids, log_p, log_r, labels, mask, o: Options):
        n, vocab = zs_all.shape
        need = ctx.needs_input_grad[0]
        in_place = need and zs_all.dtype == torch.float32
        grad = torch.empty_like(zs_all, memory_format=torch.contiguous_format) if need else None
        kd_total = ce_total = torch.zeros((), dtype=torch.float64, device=zs_all.device)
        has_kd = zt_all is not None or ids is not None
        for start in range(0, n, o.chunk_size):
            rows = slice(start, min(start + o.chunk_size, n))
            kd_counted = mask[rows] if has_kd else None
            chunk_labels = labels[rows] if labels is not None else None
            if not ((kd_counted is not None and kd_counted.any())
                    or (chunk_labels is not None and (chunk_labels != -100).any())):
                if need:
                    grad[rows].zero_()
                continue
            zs = grad[rows].copy_(zs_all[rows]) if in_place else zs_all[rows].to(torch.float32, copy=True)
            teacher = None
            if zt_all is not None:
                teacher = zt_all[rows].to(torch.float32, copy=True)
            elif ids is not None:
                teacher = (ids[rows].long(), log_p[rows].float(), log_r[rows].float())
            kd, ce, g = chunk_kd_ce(zs, teacher, chunk_labels, kd_counted, o, (o.kd_coef, o.ce_coef), need)
            kd_total, ce_total = kd_total + kd, ce_total + ce
            if need and g.data_ptr() != grad[rows].data_ptr():
                grad[rows].copy_(g)
            del zs, teacher, g
        ctx.grad = grad
        kd_total, ce_total = kd_total.float(), ce_total.float()
        loss = o.kd_coef * kd_total + o.ce_coef * ce_total
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("chunked KD+CE loss: backward called twice (the gradient buffer is used once)")
        return (grad.mul_(grad_loss.to(grad.dtype)),) + (None,) * 7


def chunked_kd_ce(student_logits: Tensor, teacher_logits: Tensor | None = None, *,
                  teacher_topk: tuple[Tensor, Tensor, Tensor] | None = None, labels: Tensor | None = None,
                  mask: Tensor | None = None, kind: str = "forward_kl", beta: float = 0.5, skew_alpha: float = 0.1,
                  temperature: float = 1.0, chunk_size: int | None = None, vocab_limit: int | None = None,
                  kd_coef: float = 1.0, ce_coef: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, KD sum, CE sum) over student logits [N, V], ``chunk_size`` rows at a time, with one stored gradient:
    ``loss = kd_coef * KD + ce_coef * CE`` is differentiable, the two sums are detached (for logging).

    KD (``teacher_logits`` [N, >= vocab_limit] or ``teacher_topk`` = (ids, log-probs, log tail mass) from a
    cache): the ``kind`` loss (``beta`` for jsd, ``skew_alpha`` for the skew KLs) at ``temperature`` (times T^2)
    summed over rows with ``mask`` [N] True (all if None), over the first ``vocab_limit`` entries, as the reference
    functions with reduction="sum"; the cache supports forward KL only. CE (``labels`` [N], -100 = ignored):
    cross_entropy(z_S, y) summed, no temperature. A missing part is returned as 0.
    """
    check_kind(kind, beta, skew_alpha)
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("give teacher_logits or teacher_topk, not both")
    if teacher_topk is not None and kind != "forward_kl":
        raise ValueError(f"a top-k teacher cache supports kind='forward_kl' only, not {kind!r}")
    n, vocab = student_logits.shape if student_logits.dim() == 2 else (None, None)
    width = vocab_limit or vocab
    if n is None or width > vocab or (teacher_logits is not None and (
            teacher_logits.dim() != 2 or teacher_logits.shape[0] != n or teacher_logits.shape[1] < width)):
        raise ValueError(f"student logits {tuple(student_logits.shape)} / teacher logits "
                         f"{None if teacher_logits is None else tuple(teacher_logits.shape)}: expected [N, V] and "
                         f"[N, >= {width}] (vocab_limit={vocab_limit})")
    for name, x in (("labels", labels), ("mask", mask)):
        if x is not None and x.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [{n}]")
    ids, log_p, log_r = (x.detach() for x in teacher_topk) if teacher_topk is not None else (None, None, None)
    zt = teacher_logits.detach() if teacher_logits is not None else None
    mask = torch.ones(n, dtype=torch.bool, device=student_logits.device) if mask is None else \
        mask.to(student_logits.device, torch.bool)
    labels = None if labels is None else labels.to(student_logits.device)
    chunk_size = resolve_chunk_size(chunk_size, vocab)
    o = Options(kind, float(beta), float(temperature), chunk_size, vocab_limit, float(kd_coef), float(ce_coef),
                float(skew_alpha))
    return _ChunkedKdCe.apply(student_logits, zt, ids, log_p, log_r, labels, mask, o)


def chunked_logit_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl", *,
                       beta: float = 0.5, skew_alpha: float = 0.1, temperature: float = 1.0,
                       mask: Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None,
                       vocab_limit: int | None = None) -> Tensor:
    """Logit loss ``kind`` (one of :data:`hf_kd.losses.chunked.KINDS`) over logits [..., V], computed by the chunk
    loop of :func:`chunked_kd_ce` (no task term). ``mask`` (leading shape, True = counted) and ``reduction`` as in the
    reference functions; ``vocab_limit`` compares only the first ``vocab_limit`` entries (the student's others get
    zero gradient). A strided view (e.g. logits[:, :-1]) is copied into rows first. ``reduction="none"`` (one value
    per position) is computed by the reference function: per-position outputs keep [N, V] temporaries anyway.
    """
    check_kind(kind, beta, skew_alpha)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    width = vocab_limit or vocab
    if teacher_logits.shape[:-1] != lead or teacher_logits.shape[-1] < width or width > vocab:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} do not match (vocab_limit={vocab_limit})")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the logits' leading shape {tuple(lead)}")
    if reduction == "none":
        fn = {"forward_kl": reference.forward_kl, "reverse_kl": reference.reverse_kl, "jsd": reference.generalized_jsd,
              "mse": reference.logit_mse, "skew_forward_kl": reference.skew_forward_kl,
              "skew_reverse_kl": reference.skew_reverse_kl, "tvd": reference.total_variation,
              "entropy_kl": reference.entropy_weighted_kl}[kind]
        extra = reference.loss_kwargs(kind, beta=beta, skew_alpha=skew_alpha)
        return fn(student_logits[..., :width], teacher_logits[..., :width].detach(), temperature=temperature,
                  mask=mask, reduction="none", **extra)
    n = lead.numel()
    flat_mask = None if mask is None else mask.reshape(-1)
    loss, _, _ = chunked_kd_ce(student_logits.reshape(n, vocab), teacher_logits.reshape(n, -1), mask=flat_mask,
                               kind=kind, beta=beta, skew_alpha=skew_alpha, temperature=temperature,
                               chunk_size=chunk_size, vocab_limit=vocab_limit, kd_coef=1.0, ce_coef=0.0)
    if reduction == "mean":
        loss = loss / max(n if mask is None else int(mask.sum()), 1)
    return loss


def _kind_of(kind: str, doc: str):
    def loss(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, skew_alpha: float = 0.1,
             temperature: float = 1.0, mask: Tensor | None = None, reduction: str = "mean",
             chunk_size: int | None = None, vocab_limit: int | None = None) -> Tensor:
        return chunked_logit_loss(student_logits, teacher_logits, kind, beta=beta, skew_alpha=skew_alpha,
                                  temperature=temperature, mask=mask, reduction=reduction, chunk_size=chunk_size,
                                  vocab_limit=vocab_limit)
    loss.__name__, loss.__doc__ = f"chunked_{kind}", doc
    return loss


chunked_forward_kl = _kind_of("forward_kl", "T^2 * KL(p_T || p_S), chunked (see :func:`chunked_logit_loss`).")
chunked_reverse_kl = _kind_of("reverse_kl", "T^2 * KL(p_S || p_T), chunked (see :func:`chunked_logit_loss`).")
chunked_generalized_jsd = _kind_of("jsd", "T^2 * JSD_beta (beta 0 = forward KL, 1 = reverse KL), chunked.")
chunked_logit_mse = _kind_of("mse", "mean_v (z_S - z_T)^2 per position, chunked; no temperature, as the reference.")
chunked_skew_forward_kl = _kind_of("skew_forward_kl", "T^2 * KL(p_T || a p_T + (1 - a) p_S), a = skew_alpha.")
chunked_skew_reverse_kl = _kind_of("skew_reverse_kl", "T^2 * KL(p_S || (1 - a) p_T + a p_S), a = skew_alpha.")
chunked_total_variation = _kind_of("tvd", "T^2 * 0.5 * sum_v |p_T - p_S|, chunked (see :func:`chunked_logit_loss`).")
chunked_entropy_weighted_kl = _kind_of("entropy_kl", "T^2 * [h KL(p_T || p_S) + (1 - h) KL(p_S || p_T)], "
                                       "h = H(p_T) / log V, chunked.")
CHUNKED_LOGIT_LOSSES = {"forward_kl": chunked_forward_kl, "reverse_kl": chunked_reverse_kl,
                        "jsd": chunked_generalized_jsd, "mse": chunked_logit_mse,
                        "skew_forward_kl": chunked_skew_forward_kl, "skew_reverse_kl": chunked_skew_reverse_kl,
                        "tvd": chunked_total_variation, "entropy_kl": chunked_entropy_weighted_kl}
