"""Turning model outputs into the tensors the losses compare: task kinds, position masks, layer maps,
projections."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.auto import modeling_auto as auto

CAUSAL_LM, MASKED_LM, CLASSIFICATION = "causal_lm", "masked_lm", "classification"
ENCODER = "encoder"  # a plain base model (e.g. BertModel): no head, no logits, hidden-state losses only

_TASK_MAPPINGS = (
    (CAUSAL_LM, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ("ForCausalLM", "LMHeadModel")),
    (MASKED_LM, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, ("ForMaskedLM",)),
    (CLASSIFICATION, auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, ("ForImageClassification",)),
    (CLASSIFICATION, auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, ("ForSequenceClassification",)),
)


def base_model_of(model: nn.Module) -> nn.Module:
    """The plain transformers model under PEFT / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def task_of(model: nn.Module) -> str:
    """'causal_lm', 'masked_lm', 'classification' or 'encoder' (a head-less base model), from the model's class."""
    name = type(base_model_of(model)).__name__
    for task, mapping, suffixes in _TASK_MAPPINGS:
        if name in mapping.values() or name.endswith(suffixes):
            return task
    if name in auto.MODEL_MAPPING_NAMES.values() or name.endswith("Model"):
        return ENCODER
    raise ValueError(f"{name} is not a causal LM, masked LM or classification model; hf_kd distills "
                     "AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForImageClassification and "
                     "AutoModelForSequenceClassification models")


def position_masks(batch: dict, task: str, kd_positions: str = "all") -> dict[str, torch.Tensor]:
    """Boolean masks of the positions each loss counts, for one batch.

    Causal LM: position i predicts token i+1, so masks have length T-1 and come from labels[:, 1:]
    (or attention_mask[:, 1:] without labels). Masked LM: 'task' = labels != -100, 'kd' = all
    non-padding tokens or only labelled ones. Classification: one position per example. Encoder: only 'hidden'.
    'hidden' counts the positions of hidden-state losses (non-padding tokens; examples for images).
    """
    labels = batch.get("labels")
    ids = batch.get("input_ids")
    attn = batch.get("attention_mask")
    if ids is not None:
        attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
    masks = {}
    if task == CAUSAL_LM:
        masks["kd"] = labels[:, 1:] != -100 if labels is not None else attn[:, 1:]
        if labels is not None:
            masks["task"] = labels[:, 1:] != -100
    elif task == MASKED_LM:
        if labels is not None:
            masks["task"] = labels != -100
        masks["kd"] = masks["task"] if kd_positions == "labels" and labels is not None else attn
    elif task == ENCODER:
        pass  # no logits and no task loss: only the hidden mask below
    else:
        n = (ids if ids is not None else batch["pixel_values"]).shape[0]
        examples = torch.ones(n, dtype=torch.bool, device=(ids if ids is not None else batch["pixel_values"]).device)
        masks["kd"] = examples if labels is None else labels.reshape(n, -1)[:, 0] != -100
        if labels is not None:
            masks["task"] = masks["kd"]
    masks["hidden"] = attn if ids is not None else masks["kd"]
    return masks


def num_hidden_states(config) -> int:
    """Number of hidden states a model returns (embeddings output + one per layer)."""
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name) + 1
    raise ValueError(f"cannot find the layer count of {type(config).__name__}")


def hidden_width(config) -> int:
    for name in ("hidden_size", "n_embd", "dim", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"hidden-state losses need [batch, tokens, width] states; {type(config).__name__} has no "
                     "hidden width (hidden_size): set hidden_weight=0 for this model")


def default_layer_map(teacher_config, student_config) -> list[tuple[int, int]]:
    """Teacher:student hidden-state pairs.

    If make_student recorded the kept teacher layers, student layer j (hidden state j+1) pairs with the
    output of teacher layer kept[j]; otherwise student states are spread uniformly over the teacher's.
    The embedding outputs (index 0) are always paired.
    """
    n_t, n_s = num_hidden_states(teacher_config) - 1, num_hidden_states(student_config) - 1
    kept = getattr(student_config, "hf_kd_teacher_layers", None)
    if kept is not None and len(kept) == n_s and max(kept) < n_t:
        return [(0, 0)] + [(int(t) + 1, j + 1) for j, t in enumerate(kept)]
    return [(round(j * n_t / n_s), j) for j in range(n_s + 1)]


def check_layer_map(pairs, teacher_config, student_config) -> None:
    n_t, n_s = num_hidden_states(teacher_config), num_hidden_states(student_config)
    for t, s in pairs:
        if not (0 <= t < n_t and 0 <= s < n_s):
            raise ValueError(f"layer_map pair {t}:{s} is out of range: the teacher has hidden states 0..{n_t - 1} "
                             f"and the student 0..{n_s - 1} (0 = embeddings)")


def build_projections(pairs, teacher_config, student_config, use_projection: bool) -> nn.ModuleList:
    """One Linear(student_dim, teacher_dim) per pair where widths differ (Identity where they match)."""
    if not pairs:
        return nn.ModuleList()
    d_t, d_s = hidden_width(teacher_config), hidden_width(student_config)
    if d_t == d_s:
        return nn.ModuleList(nn.Identity() for _ in pairs)
    if not use_projection:
        raise ValueError(f"hidden sizes differ (teacher {d_t}, student {d_s}) and use_projection is off: "
                         "set use_projection=True or hidden_weight=0")
    return nn.ModuleList(nn.Linear(d_s, d_t) for _ in pairs)
