"""Gradient matching: the student should react to its input as the teacher does.

Both signals read g = d(task loss on the ground truth)/d(input), w.r.t. the pixels (images) or the input token
embeddings (text; teacher and student embeddings must have the same width). The teacher's gradient needs a
backward through the teacher, so its pass runs outside ``inference_mode``; the student's needs a double backward
(``create_graph=True``). Cost per step: docs/methods.md.

* :class:`InputGradient` (Sobolev training, Czarnecki et al. 2017): ||g_T - g_S||^2 per example (per token for
  text).
* :class:`FeatureGradient`: the same at intermediate features (gradients w.r.t. the outputs of mapped named
  modules), through an adapter where widths differ.
* :class:`AdversarialGradient` (GREAT, Sinha et al. 2018): a small discriminator D learns to tell g_T (real) from
  g_S (fake); the student is trained to fool it, -log sigmoid(D(g_S)). D is this signal's trainable part: it is
  trained by the same optimizer step on its own loss (the student's term reaches D with D's parameters detached,
  D's term reaches D with g_S detached), clipped and checkpointed with the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..flow.capture import Needs, dummy_inputs
from ..losses import great_discriminator_loss, great_generator_loss, input_gradient_matching, match_spatial
from ..flow.tasks import base_model_of
from .base import Context, Signal
from .hints import as_map, module_adapters


POOL = 8  # GREAT's discriminator reads image gradients average-pooled to POOL x POOL per channel


def input_width(teacher, student, what: str) -> int:
    """Channels of the pixels both models read (the same tensor), or the shared token-embedding width."""
    if "pixel_values" in dummy_inputs(student):
        return base_model_of(student).config.num_channels
    t, s = (base_model_of(m).get_input_embeddings().embedding_dim for m in (teacher, student))
    if t != s:
        raise ValueError(f"{what}: teacher token embeddings have width {t}, the student's {s}; input gradients "
                         "are compared element by element, so the widths must match (keep the teacher's width)")
    return s


class InputGradient(Signal):
    """Sobolev training: squared distance of the task loss's input gradients, teacher vs student."""

    normalizer = "hidden"  # non-padding tokens for text, examples for images

    def __init__(self, name="input_gradient", weight=1.0, teacher=None):
        super().__init__(name, weight, teacher)

    def needs(self, side: str) -> Needs:
        return Needs(input_grad=True)

    def check(self, teacher, student) -> None:
        input_width(teacher, student, "input-gradient matching")

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        g_s, g_t = ctx.student.input_grad, ctx.teacher_for(self).input_grad
        mask = ctx.masks["hidden"]
        if g_s.dim() == 3:  # token embeddings [B, T, D]: per token
            return input_gradient_matching(g_s, g_t, mask=mask, reduction="sum")
        return (input_gradient_matching(g_s, g_t, reduction="none") * mask).sum()


class AdversarialGradient(Signal):
    """GREAT: the student's input gradients made indistinguishable from the teacher's by a discriminator."""

    normalizer = "examples"

    def __init__(self, name="great", weight=1.0, *, hidden: int = 64, teacher=None):
        super().__init__(name, weight, teacher)
        self.hidden = hidden
        self.discriminator = nn.Sequential()

    def needs(self, side: str) -> Needs:
        return Needs(input_grad=True)

    def check(self, teacher, student) -> None:
        width = input_width(teacher, student, "GREAT")
        if "pixel_values" in dummy_inputs(student):
            width *= POOL * POOL
        if not len(self.discriminator):
            self.discriminator.extend([nn.Linear(width, self.hidden), nn.LeakyReLU(0.2), nn.Linear(self.hidden, 1)])

    def _features(self, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per example: the pixels' gradient pooled to POOL x POOL per channel, or the mean over real
        tokens of the embeddings' gradient."""
        if g.dim() == 3:
            m = mask.unsqueeze(-1).to(g.dtype)
            return (g * m).sum(1) / m.sum(1).clamp(min=1)
        return F.adaptive_avg_pool2d(g, POOL).flatten(1)

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        mask = ctx.masks["hidden"]
        f_s, f_t = self._features(ctx.student.input_grad, mask), self._features(ctx.teacher_for(self).input_grad, mask)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fool = great_generator_loss(functional_call(self.discriminator, frozen, (f_s,)).squeeze(-1), reduction="sum")
        tell = great_discriminator_loss(self.discriminator(f_t).squeeze(-1),
                                        self.discriminator(f_s.detach()).squeeze(-1), reduction="sum")
        return fool + tell


class FeatureGradient(Signal):
    """Gradient matching at intermediate features: ||A(dL_S/dF_S) - dL_T/dF_T||^2 per example (per token for token
    states), where F are the outputs of mapped named modules and A is an adapter (Linear for token states, 1x1 conv
    + BatchNorm for feature maps) where widths differ; spatial sizes matched by pooling. The task loss is the same
    for both models, on the ground truth."""

    normalizer = "hidden"

    def __init__(self, name="feature_gradient", weight=1.0, *, pairs, teacher=None):
        super().__init__(name, weight, teacher)
        self.pairs = [tuple(p) for p in pairs]
        if not self.pairs:
            raise ValueError("feature-gradient signal: give at least one (teacher_module, student_module) pair")
        self.adapters = nn.ModuleList()

    def needs(self, side: str) -> Needs:
        return Needs(module_grads={t if side == "teacher" else s for t, s in self.pairs})

    def check(self, teacher, student) -> None:
        if not len(self.adapters):
            self.adapters.extend(module_adapters(teacher, student, self.pairs, field="feature_grad_layers"))

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        mask, total = ctx.masks["hidden"], 0.0
        for adapter, (t, s) in zip(self.adapters, self.pairs):
            g_s, g_t = ctx.student.module_grads[s], ctx.teacher_for(self).module_grads[t]
            if g_s.dim() == 4 or g_t.dim() == 4:
                g_s, g_t = (as_map(g) if g.dim() == 3 else g for g in (g_s, g_t))
                g_s, g_t = match_spatial(adapter(g_s), g_t)
                total = total + (input_gradient_matching(g_s, g_t, reduction="none") * mask).sum()
            elif mask.dim() == 2:
                total = total + input_gradient_matching(adapter(g_s), g_t, mask=mask, reduction="sum")
            else:  # images with token states: per example
                total = total + (input_gradient_matching(adapter(g_s), g_t, reduction="none") * mask).sum()
        return total / len(self.pairs)
