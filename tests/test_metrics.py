"""Per-class and agreement metrics, bootstrap intervals and the cost of a model, against hand-computed values."""

import numpy as np
import pytest

from common.architecture import apply_architecture
from common.metrics import (
    agreement,
    bootstrap_intervals,
    confusion_matrix,
    forward_flops,
    per_class_metrics,
    weight_bytes_read_per_example,
)
from common.models import save_checkpoint
from conftest import VOCABULARY, tiny_bert_config, tiny_model

PREDICTIONS = [0, 1, 1, 0, 1]
LABELS = [0, 1, 0, 0, 1]
TEACHER = [0, 0, 0, 1, 1]


def test_confusion_matrix_and_per_class_metrics_by_hand():
    matrix = confusion_matrix(PREDICTIONS, LABELS, 2)
    assert matrix.tolist() == [[2, 1], [0, 2]]  # gold 0: two right, one called 1; gold 1: both right
    metrics = per_class_metrics(matrix, ["negative", "positive"])
    # negative: precision 2/2, recall 2/3 -> F1 0.8; positive: precision 2/3, recall 2/2 -> F1 0.8
    assert metrics["negative"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert metrics["positive"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    empty = per_class_metrics(confusion_matrix([0, 0], [0, 0], 2), ["a", "b"])
    assert empty["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_agreement_with_the_teacher_splits_changes_into_fixed_and_broken():
    # example 1: teacher 0, model 1, gold 1 -> fixed; example 2: teacher 0, model 1, gold 0 -> broken;
    # example 3: teacher 1, model 0, gold 0 -> fixed; examples 0 and 4 agree
    assert agreement(PREDICTIONS, TEACHER, LABELS) == {"differs": 3, "differs_rate": 0.6, "fixed": 2, "broken": 1, "examples": 5}
    # a change between two wrong labels is neither fixed nor broken
    assert agreement([2], [1], [0]) == {"differs": 1, "differs_rate": 1.0, "fixed": 0, "broken": 0, "examples": 1}


def test_bootstrap_intervals_hold_the_estimate_and_are_reproducible():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    predictions = np.where(rng.random(400) < 0.85, labels, 1 - labels)
    intervals = bootstrap_intervals(predictions, labels, reference_predictions=labels)
    low, high = intervals["accuracy_ci95"]
    accuracy = float((predictions == labels).mean())
    assert low < accuracy < high and high - low < 0.1
    # against a perfect reference the retention is the accuracy itself, resample by resample
    assert intervals["retention_ci95"] == pytest.approx([low, high])
    assert bootstrap_intervals(predictions, labels, reference_predictions=labels) == intervals
    same = bootstrap_intervals(predictions, labels, reference_predictions=predictions)
    assert same["retention_ci95"] == [1.0, 1.0]


def bert_flops_by_hand(heads, widths, hidden=32, head_size=8, seq=10, labels=2):
    """Multiply-adds of a BERT encoder, doubled: Q/K/V/O projections, QK^T and AV, two FFN matrices per layer, then
    the pooler and the classifier on the first token."""
    macs = 0
    for kept_heads, width in zip(heads, widths):
        attention = kept_heads * head_size
        macs += seq * (3 * hidden * attention + attention * hidden + 2 * hidden * width)
        macs += 2 * seq * seq * attention
    macs += hidden * hidden + hidden * labels
    return 2 * macs


def test_flops_follow_the_real_layer_shapes():
    model = tiny_model(tiny_bert_config(layers=2, heads=4, hidden=32, ffn=64))
    assert forward_flops(model, 10) == bert_flops_by_hand([4, 4], [64, 64]) == 355_456
    pruned = tiny_model(tiny_bert_config(layers=2, heads=4, hidden=32, ffn=64))
    apply_architecture(pruned, {"model_type": "bert", "num_layers": 2, "heads_per_layer": [2, 4], "ffn_width_per_layer": [16, 64]})
    assert forward_flops(pruned, 10) == bert_flops_by_hand([2, 4], [16, 64])


def test_weight_bytes_read_count_only_the_used_embedding_rows(tokenizer, results_dir):
    folder = save_checkpoint("pruned", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["negative", "positive"]})
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    table = len(VOCABULARY) * 32 * 4  # fp32 rows of 32
    expected = total - table + table * 8 / len(VOCABULARY)
    assert weight_bytes_read_per_example([weights], len(VOCABULARY), 8) == pytest.approx(expected, abs=1)
