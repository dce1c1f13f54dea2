"""Metrics, size, latency and memory of a model.

Accuracy and macro-F1 go through the ``evaluate`` package with metric modules kept in ``metrics/`` (the hub is
unreachable). Latency and peak memory are measured in a fresh child process per model so that one model's
allocations and warm caches never flatter the next one.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import resource
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every example in ``loader`` (gathered across processes under DDP)."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    device = accelerator.device if accelerator is not None else _device_of(model)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**_model_inputs(batch)).logits.float()
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


def evaluate_accuracy(model: torch.nn.Module, loader, accelerator=None) -> dict:
    logits, labels = predict(model, loader, accelerator)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    return {"accuracy": float((logits.argmax(-1) == labels).mean()), "loss": loss}


@lru_cache(maxsize=None)
def _load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def classification_metrics(predictions, references) -> dict:
    """Accuracy and macro-F1 through the repository's ``evaluate`` metric modules."""
    predictions = [int(p) for p in predictions]
    references = [int(r) for r in references]
    accuracy = _load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    f1 = _load_metric("macro_f1").compute(predictions=predictions, references=references)["macro_f1"]
    return {"accuracy": float(accuracy), "macro_f1": float(f1)}


# -- latency and memory -----------------------------------------------------------------------------


def synthetic_batch(vocab_size: int, batch_size: int, seq_length: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    # ids above 999 avoid BERT's special and unused tokens
    low = min(1000, vocab_size - 1)
    input_ids = torch.randint(low, vocab_size, (batch_size, seq_length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def benchmark_latency(model: torch.nn.Module, batch: dict, warmup: int, repeats: int) -> dict:
    """Median and 90th-percentile wall time of one forward pass on ``batch``, and examples per second."""
    model.eval()
    for _ in range(warmup):
        model(**batch)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    batch_size = next(iter(batch.values())).shape[0]
    return {
        "latency_ms_median": 1000 * median,
        "latency_ms_p90": 1000 * float(np.percentile(timings, 90)),
        "throughput_examples_per_s": batch_size / median,
    }


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measure_child(folder: str, settings: dict, queue) -> None:
    try:
        import logging as child_logging

        child_logging.disable(child_logging.INFO)
        if settings.get("num_threads"):
            torch.set_num_threads(settings["num_threads"])
        from .models import load_model, word_embeddings

        before = _current_rss_bytes()
        model = load_model(folder)
        gc.collect()
        loaded = _current_rss_bytes()
        vocab_size = word_embeddings(model).num_embeddings
        batch = synthetic_batch(vocab_size, settings["batch_size"], settings["seq_length"])
        # Loading builds and converts layers, so its transient peak is not what serving the model costs.
        peak_was_reset = _reset_peak_rss()
        result = benchmark_latency(model, batch, settings["warmup"], settings["repeats"])
        peak = _peak_rss_bytes()
        result.update(
            peak_rss_mb=peak / 2**20,
            model_rss_mb=(loaded - before) / 2**20,
            inference_peak_mb=(peak - before) / 2**20,
            peak_covers_loading=not peak_was_reset,
            num_threads=torch.get_num_threads(),
        )
        queue.put(("ok", result))
    except BaseException as error:  # the parent reports it; a child must never hang the report
        queue.put(("error", f"{type(error).__name__}: {error}"))


def measure_in_subprocess(folder: str | Path, batch_size: int, seq_length: int, warmup: int, repeats: int, num_threads: Optional[int]) -> dict:
    """Load a checkpoint in a fresh process; return its latency, throughput and peak memory."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    settings = {"batch_size": batch_size, "seq_length": seq_length, "warmup": warmup, "repeats": repeats, "num_threads": num_threads}
    process = context.Process(target=_measure_child, args=(str(folder), settings, queue))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {folder} failed: {payload}")
    return payload
