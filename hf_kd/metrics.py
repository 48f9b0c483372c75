"""The seeds' distillation metrics as a public helper: compression ratio, measured inference speedup, the
teacher-student gap, and learning curves of held-out metrics over steps (not only training losses).

    from hf_kd.metrics import HeldOutCurve, compression_ratio, gap, speedup
    curve = HeldOutCurve(eval_batches, task="classification", every=50)
    trainer = DistillationTrainer(..., callbacks=[curve]); trainer.train()
    curve.points  # [{"step": 50, "accuracy": ...}, ...]; curve.plot("curve.png")
"""

from __future__ import annotations

import copy

import torch
from transformers import TrainerCallback

from .report import evaluate, latency, num_parameters

HIGHER_IS_BETTER = {"accuracy": True, "teacher_agreement": True, "perplexity": False, "loss": False,
                    "teacher_kl": False, "cosine_to_teacher": True}


def compression_ratio(teacher, student) -> float:
    """P_teacher / P_student."""
    return num_parameters(teacher) / num_parameters(student)


def speedup(teacher, student, inputs: dict, repeats: int = 7) -> dict:
    """Measured inference speedup: median forward time of each model on ``inputs`` (after a warm-up), both run in
    the student's dtype; returns the two times, the ratio and what was measured."""
    dtype = next(student.parameters()).dtype
    same = teacher if next(teacher.parameters()).dtype == dtype else copy.deepcopy(teacher).to(dtype)
    t, s = latency(same, inputs, repeats), latency(student, inputs, repeats)
    shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
    return {"teacher_s": t, "student_s": s, "speedup": t / s, "input": shape,
            "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "threads": torch.get_num_threads()}


def gap(teacher_metrics: dict, student_metrics: dict) -> dict:
    """Teacher minus student for every metric both have, signed so that a positive gap means the teacher is
    better (perplexity and losses: student minus teacher)."""
    out = {}
    for name, higher in HIGHER_IS_BETTER.items():
        if name in teacher_metrics and name in student_metrics:
            diff = teacher_metrics[name] - student_metrics[name]
            out[name] = diff if higher else -diff
    return out


class HeldOutCurve(TrainerCallback):
    """Evaluates the student on fixed held-out ``batches`` every ``every`` optimizer steps (and at the end), with
    :func:`hf_kd.report.evaluate`; ``points`` holds {"step", metric: value, ...} rows, also appended to the
    trainer's log history as ``heldout_<metric>``."""

    def __init__(self, batches: list[dict], task: str, every: int = 50, teacher=None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.batches, self.task, self.every, self.teacher = batches, task, every, teacher
        self.points: list[dict] = []

    def _measure(self, state, model) -> None:
        if self.points and self.points[-1]["step"] == state.global_step:
            return
        with torch.no_grad():
            metrics = evaluate(model, self.batches, self.task, self.teacher)
        self.points.append({"step": state.global_step, **metrics})
        state.log_history.append({"step": state.global_step, **{f"heldout_{k}": v for k, v in metrics.items()}})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            self._measure(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._measure(state, model)

    def plot(self, path: str, metric: str | None = None) -> str | None:
        """A PNG of ``metric`` (default: the first of accuracy / perplexity found) against steps."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        metric = metric or next((m for m in ("accuracy", "perplexity", "loss") if self.points and m in
                                 self.points[0]), None)
        if metric is None:
            return None
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot([p["step"] for p in self.points], [p[metric] for p in self.points], marker="o", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {metric}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
