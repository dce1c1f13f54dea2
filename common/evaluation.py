"""Metrics and latency of a model.

``accuracy`` is the one accuracy of the project (training, stages, ONNX checks, report); macro-F1 goes through the
``evaluate`` package with its metric module kept in ``metrics/`` (the hub is unreachable). Latency is measured for all
models together in one process, round-robin (``interleaved_latency``): every round runs each model once, so a
machine that gets busier or quieter during the benchmark affects every model alike, and speed-ups are computed per
round against the reference model. Running a checkpoint or an ONNX file, and its memory: ``runtime.py``.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import model_inputs

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


@torch.no_grad()
def predict(model: torch.nn.Module, loader, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every example in ``loader`` (gathered across processes under DDP)."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    device = accelerator.device if accelerator is not None else _device_of(model)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def accuracy(predictions, labels) -> float:
    """Share of examples whose prediction equals the label; ``predictions`` are class ids or logits (argmax taken)."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(-1)
    return float((predictions == np.asarray(labels)).mean())


def evaluate_accuracy(model: torch.nn.Module, loader, accelerator=None) -> dict:
    logits, labels = predict(model, loader, accelerator)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    return {"accuracy": accuracy(logits, labels), "loss": loss}


@lru_cache(maxsize=None)
def _load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def classification_metrics(predictions, references) -> dict:
    """Accuracy and macro-F1 (through the repository's ``evaluate`` metric module) of predicted class ids."""
    predictions = [int(p) for p in predictions]
    references = [int(r) for r in references]
    f1 = _load_metric("macro_f1").compute(predictions=predictions, references=references)["macro_f1"]
    return {"accuracy": accuracy(predictions, references), "macro_f1": float(f1)}


# -- latency and memory -----------------------------------------------------------------------------


def interleaved_latency(runners: dict[str, Callable[[], object]], warmup: int, rounds: int, batch_size: int,
                        reference: Optional[str] = None) -> dict[str, dict]:
    """Time every runner once per round, in a rotating order, for ``rounds`` rounds after ``warmup`` untimed ones.

    Returns per label: median and interquartile range of the latency, throughput, and, when ``reference`` names
    one of the runners, the speed-up against it computed round by round (reference time / model time in the same
    round), with its median and interquartile range.
    """
    labels = list(runners)
    for _ in range(warmup):
        for label in labels:
            runners[label]()
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:  # no model always runs right after the same one
            start = time.perf_counter()
            runners[label]()
            times[label].append(time.perf_counter() - start)
    results = {}
    for label, values in times.items():
        p25, median, p75 = np.percentile(values, [25, 50, 75])
        result = {
            "latency_ms_median": 1000 * float(median),
            "latency_ms_p25": 1000 * float(p25),
            "latency_ms_p75": 1000 * float(p75),
            "latency_ms_iqr": 1000 * float(p75 - p25),
            "latency_ms_p90": 1000 * float(np.percentile(values, 90)),
            "throughput_examples_per_s": batch_size / float(median),
            "latency_rounds": rounds,
            "latency_ms_per_round": [1000 * value for value in values],
        }
        if reference is not None:
            speedup = round_speedup(times[reference], values)
            result.update(speedup_vs_reference_median=speedup["median"], speedup_vs_reference_p25=speedup["p25"],
                          speedup_vs_reference_p75=speedup["p75"])
        results[label] = result
    return results


def round_speedup(reference_ms: list[float], model_ms: list[float]) -> dict:
    """Median and interquartile range of reference time / model time, round by round."""
    low, mid, high = np.percentile(np.asarray(reference_ms) / np.asarray(model_ms), [25, 50, 75])
    return {"median": float(mid), "p25": float(low), "p75": float(high)}


def cpu_info() -> dict:
    """CPU model and the instruction sets that decide int8 and bf16 speed (VNNI, AMX), from /proc/cpuinfo."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    interesting = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {
        "cpu_model": model,
        "instruction_sets": {flag: flag in flags for flag in interesting},
        "int8_acceleration": "AMX" if "amx_int8" in flags else "VNNI" if {"avx512_vnni", "avx_vnni"} & flags else "none (no VNNI/AMX)",
    }
