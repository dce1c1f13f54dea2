"""The final report's rows: evaluate each stage's model on the test split (rendered by ``report_render``).

Each row is a torch checkpoint (loaded from its own ``compression.json``: 4-bit, int8, pruned or not) or one
``.onnx`` file of an ONNX folder (run by ONNX Runtime), tokenized with its own tokenizer (a vocabulary-pruned
model numbers tokens differently) and measured: accuracy and macro-F1 on the test split, parameters, file size,
memory in a fresh process, and latency. Latency comes from one harness that times every row round-robin in this
process (``evaluation.interleaved_latency``), so a machine that is busier during one model's turn does not make
that model look slower, and each speed-up is computed against the teacher within the same rounds. One reference
row shows what a user gets without this project: the teacher exported to ONNX and quantized with ONNX Runtime's
default dynamic int8 in one line. A missing or broken checkpoint is recorded as skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoints, stages
from .data import TextClassificationData, make_loader, text_inputs, tokenize_dataset
from .evaluation import classification_metrics, cpu_info
from .metrics import agreement, bootstrap_intervals, confusion_matrix, model_cost, per_class_metrics
from .models import check_matches_data, count_parameters, load_checkpoint_tokenizer, position_limit
from .report_timing import gpu_rows, measure_latency, measure_real_text_latency
from .runtime import ModelRuntime, measure_in_subprocess, open_onnx_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    label: str
    stage: Optional[str]
    path: Optional[str]
    onnx_file: Optional[str] = None  # None: a torch checkpoint; else the file of an ONNX folder to run


REFERENCE_LABEL = stages.get("teacher").rows[0].label
ORT_REFERENCE_LABEL = "Teacher, ONNX Runtime dynamic int8 (no project)"
ORT_OPTIMIZED_REFERENCE_LABEL = "Teacher, ONNX Runtime optimizer + dynamic int8 (no project)"
OPENVINO_REFERENCE_LABEL = "Teacher, OpenVINO + NNCF int8 (no project)"
PEER_LABELS = (ORT_REFERENCE_LABEL, ORT_OPTIMIZED_REFERENCE_LABEL, OPENVINO_REFERENCE_LABEL)  # what a user could pick instead of this project


def model_entries(config) -> list[ModelEntry]:
    """One entry per report row of the stage table (a stage's folder from ``--checkpoint STAGE=PATH`` or its newest
    run), then the user's ``--extra_models 'Label=path[:file.onnx]'`` rows."""
    explicit = config.checkpoint_paths
    entries = [ModelEntry(row.label, stage.name, explicit.get(stage.name), row.file)
               for stage in stages.STAGE_TABLE for row in stage.rows]
    for item in config.extra_models:
        label, _, target = item.partition("=")
        path, _, onnx_file = target.strip().partition(":")
        entries.append(ModelEntry(label.strip(), None, path.strip(), onnx_file.strip() or None))
    return entries


@dataclass
class EvaluatedRow:
    row: dict
    entry: ModelEntry
    folder: Path
    model: ModelRuntime  # kept for the latency harness, which runs every row in this process anyway
    tokenizer: object = None
    predictions: Optional[np.ndarray] = None  # test-split class ids, for the agreement with the teacher
    labels: Optional[np.ndarray] = None


def _resolve(entry: ModelEntry) -> tuple[Path, dict]:
    if entry.stage is not None:
        folder = checkpoints.find_checkpoint(entry.stage, entry.path)
    else:
        folder = Path(entry.path).expanduser().resolve()
    return folder, checkpoints.read_record(folder)


