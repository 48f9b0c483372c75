"""Deep-to-shallow self-distillation ("Be Your Own Teacher", Zhang et al. 2019): auxiliary classifiers on a model's
own intermediate layers learn from the labels, from its final output and from its final features; no teacher.

For each exit layer l (a hidden-state index), a head h_l (LayerNorm + Linear on the pooled hidden state: masked
mean over tokens, or the spatial mean of a feature map) is trained on

    CE(h_l, y) + T^2 KL(softmax(z_final / T) || softmax(h_l / T)) + feature_weight * ||f_l - f_final||^2

with the final logits z_final and pooled final state f_final detached (the deep part teaches the shallow part; the
shallow layers also receive these gradients, which is the method's point). The exits are this signal's trainable
parts: never in the saved model; :meth:`SelfDistillation.exit_logits` runs them for early exits. Classifiers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..flow.capture import Needs
from ..losses import forward_kl
from ..flow.tasks import CLASSIFICATION, hidden_width, num_hidden_states, task_of
from .base import Context, Signal


def pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D] -> masked mean over tokens; [B, C, H, W] -> spatial mean."""
    if h.dim() == 4:
        return h.mean((2, 3))
    if mask is None or mask.dim() != 2:
        return h.mean(1)
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


class SelfDistillation(Signal):
    normalizer = "examples"
    teacher_free = True

    def __init__(self, name="self_distill", weight=1.0, *, exits: list[int], temperature: float = 3.0,
                 feature_weight: float = 0.0):
        super().__init__(name, weight)
        if not exits:
            raise ValueError("self-distillation needs at least one exit layer (a hidden-state index)")
        self.exits, self.temperature, self.feature_weight = list(exits), float(temperature), float(feature_weight)
        self.heads = nn.ModuleList()

    def needs(self, side: str) -> Needs:
        return Needs(logits=True, hidden={*self.exits, -1}) if side == "student" else Needs()

    def check(self, teacher, student) -> None:
        if task_of(student) != CLASSIFICATION:
            raise ValueError("self-distillation exits are classifier heads: the student must be a classifier")
        config = student.config
        sizes = getattr(config, "hidden_sizes", None)  # CNNs: the embedder output, then one state per stage
        n = len(sizes) + 1 if sizes else num_hidden_states(config)
        if any(not -n <= e < n for e in self.exits):
            raise ValueError(f"exit layers {self.exits} out of range: the model has hidden states 0..{n - 1}")
        if not len(self.heads):
            width = _exit_width(student, config)
            self.heads.extend(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, config.num_labels)) for w in
                              (width(e) for e in self.exits))

    def exit_logits(self, hidden: dict, mask=None) -> list[torch.Tensor]:
        """The exits' class logits from the model's hidden states (output_hidden_states=True), for early exits."""
        return [head(pool(hidden[e], mask)) for head, e in zip(self.heads, self.exits)]

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        mask, labels = ctx.masks["hidden"], ctx.labels
        final = ctx.student.logits.detach()
        deep = pool(ctx.student.hidden[-1], mask).detach()
        total = 0.0
        for logits, e in zip(self.exit_logits(ctx.student.hidden, mask), self.exits):
            total = total + forward_kl(logits, final, temperature=self.temperature, mask=ctx.masks["kd"],
                                       reduction="sum")
            if labels is not None:
                total = total + F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            if self.feature_weight > 0:
                shallow = pool(ctx.student.hidden[e], mask)
                if shallow.shape == deep.shape:
                    total = total + self.feature_weight * (shallow - deep).pow(2).sum(-1).sum()
        return total / len(self.exits)


def _exit_width(student, config):
    """The width of hidden state ``e`` (transformers: hidden_size; CNNs: the stage's channels)."""
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:  # ResNet-style: hidden state 0 is the embedder output, then one per stage
        widths = [getattr(config, "embedding_size", sizes[0])] + list(sizes)
        return lambda e: widths[e]
    width = hidden_width(config)
    return lambda e: width
