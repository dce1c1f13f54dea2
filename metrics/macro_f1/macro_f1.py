"""Macro-averaged F1: the unweighted mean over classes of 2·precision·recall / (precision + recall).

A class that is never predicted and never present is left out; a class with no true positives scores 0
(scikit-learn's ``f1_score(average="macro", zero_division=0)``). Kept in the repository because the hub is
unreachable here. Load it with ``evaluate.load("metrics/macro_f1")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Macro F1 = mean over classes of the per-class F1 score."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
Returns:
    macro_f1 (float): in [0, 1].
    per_class_f1 (dict): class id -> F1.
"""


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(predictions) == 0:
            raise ValueError("F1 of an empty prediction set is undefined.")
        per_class = {}
        for label in np.union1d(np.unique(predictions), np.unique(references)):
            true_positive = int(((predictions == label) & (references == label)).sum())
            predicted = int((predictions == label).sum())
            actual = int((references == label).sum())
            denominator = predicted + actual
            per_class[int(label)] = 2 * true_positive / denominator if denominator else 0.0
        return {"macro_f1": float(np.mean(list(per_class.values()))), "per_class_f1": per_class}