def evaluate_entry(entry: ModelEntry, data: TextClassificationData, data_config, config) -> EvaluatedRow:
    """Accuracy, size and memory of one model; raises on a missing or broken checkpoint."""
    folder, record = _resolve(entry)
    check_matches_data(folder, record, data_config, data.label_names)
    if entry.onnx_file is not None and not (folder / entry.onnx_file).is_file():
        raise FileNotFoundError(f"{folder} has no {entry.onnx_file}; {stages.rerun_hint(record.get('stage'))}")
    if entry.onnx_file is not None:
        model = open_onnx_file(folder, entry.onnx_file, num_threads=config.num_threads, spinning=False)
    else:
        model = ModelRuntime(folder, num_threads=config.num_threads, spinning=False)
    tokenizer = load_checkpoint_tokenizer(folder)
    loader = make_loader(tokenize_dataset(data.test, tokenizer, data_config.max_length), tokenizer, config.eval_batch_size, shuffle=False)
    logits, labels = model.logits(loader)
    predictions = logits.argmax(-1)
    metrics = classification_metrics(predictions, labels)
    parameters = count_parameters(model.torch_model) if entry.onnx_file is None else record.get("parameters")
    matrix = confusion_matrix(predictions, labels, len(data.label_names))
    try:
        cost = model_cost(folder, record, model.weight_files, config.latency_seq_length, parameters)
    except Exception as error:  # a model whose shapes cannot be rebuilt still gets its measured row
        logger.warning("No FLOPs/bytes for %s: %s: %s", entry.label, type(error).__name__, error)
        cost = {"parameters": parameters}
    size = model.size_bytes
    memory = dict.fromkeys(("model_rss_mb", "inference_peak_mb", "peak_rss_mb", "peak_covers_loading"))
    if config.measure_memory:
        memory = measure_in_subprocess(
            folder, config.latency_batch_size, config.latency_seq_length, warmup=1, repeats=config.memory_repeats,
            num_threads=config.num_threads, onnx_file=entry.onnx_file,
        )
    quantization = record.get("quantization") or {}
    file_info = (record.get("files") or {}).get(entry.onnx_file, {}) if entry.onnx_file else {}
    row = {
        "label": entry.label,
        "stage": record.get("stage", entry.stage),
        "path": str(folder if entry.onnx_file is None else folder / entry.onnx_file),
        "runtime": model.runtime,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_examples": int(len(labels)),
        "parameters": cost.get("parameters", parameters),
        "flops_per_example": cost.get("flops_per_example"),
        "macs_per_example": cost.get("macs_per_example"),
        "weight_bytes_read_per_example": cost.get("weight_bytes_read_per_example"),
        "cost_seq_length": cost.get("cost_seq_length"),
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class_metrics(matrix, data.label_names),
        **bootstrap_intervals(predictions, labels),
        "size_bytes": size,
        "size_mb": size / 1e6,
        "quantization": file_info.get("precision") or quantization.get("method", "none"),
        "architecture": record.get("architecture"),
        "worst_quantized_layers": _worst_layers(quantization) if entry.onnx_file is None else None,
        "model_rss_mb": memory["model_rss_mb"],
        "inference_peak_mb": memory["inference_peak_mb"],
        "peak_rss_mb": memory["peak_rss_mb"],
        "peak_covers_loading": memory["peak_covers_loading"],
    }
    return EvaluatedRow(row, entry, folder, model, tokenizer, predictions, labels)


def _worst_layers(quantization: dict) -> Optional[list[dict]]:
    errors = quantization.get("layer_errors")
    if not errors:
        return None
    from .quantization import worst_layers

    return [{"layer": name, **values} for name, values in worst_layers(errors)]


