"""Fused LM-head losses: distillation (and the student's own cross-entropy) from final hidden states.

Instead of logits [N, V] from both models, the inputs are the hidden states the LM heads would read
(after the final norm) and the heads' weights. Positions are processed ``chunk_size`` at a time: per chunk,
z_S = h_S W_S^T (+ b_S) and z_T = h_T W_T^T (+ b_T) are computed, the losses and their gradient G w.r.t.
z_S (see :mod:`hf_kd.losses.chunked` for the formulas; for cross-entropy G = softmax(z_S) - onehot(y)),
then G is pushed through the head right away:

    dL/dh_S[chunk] = G W_S          dL/dW_S += G^T h_S[chunk]          dL/db_S += sum_rows G

so no [N, V] tensor ever exists, in the forward or the backward pass. Only dL/dh_S [N, D_S], dL/dW_S
[V, D_S] (and dL/db_S) are kept until backward, in the inputs' dtypes.

Both sums come from one pass. Their gradients are stored as one combination kd_coef * dKD + ce_coef * dCE
(the caller's loss weights over their counts, known before the forward pass), and the function returns that
weighted loss itself, plus the two sums detached for logging. The teacher side is a constant (no gradient).
The model glue (finding the heads, running a model without its logits) is in :mod:`hf_kd.flow.capture`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .chunked import check_kind, resolve_chunk_size
from .kd_ce import Options, chunk_kd_ce

Tensor = torch.Tensor
# Automatic fused chunks are not sized by bytes like the logits path's: every chunk adds G^T h into the head's
# [V, D] weight gradient, a full read and write of it, so small chunks are slow (measured, 2 threads, 512
# positions at V = 151,936: 13-row chunks 12.8 s, 64 rows 6.3 s, 256 rows 4.7 s; 1,024 at 49,152: 42 rows
# 2.8 s, 256 rows 1.7 s, 512 rows 2.5 s).
FUSED_CHUNK_ROWS = 256


def _chunk_logit_grad(t: dict, chunk: Tensor, kd_mask: Tensor, o: Options, coefs, need: bool):
    """KD and CE sums of one chunk of positions, G = coefs[0] dKD/dz_S + coefs[1] dCE/dz_S [c, V] (or None)."""
    h = t["hs"].index_select(0, chunk)
    zs = F.linear(h, t["ws"], t["bs"]).float()
    zt = None
    if t["ht"] is not None:
        width = o.vocab_limit or zs.shape[1]
        bt = t["bt"][:width] if t["bt"] is not None else None
        zt = F.linear(t["ht"].index_select(0, chunk), t["wt"][:width], bt).float()
    labels = t["labels"][chunk] if t["labels"] is not None else None
    kd_sum, ce_sum, grad = chunk_kd_ce(zs, zt, labels, kd_mask[chunk], o, coefs, need)
    return kd_sum, ce_sum, h, grad


def _push_through_head(grad: Tensor, h: Tensor, w: Tensor, chunk: Tensor, grads: dict) -> None:
    """Accumulate G W into dL/dh[chunk], G^T h into dL/dW and sum_rows G into dL/db."""
    g = grad.to(w.dtype)
    if grads["hs"] is not None:
        grads["hs"].index_copy_(0, chunk, (g @ w).to(grads["hs"].dtype))
    if grads["ws"] is not None:
        if grads["ws"].dtype == g.dtype:
            grads["ws"].addmm_(g.t(), h.to(g.dtype))
        else:
            grads["ws"] += (g.t() @ h.to(g.dtype)).float()
    if grads["bs"] is not None:
        grads["bs"] += grad.sum(0)


def _fused_pass(t: dict, o: Options, coefs: tuple[float, float], need: tuple[bool, bool, bool]):
    """Walk the counted positions chunk by chunk: (KD sum, CE sum, {hs, ws, bs: gradient or None})."""
    hs, ws, n = t["hs"], t["ws"], t["hs"].shape[0]
    none = torch.zeros(n, dtype=torch.bool, device=hs.device)
    kd_mask = none if t["ht"] is None else (torch.ones_like(none) if t["mask"] is None else t["mask"])
    ce_mask = none if t["labels"] is None else t["labels"] != -100
    idx = (kd_mask | ce_mask).nonzero().squeeze(1)
    grads = {"hs": torch.zeros_like(hs) if need[0] else None,
             "ws": torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need[1] else None,
             "bs": torch.zeros(ws.shape[0], dtype=torch.float32, device=ws.device) if need[2] else None}
    kd_total = ce_total = torch.zeros((), dtype=torch.float64, device=hs.device)
    for chunk in idx.split(o.chunk_size):
        kd_sum, ce_sum, h, grad = _chunk_logit_grad(t, chunk, kd_mask, o, coefs, any(need))
        kd_total, ce_total = kd_total + kd_sum, ce_total + ce_sum
        if grad is not None:
            _push_through_head(grad, h, ws, chunk, grads)
        del grad, h
    if grads["ws"] is not None:
        grads["ws"] = grads["ws"].to(ws.dtype)
    if grads["bs"] is not None:
        grads["bs"] = grads["bs"].to(t["bs"].dtype)
    return kd_total.float(), ce_total.float(), grads


_NAMES = ("hs", "ws", "bs", "ht", "wt", "bt", "labels", "mask")


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, mask, opts: Options):
        t = dict(zip(_NAMES, (hs, ws, bs, ht, wt, bt, labels, mask)))
        kd, ce, ctx.grads = _fused_pass(t, opts, (opts.kd_coef, opts.ce_coef), tuple(ctx.needs_input_grad[:3]))
        loss = opts.kd_coef * kd + opts.ce_coef * ce
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused KD+CE loss: backward called twice (the gradient buffers are used once)")
        out = tuple(grads[k].mul_(grad_loss.to(grads[k].dtype)) if grads[k] is not None else None
                    for k in ("hs", "ws", "bs"))
        return out + (None,) * 6


def _check_inputs(hs, ws, bs, ht, wt, bt, labels, mask, vocab_limit) -> None:
    n, v = hs.shape[0], ws.shape[0]
    width = vocab_limit or v
    if hs.dim() != 2 or ws.dim() != 2 or ws.shape[1] != hs.shape[1] or (bs is not None and bs.shape != (v,)):
        raise ValueError(f"student hidden {tuple(hs.shape)} / head weight {tuple(ws.shape)}: "
                         "expected [N, D] and [V, D]")
    if width > v:
        raise ValueError(f"vocab_limit {vocab_limit} exceeds the student vocabulary {v}")
    if ht is not None and (ht.dim() != 2 or ht.shape[0] != n or wt is None or wt.shape[1] != ht.shape[1]
                           or wt.shape[0] < width or (bt is not None and bt.shape != (wt.shape[0],))):
        raise ValueError(f"teacher hidden {tuple(ht.shape)} / head weight {None if wt is None else tuple(wt.shape)} "
                         f"do not match the student's [N={n}, vocab {width}]")
    for name, x in (("labels", labels), ("mask", mask)):
        if x is not None and x.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [{n}]")


def fused_kd_ce(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor | None = None,
                teacher_head_weight: Tensor | None = None, *, labels: Tensor | None = None,
                mask: Tensor | None = None, kind: str = "forward_kl", beta: float = 0.5, skew_alpha: float = 0.1,
                temperature: float = 1.0, chunk_size: int | None = None, vocab_limit: int | None = None,
                student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None,
                kd_coef: float = 1.0, ce_coef: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, KD sum, CE sum) over hidden states [N, D] and LM heads [V, D], without [N, V] logits:
    ``loss = kd_coef * KD + ce_coef * CE`` is differentiable, the two sums are detached (for logging).

    KD (when ``teacher_hidden`` is given): sum over positions with ``mask`` True (all if None) of the
    ``kind`` loss (one of :data:`hf_kd.losses.chunked.KINDS`; ``beta`` for jsd, ``skew_alpha`` for the skew KLs)
    between z_S[:, :vocab_limit] and z_T[:, :vocab_limit] at ``temperature`` (times T^2), as the reference
    functions with reduction="sum".
    CE (when ``labels`` [N] is given): sum over labels != -100 of cross_entropy(z_S, label) over the full
    student vocabulary (no temperature). A missing part is returned as 0.
    """
    check_kind(kind, beta, skew_alpha)
    chunk_size = resolve_chunk_size(chunk_size or FUSED_CHUNK_ROWS, student_head_weight.shape[0])
    detach = (lambda x: None if x is None else x.detach())
    ht, wt, bt = detach(teacher_hidden), detach(teacher_head_weight), detach(teacher_head_bias)
    mask = None if mask is None else mask.to(student_hidden.device, torch.bool)
    labels = None if labels is None else labels.to(student_hidden.device)
    _check_inputs(student_hidden, student_head_weight, student_head_bias, ht, wt, bt, labels, mask, vocab_limit)
    opts = Options(kind, float(beta), float(temperature), chunk_size, vocab_limit, float(kd_coef), float(ce_coef),
                   float(skew_alpha))
    return _FusedHeadLoss.apply(student_hidden, student_head_weight, student_head_bias, ht, wt, bt, labels, mask,
                                opts)


