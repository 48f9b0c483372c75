"""Loss-weight and temperature schedules ("progressive alpha", temperature annealing).

With ``weight_schedule`` "linear" or "cosine", each of alpha_task, kd_weight, hidden_weight and temperature that
has an ``*_end`` value moves from its configured value at step 0 to the end value at the last step; the others
stay. The value at a step depends only on (step, max_steps), so a resumed run continues the same curve.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

SCHEDULES = ("constant", "linear", "cosine")
SCHEDULED = ("alpha_task", "kd_weight", "hidden_weight", "temperature")


def schedule_fraction(kind: str, step: int, total: int) -> float:
    """How far along the schedule ``kind`` is at optimizer step ``step`` (0-based) of ``total``: 0 at the first
    step, 1 at the last."""
    if kind not in SCHEDULES:
        raise ValueError(f"weight_schedule {kind!r} unknown; choose one of {list(SCHEDULES)}")
    if kind == "constant" or total <= 1:
        return 0.0
    x = min(max(step / (total - 1), 0.0), 1.0)  # steps 0 .. total - 1: the last step trains at the end value
    return x if kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * x))


def peak_value(args, name: str) -> float:
    """The largest value ``name`` takes during training (decides which losses and signals are built); read before
    training starts, while the field still holds its configured value."""
    end, value = getattr(args, f"{name}_end", None), getattr(args, name)
    return value if end is None else max(value, end)


class LossSchedule(TrainerCallback):
    """Sets the scheduled fields of the trainer's args before every optimizer step (and at the start of a
    resumed run), from their values when the trainer was built."""

    def __init__(self, args):
        self.starts = {name: getattr(args, name) for name in SCHEDULED}

    def values(self, args, step: int, total: int) -> dict[str, float]:
        """The scheduled fields' values at ``step``: {field: value} for the fields with an ``*_end``."""
        f = schedule_fraction(args.weight_schedule, step, total)
        return {name: self.starts[name] + f * (getattr(args, f"{name}_end") - self.starts[name])
                for name in SCHEDULED if getattr(args, f"{name}_end") is not None}

    def _apply(self, args, state) -> None:
        for name, value in self.values(args, state.global_step, state.max_steps).items():
            setattr(args, name, value)

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(args, state)