def build_reference_onnx(teacher_folder: Path, target: Path, max_length: int) -> ModelEntry:
    """What a user gets without this project: the teacher in ONNX, ONNX Runtime's default dynamic int8 (with the
    7-bit weights ONNX Runtime's documentation prescribes on CPUs whose int8 products saturate, so the peer is not
    broken by a setting a user would change)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .models import load_model
    from .onnx_export import export_onnx, write_runtime_files
    from .onnx_runtime import SATURATION_NOTE, _quiet_quantizer, int8_products_saturate

    teacher = load_model(teacher_folder)
    tokenizer = load_checkpoint_tokenizer(teacher_folder)
    export_onnx(teacher, tokenizer, target / "teacher.onnx", max_length)
    reduce_range = int8_products_saturate()
    with _quiet_quantizer():
        quantize_dynamic(str(target / "teacher.onnx"), str(target / "teacher_int8.onnx"), weight_type=QuantType.QInt8,
                         reduce_range=reduce_range)
    write_runtime_files(target, tokenizer, teacher.config, max_length)
    record = checkpoints.read_record(teacher_folder)
    checkpoints.write_json(target / checkpoints.RECORD_FILE, {
        "stage": "onnx_reference", "parent": str(teacher_folder), "label_names": record.get("label_names"),
        "parameters": count_parameters(teacher), "files": {"teacher_int8.onnx": {"precision": "int8 dynamic (ORT defaults"
                                           + (f"; {SATURATION_NOTE})" if reduce_range else ")")}},
    })
    return ModelEntry(ORT_REFERENCE_LABEL, None, str(target), "teacher_int8.onnx")


def build_reference_ort_optimized(target: Path) -> ModelEntry:
    """The teacher's ONNX export (``build_reference_onnx`` wrote it into ``target``) through ONNX Runtime's transformer
    optimizer (fused attention, LayerNorm and Gelu), then dynamic int8 (per-channel weights; the fused contrib ops
    need the quantizer's default tensor type, which ``quantize_dynamic_int8`` sets)."""
    from .onnx_runtime import optimize_graph, quantize_dynamic_int8

    fusions = optimize_graph(target / "teacher.onnx", target / "teacher_optimized.onnx")
    quantize_dynamic_int8(target / "teacher_optimized.onnx", target / "teacher_optimized_int8.onnx")
    (target / "teacher_optimized.onnx").unlink()
    record = checkpoints.read_record(target)
    fused = ", ".join(f"{name} {count}" for name, count in sorted(fusions.items())) or "none"
    record["files"]["teacher_optimized_int8.onnx"] = {"precision": f"int8 dynamic after ORT's optimizer (fused: {fused})"}
    checkpoints.write_json(target / checkpoints.RECORD_FILE, record)
    return ModelEntry(ORT_OPTIMIZED_REFERENCE_LABEL, None, str(target), "teacher_optimized_int8.onnx")


def build_reference_openvino(target: Path, data: TextClassificationData, max_length: int, samples: int = 300) -> ModelEntry:
    """The strongest peer measured here: the teacher's ONNX export (``build_reference_onnx`` wrote it into
    ``target``) in OpenVINO with NNCF's default post-training int8, calibrated on ``samples`` validation rows."""
    from .onnx_runtime import calibration_batches
    from .openvino_runtime import convert_onnx, quantize_int8

    tokenizer = load_checkpoint_tokenizer(target)
    convert_onnx(target / "teacher.onnx", target / "teacher_openvino.xml")
    from .openvino_runtime import OpenVinoClassifier

    names = OpenVinoClassifier(target / "teacher_openvino.xml").input_names
    batches = calibration_batches(tokenizer, *text_inputs(data.validation), names, max_length, 1, samples)
    quantize_int8(target / "teacher_openvino.xml", target / "teacher_openvino_int8.xml", batches, len(batches))
    record = checkpoints.read_record(target)
    record["files"]["teacher_openvino_int8.xml"] = {"precision": f"int8 (NNCF defaults, {len(batches)} validation rows)"}
    checkpoints.write_json(target / checkpoints.RECORD_FILE, record)
    return ModelEntry(OPENVINO_REFERENCE_LABEL, None, str(target), "teacher_openvino_int8.xml")


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point is at most as costly and at least as accurate,
    and strictly better in one of the two."""
    flags = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(
            other_cost <= cost and other_accuracy >= accuracy and (other_cost < cost or other_accuracy > accuracy)
            for j, (other_cost, other_accuracy) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def add_agreement(evaluated: list[EvaluatedRow]) -> None:
    """Every row against the teacher on the same test inputs: how many it labels differently (fixed / broken), and
    the bootstrap interval of its retention (accuracy / teacher accuracy)."""
    reference = next((item for item in evaluated if item.row["label"] == REFERENCE_LABEL), None)
    for item in evaluated:
        if reference is None or item.predictions is None:
            item.row.update(agreement_with_teacher=None, retention_ci95=None)
            continue
        item.row["agreement_with_teacher"] = agreement(item.predictions, reference.predictions, item.labels)
        item.row["retention_ci95"] = bootstrap_intervals(item.predictions, item.labels, reference.predictions)["retention_ci95"]


def choose_deployed(rows: list[dict], config) -> dict:
    """The row a user would ship: ``--deployed_model`` if given, else the fastest row at batch 1 on real texts (the
    synthetic batch where that was not measured) that keeps at least ``deploy_min_retention`` of the teacher's
    accuracy, else the most accurate compressed row."""
    candidates = [row for row in rows if row["label"] not in (REFERENCE_LABEL, *PEER_LABELS)]
    note = ""
    if config.deployed_model:
        if any(row["label"] == config.deployed_model for row in rows):
            return {"label": config.deployed_model, "rule": "--deployed_model"}
        note = f"--deployed_model {config.deployed_model!r} was skipped (see Skipped); "
    if not candidates:
        return {"label": None, "rule": "no compressed row"}

    def latency(row):
        return row.get("latency_b1_ms_p50") or row["latency_ms_median"]

    keeping = [row for row in candidates
               if row.get("accuracy_vs_teacher") is not None and row["accuracy_vs_teacher"] >= config.deploy_min_retention]
    if keeping:
        chosen = min(keeping, key=latency)
        rule = f"fastest row (batch-1 p50 on real texts) keeping >= {100 * config.deploy_min_retention:.1f}% of the teacher's accuracy"
    else:
        chosen = max(candidates, key=lambda row: row["test_accuracy"])
        rule = f"no row keeps {100 * config.deploy_min_retention:.1f}% of the teacher's accuracy: the most accurate compressed row"
    return {"label": chosen["label"], "rule": note + rule}


def add_relative_fields(rows: list[dict]) -> None:
    reference = next((row for row in rows if row["label"] == REFERENCE_LABEL), None)
    for row in rows:
        if reference is None:
            row.update(accuracy_vs_teacher=None, size_ratio_to_teacher=None, latency_ratio_to_teacher=None,
                       compression_vs_teacher=None)
            row.setdefault("speedup_vs_teacher", None)
            continue
        row["accuracy_vs_teacher"] = row["test_accuracy"] / reference["test_accuracy"]
        row["size_ratio_to_teacher"] = row["size_bytes"] / reference["size_bytes"]
        row["latency_ratio_to_teacher"] = row["latency_ms_median"] / reference["latency_ms_median"]
        row["compression_vs_teacher"] = reference["size_bytes"] / row["size_bytes"]
        if row.get("latency_b1_ms_p50") and reference.get("latency_b1_ms_p50"):
            row["speedup_b1_vs_teacher"] = reference["latency_b1_ms_p50"] / row["latency_b1_ms_p50"]
    size_front = pareto_front([(row["size_bytes"], row["test_accuracy"]) for row in rows])
    latency_front = pareto_front([(row["latency_ms_median"], row["test_accuracy"]) for row in rows])
    for row, on_size, on_latency in zip(rows, size_front, latency_front):
        row["pareto_size"] = on_size
        row["pareto_latency"] = on_latency


def machine_info(config) -> dict:
    threads = config.num_threads or torch.get_num_threads()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "onnxruntime_threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": checkpoints.package_versions(),
    }


def check_entries(entries: list[ModelEntry], config, data_config, label_names: list[str]) -> None:
    """Before anything is measured: every folder the user named (``--checkpoint``, ``--extra_models``) is a checkpoint
    of this data whose files are intact (a user-named ONNX file must fit the folder), and the benchmark sequence fits
    every model's position embeddings. A newest-run folder that fails is skipped and named in the report instead."""
    for entry in entries:
        try:
            folder, record = _resolve(entry)
        except (FileNotFoundError, ValueError):
            if entry.path is not None:
                raise
            continue  # a newest-run folder: reported as skipped later
        if entry.path is not None:
            check_matches_data(folder, record, data_config, label_names)
            if entry.onnx_file is not None:
                open_onnx_file(folder, entry.onnx_file, spinning=False)
            else:
                checkpoints.verify_files(folder, record=record)
        config_path = folder / "config.json"
        limit = position_limit(json.loads(config_path.read_text())) if config_path.is_file() else None
        if limit is not None and config.latency_seq_length > limit:
            raise ValueError(
                f"latency_seq_length={config.latency_seq_length} exceeds the {limit} position embeddings of {entry.label} "
                f"({folder}); pass --latency_seq_length {limit} or less."
            )


def search_behind(evaluated: list[EvaluatedRow]) -> Optional[dict]:
    """The target-driven search (scripts/compress.py) that chose the evaluated pruned checkpoint, from its
    ``compression.json``; None when that checkpoint came from stage 8 alone."""
    for item in evaluated:
        if item.row["stage"] == "pruned":
            search = checkpoints.read_record(item.folder).get("search")
            return None if search is None else {**search, "pruned_checkpoint": str(item.folder)}
    return None


def build_report(config, data: TextClassificationData, data_config, settings: dict) -> dict:
    """Evaluate every row; raises when no model at all could be evaluated (nothing useful to write)."""
    max_length = data_config.max_length
    evaluated, skipped = [], []
    entries = model_entries(config)
    check_entries(entries, config, data_config, data.label_names)
    labels = [entry.label for entry in entries] + list(PEER_LABELS)
    if config.deployed_model and config.deployed_model not in labels:
        raise ValueError(f"deployed_model={config.deployed_model!r} is none of the report's rows {labels}; pass one of "
                         f"them (an --extra_models label counts).")
    with tempfile.TemporaryDirectory(prefix="report-reference-") as scratch:
        if config.ort_reference:
            try:
                teacher_folder = checkpoints.find_checkpoint("teacher", config.checkpoint_paths.get("teacher"))
                entries.insert(1, build_reference_onnx(teacher_folder, Path(scratch), max_length))
            except Exception as error:  # the reference row is optional; say why it is missing
                skipped.append({"label": ORT_REFERENCE_LABEL, "stage": "teacher", "path": config.checkpoint_paths.get("teacher"),
                                "reason": f"{type(error).__name__}: {error}"})
        position = 2
        if config.ort_optimized_reference and (Path(scratch) / "teacher.onnx").is_file():
            try:
                entries.insert(position, build_reference_ort_optimized(Path(scratch)))
                position += 1
            except Exception as error:  # the optimizer's patterns change between ONNX Runtime versions
                skipped.append({"label": ORT_OPTIMIZED_REFERENCE_LABEL, "stage": "teacher", "path": None,
                                "reason": f"{type(error).__name__}: {error}"})
        if config.openvino_reference and (Path(scratch) / "teacher.onnx").is_file():
            try:
                entries.insert(position, build_reference_openvino(Path(scratch), data, max_length))
            except Exception as error:  # e.g. openvino or nncf not installed
                skipped.append({"label": OPENVINO_REFERENCE_LABEL, "stage": "teacher", "path": None,
                                "reason": f"{type(error).__name__}: {error}"})
        for entry in entries:
            try:
                logger.info("Evaluating %s", entry.label)
                evaluated.append(evaluate_entry(entry, data, data_config, config))
            except Exception as error:  # one bad checkpoint must not sink the whole report
                reason = f"{type(error).__name__}: {error}"
                logger.warning("Skipping %s: %s", entry.label, reason)
                skipped.append({"label": entry.label, "stage": entry.stage, "path": entry.path, "reason": reason})
        if evaluated:
            measure_latency(evaluated, config, REFERENCE_LABEL, PEER_LABELS)
            measure_real_text_latency(evaluated, data, max_length, config)
        try:
            gpu, gpu_note = gpu_rows(evaluated, data, max_length, config)
        except Exception as error:  # GPU rows are extra; a failure there must not lose the CPU report
            gpu, gpu_note = [], f"GPU rows failed: {type(error).__name__}: {error}"
    if not evaluated:
        reasons = "\n".join(f"- {item['label']}: {item['reason']}" for item in skipped)
        raise RuntimeError(f"No model could be evaluated, so no report was written:\n{reasons}\nRun the stages first "
                           f"(make pipeline), or pass checkpoint folders with --checkpoint STAGE=PATH.")
    rows = [item.row for item in evaluated]
    add_agreement(evaluated)
    add_relative_fields(rows)
    deployment = choose_deployed(rows, config)
    return {
        "models": rows,
        "skipped": skipped,
        "machine": machine_info(config),
        "settings": settings,
        "latency_method": (
            f"interleaved: {config.latency_warmup} warm-up rounds, then {config.latency_repeats} timed rounds, each running "
            f"every model once on one synthetic batch of {config.latency_batch_size} x {config.latency_seq_length} tokens in a "
            f"rotating order, in one process (ONNX Runtime threads do not spin between runs, so no model steals the "
            f"cores of the next); median and interquartile range; speed-ups are teacher time / model time within the "
            f"same round"
        ),
        "real_text_latency_method": (
            f"{min(config.real_text_examples, len(data.test))} test texts (a fixed random sample), each tokenized to its own "
            f"length: batch 1, every model once per text in a rotating order, p50/p95 over the texts; and the same texts "
            f"in batches of {config.latency_batch_size} padded to their longest text (dynamic padding), examples per second"
        ) if config.real_text_examples else None,
        "deployment": deployment,
        "search": search_behind(evaluated),
        "gpu": gpu_note,
        "gpu_models": gpu,
        "data": {"source": data.source, "test_examples": len(data.test), "label_names": data.label_names,
                 "text_pair_column": data_config.text_pair_column},
    }
