"""The one place that owns position alignment: the causal shift and the positions each loss counts.

A causal LM's logits at position i predict token i+1, for the student and the teacher alike. Every loss that
reads a causal LM's per-position outputs (the task cross-entropy, logit distillation, a teacher cache, the
report's metrics) goes through :func:`predicting` and the masks of :func:`position_masks`, so the shift is
written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tasks import CAUSAL_LM, CLASSIFICATION, ENCODER, MASKED_LM

# The counts a loss can be normalised by; each is summed over the micro-batches of an optimizer step and over
# processes (hf_kd.trainer), so a loss does not depend on how a global batch is split.
COUNT_KEYS = ("task", "kd", "hidden", "examples", "batches")
KD_POSITIONS = ("auto", "all", "labels")


def predicting(x: torch.Tensor | None, task: str) -> torch.Tensor | None:
    """Per-position outputs [B, T, ...] restricted to the positions that predict something: [:, :-1] for a
    causal LM (position i predicts token i+1), unchanged otherwise."""
    return x[:, :-1] if x is not None and task == CAUSAL_LM else x


def targets(labels: torch.Tensor | None, task: str) -> torch.Tensor | None:
    """The labels the positions of :func:`predicting` are scored against: labels[:, 1:] for a causal LM."""
    return labels[:, 1:] if labels is not None and task == CAUSAL_LM else labels


def padded_to_length(x: torch.Tensor, fill) -> torch.Tensor:
    """A causal LM's [B, T-1] mask or label tensor padded back to [B, T] with ``fill`` at the last position
    (for kernels that walk all B*T rows of the unshifted logits)."""
    return torch.cat([x, torch.full_like(x[:, :1], fill)], dim=1)


def resolve_kd_positions(kd_positions: str, task: str) -> str:
    """'auto' = 'labels' for causal LMs (instruction data masks its prompts with -100), else 'all'."""
    if kd_positions not in KD_POSITIONS:
        raise ValueError(f"kd_positions {kd_positions!r} unknown; choose one of {list(KD_POSITIONS)}")
    if kd_positions == "auto":
        return "labels" if task == CAUSAL_LM else "all"
    return kd_positions


def _examples(batch: dict) -> torch.Tensor:
    first = batch.get("input_ids", batch.get("pixel_values", batch.get("inputs_embeds")))
    return torch.ones(first.shape[0], dtype=torch.bool, device=first.device)


def position_masks(batch: dict, task: str, kd_positions: str = "auto") -> dict[str, torch.Tensor]:
    """Boolean masks of the positions each loss counts, for one batch.

    'task': positions with a label (labels != -100), shifted for causal LMs. 'kd': the positions the teacher's
    outputs are matched on. With kd_positions 'all' every non-padding position (every example of a classifier)
    counts whether or not it has a label, so unlabelled examples (label -100: a transfer set, Hinton et al.
    2015) are distilled; with 'labels' only labelled positions count. 'hidden': non-padding tokens (examples
    for images). 'examples': one per example. Causal LMs: position i predicts token i+1, so 'task' and 'kd'
    have length T-1.
    """
    labels, ids, attn = batch.get("labels"), batch.get("input_ids"), batch.get("attention_mask")
    if ids is not None:
        attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
    mode = resolve_kd_positions(kd_positions, task)
    examples = _examples(batch)
    masks = {"examples": examples}
    if task == CAUSAL_LM:
        if labels is not None:
            masks["task"] = targets(labels, task) != -100
        # a position predicts a real token when the next token is not padding
        masks["kd"] = masks["task"] if mode == "labels" and labels is not None else targets(attn, task)
    elif task == MASKED_LM:
        if labels is not None:
            masks["task"] = labels != -100
        masks["kd"] = masks["task"] if mode == "labels" and labels is not None else attn
    elif task == CLASSIFICATION:
        if labels is not None:
            n = examples.shape[0]
            labelled = labels.reshape(n, -1)[:, 0] != -100
            masks["task"] = labelled
        masks["kd"] = masks["task"] if mode == "labels" and labels is not None else examples
    elif task != ENCODER:
        raise ValueError(f"unknown task {task!r}")
    masks["hidden"] = attn if ids is not None else examples
    return masks


def count(mask: torch.Tensor | None) -> float:
    return float(mask.sum()) if mask is not None else 0.0


def batch_counts(batch: dict, task: str, kd_positions: str = "auto") -> torch.Tensor:
    """The COUNT_KEYS counts of one micro-batch, as float64 [len(COUNT_KEYS)] on the CPU."""
    masks = position_masks(batch, task, kd_positions)
    values = [count(masks.get(k)) for k in COUNT_KEYS[:-1]] + [1.0]  # 'batches': one per micro-batch
    return torch.tensor(values, dtype=torch.float64)


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str, config) -> torch.Tensor:
    """The model's own loss, summed over labelled positions (the caller divides by the global count):
    cross-entropy for LMs and single-label classifiers, MSE for a regression head (num_labels=1), binary
    cross-entropy for multi-label classifiers."""
    logits, labels = predicting(logits, task), targets(labels, task)
    regression = task == CLASSIFICATION and config.num_labels == 1
    multi_label = task == CLASSIFICATION and config.problem_type == "multi_label_classification"
    if regression:
        keep = labels.float() != -100
        return F.mse_loss(logits.float().squeeze(-1)[keep], labels.float()[keep], reduction="sum")
    if multi_label:
        keep = (labels != -100).all(-1)
        return F.binary_cross_entropy_with_logits(logits.float()[keep], labels.float()[keep], reduction="sum")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
