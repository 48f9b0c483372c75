"""A curriculum of teacher checkpoints: route-constrained optimisation (Jin et al. 2019).

The student learns from a sequence of the teacher's own training checkpoints, early to final, each for a fraction of
training: an easier route than the final teacher alone. :class:`TeacherCurriculum` loads the checkpoint of the
current stage into the teacher in place (one set of teacher weights in memory at a time), at the start of training
(so a resumed run loads the stage of its step) and whenever a step crosses a switch point. The stage in use is
logged as ``teacher_checkpoint``.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from .tasks import base_model_of


def read_weights(folder: str) -> dict:
    """The state dict saved in a model folder (model.safetensors, sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(folder, shard)).items()}
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"teacher checkpoint {folder!r} holds no model.safetensors(.index.json) or "
                            "pytorch_model.bin: pass folders written by save_pretrained / Trainer checkpoints")


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
        model = base_model_of(self.teacher)
        result = model.load_state_dict(read_weights(self.checkpoints[index]), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise ValueError(f"teacher checkpoint {self.checkpoints[index]!r} does not fit the teacher: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        self.loaded = index

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)
