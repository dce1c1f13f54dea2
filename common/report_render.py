"""Rendering of the final report: JSON, the markdown table and the accuracy-vs-size/latency plot with its Pareto
fronts, written next to each other atomically. The rows come from ``report.build_report``."""

from __future__ import annotations

import math
from pathlib import Path

from . import checkpoints, stages
from .search_trace import plot_search, search_markdown

REFERENCE_LABEL = stages.get("teacher").rows[0].label


def _number(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _whole(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown_table(report: dict) -> str:
    header = (
        "| Model | Runtime | Test acc. | Macro-F1 | vs teacher | Params | Size (MB) | × smaller | Latency (ms), median [IQR] | "
        "× faster [IQR] | × faster than teacher ORT int8 | × faster than best peer | Throughput (ex/s) | Resident (MB) | Peak (MB) | Pareto size / latency |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in report["models"]:
        speedup = _number(row.get("speedup_vs_teacher"), 1)
        if row.get("speedup_vs_teacher_p25") is not None:
            speedup += f" [{row['speedup_vs_teacher_p25']:.1f}–{row['speedup_vs_teacher_p75']:.1f}]"
        parameters = f"{row['parameters']:,}" if isinstance(row.get("parameters"), int) else "–"
        lines.append(
            f"| {row['label']} | {row.get('runtime', 'torch')} | {100 * row['test_accuracy']:.2f}% | {100 * row['test_macro_f1']:.2f}% | "
            f"{_number(None if row['accuracy_vs_teacher'] is None else 100 * row['accuracy_vs_teacher'])}% | "
            f"{parameters} | {row['size_mb']:.2f} | {_number(row['compression_vs_teacher'], 1)} | "
            f"{row['latency_ms_median']:.1f} [{row['latency_ms_p25']:.1f}–{row['latency_ms_p75']:.1f}] | {speedup} | "
            f"{_number(row.get('speedup_vs_ort_reference'), 2)} | {_number(row.get('speedup_vs_best_peer'), 2)} | "
            f"{row['throughput_examples_per_s']:.0f} | {_whole(row['model_rss_mb'])} | {_whole(row['inference_peak_mb'])} | "
            f"{'✓' if row['pareto_size'] else ''} / {'✓' if row['pareto_latency'] else ''} |"
        )
    text = header + "\n".join(lines) + "\n"
    best_peer = next((row["best_peer"] for row in report["models"] if row.get("best_peer")), None)
    if best_peer:
        text += (f"\nBest peer: {best_peer}, the fastest row a user could pick instead of this project that keeps 99% "
                 f"of the teacher's test accuracy.\n")
    machine = report["machine"]
    flags = ", ".join(name for name, present in machine.get("instruction_sets", {}).items() if present) or "unknown"
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    text += (
        f"\nTest split: {report['data']['test_examples']} examples of {report['data']['source']}.\n\n"
        f"Latency: {report['latency_method']}. Threads: {machine['torch_threads']} (torch and ONNX Runtime). "
        f"CPU: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} logical cores; int8 acceleration: "
        f"{machine.get('int8_acceleration', 'unknown')} (instruction sets present: {flags}). int8 speed-ups differ by 2–3× "
        f"between CPUs with and without VNNI/AMX. {report.get('gpu', '')}\n\n"
        f"Resident: memory the loaded model adds to its process; Peak: the process's peak resident memory during "
        f"forward passes over its size before loading (weights plus activations); both measured in a fresh process "
        f"per model.\n\nVersions: {versions}.\n"
    )
    text += quality_and_cost_table(report)
    quantized = [row for row in report["models"] if row.get("worst_quantized_layers")]
    if quantized:
        text += ("\n4-bit quantization error per layer, measured on the full-precision weights before quantizing "
                 "(relative output MSE on validation batches; weight SNR), the five worst layers of each model:\n\n"
                 "| Model | Layer | Output rel. MSE | Weight SNR (dB) |\n|---|---|---|---|\n")
        for row in quantized:
            for layer in row["worst_quantized_layers"]:
                mse = layer["output_relative_mse"]
                snr = layer["weight_snr_db"]
                text += (f"| {row['label']} | {layer['layer']} | {'–' if mse is None else f'{mse:.2e}'} | "
                         f"{'exact' if snr is None else f'{snr:.1f}'} |\n")
    if report.get("gpu_models"):
        text += "\n| GPU model | Runtime | Test acc. | Latency (ms), median [IQR] | × faster than the first GPU row |\n|---|---|---|---|---|\n"
        for row in report["gpu_models"]:
            text += (f"| {row['label']} | {row['runtime']} | {100 * row['test_accuracy']:.2f}% | {row['latency_ms_median']:.1f} "
                     f"[{row['latency_ms_p25']:.1f}–{row['latency_ms_p75']:.1f}] | {row['speedup_vs_gpu_reference']:.1f} |\n")
    if report.get("search"):
        text += (f"\nThe pruned checkpoint ({report['search']['pruned_checkpoint']}) was chosen by a target-driven search "
                 f"(scripts/compress.py); its trace, also plotted in the report's _search.png:\n\n"
                 + search_markdown(report["search"]))
    if report["skipped"]:
        text += "\nSkipped:\n" + "".join(f"- {s['label']}: {s['reason']}\n" for s in report["skipped"])
    return text


def _interval(values, scale: float = 100.0) -> str:
    return "–" if not values else f"{scale * values[0]:.1f}–{scale * values[1]:.1f}"


def _engineering(value, unit: str) -> str:
    if value is None:
        return "–"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def quality_and_cost_table(report: dict) -> str:
    """What the accuracy column hides: intervals, disagreement with the teacher, per-class F1, compute per example
    and the latency of real texts at batch 1."""
    rows = report["models"]
    labels = report["data"]["label_names"]
    sequence = next((row.get("cost_seq_length") for row in rows if row.get("cost_seq_length")), None)
    text = (f"\nQuality and cost. Intervals: 95% bootstrap over the test inputs (teacher and model resampled together "
            f"for the retention). Differs: test inputs labelled unlike the teacher (fixed: the teacher was wrong; broken: "
            f"the teacher was right). FLOPs and weight bytes read: per example of {sequence} tokens at batch 1, from the "
            f"model's real layer shapes. Batch 1: {report.get('real_text_latency_method') or 'not measured'}.\n\n"
            "| Model | Acc. 95% CI | Retention 95% CI | Differs (fixed / broken) | F1 per class (" + " / ".join(labels) + ") | "
            "FLOPs/ex | Weights read/ex | Batch-1 p50 / p95 (ms) | Batch-1 ex/s | Dynamic-batch ex/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    for row in rows:
        agreement = row.get("agreement_with_teacher")
        differs = "–" if agreement is None else f"{agreement['differs']} ({agreement['fixed']} / {agreement['broken']})"
        per_class = " / ".join(f"{100 * row['per_class'][name]['f1']:.1f}" for name in labels) if row.get("per_class") else "–"
        batch_one = ("–" if row.get("latency_b1_ms_p50") is None
                     else f"{row['latency_b1_ms_p50']:.1f} / {row['latency_b1_ms_p95']:.1f}")
        text += (f"| {row['label']} | {_interval(row.get('accuracy_ci95'))}% | {_interval(row.get('retention_ci95'))}% | "
                 f"{differs} | {per_class} | {_engineering(row.get('flops_per_example'), 'FLOP')} | "
                 f"{_engineering(row.get('weight_bytes_read_per_example'), 'B')} | {batch_one} | "
                 f"{_number(row.get('throughput_b1_examples_per_s'), 0)} | {_number(row.get('throughput_dynamic_examples_per_s'), 0)} |\n")
    deployment = report.get("deployment") or {}
    if deployment.get("label"):
        text += f"\nDeployed model (shown beside the teacher in the confusion-matrix plot): **{deployment['label']}** ({deployment['rule']}).\n"
    return text


def plot_confusion(report: dict, path: Path) -> None:
    """The teacher's and the deployed model's confusion matrices side by side (counts, and the share of each gold class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_label = {row["label"]: row for row in report["models"]}
    deployed = (report.get("deployment") or {}).get("label")
    shown = [row for row in (by_label.get(REFERENCE_LABEL), by_label.get(deployed)) if row is not None]
    names = report["data"]["label_names"]
    figure, axes = plt.subplots(1, max(1, len(shown)), figsize=(5.2 * max(1, len(shown)), 4.6), constrained_layout=True,
                                squeeze=False)
    for axis, row in zip(axes[0], shown):
        matrix = np.asarray(row["confusion_matrix"], dtype=float)
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for gold in range(len(names)):
            for predicted in range(len(names)):
                axis.text(predicted, gold, f"{int(matrix[gold, predicted])}\n{100 * shares[gold, predicted]:.1f}%",
                          ha="center", va="center", color="white" if shares[gold, predicted] > 0.6 else "black", fontsize=9)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_yticks(range(len(names)), names)
        axis.set_xlabel("Predicted")
        axis.set_ylabel("Gold")
        axis.set_title(f"{row['label']}\naccuracy {100 * row['test_accuracy']:.2f}%", fontsize=10)
    if not shown:
        axes[0][0].text(0.5, 0.5, "no teacher or deployed row", ha="center", va="center")
    figure.savefig(path, dpi=130, format="png")
    plt.close(figure)


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
    paths["confusion"] = folder / f"{name}_confusion.png"
    if report.get("search"):
        paths["search"] = folder / f"{name}_search.png"
    temporary = {suffix: path.with_name(f".{path.name}.tmp") for suffix, path in paths.items()}
    checkpoints.write_json(temporary["json"], report)
    plot_report(report, temporary["png"])
    plot_confusion(report, temporary["confusion"])
    if report.get("search"):
        plot_search(report["search"], temporary["search"])
    temporary["md"].write_text(markdown_table(report))
    for suffix in paths:
        temporary[suffix].replace(paths[suffix])
    return paths
