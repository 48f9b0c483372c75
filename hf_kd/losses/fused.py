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
(the caller's loss weights, known before the forward pass); if backward receives gradients in another
proportion, the pass is recomputed with the right weights, so the result is exact either way. The teacher
side is a constant (no gradient).
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..signals import CAUSAL_LM, CLASSIFICATION, base_model_of
from .chunked import check_kind, resolve_chunk_size
from .kd_ce import Options, chunk_kd_ce, common_scale

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
        need = tuple(ctx.needs_input_grad[:3])
        kd, ce, grads = _fused_pass(t, opts, (opts.kd_coef, opts.ce_coef), need)
        ctx.grads, ctx.opts, ctx.need = grads, opts, need
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels, mask)  # only read if backward must recompute
        return kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kd, grad_ce):
        grads, ctx.grads = ctx.grads, None
        t = dict(zip(_NAMES, ctx.saved_tensors))
        o = ctx.opts
        active = (t["ht"] is not None, t["labels"] is not None)
        s = common_scale((grad_kd, grad_ce), (o.kd_coef, o.ce_coef), active)
        if s is None or grads is None:  # not the proportion assumed in forward (or a second backward)
            _, _, grads = _fused_pass(t, o, (float(grad_kd), float(grad_ce)), ctx.need)
            s = 1.0
        out = tuple(grads[k].mul_(s) if grads[k] is not None else None for k in ("hs", "ws", "bs"))
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


def fused_kd_ce_sums(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor | None = None,
                     teacher_head_weight: Tensor | None = None, *, labels: Tensor | None = None,
                     mask: Tensor | None = None, kind: str = "forward_kl", beta: float = 0.5,
                     temperature: float = 1.0, chunk_size: int | None = None, vocab_limit: int | None = None,
                     student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None,
                     kd_coef: float = 1.0, ce_coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """(KD sum, CE sum) over hidden states [N, D] and LM heads [V, D], without [N, V] logits.

    KD (when ``teacher_hidden`` is given): sum over positions with ``mask`` True (all if None) of the
    ``kind`` loss (forward_kl, reverse_kl, jsd with ``beta``, mse) between z_S[:, :vocab_limit] and
    z_T[:, :vocab_limit] at ``temperature`` (times T^2), as the reference functions with reduction="sum".
    CE (when ``labels`` [N] is given): sum over labels != -100 of cross_entropy(z_S, label) over the full
    student vocabulary (no temperature). A missing part is returned as 0. ``kd_coef`` / ``ce_coef``: the
    weights the caller's loss gives the two sums (any common factor is free), used to store one gradient.
    """
    check_kind(kind, beta)
    chunk_size = resolve_chunk_size(chunk_size or FUSED_CHUNK_ROWS, student_head_weight.shape[0])
    detach = (lambda x: None if x is None else x.detach())
    ht, wt, bt = detach(teacher_hidden), detach(teacher_head_weight), detach(teacher_head_bias)
    mask = None if mask is None else mask.to(student_hidden.device, torch.bool)
    labels = None if labels is None else labels.to(student_hidden.device)
    _check_inputs(student_hidden, student_head_weight, student_head_bias, ht, wt, bt, labels, mask, vocab_limit)
    opts = Options(kind, float(beta), float(temperature), chunk_size, vocab_limit, float(kd_coef), float(ce_coef))
    return _FusedHeadLoss.apply(student_hidden, student_head_weight, student_head_bias, ht, wt, bt, labels, mask,
                                opts)


def fused_kd_loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor,
                  teacher_head_weight: Tensor, *, mask: Tensor | None = None, temperature: float = 1.0,
                  kind: str = "forward_kl", beta: float = 0.5, chunk_size: int | None = None,
                  vocab_limit: int | None = None, student_head_bias: Tensor | None = None,
                  teacher_head_bias: Tensor | None = None, reduction: str = "sum") -> Tensor:
    """The ``kind`` logit loss between h_S W_S^T (+ b_S) and h_T W_T^T (+ b_T), chunk by chunk.

    Equals ``LOGIT_LOSSES[kind](z_S, z_T, mask=mask, reduction=reduction)`` on the (never built) logits;
    ``reduction`` "sum" or "mean" (over counted positions). Gradients reach student_hidden, the student
    head weight and bias (a head tied to the embeddings accumulates as usual).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    kd, _ = fused_kd_ce_sums(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask=mask,
                             kind=kind, beta=beta, temperature=temperature, chunk_size=chunk_size,
                             vocab_limit=vocab_limit, student_head_bias=student_head_bias,
                             teacher_head_bias=teacher_head_bias, ce_coef=0.0)
    if reduction == "mean":
        count = student_hidden.shape[0] if mask is None else int(mask.sum())
        kd = kd / max(count, 1)
    return kd


def fused_cross_entropy(hidden: Tensor, head_weight: Tensor, labels: Tensor, *, head_bias: Tensor | None = None,
                        chunk_size: int | None = None, reduction: str = "sum") -> Tensor:
    """cross_entropy(h W^T + b, labels, ignore_index=-100) without the [N, V] logits ("sum" or "mean")."""
    _, ce = fused_kd_ce_sums(hidden, head_weight, labels=labels, student_head_bias=head_bias,
                             chunk_size=chunk_size, kd_coef=0.0)
    if reduction == "mean":
        ce = ce / max(int((labels != -100).sum()), 1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return ce


# ---- Hugging Face causal LMs: last hidden states and heads ------------------------------------------------

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lm_head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, D], bias or None) of a causal LM's output layer, which must be a plain nn.Linear."""
    head = base_model_of(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"kd_impl='fused' needs the LM head to be a plain nn.Linear, {type(model).__name__} has "
                         f"{type(head).__name__} (e.g. a PEFT-wrapped head): use kd_impl='chunked'")
    return head.weight, head.bias