def fused_kd_loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor,
                  teacher_head_weight: Tensor, *, mask: Tensor | None = None, temperature: float = 1.0,
                  kind: str = "forward_kl", beta: float = 0.5, skew_alpha: float = 0.1, chunk_size: int | None = None,
                  vocab_limit: int | None = None, student_head_bias: Tensor | None = None,
                  teacher_head_bias: Tensor | None = None, reduction: str = "sum") -> Tensor:
    """The ``kind`` logit loss between h_S W_S^T (+ b_S) and h_T W_T^T (+ b_T), chunk by chunk.

    Equals ``LOGIT_LOSSES[kind](z_S, z_T, mask=mask, reduction=reduction, **loss_kwargs(kind, ...))`` on the
    (never built) logits; ``reduction`` "sum" or "mean" (over counted positions). Gradients reach student_hidden,
    the student head weight and bias (a head tied to the embeddings accumulates as usual).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    kd, _, _ = fused_kd_ce(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask=mask,
                           kind=kind, beta=beta, skew_alpha=skew_alpha, temperature=temperature, chunk_size=chunk_size,
                           vocab_limit=vocab_limit, student_head_bias=student_head_bias,
                           teacher_head_bias=teacher_head_bias, ce_coef=0.0)
    if reduction == "mean":
        count = student_hidden.shape[0] if mask is None else int(mask.sum())
        kd = kd / max(count, 1)
    return kd


def fused_cross_entropy(hidden: Tensor, head_weight: Tensor, labels: Tensor, *, head_bias: Tensor | None = None,
                        chunk_size: int | None = None, reduction: str = "sum") -> Tensor:
    """cross_entropy(h W^T + b, labels, ignore_index=-100) without the [N, V] logits ("sum" or "mean")."""
    ce, _, _ = fused_kd_ce(hidden, head_weight, labels=labels, student_head_bias=head_bias,
                           chunk_size=chunk_size, kd_coef=0.0)
    if reduction == "mean":
        ce = ce / max(int((labels != -100).sum()), 1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return ce
