"""Feature-level losses: intermediate states, spatial attention maps, transformer attention probabilities.

Pure functions of tensors. Each takes an optional boolean ``mask`` over the positions (or examples) it scores and a
``reduction`` as in :mod:`hf_kd.losses.logits` ("sum", "mean" over counted positions, "none"). Computed in float32
(float64 inputs stay float64, so gradients can be checked exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logits import reduce

Tensor = torch.Tensor


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
                         "same shape (project the student's first)")


def hint_loss(student: Tensor, teacher: Tensor, *, normalize: bool = False, mask: Tensor | None = None,
              reduction: str = "sum") -> Tensor:
    """FitNets hints (Romero et al., ICLR 2015): the student's (projected) state regresses the teacher's.

    Token states [B, T, D] give one value per position ([B, T] ``mask``); feature maps [B, C, H, W] (or vectors
    [B, D]) one value per example ([B] ``mask``), the map flattened to a vector of C*H*W.

    normalize=False: mean over the vector of (s - t)^2.
    normalize=True: each vector is first L2-normalised (the normalised "feature similarity" form, a zero vector
    stays zero) and the value is the *sum* of (s/|s| - t/|t|)^2 = 2 - 2 cos(s, t), in [0, 4]; invariant to a
    positive rescaling of either side.
    """
    _same_shape(student, teacher, "hint_loss")
    if student.dim() == 3:
        s, t = _wide(student), _wide(teacher)
    elif student.dim() in (2, 4):
        s, t = _wide(student).reshape(student.shape[0], -1), _wide(teacher).reshape(teacher.shape[0], -1)
    else:
        raise ValueError(f"hint_loss expects token states [B, T, D], feature maps [B, C, H, W] or vectors [B, D], "
                         f"got {tuple(student.shape)}")
    if normalize:
        per_pos = (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1)
    else:
        per_pos = (s - t).pow(2).mean(-1)
    return reduce(per_pos, mask, reduction)


def spatial_attention_map(features: Tensor, p: float = 2) -> Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis, ICLR 2017, "Paying more attention to attention").

    [B, C, H, W] -> [B, H*W]: Q = mean over channels of |A_c|^p, flattened and L2-normalised per example (an
    all-zero map stays zero). Independent of C, and of a positive rescaling of the features.
    """
    if features.dim() != 4:
        raise ValueError(f"spatial_attention_map expects feature maps [B, C, H, W], got {tuple(features.shape)}")
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    q = _wide(features).abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, dim=1)


def match_spatial(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two maps [B, H, W] or [B, C, H, W] (channel counts may differ) to one spatial size.

    Each is adaptive-average-pooled to (min of the heights, min of the widths), so the larger map is pooled to
    the smaller one's size and a map already of that size is returned as is.
    """
    if student_map.dim() not in (3, 4) or teacher_map.dim() not in (3, 4):
        raise ValueError(f"match_spatial expects [B, H, W] or [B, C, H, W] maps, got {tuple(student_map.shape)} and "
                         f"{tuple(teacher_map.shape)}")
    size = (min(student_map.shape[-2], teacher_map.shape[-2]), min(student_map.shape[-1], teacher_map.shape[-1]))

    def fit(m: Tensor) -> Tensor:
        return m if tuple(m.shape[-2:]) == size else F.adaptive_avg_pool2d(m, size)

    return fit(student_map), fit(teacher_map)


def attention_transfer(student_features: Tensor, teacher_features: Tensor, *, p: float = 2,
                       mask: Tensor | None = None, reduction: str = "sum") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): per example ||Q_S - Q_T||_2^2, in [0, 2].

    Q = :func:`spatial_attention_map` of feature maps [B, C, H, W]; the channel counts may differ. When the
    spatial sizes differ, the features are first brought to the smaller size by :func:`match_spatial` (average
    pooling of the features, then the maps). ``mask``: [B] examples.
    """
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(f"attention_transfer: student has {student_features.shape[0]} examples, teacher "
                         f"{teacher_features.shape[0]}")
    s, t = match_spatial(_wide(student_features), _wide(teacher_features))
    per_example = (spatial_attention_map(s, p) - spatial_attention_map(t, p)).pow(2).sum(1)
    return reduce(per_example, mask, reduction)


def attention_probs_loss(student_probs: Tensor, teacher_probs: Tensor, *, kind: str = "kl",
                         mask: Tensor | None = None, reduction: str = "sum") -> Tensor:
    """Transformer self-attention distillation (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020).

    Inputs: attention probabilities [B, heads, T, T], each query row summing to 1 over the keys. With equal head
    counts, head h is compared with head h; otherwise each side is first averaged over its heads.

    kind="kl": KL(A_T || A_S) per query row = sum_k a_T log a_T - a_T log max(a_S, tiny), with 0 log 0 = 0, so
    exact zeros in the teacher (padded keys, causal masks) cost nothing, and a student zero where the teacher is
    positive costs a large finite a_T * log(1/tiny) rather than inf.
    kind="mse": mean over keys of (a_S - a_T)^2.

    The value of a query position is the mean over heads; ``mask`` [B, T] selects query positions (padded keys
    already have probability 0). Returns the reduction over [B, T].
    """
    if student_probs.dim() != 4 or teacher_probs.dim() != 4:
        raise ValueError(f"attention_probs_loss expects [B, heads, T, T], got {tuple(student_probs.shape)} and "
                         f"{tuple(teacher_probs.shape)}")
    if (student_probs.shape[0], *student_probs.shape[2:]) != (teacher_probs.shape[0], *teacher_probs.shape[2:]):
        raise ValueError(f"attention_probs_loss: batch and sequence sizes differ: student {tuple(student_probs.shape)}"
                         f", teacher {tuple(teacher_probs.shape)}")
    s, t = _wide(student_probs), _wide(teacher_probs)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    if kind == "kl":
        log_s = s.clamp_min(torch.finfo(s.dtype).tiny).log()
        per_row = (torch.xlogy(t, t) - t * log_s).sum(-1)
    elif kind == "mse":
        per_row = (s - t).pow(2).mean(-1)
    else:
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    return reduce(per_row.mean(1), mask, reduction)
