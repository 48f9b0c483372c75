"""The no-teacher arms of the classifier jobs (image, text): the same initial student trained on its labelled rows
with the task loss alone, at equal steps and (``--equal_time``) at the steps that fit the distilled run's training
seconds, each with a held-out curve (:class:`hf_kd.tools.curves.HeldOutCurve`) for the report."""

from __future__ import annotations

import dataclasses
import statistics

from hf_kd.modes.experiment import train_baseline
from hf_kd.tools.curves import HeldOutCurve


def run_baselines(job, args, new_student, metrics, seconds, histories, curves, score, common, every) -> None:
    """The no-teacher student at equal steps, and with ``job.equal_time`` at the steps that fit the distilled run's
    training seconds (at the equal-steps baseline's measured seconds per step). ``curves['distilled']`` must hold
    the distilled run's curve; ``common``: train_baseline's keywords (teacher, train_dataset, eval_batches, task...)."""
    baseline_run("baseline_no_teacher", "baseline", "no teacher", args, new_student, metrics, seconds, histories,
                 curves, score, common, every)
    if job.equal_time:
        # training seconds without the curves' own evaluations (HeldOutCurve leaves them out), teacher forwards in
        kd_s, base_s = curves["distilled"][-1]["seconds"], curves["no teacher"][-1]["seconds"]
        steps = max(1, int(kd_s / (base_s / args.max_steps)))
        baseline_run("baseline_equal_time", "baseline_equal_time", f"no teacher, equal time ({steps} steps)",
                     dataclasses.replace(args, max_steps=steps), new_student, metrics, seconds, histories, curves,
                     score, common, max(1, steps // 8))


def baseline_run(row, key, name, args, new_student, metrics, seconds, histories, curves, score, common, every):
    curve, model = HeldOutCurve(common["eval_batches"], common["task"], every=every, at_start=True), new_student()
    metrics[row], seconds[key], histories[f"{key} (no teacher)"] = train_baseline(args, model, callbacks=[curve],
                                                                                  **common)
    metrics[row]["steps"] = args.max_steps
    score(metrics[row], model, common["eval_batches"])
    curves[name] = curve.points


def grad_norm_stats(history: list[dict]) -> dict:
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    return {"median": statistics.median(norms), "max": max(norms)} if norms else {}


def grad_norms(histories: dict) -> str:
    stats = {k: grad_norm_stats(h) for k, h in histories.items()}
    return "; ".join(f"{k}: median {v['median']:.2f}, max {v['max']:.2f}" for k, v in stats.items() if v) or "not logged"
