"""Metric modules shipped with hf_kd, in ``evaluate``'s own format, so the common classification metrics load
offline (``evaluate.load("accuracy")`` fetches its script from the Hub).

Each metric is a folder ``<name>/<name>.py`` holding an ``evaluate.Metric`` subclass (``_info`` + ``_compute``), the
layout of a metric on the Hub; :func:`hf_kd.tools.metrics.load_metric` hands the folder to ``evaluate.load``, which imports
it from disk. The names and arguments follow the Hub's modules (``average="binary"`` by default for f1, precision
and recall, ``pos_label=1``, ``labels``, ``sample_weight``), computed here with numpy instead of scikit-learn.

This package also holds the counting the f1, precision and recall modules share (:func:`classification_score`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FOLDER = Path(__file__).resolve().parent
AVERAGES = ("binary", "micro", "macro", "weighted", None)


def names() -> list[str]:
    """The metrics shipped here (each a folder ``<name>/<name>.py``)."""
    return sorted(p.parent.name for p in FOLDER.glob("*/*.py") if p.stem == p.parent.name)


def path(name: str) -> Path | None:
    """The folder of the shipped metric ``name``, or None when hf_kd has none of that name."""
    folder = FOLDER / name
    return folder if (folder / f"{name}.py").is_file() else None


def _counts(predictions, references, labels, sample_weight):
    """(true positives, predicted, actual) per label of ``labels``, each weighted by ``sample_weight``."""
    p, r = np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1)
    w = np.ones(len(r)) if sample_weight is None else np.asarray(sample_weight, dtype=float).reshape(-1)
    if not len(p) == len(r) == len(w):
        raise ValueError(f"predictions, references and sample_weight differ in length: {len(p)}, {len(r)}, {len(w)}")
    is_p, is_r = p[None, :] == labels[:, None], r[None, :] == labels[:, None]
    return (is_p & is_r) @ w, is_p @ w, is_r @ w


def _ratio(num, den):
    """num / den elementwise, 0 where den is 0 (scikit-learn's zero_division=0 default, without the warning)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _per_label(score: str, tp, predicted, actual):
    if score == "precision":
        return _ratio(tp, predicted)
    if score == "recall":
        return _ratio(tp, actual)
    if score == "f1":  # 2PR/(P+R) = 2TP / (2TP + FP + FN)
        return _ratio(2 * tp, predicted + actual)
    raise ValueError(f"score {score!r} unknown: 'precision', 'recall' or 'f1'")


def _labels_for(predictions, references, labels, average, pos_label):
    present = np.union1d(np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1))
    if average != "binary":
        return np.asarray(labels) if labels is not None else present
    if len(present) > 2:
        raise ValueError(f"average='binary' needs two classes, the data has {len(present)}: pass "
                         "average='macro', 'micro' or 'weighted'")
    return np.asarray([pos_label])


def classification_score(score: str, predictions, references, average: str | None = "binary", labels=None,
                         pos_label=1, sample_weight=None):
    """Precision, recall or f1 of class ``predictions`` against ``references``.

    ``average``: 'binary' (the score of ``pos_label``), 'micro' (from counts summed over labels), 'macro' (the plain
    mean over labels), 'weighted' (the mean weighted by each label's true count) or None (one score per label, a
    list). ``labels``: the labels averaged over (default: every label in predictions or references). A label never
    predicted (or never present) scores 0 where its ratio is 0/0.
    """
    if average not in AVERAGES:
        raise ValueError(f"average {average!r} unknown; choose one of {list(AVERAGES)}")
    labels = _labels_for(predictions, references, labels, average, pos_label)
    tp, predicted, actual = _counts(predictions, references, labels, sample_weight)
    if average == "micro":
        return float(_per_label(score, tp.sum(), predicted.sum(), actual.sum()))
    per_label = _per_label(score, tp, predicted, actual)
    if average is None:
        return per_label.tolist()
    if average == "weighted":
        return float(_ratio((per_label * actual).sum(), actual.sum()))
    return float(per_label.mean()) if len(per_label) else 0.0
