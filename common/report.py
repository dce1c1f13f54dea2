"""The final report: evaluate each stage's checkpoint on the test split and write JSON, PNG and Markdown.

Each model is loaded from its own ``compression.json`` (4-bit, int8, pruned or not), tokenized with its own
tokenizer (a vocabulary-pruned model numbers tokens differently) and measured: accuracy and macro-F1 on the
test split, parameters, weight-file size, CPU latency/throughput and peak memory in a fresh process. A missing
or broken checkpoint is recorded as skipped with the reason; the rest are still evaluated.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoints
from .data import TextClassificationData, make_loader, tokenize_dataset
from .evaluation import classification_metrics, measure_in_subprocess, predict
from .models import count_parameters, load_checkpoint_tokenizer, load_model, weights_size_bytes

logger = logging.getLogger(__name__)

# Display name -> stage; users can add rows with --extra_models 'Label=path'.
MODELS_TO_EVALUATE = {
    "Teacher (FP32)": "teacher",
    "Student (FP32)": "student",
    "Pruned Student (FP32)": "pruned",
    "Pruned + Quantized Student (PTQ)": "ptq_4bit",
    "Pruned + QKD-4bit (QAT)": "qkd_4bit",
    "Int8 CPU deployment": "int8",
}
REFERENCE_LABEL = "Teacher (FP32)"


@dataclass
class ModelEntry:
    label: str
    stage: Optional[str]
    path: Optional[str]


def model_entries(config) -> list[ModelEntry]:
    explicit = {
        "teacher": config.teacher_path, "student": config.student_path, "pruned": config.pruned_path,
        "ptq_4bit": config.ptq_path, "qkd_4bit": config.qkd_path, "int8": config.int8_path,
    }
    entries = [ModelEntry(label, stage, explicit[stage]) for label, stage in MODELS_TO_EVALUATE.items()]
    for item in config.extra_models:
        label, _, path = item.partition("=")
        entries.append(ModelEntry(label.strip(), None, path.strip()))
    return entries


def evaluate_entry(entry: ModelEntry, data: TextClassificationData, max_length: int, config) -> dict:
    """All measurements of one model; raises on a missing or broken checkpoint."""
    if entry.stage is not None:
        folder = checkpoints.find_checkpoint(entry.stage, entry.path)
    else:
        folder = Path(entry.path).expanduser().resolve()
        checkpoints.read_record(folder)
    record = checkpoints.read_record(folder)
    trained_on = record.get("label_names")
    if trained_on is not None and list(trained_on) != data.label_names:
        raise ValueError(f"trained on labels {trained_on}, but the test data has {data.label_names}")
    model = load_model(folder)
    tokenizer = load_checkpoint_tokenizer(folder)
    loader = make_loader(tokenize_dataset(data.test, tokenizer, max_length), tokenizer, config.eval_batch_size, shuffle=False)
    logits, labels = predict(model, loader)
    metrics = classification_metrics(logits.argmax(-1), labels)
    parameters = count_parameters(model)
    del model
    speed = measure_in_subprocess(
        folder, config.latency_batch_size, config.latency_seq_length, config.latency_warmup, config.latency_repeats, config.num_threads
    )
    quantization = record.get("quantization") or {}
    return {
        "label": entry.label,
        "stage": record.get("stage", entry.stage),
        "path": str(folder),
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_examples": int(len(labels)),
        "parameters": parameters,
        "size_bytes": weights_size_bytes(folder),
        "size_mb": weights_size_bytes(folder) / 1e6,
        "quantization": quantization.get("method", "none"),
        "architecture": record.get("architecture"),
        **speed,
    }


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


def add_relative_fields(rows: list[dict]) -> None:
    reference = next((row for row in rows if row["label"] == REFERENCE_LABEL), None)
    for row in rows:
        if reference is None:
            row.update(accuracy_vs_teacher=None, size_ratio_to_teacher=None, latency_ratio_to_teacher=None,
                       compression_vs_teacher=None, speedup_vs_teacher=None)
            continue
        row["accuracy_vs_teacher"] = row["test_accuracy"] / reference["test_accuracy"]
        row["size_ratio_to_teacher"] = row["size_bytes"] / reference["size_bytes"]
        row["latency_ratio_to_teacher"] = row["latency_ms_median"] / reference["latency_ms_median"]
        row["compression_vs_teacher"] = reference["size_bytes"] / row["size_bytes"]
        row["speedup_vs_teacher"] = reference["latency_ms_median"] / row["latency_ms_median"]
    size_front = pareto_front([(row["size_bytes"], row["test_accuracy"]) for row in rows])
    latency_front = pareto_front([(row["latency_ms_median"], row["test_accuracy"]) for row in rows])
    for row, on_size, on_latency in zip(rows, size_front, latency_front):
        row["pareto_size"] = on_size
        row["pareto_latency"] = on_latency


def machine_info(config) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": config.num_threads or torch.get_num_threads(),
        "versions": checkpoints.package_versions(),
    }


def build_report(config, data: TextClassificationData, max_length: int, settings: dict) -> dict:
    rows, skipped = [], []
    for entry in model_entries(config):
        try:
            logger.info("Evaluating %s", entry.label)
            rows.append(evaluate_entry(entry, data, max_length, config))
        except Exception as error:  # one bad checkpoint must not sink the whole report
            reason = f"{type(error).__name__}: {error}"
            logger.warning("Skipping %s: %s", entry.label, reason)
            skipped.append({"label": entry.label, "stage": entry.stage, "path": entry.path, "reason": reason})
    add_relative_fields(rows)
    return {
        "models": rows,
        "skipped": skipped,
        "machine": machine_info(config),
        "settings": settings,
        "data": {"source": data.source, "test_examples": len(data.test), "label_names": data.label_names},
    }


# -- writing ---------------------------------------------------------------------------------------------


def _number(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown_table(report: dict) -> str:
    header = (
        "| Model | Test acc. | Macro-F1 | vs teacher | Params | Size (MB) | × smaller | Latency (ms) | × faster | "
        "Throughput (ex/s) | Resident (MB) | Peak (MB) | Pareto size / latency |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in report["models"]:
        lines.append(
            f"| {row['label']} | {100 * row['test_accuracy']:.2f}% | {100 * row['test_macro_f1']:.2f}% | "
            f"{_number(None if row['accuracy_vs_teacher'] is None else 100 * row['accuracy_vs_teacher'])}% | "
            f"{row['parameters']:,} | {row['size_mb']:.2f} | {_number(row['compression_vs_teacher'], 1)} | "
            f"{row['latency_ms_median']:.1f} | {_number(row['speedup_vs_teacher'], 1)} | "
            f"{row['throughput_examples_per_s']:.0f} | {row['model_rss_mb']:.0f} | {row['inference_peak_mb']:.0f} | "
            f"{'✓' if row['pareto_size'] else ''} / {'✓' if row['pareto_latency'] else ''} |"
        )
    text = header + "\n".join(lines) + "\n"
    settings = report["settings"]
    text += (
        f"\nTest split: {report['data']['test_examples']} examples of {report['data']['source']}. Latency: batch "
        f"{settings['latency_batch_size']} × {settings['latency_seq_length']} tokens, median of {settings['latency_repeats']} "
        f"runs after {settings['latency_warmup']} warm-up, {report['machine']['torch_threads']} threads, one fresh process per model. "
        f"Resident: memory the loaded model adds to its process; Peak: the process's peak resident memory during the "
        f"timed forward passes, over its size before loading (weights plus activations).\n"
    )
    if report["skipped"]:
        text += "\nSkipped:\n" + "".join(f"- {s['label']}: {s['reason']}\n" for s in report["skipped"])
    return text


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["models"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    if not rows:
        for axis in axes:
            axis.text(0.5, 0.5, "no model could be evaluated", ha="center", va="center", transform=axis.transAxes)
        figure.savefig(path, dpi=130, format="png")
        plt.close(figure)
        return
    colormap = plt.get_cmap("tab10" if len(rows) <= 10 else "viridis")
    colors = [colormap(i if len(rows) <= 10 else i / max(1, len(rows) - 1)) for i in range(len(rows))]
    markers = "osD^vPX*hp<>"
    # Later models are drawn smaller and on top, so models at the same point stay visible as nested markers.
    sizes = [max(50, 260 - 35 * i) for i in range(len(rows))]
    panels = (("size_mb", "pareto_size", "Weight files on disk (MB, log scale)"), ("latency_ms_median", "pareto_latency", "CPU latency per batch (ms, log scale)"))
    for axis, (key, front_key, xlabel) in zip(axes, panels):
        for index, (row, color, size) in enumerate(zip(rows, colors, sizes)):
            x, y = row[key], 100 * row["test_accuracy"]
            axis.scatter(x, y, s=size, color=color, marker=markers[index % len(markers)], label=row["label"], zorder=3 + index, alpha=0.95)
            if row[front_key]:
                axis.scatter(x, y, s=size + 220, facecolors="none", edgecolors="black", linewidths=1.3, zorder=2)
        front = sorted((row[key], 100 * row["test_accuracy"]) for row in rows if row[front_key])
        if len(front) > 1:
            axis.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", linestyle="--", linewidth=1, zorder=1)
        axis.set_xscale("log")
        # plain numbers on the log axis; minor labels would run into each other
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel(xlabel)
        axis.set_ylabel("Test accuracy (%)")
        axis.margins(x=0.15, y=0.15)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_title("Accuracy vs size")
    axes[1].set_title("Accuracy vs latency")
    handles, labels = axes[0].get_legend_handles_labels()
    ring = plt.Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", markeredgecolor="black", markersize=13)
    front_line = plt.Line2D([], [], color="grey", linestyle="--")
    figure.legend(handles + [ring, front_line], labels + ["Pareto-optimal (ring)", "Pareto front"],
                  loc="outside right center", fontsize=9, frameon=False)
    figure.savefig(path, dpi=130, format="png")
    plt.close(figure)


def write_report(report: dict, folder: Path, name: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {suffix: folder / f"{name}.{suffix}" for suffix in ("json", "png", "md")}
    temporary = {suffix: path.with_name(f".{path.name}.tmp") for suffix, path in paths.items()}
    checkpoints.write_json(temporary["json"], report)
    plot_report(report, temporary["png"])
    temporary["md"].write_text(markdown_table(report))
    for suffix in paths:
        temporary[suffix].replace(paths[suffix])
    return paths
