"""Chunked logit losses: the reference losses of :mod:`hf_kd.losses.logits`, computed a few tokens at a time.

The reference losses build several float32 [tokens, vocab] tensors (log-probabilities of both models, the
teacher's probabilities, the KL terms) and autograd keeps most of them for the backward pass. Here one
``torch.autograd.Function`` walks over the counted positions ``chunk_size`` at a time, computes each
chunk's loss *and* its analytic gradient with respect to the student logits, writes that gradient into a
single buffer in the student logits' dtype, and frees the chunk's float32 temporaries. The backward pass
only scales the buffer by the incoming gradient (in place): nothing else is kept for autograd, and no
[tokens, vocab] float32 tensor of probabilities ever exists.

Why store the gradient rather than recompute it in backward: recomputing needs both logits tensors kept
alive until backward *and* a fresh [tokens, vocab] gradient there, plus a second exp/log pass; storing
keeps one tensor (measured at 1024 x 151936: same peak, backward ~10 s instead of ~6 s).

Notation, per position: a = z_S / T, b = z_T / T, q = softmax(a) (student), p = softmax(b) (teacher).

* forward KL   L = T^2 KL(p || q)                        dL/dz_S = T (q - p)
* reverse KL   L = T^2 KL(q || p)                        dL/dz_S = T q (r - <q, r>),  r = log q - log p
* JSD_beta     L = T^2 [beta KL(p || m) + (1 - beta) KL(q || m)],  m = beta p + (1 - beta) q
                                                         dL/dz_S = T (1 - beta) q (r - <q, r>),  r = log q - log m
* MSE          L = mean_v (z_S - z_T)^2 (no temperature) dL/dz_S = 2 (z_S - z_T) / V

Derivation: a loss with gradient g w.r.t. q has gradient q (g - <q, g>) w.r.t. a (softmax Jacobian), and
dL/dz_S = dL/da / T, so the T^2 factor leaves T. Reverse KL: g = log q - log p + 1. JSD: the loss is
T^2 [beta sum p log p + (1 - beta) sum q log q - sum m log m] (as beta p + (1 - beta) q = m), so
g = (1 - beta)(log q - log m); constants in g cancel in g - <q, g>. <q, r> is the row's KL(q || .).
Terms with zero probability count 0 (0 log 0 = 0), so vocabulary entries that are -inf for both models
(a masked vocabulary) contribute nothing to the loss and get a zero gradient. The teacher logits are
treated as constants (no gradient flows to them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor
KINDS = ("forward_kl", "reverse_kl", "jsd", "mse")


# ---- per-chunk math: float32 [c, V] logits in, per-row loss [c] and dL/dz_S [c, V] out ---------------------
# The helpers take scratch copies zs, zt (made by the callers) and reuse them as output buffers, so a chunk
# needs four [c, V] float32 buffers at once (zs, zt and the two log-softmaxes) besides a bool mask.

def _log_softmax(z: Tensor, temperature: float) -> Tensor:
    """log_softmax(z / T) (a new tensor; z, a scratch copy, is divided in place)."""
    return F.log_softmax(z.div_(temperature) if temperature != 1.0 else z, dim=-1)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a * b per row, without a [c, V] product tensor (vecdot: einsum / bmm measured 5-20x slower on CPU)."""
    return torch.linalg.vecdot(a, b, dim=-1)


def _weighted_log_ratio(weights: Tensor, log_w: Tensor, log_other: Tensor) -> Tensor:
    """sum_v w (log w - log other) per row, 0 where w = 0 (0 log 0 = 0; -inf - -inf never counts).

    Overwrites ``log_w`` with the masked log ratio and returns the row sums.
    """
    ratio = log_w.sub_(log_other).masked_fill_(weights == 0, 0.0)
    return _rowdot(ratio, weights)


def _forward_kl_rows(zs: Tensor, zt: Tensor, temperature: float, need_grad: bool):
    """T^2 sum_v p (log p - log q) per row; gradient T (q - p)."""
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    p = torch.exp(log_p, out=zt)
    loss = _weighted_log_ratio(p, log_p, log_q).mul_(temperature ** 2)
    grad = torch.exp(log_q, out=zs).sub_(p).mul_(temperature) if need_grad else None
    return loss, grad


