"""Accuracy: the share of predictions equal to the reference label.

Kept in the repository because ``evaluate.load("accuracy")`` downloads its module from the hub, which is
unreachable here, and the hub version needs scikit-learn. Load it with ``evaluate.load("metrics/accuracy")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = (number of predictions equal to the reference) / (number of predictions)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
Returns:
    accuracy (float): in [0, 1].
"""


class Accuracy(evaluate.Metric):
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
            raise ValueError("accuracy of an empty prediction set is undefined.")
        return {"accuracy": float((predictions == references).mean())}
