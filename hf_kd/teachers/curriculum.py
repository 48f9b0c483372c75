"""A curriculum of teacher checkpoints: route-constrained optimisation (Jin et al. 2019).

The student learns from a sequence of the teacher's own training checkpoints, early to final, each for a fraction of
training: an easier route than the final teacher alone. :class:`TeacherCurriculum` loads the checkpoint of the
current stage into the teacher in place (one set of teacher weights in memory at a time), at the start of training
(so a resumed run loads the stage of its step) and whenever a step crosses a switch point. The stage in use is
logged as ``teacher_checkpoint``.
"""

from __future__ import annotations

import os
import warnings

from torch import nn
from transformers import TrainerCallback

from ..flow.tasks import base_model_of


def load_weights(model: nn.Module, folder: str) -> None:
    """Load the weights saved in ``folder`` (save_pretrained / Trainer checkpoint) into ``model`` in place.

    Read through ``from_pretrained`` of the model's class, so checkpoints in an older layout (renamed keys) load as
    transformers loads them; the folder's weights are in memory twice only while they are copied. Refuses a
    folder whose weights do not fit the model."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint {folder!r} not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded = type(model).from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint {folder!r} does not fit the model: {e}") from e
    state = loaded.state_dict()
    del loaded
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not k.startswith("hf_kd_signals.")]
    if result.unexpected_keys or missing:
        raise ValueError(f"checkpoint {folder!r} does not fit the model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")


def switch_points(n: int, switch_at: list[float] | None) -> list[float]:
    """Fractions of training where checkpoint i+1 takes over from i: given, or evenly spaced."""
    points = list(switch_at) if switch_at else [i / n for i in range(1, n)]
    if len(points) != n - 1 or any(not 0 < p < 1 for p in points) or points != sorted(points):
        raise ValueError(f"teacher_switch_at {switch_at}: give {n - 1} increasing fractions in (0, 1) for {n} "
                         "teacher checkpoints")
    return points


class TeacherCurriculum(TrainerCallback):
    def __init__(self, teacher, checkpoints: list[str], switch_at: list[float] | None = None):
        missing = [c for c in checkpoints if not os.path.isdir(c)]
        if missing:
            raise FileNotFoundError(f"teacher checkpoints not found: {missing}")
        self.teacher, self.checkpoints = teacher, list(checkpoints)
        self.points = switch_points(len(checkpoints), switch_at)
        self.loaded = None

    def stage(self, step: int, total: int) -> int:
        fraction = step / max(total - 1, 1)
        return sum(fraction >= p for p in self.points)

    def _apply(self, state) -> None:
        index = self.stage(state.global_step, state.max_steps)
        if index == self.loaded:
            return
        load_weights(base_model_of(self.teacher), self.checkpoints[index])
        self.loaded = index

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)
