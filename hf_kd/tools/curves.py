"""Held-out quality along training, so a distilled student and its no-teacher baseline can be compared at every
budget: against optimizer steps and against wall-clock seconds (teacher costs included), with the point where one
overtakes the other.

    kd, base = HeldOutCurve(batches, "causal_lm", every=10), HeldOutCurve(batches, "causal_lm", every=10)
    DistillationTrainer(..., callbacks=[kd]).train(); DistillationTrainer(..., callbacks=[base]).train()
    plot_curves({"distilled": kd.points, "no teacher": base.points}, "curves.png", "perplexity")
    crossover(kd.points, base.points, "perplexity", x="seconds")  # None: the distilled student never leads
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from .report import evaluate

HIGHER_IS_BETTER = {"accuracy": True, "teacher_agreement": True, "perplexity": False, "loss": False,
                    "teacher_kl": False, "cosine_to_teacher": True}


class HeldOutCurve(TrainerCallback):
    """Evaluates the student on fixed held-out ``batches`` every ``every`` optimizer steps (and at the end; with
    ``at_start`` also before the first step), with :func:`hf_kd.tools.report.evaluate`. ``points`` holds {"step",
    "seconds", metric: value, ...} rows, also appended to the trainer's log history as ``heldout_<metric>``.
    ``seconds``: training wall time so far, the curve's own evaluations left out, plus ``offset_seconds`` (a cost
    paid before training that the comparison must count, e.g. building a teacher cache); ``cpu_seconds``: this
    process's CPU time over the same span (less sensitive to other jobs on the machine; no offset)."""

    def __init__(self, batches: list[dict], task: str, every: int = 50, teacher=None, at_start: bool = False,
                 offset_seconds: float = 0.0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.batches, self.task, self.every, self.teacher = batches, task, every, teacher
        self.at_start, self.offset = at_start, float(offset_seconds)
        self.points: list[dict] = []
        self._start, self._evaluating = None, 0.0
        self._cpu_start, self.cpu_in_evaluation = None, 0.0  # process CPU time: what other jobs on the machine
        # slow down less than wall time

    def _measure(self, state, model) -> None:
        if self.points and self.points[-1]["step"] == state.global_step:
            return
        began, cpu_began = time.perf_counter(), time.process_time()
        seconds = self.offset + began - self._start - self._evaluating
        cpu_seconds = cpu_began - self._cpu_start - self.cpu_in_evaluation
        with torch.no_grad():
            metrics = evaluate(model, self.batches, self.task, self.teacher)
        self._evaluating += time.perf_counter() - began
        self.cpu_in_evaluation += time.process_time() - cpu_began
        self.points.append({"step": state.global_step, "seconds": seconds, "cpu_seconds": cpu_seconds, **metrics})
        state.log_history.append({"step": state.global_step, "heldout_seconds": seconds,
                                  **{f"heldout_{k}": v for k, v in metrics.items()}})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start, self._evaluating = time.perf_counter(), 0.0
        self._cpu_start, self.cpu_in_evaluation = time.process_time(), 0.0
        if self.at_start and state.is_world_process_zero:
            self._measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            self._measure(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._measure(state, model)

    def plot(self, path: str, metric: str | None = None) -> str | None:
        """A PNG of ``metric`` (default: the first of accuracy / perplexity found) against steps and seconds."""
        return plot_curves({"student": self.points}, path, metric)


def _metric_of(points: list[dict], metric: str | None) -> str | None:
    return metric or next((m for m in ("accuracy", "perplexity", "loss") if points and m in points[0]), None)


def plot_curves(curves: dict[str, list[dict]], path: str, metric: str | None = None) -> str | None:
    """One PNG, two panels: held-out ``metric`` of each named curve against steps and against wall-clock seconds.
    Returns the path (None without matplotlib or points)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = _metric_of(next(iter(curves.values()), []), metric)
    if metric is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for name, points in curves.items():
        for ax, x in zip(axes, ("step", "seconds")):
            ax.plot([p[x] for p in points if x in p], [p[metric] for p in points if x in p], marker="o", ms=3,
                    label=name)
    for ax, label in zip(axes, ("optimizer step", "wall-clock seconds (teacher costs included)")):
        ax.set_xlabel(label)
    axes[0].set_ylabel(f"held-out {metric}")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interpolate(points: list[dict], x: str, metric: str, at: float) -> float | None:
    xs = [(p[x], p[metric]) for p in points]
    for (x0, y0), (x1, y1) in zip(xs, xs[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return None


def crossover(distilled: list[dict], baseline: list[dict], metric: str, x: str = "seconds") -> float | None:
    """The first ``x`` (``'step'`` or ``'seconds'``) of the distilled curve from which it is better than the
    baseline (linearly interpolated at the same ``x``) at every later point both curves cover; None if it never is.
    """
    higher = HIGHER_IS_BETTER.get(metric, True)
    leads = []
    for p in distilled:
        other = _interpolate(baseline, x, metric, p[x])
        if other is not None:
            leads.append((p[x], p[metric] > other if higher else p[metric] < other))
    first = None
    for at, lead in leads:
        first = (first if first is not None else at) if lead else None
    return first
