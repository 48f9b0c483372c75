"""Accuracy, as an ``evaluate`` metric module shipped with hf_kd (loads offline; same name and arguments as the Hub's
``accuracy``): the share of predictions equal to their reference."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the share of predictions equal to their reference (or their number, normalize=False)."
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): True (default) for the share of correct predictions, False for their (weighted) count.
    sample_weight (list of float): optional weight of each example.
Returns:
    accuracy (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    """Accuracy of class predictions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        p, r = np.asarray(predictions), np.asarray(references)
        w = np.ones(len(r)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        correct = float(((p == r) * w).sum())
        if not normalize:
            return {"accuracy": correct}
        return {"accuracy": correct / float(w.sum()) if w.sum() > 0 else 0.0}
