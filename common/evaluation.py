"""Metrics, size, latency and memory of a model.

Accuracy and macro-F1 go through the ``evaluate`` package with metric modules kept in ``metrics/`` (the hub is
unreachable). Latency is measured for all models together in one process, round-robin (``interleaved_latency``):
every round runs each model once, so a machine that gets busier or quieter during the benchmark affects every
model alike, and speed-ups are computed per round against the reference model. Memory is measured in a fresh
child process per model so that one model's allocations never count against another.
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


class InferenceModel:
    """One model to time or evaluate: a checkpoint loaded into torch, or one ``.onnx`` file of an ONNX folder."""

    def __init__(self, folder: str | Path, onnx_file: Optional[str] = None, num_threads: Optional[int] = None,
                 vocab_size: Optional[int] = None) -> None:
        self.folder = Path(folder)
        self.onnx_file = onnx_file
        if onnx_file is not None:
            from .onnx_runtime import OnnxClassifier

            # no busy-waiting threads: they would slow down whichever model the benchmark times next
            self.onnx = OnnxClassifier(self.folder / onnx_file, num_threads, spinning=False)
            self.torch_model = None
            if vocab_size is None:
                import json

                vocab_size = int(json.loads((self.folder / "config.json").read_text())["vocab_size"])
            self.vocab_size = vocab_size
        else:
            from .architecture import word_embeddings
            from .models import load_model

            self.onnx = None
            self.torch_model = load_model(self.folder)
            self.vocab_size = word_embeddings(self.torch_model).num_embeddings

    @property
    def input_names(self) -> list[str]:
        if self.onnx is not None:
            return self.onnx.input_names
        from .architecture import forward_input_names

        return forward_input_names(self.torch_model)

    def batch(self, batch_size: int, seq_length: int) -> dict:
        """A synthetic batch of this model's vocabulary, shaped for its inputs (numpy for ONNX Runtime)."""
        batch = synthetic_batch(self.vocab_size, batch_size, seq_length)
        if "token_type_ids" in self.input_names:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if self.onnx is not None:
            return self.onnx.feeds(batch)
        return batch

    def runner(self, batch: dict) -> Callable[[], object]:
        """A no-argument call of one forward pass on ``batch``, for the latency harness."""
        if self.onnx is not None:
            session = self.onnx.session
            return lambda: session.run(None, batch)
        model = self.torch_model.eval()

        def run():
            with torch.no_grad():
                return model(**batch)

        return run

    def logits(self, loader) -> tuple[np.ndarray, np.ndarray]:
        if self.onnx is not None:
            from .onnx_runtime import predict_onnx

            return predict_onnx(self.onnx, loader)
        return predict(self.torch_model, loader)


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
        before = _current_rss_bytes()
        model = InferenceModel(folder, settings.get("onnx_file"), settings.get("num_threads"))
        gc.collect()
        loaded = _current_rss_bytes()
        run = model.runner(model.batch(settings["batch_size"], settings["seq_length"]))
        # Loading builds and converts layers, so its transient peak is not what serving the model costs.
        peak_was_reset = _reset_peak_rss()
        for _ in range(settings["warmup"]):
            run()
        timings = []
        for _ in range(settings["repeats"]):
            start = time.perf_counter()
            run()
            timings.append(time.perf_counter() - start)
        median = statistics.median(timings)
        result = {
            "latency_ms_median": 1000 * median,
            "latency_ms_p90": 1000 * float(np.percentile(timings, 90)),
            "throughput_examples_per_s": settings["batch_size"] / median,
        }
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


def measure_in_subprocess(folder: str | Path, batch_size: int, seq_length: int, warmup: int, repeats: int,
                          num_threads: Optional[int], onnx_file: Optional[str] = None) -> dict:
    """Load a checkpoint (or one ``.onnx`` file of an ONNX folder) in a fresh process; return its memory use and a
    sequential latency (the report times models with ``interleaved_latency`` instead)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    settings = {"batch_size": batch_size, "seq_length": seq_length, "warmup": warmup, "repeats": repeats,
                "num_threads": num_threads, "onnx_file": onnx_file}
    process = context.Process(target=_measure_child, args=(str(folder), settings, queue))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {folder} failed: {payload}")
    return payload
