"""FitNets hints (Romero et al. 2015) on any named modules of teacher and student.

For each (teacher module, student module) pair, the student's output goes through an adapter to the teacher's
shape and is compared with ``hf_kd.losses.hint_loss``: plain MSE, or with ``normalize`` the squared distance of
L2-normalised features (the seeds' "feature similarity"). Adapters, sized by a shape probe at construction:

* token states [B, T, D]: a Linear(D_S, D_T) where widths differ;
* feature maps [B, C, H, W]: a 1x1 Conv (C_S -> C_T) + BatchNorm where channels differ; spatial sizes are matched
  by average-pooling the larger map (``hf_kd.losses.match_spatial``);
* a ViT teacher and a CNN student (or the reverse): the token states (the class token dropped) are laid out on their
  square patch grid [B, D, h, w] and treated as a feature map.

Normalised by the 'hidden' count: non-padding tokens for text, examples for images (per-example means).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..flow.capture import Needs, find_module, probe_shapes
from ..flow.tasks import base_model_of
from ..losses import hint_loss, match_spatial
from .base import Context, Signal


def as_map(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, D] patch tokens (a class token first when T - 1 is square) -> [B, D, h, w] on the patch grid."""
    b, t, d = tokens.shape
    side = math.isqrt(t)
    if side * side != t:
        if math.isqrt(t - 1) ** 2 != t - 1:
            raise ValueError(f"hint: cannot lay {t} tokens on a square patch grid (with or without a class token)")
        tokens, side = tokens[:, 1:], math.isqrt(t - 1)
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def on_grid(tokens: int) -> bool:
    """Whether ``tokens`` patch tokens (a class token first or not) lie on a square grid (:func:`as_map`)."""
    return math.isqrt(tokens) ** 2 == tokens or math.isqrt(tokens - 1) ** 2 == tokens - 1


def probe_pairs(teacher, student, pairs, field: str, maps: bool = False) -> tuple[dict, dict]:
    """Check module ``pairs`` at construction with a shape probe of both models: every module exists and outputs
    token states [B, T, D] or feature maps [B, C, H, W] (token states on a square patch grid where they meet a map,
    or always with ``maps``). Errors name ``field``, the module and what to change. Returns (teacher shapes,
    student shapes)."""
    shapes = {}
    for who, model, names in (("teacher", teacher, {t for t, _ in pairs}), ("student", student, {s for _, s in pairs})):
        for name in names:
            try:
                find_module(model, name)
            except ValueError as e:
                raise ValueError(f"{field}: {who} module {name!r} not found: {e}") from None
        shapes[who] = probe_shapes(model, names)
        for name, shape in shapes[who].items():
            if len(shape) not in (3, 4):
                raise ValueError(f"{field}: {who} module {name!r} outputs shape {shape}, not token states [B, T, D] "
                                 "or feature maps [B, C, H, W]: pair a module inside the body (an encoder stage or "
                                 "block), not a head or a pooler")
    images = {who: getattr(base_model_of(m), "main_input_name", "") == "pixel_values"
              for who, m in (("teacher", teacher), ("student", student))}
    for t, s in pairs:
        t_shape, s_shape = shapes["teacher"][t], shapes["student"][s]
        for who, name, shape in (("teacher", t, t_shape), ("student", s, s_shape)):
            as_image = maps or 4 in (len(t_shape), len(s_shape))
            if len(shape) == 3 and as_image and not (images[who] and on_grid(shape[1])):
                raise ValueError(f"{field}: {who} module {name!r} outputs {shape[1]} tokens, not patch tokens on a "
                                 "square grid (an image model's), so they cannot be compared as a feature map: pair "
                                 "modules that output feature maps or a vision transformer's patch tokens")
    return shapes["teacher"], shapes["student"]


def module_adapters(teacher, student, pairs, force: bool = False, field: str = "hint_layers") -> list[nn.Module]:
    """One adapter per (teacher module, student module) pair, sized by :func:`probe_pairs`."""
    t_shapes, s_shapes = probe_pairs(teacher, student, pairs, field)
    return [adapter_for(s_shapes[s], t_shapes[t], force) for t, s in pairs]


def adapter_for(s_shape: tuple, t_shape: tuple, force: bool = False) -> nn.Module:
    """The module that takes the student's feature to the teacher's width (channels for maps)."""
    as_maps = len(s_shape) == 4 or len(t_shape) == 4
    c_s = s_shape[1] if len(s_shape) == 4 else s_shape[-1]
    c_t = t_shape[1] if len(t_shape) == 4 else t_shape[-1]
    if c_s == c_t and not force:
        return nn.Identity()
    if as_maps:
        return nn.Sequential(nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t))
    return nn.Linear(c_s, c_t)


class Hint(Signal):
    """Hints on ``pairs`` of (teacher module name, student module name), averaged over the pairs."""

    normalizer = "hidden"

    def __init__(self, name="hint", weight=1.0, *, pairs, normalize: bool = False, adapter: bool = False,
                 teacher=None):
        super().__init__(name, weight, teacher)
        self.pairs = [tuple(p) for p in pairs]
        if not self.pairs:
            raise ValueError("hint signal: give at least one (teacher_module, student_module) pair")
        self.normalize, self.force_adapter = normalize, adapter
        self.adapters = nn.ModuleList()

    def needs(self, side: str) -> Needs:
        return Needs(modules={t if side == "teacher" else s for t, s in self.pairs})

    def check(self, teacher, student) -> None:
        if not len(self.adapters):  # built once (a resumed trainer reuses them)
            self.adapters.extend(module_adapters(teacher, student, self.pairs, self.force_adapter))

    def _pair_sum(self, adapter, h_s, h_t, mask) -> torch.Tensor:
        if h_s.dim() == 4 or h_t.dim() == 4:  # feature maps (token states of the other side laid on their grid)
            h_s, h_t = (as_map(h) if h.dim() == 3 else h for h in (h_s, h_t))
            h_s, h_t = match_spatial(adapter(h_s), h_t)
            return (hint_loss(h_s, h_t, normalize=self.normalize, reduction="none") * mask).sum()  # mask: [B]
        h_s = adapter(h_s)
        if h_s.shape != h_t.shape:
            raise ValueError(f"hint: student tokens {tuple(h_s.shape)} vs teacher {tuple(h_t.shape)} after the "
                             "adapter; token hints need the same number of tokens")
        if mask.dim() == 1:  # images with token states: per-example mean over tokens
            return (hint_loss(h_s, h_t, normalize=self.normalize, reduction="none").mean(-1) * mask).sum()
        return hint_loss(h_s, h_t, normalize=self.normalize, mask=mask, reduction="sum")

    def loss_sum(self, ctx: Context) -> torch.Tensor:
        mask = ctx.masks["hidden"]
        return sum(self._pair_sum(a, ctx.student.modules[s], ctx.teacher_for(self).modules[t], mask)
                   for a, (t, s) in zip(self.adapters, self.pairs)) / len(self.pairs)
