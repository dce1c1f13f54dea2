"""The report's timings: every row round-robin in one process on the synthetic batch (``measure_latency``), on real
test texts at batch 1 and in dynamically padded batches (``measure_real_text_latency``), and the GPU rows where CUDA
is present (``gpu_rows``). Each takes the report's evaluated rows (``report.EvaluatedRow``) and writes into them."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .data import TextClassificationData, encode, make_loader, text_inputs, tokenize_dataset
from .evaluation import classification_metrics, interleaved_latency, round_speedup
from .models import load_checkpoint_tokenizer
from .runtime import ModelRuntime

logger = logging.getLogger(__name__)


def measure_latency(evaluated: list, config, reference_label: str, peer_labels: tuple[str, ...]) -> None:
    """Time every row in one interleaved harness; write latency, IQR and per-round speed-ups into the rows: against
    the teacher, against ONNX Runtime's int8 of the teacher (the first peer) and against the best peer (the fastest
    peer row keeping 99% of the teacher's test accuracy)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    runners = {item.row["label"]: item.model.runner(item.model.batch(config.latency_batch_size, config.latency_seq_length))
               for item in evaluated}
    reference = reference_label if reference_label in runners else None
    logger.info("Timing %d models round-robin: %d warm-up and %d timed rounds, %d threads",
                len(runners), config.latency_warmup, config.latency_repeats, config.num_threads or torch.get_num_threads())
    timings = interleaved_latency(runners, config.latency_warmup, config.latency_repeats, config.latency_batch_size, reference)
    ort_reference = timings.get(peer_labels[0])
    accuracy = {item.row["label"]: item.row["test_accuracy"] for item in evaluated}
    peers = [label for label in peer_labels if label in timings and reference in accuracy
             and accuracy[label] >= 0.99 * accuracy[reference]]
    best_peer = min(peers, key=lambda label: timings[label]["latency_ms_median"]) if peers else None
    for item in evaluated:
        timing = timings[item.row["label"]]
        item.row.update({key: value for key, value in timing.items() if not key.startswith("speedup_vs_reference")})
        item.row["speedup_vs_teacher"] = timing.get("speedup_vs_reference_median")
        item.row["speedup_vs_teacher_p25"] = timing.get("speedup_vs_reference_p25")
        item.row["speedup_vs_teacher_p75"] = timing.get("speedup_vs_reference_p75")
        if ort_reference is not None:  # against what a user gets without this project, from the same rounds
            speedup = round_speedup(ort_reference["latency_ms_per_round"], timing["latency_ms_per_round"])
            item.row.update(speedup_vs_ort_reference=speedup["median"], speedup_vs_ort_reference_p25=speedup["p25"],
                            speedup_vs_ort_reference_p75=speedup["p75"])
        if best_peer is not None:
            speedup = round_speedup(timings[best_peer]["latency_ms_per_round"], timing["latency_ms_per_round"])
            item.row.update(best_peer=best_peer, speedup_vs_best_peer=speedup["median"],
                            speedup_vs_best_peer_p25=speedup["p25"], speedup_vs_best_peer_p75=speedup["p75"])
        item.row["num_threads"] = config.num_threads or torch.get_num_threads()


def measure_real_text_latency(evaluated: list, data: TextClassificationData, max_length: int, config) -> None:
    """Latency people feel: real test texts at batch 1, each padded to nothing but itself, p50/p95 over the texts,
    every model once per text in a rotating order; and throughput on the same texts in batches with dynamic padding."""
    if not config.real_text_examples:
        return
    texts, pairs = text_inputs(data.test)
    count = min(config.real_text_examples, len(texts))
    picked = sorted(np.random.default_rng(0).choice(len(texts), size=count, replace=False).tolist())

    def encoded(tokenizer, indices, padding):
        return dict(encode(tokenizer, [texts[i] for i in indices], [pairs[i] for i in indices] if pairs else None,
                           truncation=True, max_length=max_length, padding=padding, return_tensors="np"))

    single, batched = {}, {}
    for item in evaluated:
        label, model = item.row["label"], item.model
        single[label] = [model.runner(model.inputs(encoded(item.tokenizer, [i], False))) for i in picked]
        chunks = [picked[start:start + config.latency_batch_size] for start in range(0, count, config.latency_batch_size)]
        batched[label] = [model.runner(model.inputs(encoded(item.tokenizer, chunk, True))) for chunk in chunks]
    labels = list(single)
    logger.info("Timing %d models on %d real test texts at batch 1 and in dynamically padded batches", len(labels), count)
    for label in labels:  # warm-up: each model's first texts and first batch
        for run in single[label][:3] + batched[label][:1]:
            run()
    per_text = {label: [] for label in labels}
    for index in range(count):
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            single[label][index]()
            per_text[label].append(time.perf_counter() - start)
    batch_seconds = dict.fromkeys(labels, 0.0)
    for index in range(len(next(iter(batched.values())))):
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            batched[label][index]()
            batch_seconds[label] += time.perf_counter() - start
    for item in evaluated:
        label = item.row["label"]
        values = np.asarray(per_text[label])
        item.row.update(
            latency_b1_ms_p50=1000 * float(np.percentile(values, 50)),
            latency_b1_ms_p95=1000 * float(np.percentile(values, 95)),
            throughput_b1_examples_per_s=count / float(values.sum()),
            throughput_dynamic_examples_per_s=count / batch_seconds[label],
            real_text_examples=count,
        )


