"""The logit engine: the task loss and logit distillation of one micro-batch in one pass over the logits.

Three implementations of the same sums (tests hold them equal to the reference functions, loss and gradient):

* full     the reference losses of :mod:`hf_kd.losses.logits` on the whole logits (classifiers' default)
* chunked  :func:`hf_kd.losses.kd_ce.chunked_kd_ce`: rows of the logits a chunk at a time, task cross-entropy and
           KD together, one gradient buffer (language models' default)
* fused    :func:`hf_kd.losses.fused.fused_kd_ce`: logits made from the last hidden states chunk by chunk, never
           [tokens, vocab] (causal LMs)

The engine is given each term's coefficient (its weight at this step over its global count) and returns the
weighted loss, already differentiable, and each term's detached sum for logging; nothing else is combined later.
"""

from __future__ import annotations

import torch
from torch import nn

from .flow.align import padded_to_length, predicting, targets, task_loss_sum
from .flow.capture import Needs, lm_head_of
from .losses import LOGIT_LOSSES, loss_kwargs
from .losses.fused import fused_kd_ce
from .losses.kd_ce import chunked_kd_ce
from .signals.base import Context
from .flow.tasks import CAUSAL_LM, MASKED_LM, base_model_of
from .teachers.cache import CACHE_COLUMNS, cached_kl_sum

Tensor = torch.Tensor


def logit_needs(impl: str, side: str, kd: bool, task: bool) -> Needs:
    """What the engine reads from ``side`` when the KD term (``kd``) and/or the task term (``task``) are on."""
    wanted = kd if side == "teacher" else (kd or task)
    if not wanted:
        return Needs()
    return Needs(last_hidden=True) if impl == "fused" else Needs(logits=True)


