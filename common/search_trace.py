"""The record of a target-driven search (``scripts/compress.py``), rendered: its markdown table and its trace plot.
Shared by compress.py (``results/compress/<run_id>/search.{md,png}``) and the report, which shows the search behind
the pruned checkpoint it evaluates (the record is kept in that checkpoint's ``compression.json`` under ``search``);
also the tables of the tools that measure afterwards (``scripts/compress_summary.py``, ``scripts/retention_check.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


def candidate_name(entry: dict) -> str:
    """'sparsity 0.30' or 'sparsity 0.30, 1 layer(s) dropped' (a candidate, or the winner's record)."""
    drop = entry.get("drop_layers", 0)
    return f"sparsity {entry['sparsity']:.2f}" + (f", {drop} layer(s) dropped" if drop else "")


def start_name(as_own_student: bool, capitalized: bool = False) -> str:
    """What the messages call the model the candidates are pruned from (``capitalized`` to open a sentence)."""
    name = "the unpruned teacher (pruned as its own student)" if as_own_student else "the unpruned student"
    return name[0].upper() + name[1:] if capitalized else name


def gate_word(candidate: dict) -> str:
    """A candidate's gate in a word; 'pass, not its int8 copy' where its int8 copy counts (--finish false, or
    --optimize latency) and fails, so the search counted it as failing (``common.search.qualifies``)."""
    if not candidate["passes"]:
        return "fail"
    return "pass" if candidate.get("qualifies", True) else "pass, not its int8 copy"


def _int8_gate(candidate: dict) -> str:
    gate = candidate.get("int8_gate")  # traces written before the int8 copy was gated have none
    return "—" if gate is None else f"{gate['retention']:.4f} ({'pass' if gate['passes'] else 'fail'})"


def search_markdown(record: dict) -> str:
    """The target, every candidate and file with its gate, the winner and the delivered file, and why."""
    lines = [f"Target: {record['target_retention']} of the teacher's validation accuracy "
             f"({record['teacher_validation_accuracy']:.4f}, {record['validation_examples']} examples), gate z = "
             f"{record['gate_z']}, optimize {record['optimize']}{_seed(record)}. Status: {record.get('status')}.", "",
             "| Sparsity | Layers dropped | Validation acc. | Retention | Margin (points) | Gate | int8 ms | int8 MB | int8 retention (gate) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in record["candidates"]:
        predicted = f" (table: {c['predicted_int8_latency_ms']:.2f})" if c.get("predicted_int8_latency_ms") else ""
        lines.append(f"| {c['sparsity']:.2f} | {c.get('drop_layers', 0)} | {c['validation_accuracy']:.4f} | {c['retention']:.4f} | {c['margin_points']:.2f} | "
                     f"{gate_word(c)} | {c['int8_latency_ms']:.2f}{predicted} | {c['int8_size_mb']:.2f} | "
                     f"{_int8_gate(c)} |")
    for c in record.get("not_trained", []):
        lines.append(f"| {c['sparsity']:.2f} | {c['drop_layers']} | not trained: {c['why']} | | | | | | |")
    if record.get("files"):
        lines += ["", "| File | Validation acc. | Retention | Gate | Latency ms | Size MB |", "|---|---|---|---|---|---|"]
        for f in record["files"]:
            latency = "not timed" if f["latency_ms"] is None or math.isinf(f["latency_ms"]) else f"{f['latency_ms']:.2f}"
            lines.append(f"| {f['name']} | {f['validation_accuracy']:.4f} | {f['retention']:.4f} | {'pass' if f['passes'] else 'fail'} | "
                         f"{latency} | {f['size_mb']:.2f} |")
    student = record.get("student_gate")
    if student:
        # traces written before as_own_student was recorded: the same folder named for both
        start = start_name(record.get("as_own_student", record.get("student") == record.get("teacher")), capitalized=True)
        lines += ["", f"{start}, for reference: retention {student['retention']:.4f}, "
                      f"{'pass' if student['passes'] else 'fail'} (lower bound {student['lower_bound_points']:+.2f} points)."]
    deeper = record.get("deeper_students")
    if deeper:
        found = deeper["found_gate"]
        lines.append(f"Found student {deeper['found_student']}: retention {found['retention']:.4f}, fail (lower bound "
                     f"{found['lower_bound_points']:+.2f} points); {deeper['why']}.")
        for student in deeper["tried"]:
            lines.append(f"- deeper student, {student['layers']} layers ({student['folder']}): retention "
                         f"{student['retention']:.4f}, {'pass' if student['passes'] else 'fail'} (lower bound "
                         f"{student['lower_bound_points']:+.2f} points)")
    if record.get("start_fallback"):
        lines.append(f"Start: {record['start_fallback']['why']}.")
    if record.get("ladder_extension"):
        lines.append(f"Below the ladder: {record['ladder_extension']['why']}.")
    if record.get("winner"):
        retreated = (record.get("retreat") or {}).get("chosen")
        lines += ["", f"Winner{' of the search' if retreated else ''}: {candidate_name(record['winner'])}, "
                      f"{record['winner']['why']}."]
        if retreated:
            lines.append(f"Exported instead: {retreated['name']}, whose QKD-4bit model kept the target where the "
                         f"winner's missed (Retreat, below).")
    if record.get("embeddings"):
        lines.append(f"Word-embedding rows: {record['embeddings']['method']}, {record['embeddings']['why']}.")
    retreat = record.get("retreat")
    if retreat:
        lines.append(f"Retreat (--qkd_retreats): {retreat['why']}.")
        lines += [f"- stage 10 on {entry['name']}: {_rows(entry['embeddings']['method'], entry['embeddings']['gate'])}, "
                  f"retention {entry['embeddings']['gate']['retention']:.4f} "
                  f"({'pass' if entry['embeddings']['gate']['passes'] else 'fail'})"
                  for entry in retreat["tried"]]
    mixed = record.get("mixed_precision")
    if mixed:
        lines.append(f"Mixed precision: every Linear in 4 bits gives retention {mixed['all_4bit']['retention']:.4f} "
                     f"({'pass' if mixed['all_4bit']['passes'] else 'fail'}); {mixed['why']}.")
    if record.get("delivered_why"):
        lines.append(f"Delivered: {record['delivered_why']}.")
    for objective, chosen in (record.get("by_objective") or {}).items():
        if objective != record["optimize"] and chosen:
            lines.append(f"With --optimize {objective} the same files would deliver {chosen['name']} "
                         f"({chosen['latency_ms']:.2f} ms, {chosen['size_mb']:.2f} MB, retention {chosen['retention']:.4f}).")
    if record.get("resumed_from"):
        lines.append(f"Resumed from {record['resumed_from']}: {record.get('reused_steps', 0)} of "
                     f"{len(record.get('steps', []))} stage runs reused (the same command), the rest run.")
    if "wall_time_s" in record:
        lines.append(f"Wall time: {record['wall_time_s']} s.")
    return "\n".join(lines) + "\n"


def _seed(record: dict) -> str:
    return "" if record.get("seed") is None else f", seed {record['seed']}"


def qkd_points(record: dict) -> list[dict]:
    """The QKD-4bit models of the trace (stage 10 on the winner, its 8-bit search's tries, then stage 10 on the
    retreat's candidates), each with the sparsity of the candidate it was trained from, its word-embedding rows, a
    label (naming the Linears kept at 8 bits too) and its gate."""
    points = []
    embeddings = record.get("embeddings")
    if embeddings and record.get("winner"):
        points += _stage_10_points(record["winner"]["sparsity"], embeddings)
        points += [{"sparsity": record["winner"]["sparsity"], "rows": embeddings["method"],
                    "label": f"{embeddings['method']} rows, {entry['layers_8bit']} Linear(s) at 8 bits",
                    "retention": entry["retention"], "passes": entry["passes"]}
                   for entry in (record.get("mixed_precision") or {}).get("tried", [])]
    by_folder = {c.get("folder"): c for c in record.get("candidates", [])}
    for entry in (record.get("retreat") or {}).get("tried", []):
        candidate = by_folder.get(entry["folder"])
        if candidate is None:
            continue
        points += _stage_10_points(candidate["sparsity"], entry["embeddings"])
    return points


def _stage_10_points(sparsity: float, embeddings: dict) -> list[dict]:
    # a kept first try (ternary rows that passed) is both in "tried" and the "gate": one point
    gates = [gate for gate in embeddings.get("tried", []) if gate.get("folder") != embeddings["gate"].get("folder")]
    return [{"sparsity": sparsity, "rows": rows, "label": _rows(rows, gate), "retention": gate["retention"],
             "passes": gate["passes"]}
            for rows, gate in [*((gate.get("rows", "int2"), gate) for gate in gates),
                               (embeddings["method"], embeddings["gate"])]]


def _rows(rows: str, gate: dict) -> str:
    """``int2 rows, 3000 at int4``: a stage-10 model's word-embedding rows (int4 rows among ternary ones counted)."""
    return f"{rows} rows" + (f", {gate['int4_rows']} at int4" if gate.get("int4_rows") else "")


def exported_candidate(record: dict) -> Optional[dict]:
    """The candidate whose pruned checkpoint stages 12 and 13 exported: the winner, or the retreat's choice."""
    return next((c for c in record.get("candidates", []) if record.get("published_from")
                 and c.get("folder") == record["published_from"]), None)


def plot_search(record: dict, path: Path) -> None:
    """Validation retention of every candidate against its sparsity (marker: layers dropped; green: passes the gate,
    bar: the gate's margin; label: int8 latency), the QKD-4bit models trained from them (diamonds), the exported
    candidate ringed, with the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    markers = dict(zip(sorted({c.get("drop_layers", 0) for c in record["candidates"]}), "os^Dv<>p"))
    for c in record["candidates"]:
        drop = c.get("drop_layers", 0)
        axis.errorbar(c["sparsity"], 100 * c["retention"], yerr=c["margin_points"] / max(record["teacher_validation_accuracy"], 1e-9),
                      marker=markers.get(drop, "o"), color="tab:green" if c["passes"] else "tab:red", capsize=3,
                      fillstyle="full" if c["passes"] else "none")
        axis.annotate(f"{c['int8_latency_ms']:.1f} ms", (c["sparsity"], 100 * c["retention"]), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
    points = qkd_points(record)
    for point in points:  # drawn a little to the right of their candidate, which they would otherwise hide
        axis.plot(point["sparsity"] + 0.008, 100 * point["retention"], marker="d", linestyle="none",
                  color="tab:green" if point["passes"] else "tab:red", fillstyle="full" if point["passes"] else "none")
        axis.annotate(point["label"], (point["sparsity"] + 0.008, 100 * point["retention"]), fontsize=7,
                      xytext=(4, -8), textcoords="offset points")
    exported = exported_candidate(record)
    if exported is not None:
        axis.plot(exported["sparsity"], 100 * exported["retention"], marker="o", markersize=14, fillstyle="none",
                  color="black", linestyle="none", label="exported by stages 12 and 13")
    axis.axhline(100 * record["target_retention"], color="grey", linestyle="--", label="target")
    axis.set_xlabel("stage-8 sparsity (share of heads and FFN neurons removed)")
    axis.set_ylabel("validation retention (% of the teacher), bar: gate margin")
    for drop, marker in markers.items():
        axis.plot([], [], marker=marker, color="grey", linestyle="none", label=f"{drop} layer(s) dropped")
    if points:
        axis.plot([], [], marker="d", color="grey", linestyle="none", label="QKD-4bit model (stage 10)")
    axis.set_title("Search trace (green: passes the gate, red: fails)")
    axis.legend()
    figure.savefig(path, dpi=130, format="png")
    plt.close(figure)


def seed_spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max of one measure over runs (seeds); std is None for one run."""
    if not values:
        raise ValueError("no runs to summarize")
    mean = sum(values) / len(values)
    std = None if len(values) < 2 else (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {"runs": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def spread_cell(stats: Optional[dict], scale: float = 1.0, unit: str = "") -> str:
    """One ``seed_spread`` as a table cell: mean ± std [min–max] (no ± for one run; n/a for none)."""
    if stats is None:
        return "n/a"
    std = "" if stats["std"] is None else f" ± {scale * stats['std']:.2f}"
    return f"{scale * stats['mean']:.2f}{unit}{std} [{scale * stats['min']:.2f}–{scale * stats['max']:.2f}]"


def summary_markdown(rows: list[dict], spread: dict) -> str:
    """The per-run table of what each objective delivered (test accuracy measured afterwards) and the spread over runs."""
    lines = ["| Run | Seed | Objective | File | Validation retention | Test acc. (% of teacher) | Latency ms (× teacher) | Size MB (× smaller) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = f" ({row['speedup_vs_teacher']:.1f}×)" if row.get("speedup_vs_teacher") else ""
        lines.append(f"| {row['run']} | {row['seed']} | {row['objective']} | {row['name']} | {100 * row['validation_retention']:.2f}% | "
                     f"{100 * row['test_accuracy']:.2f}% ({100 * row['test_retention']:.2f}%) | {row['latency_ms']:.1f}{speedup} | "
                     f"{row['size_mb']:.2f} ({row['times_smaller']:.1f}×) |")
    lines += ["", "| Objective | Runs | Test retention, mean ± std [min–max] | × faster than the torch teacher | × smaller than the teacher's checkpoint |",
              "|---|---|---|---|---|"]
    for objective, stats in spread.items():
        lines.append(f"| {objective} | {stats['test_retention']['runs']} | {spread_cell(stats['test_retention'], 100, '%')} | "
                     f"{spread_cell(stats['speedup_vs_teacher'])} | {spread_cell(stats['times_smaller'])} |")
    return "\n".join(lines) + "\n"


REFERENCE_COLUMNS = {"speedup_vs_torch_teacher": "× faster than the torch teacher",
                     "speedup_vs_teacher_int8": "× faster than the teacher in ONNX Runtime int8",
                     "speedup_vs_baseline": "× faster than the baseline"}


def baseline_spread(rows: list[dict], references: list[dict]) -> dict:
    """Per objective: the spread over runs of the picked file's median speed-up against --baseline in its run's rounds
    (empty without a baseline)."""
    medians: dict[str, list[float]] = {}
    for reference in references:
        timed = {model["name"]: model for model in reference["models"] if "speedup_vs_baseline" in model}
        for row in rows:
            if row["run"] == reference["run"] and row["name"] in timed:
                medians.setdefault(row["objective"], []).append(timed[row["name"]]["speedup_vs_baseline"]["median"])
    return {objective: seed_spread(values) for objective, values in medians.items()}


def reference_markdown(references: list[dict], against_baseline: Optional[dict] = None) -> str:
    """Per run: the torch teacher, the references (the teacher in ONNX Runtime dynamic int8, --baseline) and each
    picked file, timed in the same interleaved rounds (speed-up medians [IQR] over rounds); then, with a baseline, the
    spread over runs of each objective's speed-up against it."""
    def ratio(stats: dict) -> str:
        return f"{stats['median']:.2f}× [{stats['p25']:.2f}–{stats['p75']:.2f}]"

    columns = [key for key in REFERENCE_COLUMNS if any(key in model for ref in references for model in ref["models"])]
    lines = ["| Run | Model | Test acc. (% of teacher) | Size MB | Latency ms [IQR] | "
             + " | ".join(REFERENCE_COLUMNS[key] for key in columns) + " |", "|---|---|---|---|---|" + "---|" * len(columns)]
    for reference in references:
        for model in reference["models"]:
            accuracy = (f"{100 * model['test_accuracy']:.2f}% ({100 * model['test_retention']:.2f}%)"
                        if model.get("test_accuracy") is not None else "—")
            ratios = " | ".join(ratio(model[key]) if key in model else "—" for key in columns)
            lines.append(f"| {reference['run']} | {model['name']} | {accuracy} | {model['size_mb']:.2f} | "
                         f"{model['latency_ms']:.1f} [{model['latency_iqr_ms'][0]:.1f}–{model['latency_iqr_ms'][1]:.1f}] | "
                         f"{ratios} |")
    if against_baseline:
        lines += ["", "| Objective | Runs | × faster than the baseline (run medians), mean ± std [min–max] |", "|---|---|---|"]
        for objective, stats in against_baseline.items():
            lines.append(f"| {objective} | {stats['runs']} | {spread_cell(stats)} |")
    return "\n".join(lines) + "\n"


def retention_markdown(rows: list[dict], target: float, z: float, teacher: str) -> str:
    """scripts/retention_check.py's table: one line per model and split (``compare_with_teacher`` entries with the
    model's name and split)."""
    lines = [f"Against the teacher {teacher}; gate: retention {target} at z = {z} (it decides on validation; on test the "
             "same statistic is for reading only).", "",
             "| Model | Split | Accuracy | Teacher | Retention | Differs (fixed / broken) | Margin (points) | Lower bound "
             "(points) | Gate |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        differs = row["agreement"]
        lines.append(f"| {row['model']} | {row['split']} | {100 * row['accuracy']:.2f}% | {100 * row['teacher_accuracy']:.2f}% "
                     f"| {100 * row['retention']:.2f}% | {differs['differs']} ({differs['fixed']} / {differs['broken']}) "
                     f"| {row['margin_points']:.2f} | {row['lower_bound_points']:+.2f} | {'pass' if row['passes'] else 'fail'} |")
    return "\n".join(lines) + "\n"