def gpu_variants(item, cuda_ort: bool) -> list[tuple[str, bool, str]]:
    """How a report row runs on a GPU: (runtime, half precision, label suffix) for each way, none where it cannot."""
    from .checkpoints import read_record
    from .quantization import is_movable

    if item.entry.onnx_file is not None:
        if item.entry.onnx_file.endswith(".xml"):
            return []  # OpenVINO runs on the CPU here
        return [("onnxruntime cuda", False, " (ONNX Runtime CUDA)")] if cuda_ort else []
    record = read_record(item.folder)
    if not is_movable(record, "cuda"):
        return []  # e.g. torch dynamic int8: CPU kernels only
    if record.get("quantization"):
        return [("torch cuda", False, " (torch GPU)")]  # bitsandbytes 4-bit: its CUDA kernels
    return [("torch cuda fp32", False, " (FP32, torch GPU)"), ("torch cuda fp16", True, " (FP16, torch GPU)")]


def gpu_rows(evaluated: list, data: TextClassificationData, max_length: int, config) -> tuple[list[dict], str]:
    """Where CUDA is present, every row that can run on a GPU: full-precision torch models in fp32 and fp16, the
    bitsandbytes 4-bit checkpoints, and every ONNX file on ONNX Runtime's CUDA provider; test accuracy on the GPU and
    latency timed round-robin among themselves. A row that fails on the GPU is named in the note. Returns (rows, note)."""
    if not torch.cuda.is_available():
        return [], "No CUDA device: GPU rows (torch fp32/fp16, bitsandbytes 4-bit, ONNX Runtime CUDA) skipped."
    import onnxruntime as ort

    cuda_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    rows, runners, failed = [], {}, []
    for item in evaluated:
        for runtime, half, suffix in gpu_variants(item, cuda_ort):
            label = item.row["label"].replace(" (FP32)", "") + suffix
            try:
                model = ModelRuntime(item.folder, item.entry.onnx_file, device="cuda", half=half)
                if model.onnx is not None and "CUDAExecutionProvider" not in model.onnx.session.get_providers():
                    raise RuntimeError("ONNX Runtime put the whole graph on the CPU provider")
                tokenizer = load_checkpoint_tokenizer(item.folder)
                loader = make_loader(tokenize_dataset(data.test, tokenizer, max_length), tokenizer, config.eval_batch_size,
                                     shuffle=False)
                logits, labels = model.logits(loader)
                runner = model.runner(model.batch(config.latency_batch_size, config.latency_seq_length))
                runner()
            except Exception as error:  # one row that cannot run on this GPU must not lose the others
                failed.append(f"{label}: {type(error).__name__}: {error}")
                continue
            metrics = classification_metrics(logits.argmax(-1), labels)
            rows.append({**item.row, "label": label, "runtime": runtime, "device": "cuda",
                         "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]})
            runners[label] = runner
    failures = f" Could not run on the GPU: {'; '.join(failed)}." if failed else ""
    if not runners:
        return [], f"CUDA present, but no row ran on it.{failures}"
    reference = next(iter(runners))
    timings = interleaved_latency(runners, config.latency_warmup, config.latency_repeats, config.latency_batch_size, reference)
    for row in rows:
        timing = timings[row["label"]]
        row.update({key: value for key, value in timing.items() if not key.startswith("speedup_vs_reference")})
        row.update(speedup_vs_gpu_reference=timing["speedup_vs_reference_median"])
    return rows, (f"GPU rows on {torch.cuda.get_device_name(0)}, timed round-robin among themselves against "
                  f"{reference}.{failures}")