class LogitEngine:
    def __init__(self, impl: str, task: str, student: nn.Module, teachers: dict, *, chunk_size: int = 0,
                 vocab_limit: int | None = None):
        self.impl, self.task, self.student, self.teachers = impl, task, student, teachers
        self.chunk_size, self.vocab_limit = chunk_size, vocab_limit

    def __call__(self, ctx: Context, task_term, kd_term) -> tuple[Tensor, dict]:
        """``task_term`` / ``kd_term``: (signal, coefficient) or None. Returns (weighted loss, {name: sum})."""
        if self.impl == "fused":
            return self._fused(ctx, task_term, kd_term)
        if self.impl == "chunked":
            return self._chunked(ctx, task_term, kd_term)
        return self._full(ctx, task_term, kd_term)

    # ---- full: the reference losses -----------------------------------------------------------------------
    def _full(self, ctx, task_term, kd_term):
        loss, sums = 0.0, {}
        if task_term is not None:
            s = task_loss_sum(ctx.student.logits, ctx.labels, self.task, base_model_of(self.student).config)
            loss, sums[task_term[0].name] = loss + task_term[1] * s, s.detach()
        if kd_term is not None:
            s = self._full_kd(ctx, kd_term[0])
            loss, sums[kd_term[0].name] = loss + kd_term[1] * s, s.detach()
        return loss, sums

    def _full_kd(self, ctx, sig) -> Tensor:
        temperature, mask = sig.temperature.value(ctx.step, ctx.total_steps), ctx.masks["kd"]
        if ctx.extra.get("cache"):
            return cached_kl_sum(ctx.student.logits, ctx.extra["cache"], mask, self.task, temperature)
        target = sig.target_logits(ctx, self.vocab_limit)
        s, t = predicting(ctx.student.logits, self.task), predicting(target, self.task)
        if self.vocab_limit is not None:
            s, t = s[..., :self.vocab_limit], t[..., :self.vocab_limit]
        extra = loss_kwargs(sig.kind, beta=sig.beta, skew_alpha=sig.skew_alpha)
        return LOGIT_LOSSES[sig.kind](s, t, temperature=temperature, mask=mask, reduction="sum", **extra)

    # ---- chunked: rows of the logits, KD and the LM cross-entropy in one pass --------------------------------
    def _chunked(self, ctx, task_term, kd_term):
        logits = ctx.student.logits
        n = logits.numel() // logits.shape[-1]
        lm = self.task in (CAUSAL_LM, MASKED_LM)  # their task loss is a cross-entropy over the same rows
        ce_term = task_term if lm else None
        kw = self._kd_kwargs(ctx, kd_term, n) if kd_term is not None else {}
        labels = None
        if ce_term is not None:
            labels = ctx.labels if self.task != CAUSAL_LM else padded_to_length(targets(ctx.labels, self.task), -100)
            labels = labels.reshape(-1)
        loss, kd_sum, ce_sum = chunked_kd_ce(
            logits.reshape(n, -1), labels=labels, chunk_size=self.chunk_size, vocab_limit=self.vocab_limit,
            kd_coef=kd_term[1] if kd_term else 0.0, ce_coef=ce_term[1] if ce_term else 0.0, **kw)
        sums = {}
        if kd_term is not None:
            sums[kd_term[0].name] = kd_sum
        if ce_term is not None:
            sums[ce_term[0].name] = ce_sum
        if task_term is not None and ce_term is None:  # classifiers: their own task loss (CE, MSE or BCE)
            rest, rest_sums = self._full(ctx, task_term, None)
            loss, sums = loss + rest, {**sums, **rest_sums}
        return loss, sums

    def _kd_kwargs(self, ctx, kd_term, n: int) -> dict:
        sig = kd_term[0]
        mask = ctx.masks["kd"]
        if self.task == CAUSAL_LM:  # the kernel walks all T rows; the last position predicts nothing
            mask = padded_to_length(mask, False)
        kw = dict(mask=mask.reshape(-1), kind=sig.kind, beta=sig.beta, skew_alpha=sig.skew_alpha,
                  temperature=sig.temperature.value(ctx.step, ctx.total_steps))
        cache = ctx.extra.get("cache")
        if cache:
            kw["teacher_topk"] = tuple(cache[c].reshape(n, -1).squeeze(-1) if c == CACHE_COLUMNS[2]
                                       else cache[c].reshape(n, -1) for c in CACHE_COLUMNS)
        else:
            kw["teacher_logits"] = sig.target_logits(ctx, self.vocab_limit).reshape(n, -1)
        return kw

    # ---- fused: logits from the last hidden states, chunk by chunk ---------------------------------------------
    def _fused(self, ctx, task_term, kd_term):
        hs = ctx.student.last_hidden
        b, t, _ = hs.shape
        ws, bs = lm_head_of(self.student)
        kw = {}
        if kd_term is not None:
            sig = kd_term[0]
            (name,) = sig.teacher_names(ctx.default_teacher)  # one teacher: a mixture needs its logits
            wt, bt = lm_head_of(self.teachers[name])
            kw = dict(teacher_hidden=ctx.teachers[name].last_hidden.reshape(b * t, -1), teacher_head_weight=wt,
                      teacher_head_bias=bt, kind=sig.kind, beta=sig.beta, skew_alpha=sig.skew_alpha,
                      temperature=sig.temperature.value(ctx.step, ctx.total_steps),
                      mask=padded_to_length(ctx.masks["kd"].to(hs.device), False).reshape(-1))
        labels = None
        if task_term is not None:
            labels = padded_to_length(targets(ctx.labels, self.task).to(hs.device), -100).reshape(-1)
        loss, kd_sum, ce_sum = fused_kd_ce(
            hs.reshape(b * t, -1), ws, student_head_bias=bs, labels=labels, chunk_size=self.chunk_size,
            vocab_limit=self.vocab_limit, kd_coef=kd_term[1] if kd_term else 0.0,
            ce_coef=task_term[1] if task_term else 0.0, **kw)
        sums = {}
        if kd_term is not None:
            sums[kd_term[0].name] = kd_sum
        if task_term is not None:
            sums[task_term[0].name] = ce_sum
        return loss, sums
