"""What a compressed classifier gets right and wrong, and what it costs, beyond one accuracy number.

Quality, from predicted class ids: the confusion matrix, per-class precision/recall/F1, agreement with the teacher
it replaces (how many test inputs it now labels differently, split into "fixed": the teacher was wrong and the model
is right, and "broken": the other way round) and bootstrap 95% intervals for accuracy and for the retention (model
accuracy / teacher accuracy, resampling the same test inputs for both, so the interval reflects the pairing).

Cost, from the model's real shapes: parameters, FLOPs and MACs per example at a given sequence length (counted by
``torch.utils.flop_counter`` on one forward pass of a weightless skeleton, so per-layer head counts, FFN widths and
any architecture's extra projections are included), and the weight bytes one example reads at batch 1 (every stored
weight once, but only ``seq_length`` rows of the word-embedding table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

BOOTSTRAP_RESAMPLES = 1000


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
    """``matrix[gold][predicted]``: how many examples of each gold class got each predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray, label_names: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (0 where a denominator is 0)."""
    result = {}
    for index, name in enumerate(label_names):
        true_positive = int(matrix[index, index])
        predicted, support = int(matrix[:, index].sum()), int(matrix[index, :].sum())
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return result


def agreement(predictions, reference_predictions, labels) -> dict:
    """How often the model labels a test input differently from the reference (teacher), and whether each change
    fixed a reference error or broke a correct answer (a change between two wrong labels is neither)."""
    predictions, reference, labels = (np.asarray(values) for values in (predictions, reference_predictions, labels))
    differs = predictions != reference
    fixed = int((differs & (predictions == labels)).sum())
    broken = int((differs & (reference == labels)).sum())
    return {"differs": int(differs.sum()), "differs_rate": float(differs.mean()), "fixed": fixed, "broken": broken,
            "examples": int(len(labels))}


def paired_difference_se(correct_a, correct_b) -> float:
    """Standard error of accuracy(a) - accuracy(b) measured on the same examples (``correct_*``: one bool per example).

    Two models that agree on most examples differ by far less noise than two independent accuracy readings: only the
    examples one gets right and the other wrong count. This is the noise a choice between them must allow for."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired accuracies need the same examples, at least two: got {a.shape} and {b.shape}.")
    return float((a - b).std(ddof=1) / np.sqrt(a.size))


def bootstrap_intervals(predictions, labels, reference_predictions=None, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0) -> dict:
    """95% percentile-bootstrap intervals of the accuracy and, with ``reference_predictions``, of the retention
    (accuracy / reference accuracy) over the same resampled inputs. Fixed ``seed``: the same rows give the same
    intervals."""
    correct = (np.asarray(predictions) == np.asarray(labels)).astype(np.float64)
    indices = np.random.default_rng(seed).integers(0, len(correct), size=(resamples, len(correct)))
    accuracies = correct[indices].mean(axis=1)
    result = {"accuracy_ci95": [float(v) for v in np.percentile(accuracies, [2.5, 97.5])], "bootstrap_resamples": resamples}
    if reference_predictions is not None:
        reference_correct = (np.asarray(reference_predictions) == np.asarray(labels)).astype(np.float64)
        reference_accuracies = reference_correct[indices].mean(axis=1)
        ratios = accuracies / np.where(reference_accuracies > 0, reference_accuracies, np.nan)
        result["retention_ci95"] = [float(v) for v in np.nanpercentile(ratios, [2.5, 97.5])]
    return result


# -- cost ------------------------------------------------------------------------------------------------


def forward_flops(model, seq_length: int) -> int:
    """FLOPs of one forward pass of ``model`` on one example of ``seq_length`` tokens (matrix products and attention,
    as ``torch.utils.flop_counter`` counts them; element-wise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .architecture import forward_input_names

    vocab_size = model.get_input_embeddings().num_embeddings
    input_ids = torch.randint(min(5, vocab_size - 1), vocab_size, (1, seq_length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if "token_type_ids" in forward_input_names(model):
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
    model.eval()
    try:  # the fused CPU attention kernel is invisible to the counter; the eager path computes the same products
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        pass
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return int(counter.get_total_flops())


def embedding_table_bytes(tensors: dict[str, tuple[tuple, int]], vocab_size: int) -> int:
    """Stored bytes of the word-embedding table: every tensor ``{name: (shape, bytes)}`` whose first dimension is the
    vocabulary (the table itself, or its row-wise codes and per-row scales)."""
    return sum(size for shape, size in tensors.values() if len(shape) >= 1 and shape[0] == vocab_size)


def stored_tensors(path: Path) -> dict[str, tuple[tuple, int]]:
    """``{name: (shape, bytes)}`` of the weights in a safetensors file (header only), an ONNX file's initializers or an
    OpenVINO IR's constants (read from its .xml; its .bin adds nothing more)."""
    if path.suffix == ".xml":
        from .openvino_runtime import stored_constants

        return stored_constants(path)
    if path.suffix == ".bin":
        return {}
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path), load_external_data=False).graph
        result = {}
        for initializer in graph.initializer:
            if initializer.data_location == onnx.TensorProto.EXTERNAL:
                size = int({entry.key: entry.value for entry in initializer.external_data}.get("length", 0))
            elif initializer.raw_data:
                size = len(initializer.raw_data)
            else:
                size = numpy_helper.to_array(initializer).nbytes
            result[initializer.name] = (tuple(initializer.dims), size)
        return result
    import json
    import struct

    with open(path, "rb") as handle:
        header_length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_length))
    return {name: (tuple(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def weight_bytes_read_per_example(files: list[Path], vocab_size: int, seq_length: int) -> int:
    """Weight bytes one example reads at batch 1: all stored weights, but of the word-embedding table only the rows
    of its ``seq_length`` tokens."""
    tensors: dict[str, tuple[tuple, int]] = {}
    for path in files:
        tensors.update({f"{path.name}:{name}": value for name, value in stored_tensors(path).items()})
    total = sum(size for _, size in tensors.values())
    table = embedding_table_bytes(tensors, vocab_size)
    return int(total - table + table * min(seq_length, vocab_size) / vocab_size)


def model_cost(folder: Path, record: dict, weight_files: list[Path], seq_length: int,
               parameters: Optional[int] = None) -> dict:
    """Parameters, FLOPs/MACs per example and weight bytes read per example of the model stored in ``folder``."""
    from .models import build_skeleton, count_parameters

    skeleton = build_skeleton(folder, record)
    flops = forward_flops(skeleton, seq_length)
    vocab_size = skeleton.get_input_embeddings().num_embeddings
    return {
        "parameters": parameters if parameters is not None else count_parameters(skeleton),
        "flops_per_example": flops,
        "macs_per_example": flops // 2,
        "weight_bytes_read_per_example": weight_bytes_read_per_example(weight_files, vocab_size, seq_length),
        "cost_seq_length": seq_length,
    }