def _check_logits_from_hidden(core: nn.Module, inputs: dict) -> None:
    """Once per model: logits == head(last_hidden_state) on a few tokens (no softcap / logit scaling...)."""
    if core in _CHECKED or inputs.get("input_ids") is None:
        return
    small = {k: inputs[k][:1, :8] for k in ("input_ids", "attention_mask") if inputs.get(k) is not None}
    extra = {"use_cache": False} if getattr(core.config, "use_cache", None) is not None else {}
    weight, bias = lm_head_of(core)
    training = core.training
    core.eval()
    try:
        with torch.no_grad():
            reference = core(**small, **extra).logits.float()
            mine = F.linear(core.base_model(**small, **extra)[0], weight, bias).float()
    finally:
        core.train(training)
    # 3% of the largest logit: loose enough for bf16 weights or a forward that accelerate runs under autocast
    # (the base model is then called outside it), tight enough to catch soft-capping and logit scales
    tol = 3e-2
    if mine.shape != reference.shape or not torch.allclose(mine, reference, rtol=tol,
                                                           atol=tol * float(reference.abs().max()) + 1e-6):
        raise ValueError(f"{type(core).__name__} does not compute logits as lm_head(base_model(...).last_hidden_state)"
                         " (logit soft-capping or scaling?): kd_impl='fused' would be wrong; use 'chunked'")
    _CHECKED[core] = True


def resolve_kd_impl(kd_impl: str, task: str) -> str:
    """'full', 'chunked' or 'fused' for DistillationConfig.kd_impl: 'auto' = chunked except for classifiers."""
    if kd_impl == "auto":
        return "full" if task == CLASSIFICATION else "chunked"
    if kd_impl == "fused" and task != CAUSAL_LM:
        raise ValueError(f"kd_impl='fused' computes logits from a causal LM's last hidden states; this is a {task} "
                         "model: use kd_impl='chunked' or 'auto'")
    if kd_impl not in ("full", "chunked", "fused"):
        raise ValueError(f"kd_impl must be 'auto', 'full', 'chunked' or 'fused', got {kd_impl!r}")
    return kd_impl


