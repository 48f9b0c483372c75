"""The seeds' distillation metrics as a public helper: compression ratio, measured inference speedup, the
teacher-student gap, and learning curves of held-out metrics over steps (not only training losses).

    from hf_kd.tools.metrics import HeldOutCurve, compression_ratio, gap, speedup
    curve = HeldOutCurve(eval_batches, task="classification", every=50)
    trainer = DistillationTrainer(..., callbacks=[curve]); trainer.train()
    curve.points  # [{"step": 50, "accuracy": ...}, ...]; curve.plot("curve.png")

Any ``evaluate`` metric, offline too: :func:`load_metric` ("accuracy", "f1", ... or an ``evaluate.EvaluationModule``),
:func:`trainer_metrics` (a ``compute_metrics`` for the Trainer) and :func:`metric_on_batches` (a model on fixed batches).

    trainer = DistillationTrainer(..., compute_metrics=trainer_metrics("f1", "classification", average="macro"),
                                  preprocess_logits_for_metrics=logits_to_predictions)
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Callable

import numpy as np
import torch
from transformers import EvalPrediction

from . import metric_modules
from ..flow.align import predicting, targets
from .curves import HIGHER_IS_BETTER, HeldOutCurve, crossover, plot_curves
from .report import _no_cache, latency, num_parameters
from ..flow.tasks import CLASSIFICATION, as_model_dtype

__all__ = ["HIGHER_IS_BETTER", "HeldOutCurve", "compression_ratio", "compute_metric", "crossover", "gap", "load_metric",
           "logits_to_predictions", "metric_on_batches", "plot_curves", "predictions_and_references", "speedup",
           "trainer_metrics"]


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


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def load_metric(metric, **load_kwargs):
    """An ``evaluate.EvaluationModule`` from ``metric``: a module passes through; a name hf_kd ships
    (:func:`hf_kd.tools.metric_modules.names`: accuracy, f1, precision, recall) loads from the package's own folder, so
    nothing is fetched; a path to a metric folder or script loads from disk; any other name comes from the Hub via
    ``evaluate.load`` (online only: offline, a ValueError names the shipped metrics)."""
    import evaluate as evaluate_lib  # imported on use: ~0.5 s that `import hf_kd` does not pay
    if isinstance(metric, evaluate_lib.EvaluationModule):
        return metric
    if not isinstance(metric, str) or not metric:
        raise TypeError(f"metric must be a name, a path or an evaluate.EvaluationModule, got {metric!r}")
    local = metric_modules.path(metric)
    if local is not None or os.path.exists(metric):
        return evaluate_lib.load(str(local or metric), **load_kwargs)
    shipped = ", ".join(metric_modules.names())
    if _offline():
        raise ValueError(f"metric {metric!r} is not shipped with hf_kd (offline it has: {shipped}) and the Hub is "
                         "offline (HF_HUB_OFFLINE): unset it to load the metric from the Hub, or pass the path of a "
                         "local metric folder or an evaluate.EvaluationModule")
    try:
        return evaluate_lib.load(metric, **load_kwargs)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise ValueError(f"could not load metric {metric!r} from the Hub ({e}); hf_kd ships {shipped}") from e


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def predictions_and_references(predictions, labels, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat class predictions and their references, as numpy arrays, from a model's logits (or already-argmaxed
    predictions) and labels: argmax over the last axis; causal LMs shifted by :mod:`hf_kd.flow.align` (position i
    predicts token i+1); positions and examples labelled -100 dropped. A regression head (one logit) keeps its
    values. Multi-label classifiers are not handled (their labels have the logits' shape)."""
    predictions = _first(predictions)
    p, y = (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x) for x in (predictions, labels))
    if task == CLASSIFICATION and p.ndim == 2 and p.shape[-1] == 1 and y.ndim == 1:
        p = p[:, 0]  # regression
    elif p.ndim == y.ndim + 1:
        p = p.argmax(-1)
    elif p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} do not match labels {y.shape} (multi-label classifiers are not "
                         "handled: pass a compute_metrics of your own)")
    p, y = predicting(p, task), targets(y, task)
    keep = y != -100
    return p[keep], y[keep]


def logits_to_predictions(logits, labels=None) -> torch.Tensor:
    """For ``preprocess_logits_for_metrics``: the argmax class of each position, so evaluation does not gather the
    full [N, T, vocab] logits of a language model (:func:`trainer_metrics` accepts either)."""
    logits = _first(logits)
    return logits if logits.shape[-1] == 1 else logits.argmax(-1)


def compute_metric(metric, predictions, references, **compute_kwargs) -> dict:
    """``metric.compute`` on flat predictions and references, returning plain floats (lists stay lists). A metric
    that takes ``average`` (f1, precision, recall) and is given none uses 'macro' when there are more than two
    classes (the Hub's default, 'binary', fails there)."""
    module = load_metric(metric)
    takes_average = "average" in inspect.signature(module._compute).parameters
    if takes_average and "average" not in compute_kwargs and len(np.union1d(predictions, references)) > 2:
        compute_kwargs["average"] = "macro"
    out = module.compute(predictions=predictions, references=references, **compute_kwargs) or {}
    return {k: float(v) if np.ndim(v) == 0 and isinstance(v, (int, float, np.number)) else v for k, v in out.items()}


def trainer_metrics(metric, task: str, **compute_kwargs) -> Callable[[EvalPrediction], dict]:
    """A ``compute_metrics`` for the (Distillation)Trainer: ``metric`` (see :func:`load_metric`, loaded once, now)
    on the evaluation predictions, via :func:`predictions_and_references` for ``task`` ('classification',
    'masked_lm', 'causal_lm'); ``compute_kwargs`` go to ``metric.compute`` (e.g. ``average="macro"``)."""
    module = load_metric(metric)

    def compute_metrics(eval_prediction: EvalPrediction) -> dict:
        p, y = predictions_and_references(eval_prediction.predictions, eval_prediction.label_ids, task)
        return compute_metric(module, p, y, **compute_kwargs)

    return compute_metrics


@torch.inference_mode()
def metric_on_batches(model, batches: list[dict], metric, task: str, **compute_kwargs) -> dict:
    """``metric`` of ``model`` on fixed held-out ``batches`` (the ones :func:`hf_kd.tools.report.evaluate` reads), through
    the same :func:`predictions_and_references` as :func:`trainer_metrics`."""
    module = load_metric(metric)
    was_training = model.training
    model.eval()
    preds, refs = [], []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**as_model_dtype(model, inputs), **_no_cache(model)).logits.float()
        p, y = predictions_and_references(logits_to_predictions(logits), batch["labels"], task)
        preds.append(p)
        refs.append(y)
    model.train(was_training)
    return compute_metric(module, np.concatenate(preds), np.concatenate(refs), **compute_kwargs)
