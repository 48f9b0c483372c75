"""Augmentation consistency: k augmented views of every example, teacher and student matched on each view.

:class:`MultiViewCollator` wraps a collator: every example of a batch appears ``views`` times, each view passed
through ``augment``. The teacher and the student both see each view (one pass each over the enlarged batch),
and every loss normalised by examples or tokens averages over the views. The task loss sees the views too
(labels are repeated), which is ordinary data augmentation; the distillation terms become the consistency of
the student with the teacher under the augmentation. Augmentations for images (:func:`random_shift`) and text
(:func:`token_dropout`, replacing tokens by a mask token) are provided; any ``fn(batch, generator) -> batch``
works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import default_data_collator


def random_shift(pixels: int = 2, fill: float | None = None):
    """Images: translate each view by up to ``pixels`` in each direction. The uncovered border repeats the image's
    edge pixels (``fill=None``: right for normalised images whose background is not 0) or takes ``fill``."""
    def augment(batch: dict, gen: torch.Generator) -> dict:
        x = batch["pixel_values"]
        shifts = torch.randint(-pixels, pixels + 1, (x.shape[0], 2), generator=gen)
        pad = (pixels, pixels, pixels, pixels)
        padded = F.pad(x, pad, mode="replicate") if fill is None else F.pad(x, pad, value=fill)
        h, w = x.shape[-2:]
        out = torch.stack([padded[i, :, pixels + dy:pixels + dy + h, pixels + dx:pixels + dx + w]
                           for i, (dy, dx) in enumerate(shifts.tolist())])
        return {**batch, "pixel_values": out}
    return augment


def token_dropout(mask_token_id: int, p: float = 0.1):
    """Text: replace each non-padding token by ``mask_token_id`` with probability ``p`` (labels untouched)."""
    def augment(batch: dict, gen: torch.Generator) -> dict:
        ids = batch["input_ids"]
        real = batch.get("attention_mask", torch.ones_like(ids)).bool()
        drop = (torch.rand(ids.shape, generator=gen) < p) & real
        return {**batch, "input_ids": torch.where(drop, torch.full_like(ids, mask_token_id), ids)}
    return augment


class MultiViewCollator:
    """``collator`` (default: transformers' default_data_collator), then ``views`` augmented copies of the batch
    stacked along the batch dimension (the first view unaugmented when ``keep_original``)."""

    def __init__(self, augment, views: int = 2, collator=None, keep_original: bool = True, seed: int = 0):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.augment, self.views, self.keep_original = augment, views, keep_original
        self.collator = collator or default_data_collator
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, features: list) -> dict:
        batch = self.collator(features)
        copies = [batch if i == 0 and self.keep_original else self.augment(batch, self.gen)
                  for i in range(self.views)]
        return {k: torch.cat([c[k] for c in copies]) if torch.is_tensor(v) else v for k, v in batch.items()}
