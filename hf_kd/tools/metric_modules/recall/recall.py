"""Recall, as an ``evaluate`` metric module shipped with hf_kd (loads offline; the Hub's ``recall`` name and
arguments): TP / (TP + FN), the share of a class's examples that are found; counted by
:func:`hf_kd.tools.metric_modules.classification_score`."""

import datasets
import evaluate

from hf_kd.tools.metric_modules import classification_score

_DESCRIPTION = ("Recall: the share of examples of a class that are found, TP / (TP + FN), "
                "for one class (binary) or averaged over classes.")
_INPUTS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str or None): 'binary' (default: the score of pos_label; two classes only), 'micro' (from counts
        summed over labels), 'macro' (plain mean over labels), 'weighted' (mean weighted by each label's true
        count) or None (one score per label).
    labels (list of int): the labels to average over (default: every label present).
    pos_label (int): the class scored with average='binary' (default 1).
    sample_weight (list of float): optional weight of each example.
Returns:
    recall (float, or a list with average=None).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Recall(evaluate.Metric):
    """Recall of class predictions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, average="binary", labels=None, pos_label=1, sample_weight=None):
        return {"recall": classification_score("recall", predictions, references, average=average, labels=labels,
                                               pos_label=pos_label, sample_weight=sample_weight)}
