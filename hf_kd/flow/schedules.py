"""Schedules: the value of a loss weight or a temperature at an optimizer step.

A :class:`Schedule` moves from ``start`` to ``end`` over training with a shape ``kind``:

* constant  ``start`` throughout (``end`` unused)
* linear    ``start + f (end - start)`` with f = step / (total - 1)
* cosine    ``start + (1 - cos(pi f)) / 2 (end - start)``
* step      ``start`` before the fraction ``at`` of training, ``end`` from it on
* warmup    linear from ``start`` to ``end`` over the first ``at`` of training, then ``end`` (a ramp)

The value depends only on (step, total), so a resumed run continues the same curve, and nothing is written
back into the training arguments: the trainer asks each signal's schedule for its value at every step, and every
construction-time check reads :attr:`Schedule.peak`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine", "step", "warmup")
SCHEDULED = ("alpha_task", "kd_weight", "hidden_weight", "temperature")  # the config fields with an *_end


def schedule_fraction(kind: str, step: int, total: int, at: float = 0.5) -> float:
    """How far along a ``kind`` schedule is at optimizer step ``step`` (0-based) of ``total``: 0 at the first step,
    1 at the last (the last step trains at the end value)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r} unknown; choose one of {list(SCHEDULES)}")
    if kind == "constant" or total <= 1:
        return 0.0
    x = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "linear":
        return x
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    if kind == "step":
        return 1.0 if x >= at else 0.0
    return min(x / at, 1.0) if at > 0 else 1.0  # warmup


@dataclass(frozen=True)
class Schedule:
    """A value over training; ``Schedule.constant(v)`` or e.g. ``Schedule(0.0, 1.0, "warmup", at=0.1)``."""

    start: float
    end: float | None = None
    kind: str = "constant"
    at: float = 0.5  # step: where the jump happens; warmup: the length of the ramp (fractions of training)

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r} unknown; choose one of {list(SCHEDULES)}")
        if self.kind != "constant" and self.end is None:
            raise ValueError(f"a {self.kind!r} schedule needs an end value")
        if not 0.0 <= self.at <= 1.0:
            raise ValueError(f"schedule fraction 'at' must be in [0, 1], got {self.at}")
        for v in (self.start, self.end):
            if v is not None and not math.isfinite(v):
                raise ValueError(f"schedule values must be finite, got {v}")

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls(float(value))

    def value(self, step: int, total: int) -> float:
        if self.kind == "constant" or self.end is None:
            return self.start
        return self.start + schedule_fraction(self.kind, step, total, self.at) * (self.end - self.start)

    @property
    def peak(self) -> float:
        """The largest value taken during training (decides which signals are built and checked)."""
        return self.start if self.end is None or self.kind == "constant" else max(self.start, self.end)

    @property
    def varies(self) -> bool:
        return self.kind != "constant" and self.end is not None and self.end != self.start


def from_args(args, name: str) -> Schedule:
    """The schedule of config field ``name`` (alpha_task, kd_weight, hidden_weight, temperature): its value, its
    ``*_end`` and ``weight_schedule`` / ``schedule_at``; read, never written."""
    end = getattr(args, f"{name}_end", None)
    if end is None or args.weight_schedule == "constant":
        return Schedule.constant(getattr(args, name))
    return Schedule(float(getattr(args, name)), float(end), args.weight_schedule, args.schedule_at)


def peak_value(args, name: str) -> float:
    """The largest value config field ``name`` takes during training."""
    return from_args(args, name).peak
