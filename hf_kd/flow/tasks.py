"""What kind of model a model is: causal LM, masked LM, classifier (image or sequence), or a head-less encoder."""

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


def weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s floating weights (its first floating parameter; None if it has none)."""
    return next((p.dtype for p in base_model_of(model).parameters() if p.is_floating_point()), None)


def as_model_dtype(model: nn.Module, inputs: dict) -> dict:
    """``inputs`` with every floating tensor (pixel values, input embeddings, any float column) cast to the dtype of
    ``model``'s weights; ids, masks, labels and non-tensors unchanged. The one place where a batch meets a model's
    precision: a bfloat16 teacher gets bfloat16 pixels, whatever dtype the collator made."""
    dtype = weights_dtype(model)
    if dtype is None:
        return inputs
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and v.dtype != dtype else v
            for k, v in inputs.items()}


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
