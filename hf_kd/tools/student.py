"""Build a smaller student from a teacher by keeping a subset of its transformer blocks.

The block list is discovered from the model's structure (no per-architecture tables): it is the
``nn.ModuleList`` of identical-class blocks whose length equals the config's layer count.

Layer selection strategies for ``num_layers=N`` out of ``L`` teacher layers (0-based indices):

* ``"distilbert"``: a spread that always keeps the first and the last layer and is symmetric
  around the middle. With ``s = (L - 1) / (N - 1)``, the first ``ceil(N / 2)`` layers are
  ``floor(i * s)`` counted from the bottom and the remaining ``floor(N / 2)`` are mirrored from
  the top, ``L - 1 - floor(i * s)``. For 12 -> 6 this gives DistilBERT's ``[0, 2, 4, 7, 9, 11]``.
  ``N == 1`` keeps layer 0.
* ``"uniform"``: every k-th layer counted from the bottom, ending at the last layer (TinyBERT's
  uniform mapping): ``(i + 1) * L // N - 1``. For 12 -> 6: ``[1, 3, 5, 7, 9, 11]``; 12 -> 4:
  ``[2, 5, 8, 11]``.
* ``"first"``: ``[0 .. N-1]``; ``"last"``: ``[L-N .. L-1]``.
* ``"importance"``: the N layers with the highest block influence ``1 - cos(input, output)``
  (see :func:`layer_importance`), returned in ascending index order.

Provenance is stored on the student config and survives ``save_pretrained``/``from_pretrained``:
``hf_kd_teacher_layers`` (kept teacher indices) and, for ``"importance"``, ``hf_kd_layer_scores``
(the score of every teacher layer).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from itertools import chain

import torch
from torch import nn

from ..flow.layers import LAYER_COUNT_ATTRIBUTES, _layer_counts, find_layers  # noqa: F401 (re-exported)
from ..flow.tasks import as_model_dtype

STRATEGIES = ("distilbert", "uniform", "first", "last", "importance")


def select_layers(total: int, num_layers: int, strategy: str = "distilbert") -> list[int]:
    """Teacher layer indices to keep for a non-data-driven strategy (see module docstring)."""
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be between 1 and the teacher's {total} layers, got {num_layers}")
    if strategy == "first":
        return list(range(num_layers))
    if strategy == "last":
        return list(range(total - num_layers, total))
    if strategy == "uniform":
        return [(i + 1) * total // num_layers - 1 for i in range(num_layers)]
    if strategy == "distilbert":
        if num_layers == 1:
            return [0]
        bottom = (num_layers + 1) // 2
        spread = [i * (total - 1) // (num_layers - 1) for i in range(num_layers)]
        return spread[:bottom] + [total - 1 - step for step in reversed(spread[: num_layers - bottom])]
    if strategy == "importance":
        raise ValueError('strategy="importance" needs calibration data: use make_student(..., calibration_batches=...)')
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


@torch.no_grad()
def layer_importance(
    model: nn.Module, batches: Iterable[Mapping[str, object]], *, layers_path: str | None = None
) -> list[float]:
    """Block influence of every layer: ``1 - cos(block input, block output)`` per token, averaged
    over all tokens of all batches, ignoring positions where ``attention_mask`` is 0.

    The block inputs/outputs are captured with forward hooks rather than read from
    ``output_hidden_states``, because decoders (GPT-2, Llama, ...) report the *final-normed* state
    as the last hidden state, which would distort the last layer's score. The model runs in eval
    mode under ``no_grad``; its training mode is restored afterwards.
    """
    _, blocks = find_layers(model, layers_path)
    sums, counts = [0.0] * len(blocks), [0.0] * len(blocks)
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def recorder(index: int):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs.get("hidden_states")
            after = output[0] if isinstance(output, (tuple, list)) else output
            if not (torch.is_tensor(before) and torch.is_tensor(after)):
                raise ValueError(f"{type(module).__name__}: cannot read the block's hidden states")
            influence = 1 - nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            mask = current["mask"]
            weight = mask.to(influence) if mask is not None and mask.shape == influence.shape else torch.ones_like(influence)
            sums[index] += (influence * weight).sum().item()
            counts[index] += weight.sum().item()

        return hook

    was_training = model.training
    hooks = [block.register_forward_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model.eval()
        device = next(model.parameters()).device
        for batch in batches:
            batch = as_model_dtype(model, {key: value.to(device) if torch.is_tensor(value) else value
                                           for key, value in batch.items()})
            current["mask"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    if min(counts) == 0:
        raise ValueError("layer_importance: the calibration batches contained no (non-padding) tokens")
    return [total / count for total, count in zip(sums, counts)]


def make_student(
    teacher: nn.Module,
    layers: Iterable[int] | None = None,
    *,
    num_layers: int | None = None,
    strategy: str = "distilbert",
    calibration_batches: Iterable[Mapping[str, object]] | None = None,
    layers_path: str | None = None,
):
    """A new model of the teacher's class holding a subset of its layers.

    Give either ``layers`` (teacher indices; sorted silently, duplicates / out-of-range raise) or
    ``num_layers`` with a ``strategy``. Every weight outside the block list (embeddings, final norm,
    heads) is copied too; dtypes and devices follow the teacher, tied weights stay tied, and the
    teacher is not modified. The student's config has its layer count and per-layer lists cut, and
    records ``hf_kd_teacher_layers`` (plus ``hf_kd_layer_scores`` for ``"importance"``).

    Note: the copied blocks get ``layer_idx`` 0..n-1 (what the KV cache needs), so features that
    depend on the absolute index, e.g. GPT-2's ``scale_attn_by_inverse_layer_idx``, follow the new index.
    """
    path, blocks = find_layers(teacher, layers_path)
    total, scores = len(blocks), None
    if layers is not None:
        if num_layers is not None:
            raise ValueError("pass either layers or num_layers, not both")
        kept = _check_layers(layers, total)
    elif num_layers is None:
        raise ValueError("pass layers=[teacher indices] or num_layers=N")
    elif strategy == "importance":
        if calibration_batches is None:
            raise ValueError('strategy="importance" needs calibration_batches (an iterable of model-input dicts)')
        select_layers(total, num_layers, "first")  # validates num_layers
        scores = layer_importance(teacher, calibration_batches, layers_path=path)
        kept = sorted(sorted(range(total), key=lambda i: -scores[i])[:num_layers])
    else:
        kept = select_layers(total, num_layers, strategy)

    config = _student_config(teacher.config, total, kept)
    config.hf_kd_teacher_layers = kept
    if scores is not None:
        config.hf_kd_layer_scores = scores
    student = type(teacher)(config)
    teacher_tensors = dict(chain(teacher.named_parameters(), teacher.named_buffers()))
    _match_dtype_and_device(student, _remap(teacher_tensors, path, kept))
    student.load_state_dict(_remap(teacher.state_dict(), path, kept), strict=True)
    _renumber_layer_idx(student.get_submodule(path))
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student


def _check_layers(layers: Iterable[int], total: int) -> list[int]:
    kept = sorted(int(index) for index in layers)
    if not kept:
        raise ValueError("layers is empty: keep at least one teacher layer")
    if len(set(kept)) != len(kept):
        raise ValueError(f"layers contains duplicates: {kept}")
    if kept[0] < 0 or kept[-1] >= total:
        raise ValueError(f"layers {kept} out of range: the teacher has layers 0..{total - 1}")
    return kept


def _is_per_layer(key: str, value: object, total: int) -> bool:
    """A config list with one entry per layer (e.g. ``layer_types``). Token-id lists and
    ``architectures`` are never per-layer even when their length happens to match."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == total
        and not key.startswith("_")
        and key != "architectures"
        and "token" not in key
    )