def _student_kl_rows(log_q: Tensor, log_target: Tensor, q_buffer: Tensor, scale: float, temperature: float,
                     need_grad: bool):
    """scale T^2 KL(q || target) per row; gradient scale T q (r - KL), r = log q - log target.

    q is written into ``q_buffer``, r (then the gradient) into ``log_target``.
    """
    q = torch.exp(log_q, out=q_buffer)
    r = log_target.neg_().add_(log_q).masked_fill_(q == 0, 0.0)
    kl = _rowdot(q, r)
    loss = kl * (scale * temperature ** 2)
    grad = r.sub_(kl.unsqueeze(-1)).mul_(q).mul_(scale * temperature) if need_grad else None
    return loss, grad


def _reverse_kl_rows(zs: Tensor, zt: Tensor, temperature: float, need_grad: bool):
    """T^2 sum_v q (log q - log p) per row."""
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    return _student_kl_rows(log_q, log_p, zs, 1.0, temperature, need_grad)


def _jsd_rows(zs: Tensor, zt: Tensor, beta: float, temperature: float, need_grad: bool):
    """T^2 [beta KL(p || m) + (1 - beta) KL(q || m)] per row, m = beta p + (1 - beta) q (0 < beta < 1)."""
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    log_m = torch.logaddexp(torch.add(log_p, math.log(beta), out=zt), torch.add(log_q, math.log1p(-beta), out=zs),
                            out=zt)
    p = torch.exp(log_p, out=zs)
    loss_t = _weighted_log_ratio(p, log_p, log_m).mul_(beta * temperature ** 2)
    del p, log_p
    loss_s, grad = _student_kl_rows(log_q, log_m, zs, 1.0 - beta, temperature, need_grad)
    return loss_t + loss_s, grad


def _mse_rows(zs: Tensor, zt: Tensor, need_grad: bool):
    """mean_v (z_S - z_T)^2 per row; gradient 2 (z_S - z_T) / V."""
    diff = zs.sub_(zt)
    loss = _rowdot(diff, diff) / zs.shape[-1]
    grad = diff.mul_(2.0 / zs.shape[-1]) if need_grad else None
    return loss, grad


