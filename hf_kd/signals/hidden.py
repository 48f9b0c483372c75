"""Hidden-state signals over a teacher:student layer map: matching the states (DistilBERT / TinyBERT style,
through learned projections where widths differ) and similarity preservation (Tung & Mori 2019)."""

from __future__ import annotations

from torch import nn

from ..flow.capture import Needs
from ..losses import HIDDEN_LOSSES
from ..losses.relational import pooled, similarity_preserving
from ..flow.tasks import hidden_width, num_hidden_states
from .base import Context, Signal


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


def layer_pairs_for(pairs, teacher, student) -> list[tuple[int, int]]:
    """The given pairs (checked) or the default map of the two models."""
    hidden_width(teacher.config), hidden_width(student.config)  # clear error for CNNs etc.
    pairs = list(pairs) if pairs else default_layer_map(teacher.config, student.config)
    check_layer_map(pairs, teacher.config, student.config)
    return pairs


def build_projections(pairs, teacher_config, student_config, use_projection: bool) -> nn.ModuleList:
    """One Linear(student_dim, teacher_dim) per pair where widths differ (Identity where they match)."""
    d_t, d_s = hidden_width(teacher_config), hidden_width(student_config)
    if d_t == d_s:
        return nn.ModuleList(nn.Identity() for _ in pairs)
    if not use_projection:
        raise ValueError(f"hidden sizes differ (teacher {d_t}, student {d_s}) and use_projection is off: "
                         "set use_projection=True or hidden_weight=0")
    return nn.ModuleList(nn.Linear(d_s, d_t) for _ in pairs)


class _LayerMapSignal(Signal):
    def __init__(self, name, weight, pairs, teacher=None):
        super().__init__(name, weight, teacher)
        self.pairs = [tuple(p) for p in pairs]
        if not self.pairs:
            raise ValueError(f"signal {name!r} needs at least one teacher:student layer pair")

    def needs(self, side: str) -> Needs:
        return Needs(hidden={t if side == "teacher" else s for t, s in self.pairs})


class HiddenStates(_LayerMapSignal):
    """Mean over the layer map of a per-token hidden-state loss (``hf_kd.losses.HIDDEN_LOSSES``: cosine =
    DistilBERT's 1 - cos, mse = FitNets / TinyBERT), the student's state projected to the teacher's width by a
    learned Linear where widths differ. Normalised by the non-padding tokens (examples for images, whose
    per-example value is the mean over patches)."""

    normalizer = "hidden"

    def __init__(self, name="hidden", weight=1.0, *, pairs, loss="cosine", projections: nn.ModuleList | None = None,
                 teacher=None):
        super().__init__(name, weight, pairs, teacher)
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss {loss!r} unknown; choose one of {sorted(HIDDEN_LOSSES)}")
        self.loss = loss
        self.projections = projections if projections is not None else nn.ModuleList(nn.Identity() for _ in pairs)

    def loss_sum(self, ctx: Context):
        fn, mask = HIDDEN_LOSSES[self.loss], ctx.masks["hidden"]
        total = 0.0
        for proj, (t, s) in zip(self.projections, self.pairs):
            h_s, h_t = proj(ctx.student.hidden[s]), ctx.teacher_for(self).hidden[t]
            if h_s.dim() != 3 or h_s.shape != h_t.shape:
                raise ValueError(f"hidden states {t}:{s} have shapes {tuple(h_t.shape)} (teacher) and "
                                 f"{tuple(h_s.shape)} (student): hidden losses need [batch, tokens, width] "
                                 "states with the same number of tokens")
            if mask.dim() == 1:  # images: one count per example, mean over patches
                total = total + (fn(h_s, h_t, reduction="none").mean(-1) * mask).sum()
            else:
                total = total + fn(h_s, h_t, mask=mask, reduction="sum")
        return total / len(self.pairs)


class SimilarityPreserving(_LayerMapSignal):
    """Similarity-preserving KD (Tung & Mori 2019) over the layer map: the b x b similarities of the examples'
    pooled hidden states, student vs teacher (any widths, no projection), per micro-batch (batches of 2+)."""

    normalizer = "batches"

    def loss_sum(self, ctx: Context):
        mask = ctx.masks["hidden"]
        mask = mask if mask.dim() == 2 else None  # images: every patch counts
        return sum(similarity_preserving(pooled(ctx.student.hidden[s], mask), pooled(ctx.teacher_for(self).hidden[t], mask))
                   for t, s in self.pairs) / len(self.pairs)
