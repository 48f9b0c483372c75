"""Attention transfer: what the teacher looks at.

* :class:`AttentionTransfer` (Zagoruyko & Komodakis 2017): spatial attention maps of feature maps, the
  L2-normalised channel mean of |A|^p flattened over positions, matched by squared distance per example; any
  channel counts, spatial sizes matched by pooling. Token states of a ViT are laid on their patch grid, so a ViT
  teacher can guide a CNN student. Cheap: the maps come from forward hooks on named modules.
* :class:`AttentionProbs` (the attention-matrix transfer of TinyBERT / MiniLM): the attention probabilities of
  mapped transformer layers, KL(teacher || student) per query row (or MSE), heads compared one to one when the
  counts match, else each side's head average. The probabilities are returned only by eager attention, so the
  trainer switches both models to it: slower and more memory than SDPA (docs/methods.md gives the measured cost).
  Eager attention returns the probabilities *after* attention dropout: with dropout on, the student's rows hold
  exact zeros (and no longer sum to 1), which the KL punishes hard; the trainer warns, and a student built for
  attention transfer should use attention dropout 0.
"""

from __future__ import annotations

import warnings

import torch

from ..flow.capture import Needs
from ..losses import attention_probs_loss, attention_transfer
from .base import Context, Signal
from .hints import as_map, probe_pairs


class AttentionTransfer(Signal):
    """Spatial attention transfer on ``pairs`` of (teacher module, student module), averaged over pairs, summed
    over examples (normaliser: examples)."""

    normalizer = "examples"

    def __init__(self, name="attention_transfer", weight=1.0, *, pairs, p: float = 2.0, teacher=None):
        super().__init__(name, weight, teacher)
        self.pairs, self.p = [tuple(x) for x in pairs], float(p)
        if not self.pairs:
            raise ValueError("attention transfer: give at least one (teacher_module, student_module) pair")

    def needs(self, side: str) -> Needs:
        return Needs(modules={t if side == "teacher" else s for t, s in self.pairs})

    def check(self, teacher, student) -> None:
        probe_pairs(teacher, student, self.pairs, "at_layers", maps=True)

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        total = 0.0
        for t, s in self.pairs:
            h_s, h_t = (as_map(h) if h.dim() == 3 else h for h in (ctx.student.modules[s], ctx.teacher_for(self).modules[t]))
            total = total + attention_transfer(h_s, h_t, p=self.p, mask=ctx.masks["examples"], reduction="sum")
        return total / len(self.pairs)


class AttentionProbs(Signal):
    """Attention-probability matching on ``layers``: (teacher layer, student layer) indices, 0-based."""

    normalizer = "hidden"

    def __init__(self, name="attention", weight=1.0, *, layers, kind: str = "kl", teacher=None):
        super().__init__(name, weight, teacher)
        if kind not in ("kl", "mse"):
            raise ValueError(f"attention_loss must be 'kl' or 'mse', got {kind!r}")
        self.layers, self.kind = [tuple(x) for x in layers], kind
        if not self.layers:
            raise ValueError("attention signal: give at least one (teacher layer, student layer) pair")

    def needs(self, side: str) -> Needs:
        return Needs(attentions={t if side == "teacher" else s for t, s in self.layers})

    def check(self, teacher, student) -> None:
        config = student.config
        rate = max(float(getattr(config, n, 0.0) or 0.0) for n in ("attention_probs_dropout_prob", "attention_dropout"))
        if rate > 0:
            warnings.warn(f"attention signal: the student's attention dropout is {rate}; eager attention returns the "
                          "probabilities after dropout, so the KL sees dropped (zero) entries. Set the student's "
                          "attention dropout to 0 for attention transfer.", stacklevel=2)

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        mask = ctx.masks["hidden"]
        total = 0.0
        for t, s in self.layers:
            a_s, a_t = ctx.student.attentions.get(s), ctx.teacher_for(self).attentions.get(t)
            if a_s is None or a_t is None:
                raise ValueError("attention signal: the model returned no attention probabilities (a model whose "
                                 "attention implementation cannot output them?)")
            if mask.dim() == 1:  # images: every patch is a query; per-example mean over queries
                per_query = attention_probs_loss(a_s, a_t, kind=self.kind, reduction="none")
                total = total + (per_query.mean(-1) * mask).sum()
            else:
                total = total + attention_probs_loss(a_s, a_t, kind=self.kind, mask=mask, reduction="sum")
        return total / len(self.layers)