def kd_rows(zs: Tensor, zt: Tensor, kind: str, *, beta: float = 0.5, temperature: float = 1.0,
            need_grad: bool = True, overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-row loss [c] and its gradient w.r.t. ``zs`` [c, V] (or None) for float32 logits [c, V].

    Same semantics as the reference function of ``kind`` (jsd with beta 0 / 1 is forward / reverse KL).
    ``overwrite``: zs and zt are scratch buffers the computation may reuse (saves two [c, V] copies).
    """
    if not overwrite:
        zs, zt = zs.clone(), zt.clone()
    if kind == "jsd" and beta == 0.0 or kind == "forward_kl":
        return _forward_kl_rows(zs, zt, temperature, need_grad)
    if kind == "jsd" and beta == 1.0 or kind == "reverse_kl":
        return _reverse_kl_rows(zs, zt, temperature, need_grad)
    if kind == "jsd":
        return _jsd_rows(zs, zt, beta, temperature, need_grad)
    if kind == "mse":
        return _mse_rows(zs, zt, need_grad)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


CHUNK_BYTES = 8 << 20  # automatic chunks: one float32 [rows, vocab] buffer of at most 8 MiB


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    """Rows per chunk: ``chunk_size``, or (None / 0) as many rows as keep a float32 [rows, vocab] buffer <= 8 MiB.

    Bytes, not rows: glibc serves buffers above 32 MiB with fresh mmaps, whose page faults cost more than the
    math (measured, 2 threads: log_softmax of one [256, 49152] chunk 25 ms, of four [64, 49152] chunks 5.5 ms).
    """
    if chunk_size is None or chunk_size == 0:
        return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be > 0 (or 0 / None for automatic), got {chunk_size}")
    return int(chunk_size)


def check_kind(kind: str, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


# ---- the chunked autograd function --------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    kind: str
    beta: float
    temperature: float
    reduction: str
    chunk_size: int
    vocab_limit: int | None


def counted_positions(mask: Tensor | None, shape: torch.Size, device) -> Tensor:
    """Flat indices (over ``shape``) of the counted positions: all of them when ``mask`` is None."""
    if mask is None:
        return torch.arange(math.prod(shape), device=device)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the logits' leading shape {tuple(shape)}")
    return mask.to(device, torch.bool).reshape(-1).nonzero().squeeze(1)


def _flat(x: Tensor) -> Tensor | None:
    """x as [positions, V] without a copy, or None (a strided view such as logits[:, :-1])."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _rows(x: Tensor, flat_idx: Tensor, width: int) -> Tensor:
    """A float32 copy of rows x[..., :width] at flat leading positions ``flat_idx``: [len, width], any strides.

    Advanced indexing, not ``index_select``: on CPU, index_select of long float32 rows was measured 4-20x slower
    than a plain copy (seconds for a [512, 49152] chunk with 2 threads).
    """
    flat = _flat(x)
    if flat is None:  # gather by coordinates (also a copy)
        return x[torch.unravel_index(flat_idx, x.shape[:-1])][:, :width].float()
    return flat[flat_idx, :width].float()


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, opts: _Options):
        lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
        width = opts.vocab_limit or vocab
        if teacher_logits.shape[:-1] != lead or teacher_logits.shape[-1] < width or width > vocab:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} do not match (vocab_limit={opts.vocab_limit})")
        idx = counted_positions(mask, lead, student_logits.device)
        factor = 1.0 / max(idx.numel(), 1) if opts.reduction == "mean" else 1.0
        need_grad = ctx.needs_input_grad[0]
        s_flat, t_flat = _flat(student_logits), _flat(teacher_logits)
        # Mostly counted positions (e.g. a causal LM's mask drops one per sequence): walk contiguous row ranges,
        # slices instead of gathers, and zero the few uncounted rows; sparse masks gather the counted rows.
        dense = s_flat is not None and t_flat is not None and 2 * idx.numel() >= lead.numel()
        every_entry = (dense or idx.numel() == lead.numel()) and width == vocab  # no zero rows or columns to fill
        new = torch.empty_like if every_entry else torch.zeros_like
        grad = new(student_logits, memory_format=torch.contiguous_format) if need_grad else None
        per_pos = torch.zeros(lead.numel(), device=student_logits.device) if opts.reduction == "none" else None
        total = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        counted = None
        if dense and idx.numel() != lead.numel():
            counted = torch.zeros(lead.numel(), dtype=torch.bool, device=student_logits.device)
            counted[idx] = True
        n_rows = lead.numel()
        # float32 gradient over the full vocabulary: compute each chunk inside its slice of the gradient buffer
        # (kd_rows leaves dL/dz_S in the student scratch for forward KL and MSE): one copy and one buffer fewer.
        in_place = dense and need_grad and width == vocab and grad.dtype == torch.float32
        starts = range(0, n_rows, opts.chunk_size) if dense else idx.split(opts.chunk_size)
        for start in starts:
            if dense:
                rows = slice(start, min(start + opts.chunk_size, n_rows))
                if in_place:  # the chunk's slice of the gradient buffer is the student scratch copy
                    zs = grad.view(-1, vocab)[rows].copy_(s_flat[rows])
                else:
                    zs = s_flat[rows, :width].to(torch.float32, copy=True)
                zt = t_flat[rows, :width].to(torch.float32, copy=True)
            else:
                rows = start  # the chunk's flat indices
                zs, zt = _rows(student_logits, rows, width), _rows(teacher_logits, rows, width)
            loss, g = kd_rows(zs, zt, opts.kind, beta=opts.beta, temperature=opts.temperature, need_grad=need_grad,
                              overwrite=True)
            del zs, zt
            keep = counted[rows] if counted is not None else None
            if keep is not None:  # uncounted rows inside the range: no loss, zero gradient (NaN-safe)
                loss = loss.masked_fill(~keep, 0.0)
            if per_pos is not None:
                if dense:
                    per_pos[rows] = loss
                else:
                    per_pos.index_copy_(0, rows, loss)
            total += loss.sum(dtype=torch.float64)
            if need_grad:
                if keep is not None:
                    g = g.masked_fill_(~keep.unsqueeze(1), 0.0)
                g = g.mul_(factor) if factor != 1.0 else g
                if dense:
                    target = grad.view(-1, vocab)[rows, :width]
                    if g.data_ptr() != target.data_ptr():
                        target.copy_(g)
                else:
                    grad.view(-1, vocab)[:, :width].index_copy_(0, rows, g.to(grad.dtype))
            del loss, g
        ctx.grad, ctx.lead = grad, lead
        if per_pos is not None:
            return per_pos.view(lead)
        return (total * factor).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None  # release the buffer as it is handed over
        if grad is None:
            raise RuntimeError("chunked logit loss: backward called twice (the gradient buffer is used once)")
        scale = grad_output.reshape(ctx.lead + (1,)) if grad_output.dim() else grad_output
        return grad.mul_(scale.to(grad.dtype)), None, None, None