def _student_config(teacher_config, total: int, kept: list[int]):
    config = copy.deepcopy(teacher_config)
    names = [name for name, value in _layer_counts(config).items() if value == total]
    if not names:
        raise ValueError(
            f"{type(config).__name__} has no layer-count attribute ({', '.join(LAYER_COUNT_ATTRIBUTES)}) "
            f"equal to the {total} layers found"
        )
    for key in [key for key in vars(config) if key.startswith("hf_kd_")]:  # stale provenance
        delattr(config, key)
    for name in names:
        setattr(config, name, len(kept))
    for key, value in list(vars(config).items()):
        if _is_per_layer(key, value, total):
            setattr(config, key, type(value)(value[i] for i in kept))
    return config


def _remap(tensors: Mapping[str, torch.Tensor], path: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """Rename ``<path>.<kept[j]>.*`` to ``<path>.<j>.*``; drop other layers; keep everything else."""
    prefix, new_index = path + ".", {old: new for new, old in enumerate(kept)}
    result = {}
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        result[key] = tensor
    return result


def _match_dtype_and_device(student: nn.Module, source: Mapping[str, torch.Tensor]) -> None:
    """Give each student tensor its teacher counterpart's dtype and device (mixed dtypes kept)."""
    for name, tensor in chain(student.named_parameters(), student.named_buffers()):
        reference = source.get(name)
        if reference is not None and (tensor.dtype, tensor.device) != (reference.dtype, reference.device):
            tensor.data = tensor.data.to(device=reference.device, dtype=reference.dtype)


def _renumber_layer_idx(blocks: nn.ModuleList) -> None:
    """Set ``layer_idx`` (used by the KV cache) to the block's new position wherever it exists."""
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
