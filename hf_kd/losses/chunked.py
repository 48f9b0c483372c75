"""The per-chunk math of the chunked logit losses: a chunk's loss per row *and* its analytic gradient with respect
to the student logits, for the reference losses of :mod:`hf_kd.losses.logits`.

The reference losses build several float32 [tokens, vocab] tensors (log-probabilities of both models, the
teacher's probabilities, the KL terms) and autograd keeps most of them for the backward pass. The one chunk loop
(:mod:`hf_kd.losses.kd_ce`, shared by the fused path) walks the positions ``chunk_size`` at a time, calls
:func:`kd_rows` on each chunk, writes the gradient into a single buffer in the student logits' dtype and frees
the chunk's float32 temporaries: no [tokens, vocab] float32 tensor of probabilities ever exists.

Why store the gradient rather than recompute it in backward: recomputing needs both logits tensors kept
alive until backward *and* a fresh [tokens, vocab] gradient there, plus a second exp/log pass; storing
keeps one tensor (measured at 1024 x 151936: same peak, backward ~10 s instead of ~6 s).

Notation, per position: a = z_S / T, b = z_T / T, q = softmax(a) (student), p = softmax(b) (teacher).

* forward KL   L = T^2 KL(p || q)                        dL/dz_S = T (q - p)
* reverse KL   L = T^2 KL(q || p)                        dL/dz_S = T q (r - <q, r>),  r = log q - log p
* JSD_beta     L = T^2 [beta KL(p || m) + (1 - beta) KL(q || m)],  m = beta p + (1 - beta) q
                                                         dL/dz_S = T (1 - beta) q (r - <q, r>),  r = log q - log m
* MSE          L = mean_v (z_S - z_T)^2 (no temperature) dL/dz_S = 2 (z_S - z_T) / V
* skew forward L = T^2 KL(p || m),  m = a p + (1 - a) q    dL/dz_S = (1 - a) T (q <1, u> - u),  u = q p / m
* skew reverse L = T^2 KL(q || m),  m = (1 - a) p + a q    dL/dz_S = T q (g - <q, g>),  g = log q - log m - a q / m
* TVD          L = T^2 / 2 sum_v |q - p|                 dL/dz_S = T q (s - <q, s>) / 2,  s = sign(q - p)
* entropy mix  L = T^2 [h KL(p || q) + (1 - h) KL(q || p)],  h = H(p) / log V (a constant)
                                                 dL/dz_S = h T (q - p) + (1 - h) T q (r - <q, r>),  r = log q - log p

Derivation: a loss with gradient g w.r.t. q has gradient q (g - <q, g>) w.r.t. a (softmax Jacobian), and
dL/dz_S = dL/da / T, so the T^2 factor leaves T. Reverse KL: g = log q - log p + 1. JSD: the loss is
T^2 [beta sum p log p + (1 - beta) sum q log q - sum m log m] (as beta p + (1 - beta) q = m), so
g = (1 - beta)(log q - log m); constants in g cancel in g - <q, g>. <q, r> is the row's KL(q || .).
Skew forward: g = -(1 - a) p / m, so q (g - <q, g>) = (1 - a)(q <1, u> - u). Skew reverse: g = log q + 1 - log m -
a q / m. TVD: g = sign(q - p) / 2 (0 where q = p, as autograd's abs).
Terms with zero probability count 0 (0 log 0 = 0), so vocabulary entries that are -inf for both models
(a masked vocabulary) contribute nothing to the loss and get a zero gradient. The teacher logits are
treated as constants (no gradient flows to them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .logits import check_skew_alpha

Tensor = torch.Tensor
KINDS = ("forward_kl", "reverse_kl", "jsd", "mse", "skew_forward_kl", "skew_reverse_kl", "tvd", "entropy_kl")


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


def _skew_forward_rows(zs: Tensor, zt: Tensor, alpha: float, temperature: float, need_grad: bool):
    """T^2 KL(p || m) per row, m = alpha p + (1 - alpha) q (0 < alpha < 1)."""
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    log_m = torch.logaddexp(torch.add(log_p, math.log(alpha), out=zt), torch.add(log_q, math.log1p(-alpha), out=zs),
                            out=zt)
    p = torch.exp(log_p, out=zs)
    ratio = log_p.sub_(log_m).masked_fill_(p == 0, 0.0)  # log p - log m where p > 0
    loss = _rowdot(ratio, p).mul_(temperature ** 2)
    if not need_grad:
        return loss, None
    q = log_q.exp_()
    u = ratio.exp_().mul_(q).masked_fill_(p == 0, 0.0)  # q p / m (<= p / (1 - alpha))
    grad = q.mul_(u.sum(-1, keepdim=True)).sub_(u).mul_((1.0 - alpha) * temperature)
    return loss, grad


def _skew_reverse_rows(zs: Tensor, zt: Tensor, alpha: float, temperature: float, need_grad: bool):
    """T^2 KL(q || m) per row, m = (1 - alpha) p + alpha q (0 < alpha < 1)."""
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    log_m = torch.logaddexp(torch.add(log_p, math.log1p(-alpha), out=zt), torch.add(log_q, math.log(alpha), out=zs),
                            out=zt)
    q = torch.exp(log_q, out=zs)
    r = log_q.sub_(log_m).masked_fill_(q == 0, 0.0)  # log q - log m where q > 0
    loss = _rowdot(q, r).mul_(temperature ** 2)
    if not need_grad:
        return loss, None
    g = r.sub_(torch.exp(r, out=log_p).mul_(alpha))  # log q - log m - alpha q / m
    grad = g.sub_(_rowdot(q, g).unsqueeze(-1)).mul_(q).mul_(temperature)
    return loss, grad


def _tvd_rows(zs: Tensor, zt: Tensor, temperature: float, need_grad: bool):
    """T^2 / 2 sum_v |q - p| per row; gradient T q (s - <q, s>) / 2, s = sign(q - p)."""
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    q, p = torch.exp(log_q, out=zs), torch.exp(log_p, out=zt)
    diff = log_p.copy_(q).sub_(p)
    s = torch.sign(diff, out=log_q)
    loss = _rowdot(diff, s).mul_(0.5 * temperature ** 2)
    grad = s.sub_(_rowdot(q, s).unsqueeze(-1)).mul_(q).mul_(0.5 * temperature) if need_grad else None
    return loss, grad


def _entropy_kl_rows(zs: Tensor, zt: Tensor, temperature: float, need_grad: bool):
    """T^2 [h KL(p || q) + (1 - h) KL(q || p)] per row, h = H(p) / log V clamped to [0, 1] (1 when V = 1)."""
    vocab = zs.shape[-1]
    log_q, log_p = _log_softmax(zs, temperature), _log_softmax(zt, temperature)
    p = torch.exp(log_p, out=zt)
    neg_entropy = _rowdot(torch.mul(p, log_p, out=zs).masked_fill_(p == 0, 0.0), torch.ones_like(p[:1]))
    h = (-neg_entropy / math.log(vocab)).clamp_(0.0, 1.0) if vocab > 1 else torch.ones_like(neg_entropy)
    r = torch.sub(log_q, log_p, out=zs)  # log q - log p, before log p is overwritten
    forward = _weighted_log_ratio(p, log_p, log_q)
    q = log_q.exp_()
    reverse = _rowdot(q, r.masked_fill_(q == 0, 0.0))
    loss = (h * forward + (1.0 - h) * reverse).mul_(temperature ** 2)
    if not need_grad:
        return loss, None
    grad = r.sub_(reverse.unsqueeze(-1)).mul_(q).mul_((1.0 - h).unsqueeze(-1))
    grad = grad.add_(q.sub_(p).mul_(h.unsqueeze(-1))).mul_(temperature)
    return loss, grad


def kd_rows(zs: Tensor, zt: Tensor, kind: str, *, beta: float = 0.5, skew_alpha: float = 0.1,
            temperature: float = 1.0, need_grad: bool = True, overwrite: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-row loss [c] and its gradient w.r.t. ``zs`` [c, V] (or None) for float32 logits [c, V].

    Same semantics as the reference function of ``kind`` (jsd with beta 0 / 1 is forward / reverse KL, a skew KL with
    skew_alpha 0 the plain one). ``overwrite``: zs and zt are scratch buffers the computation may reuse (saves two
    [c, V] copies).
    """
    if not overwrite:
        zs, zt = zs.clone(), zt.clone()
    if kind == "jsd" and beta == 0.0 or kind == "forward_kl" or kind == "skew_forward_kl" and skew_alpha == 0.0:
        return _forward_kl_rows(zs, zt, temperature, need_grad)
    if kind == "jsd" and beta == 1.0 or kind == "reverse_kl" or kind == "skew_reverse_kl" and skew_alpha == 0.0:
        return _reverse_kl_rows(zs, zt, temperature, need_grad)
    if kind == "skew_forward_kl":
        return _skew_forward_rows(zs, zt, skew_alpha, temperature, need_grad)
    if kind == "skew_reverse_kl":
        return _skew_reverse_rows(zs, zt, skew_alpha, temperature, need_grad)
    if kind == "tvd":
        return _tvd_rows(zs, zt, temperature, need_grad)
    if kind == "entropy_kl":
        return _entropy_kl_rows(zs, zt, temperature, need_grad)
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


def check_kind(kind: str, beta: float, skew_alpha: float = 0.1) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    check_skew_alpha(skew_alpha)