def forward_hidden(model: nn.Module, inputs: dict, check: bool = True, **kwargs):
    """Run a causal LM (through any DDP / PEFT wrapper) without computing logits.

    Returns (outputs, last_hidden [B, T, D]): outputs as ``model(**inputs, **kwargs)`` would give them but
    with logits for no position (``logits_to_keep`` = no index), and the LM head's input captured by a
    hook on the base model (``model.base_model``, e.g. ``LlamaModel``, whose output is already final-normed).
    ``check``: verify once per model that its logits are lm_head(last hidden state).
    """
    core = base_model_of(model)
    body = core.base_model
    if body is core or core.get_output_embeddings() is None:
        raise ValueError("kd_impl='fused' needs a causal LM with a base model and an LM head; "
                         f"got {type(core).__name__}")
    if check:
        _check_logits_from_hidden(core, inputs)
    captured = []
    handle = body.register_forward_hook(lambda _module, _args, out: captured.append(out[0]))
    try:
        if "logits_to_keep" in inspect.signature(core.forward).parameters:
            device = next(iter(v for v in inputs.values() if isinstance(v, Tensor))).device
            outputs = model(**inputs, **kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
        else:
            warnings.warn(f"{type(core).__name__}.forward has no logits_to_keep: its full logits are still "
                          "computed (then dropped)", stacklevel=2)
            outputs = model(**inputs, **kwargs)
            outputs.logits = None
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(core).__name__}.forward did not call its base model {type(body).__name__}: "
                         "kd_impl='fused' cannot find the LM head's input; use 'chunked'")
    return outputs, captured[-1]


def _append_false(mask: Tensor, value) -> Tensor:
    return torch.cat([mask, torch.full_like(mask[:, :1], value)], dim=1)


def fused_lm_sums(student: nn.Module, student_hidden: Tensor, teacher: nn.Module | None,
                  teacher_hidden: Tensor | None, labels: Tensor | None, kd_mask: Tensor, *, kind: str,
                  beta: float, temperature: float, chunk_size: int, vocab_limit: int | None = None,
                  kd_coef: float = 1.0, ce_coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """(KD sum, task CE sum) of causal LMs from last hidden states [B, T, D], without logits.

    Position i predicts token i+1: ``kd_mask`` is [B, T-1] (as from position_masks) and labels are shifted
    left, so these equal the reference KD on logits[:, :-1] and ``task_loss_sum``. KD is skipped when
    ``teacher_hidden`` is None, CE when ``labels`` is None (returned as 0).
    """
    b, t, _ = student_hidden.shape
    mask = _append_false(kd_mask.to(student_hidden.device, torch.bool), False).reshape(-1)
    shifted = None if labels is None else _append_false(labels[:, 1:].to(student_hidden.device), -100).reshape(-1)
    ws, bs = lm_head_of(student)
    wt = bt = ht = None
    if teacher_hidden is not None:
        wt, bt = lm_head_of(teacher)
        ht = teacher_hidden.reshape(b * t, -1)
    return fused_kd_ce_sums(student_hidden.reshape(b * t, -1), ws, ht, wt, labels=shifted, mask=mask, kind=kind,
                            beta=beta, temperature=temperature, chunk_size=chunk_size, vocab_limit=vocab_limit,
                            student_head_bias=bs, teacher_head_bias=bt, kd_coef=kd_coef, ce_coef=ce_coef)


def fused_student_pass(model: nn.Module, inputs: dict, teacher: nn.Module | None, teacher_out, labels: Tensor | None,
                       kd_mask: Tensor, args, counts: dict, kd_vocab: int | None = None, **kwargs):
    """DistillationTrainer's fused path: (student outputs without logits, {"task": CE sum, "kd": KD sum}).

    ``teacher_out`` must carry ``last_hidden_state`` (from :func:`forward_hidden`) when ``args.kd_weight``
    > 0. The stored gradient combination is the trainer's: kd_weight / count_kd and alpha_task / count_task.
    """
    outputs, hidden = forward_hidden(model, inputs, **kwargs)
    use_kd, use_ce = args.kd_weight > 0, args.alpha_task > 0
    kd, ce = fused_lm_sums(model, hidden, teacher if use_kd else None,
                           teacher_out.last_hidden_state if use_kd else None, labels if use_ce else None, kd_mask,
                           kind=args.kd_loss, beta=args.jsd_beta, temperature=args.temperature,
                           chunk_size=args.kd_chunk_size, vocab_limit=kd_vocab,
                           kd_coef=args.kd_weight / float(counts["kd"]),
                           ce_coef=args.alpha_task / float(counts["task"]))
    return outputs, {"kd": kd, "task": ce}