def chunked_logit_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward_kl", *,
                       beta: float = 0.5, temperature: float = 1.0, mask: Tensor | None = None,
                       reduction: str = "mean", chunk_size: int | None = None, vocab_limit: int | None = None) -> Tensor:
    """Logit loss ``kind`` (forward_kl, reverse_kl, jsd, mse) over logits [..., V], ``chunk_size`` counted
    positions at a time. ``mask`` (leading shape, True = counted) and ``reduction`` ("mean", "sum", "none")
    as in the reference functions; ``vocab_limit`` compares only the first ``vocab_limit`` vocabulary
    entries (the student's other entries get zero gradient), like slicing both logits first but without
    the copy. The gradient w.r.t. the student logits is computed in the forward pass (see module doc).
    """
    check_kind(kind, beta)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    chunk_size = resolve_chunk_size(chunk_size, vocab_limit or student_logits.shape[-1])
    opts = _Options(kind, float(beta), float(temperature), reduction, chunk_size, vocab_limit)
    return _ChunkedLogitLoss.apply(student_logits, teacher_logits.detach(), mask, opts)


def chunked_forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                       mask: Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None,
                       vocab_limit: int | None = None) -> Tensor:
    """T^2 * KL(p_T || p_S), chunked (see :func:`chunked_logit_loss`)."""
    return chunked_logit_loss(student_logits, teacher_logits, "forward_kl", temperature=temperature, mask=mask,
                              reduction=reduction, chunk_size=chunk_size, vocab_limit=vocab_limit)


def chunked_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                       mask: Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None,
                       vocab_limit: int | None = None) -> Tensor:
    """T^2 * KL(p_S || p_T), chunked (see :func:`chunked_logit_loss`)."""
    return chunked_logit_loss(student_logits, teacher_logits, "reverse_kl", temperature=temperature, mask=mask,
                              reduction=reduction, chunk_size=chunk_size, vocab_limit=vocab_limit)


def chunked_generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
                            temperature: float = 1.0, mask: Tensor | None = None, reduction: str = "mean",
                            chunk_size: int | None = None, vocab_limit: int | None = None) -> Tensor:
    """T^2 * JSD_beta (beta 0 = forward KL, 1 = reverse KL), chunked (see :func:`chunked_logit_loss`)."""
    return chunked_logit_loss(student_logits, teacher_logits, "jsd", beta=beta, temperature=temperature,
                              mask=mask, reduction=reduction, chunk_size=chunk_size, vocab_limit=vocab_limit)


def chunked_logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                      mask: Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None,
                      vocab_limit: int | None = None) -> Tensor:
    """mean_v (z_S - z_T)^2 per position, chunked; ``temperature`` is ignored as in the reference."""
    return chunked_logit_loss(student_logits, teacher_logits, "mse", mask=mask, reduction=reduction,
                              chunk_size=chunk_size, vocab_limit=vocab_limit)


CHUNKED_LOGIT_LOSSES = {
    "forward_kl": chunked_forward_kl,
    "reverse_kl": chunked_reverse_kl,
    "jsd": chunked_generalized_jsd,
    "mse": chunked_logit_mse,
}
