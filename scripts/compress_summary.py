"""What compress.py delivered, measured on test, and its spread over runs (e.g. seeds of the compression stages).

The search chooses on validation only; this tool measures afterwards, on the test split, the file each objective
picked in each run (the delivered file and the one ``by_objective`` names for the other objective), against the
run's own teacher, and gives mean ± standard deviation [min–max] over the runs of test retention, speed-up against the
torch teacher (from the run's own interleaved rounds) and size reduction against the teacher's checkpoint.

Reads:  results/compress/<run_id>/search.json of every run that delivered (or --runs), the checkpoints and exported
        files they name, and the test split of the data flags each run was made with (its record keeps them).
        With --int8_reference also each run's teacher in ONNX Runtime dynamic int8 (exported and quantized here), with
        --baseline a model to beat (e.g. the fixed recipe's NF4-codes int8 file): their test accuracy, and the picked
        files timed round-robin against them and the torch teacher (--reference_rounds).
Writes: results/compress_summary.json and .md (--output_name), and the tables on stdout.

Run as:
    python scripts/compress_summary.py
    python scripts/compress_summary.py --runs results/compress/<run_id> results/compress/<run_id>
    python scripts/compress_summary.py --runs results/compress/<run_id> --int8_reference true
    python scripts/compress_summary.py --baseline results/onnx_4bit/<run_id>/model_nf4_int8.onnx
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import parse_config  # noqa: E402
from common.config import CompressSummaryConfig, DataConfig  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402


def delivered_runs(config: CompressSummaryConfig) -> list[tuple[Path, dict]]:
    """(search.json, record) of the runs to summarize, oldest first; refuses runs that did not deliver."""
    from common.checkpoints import results_root

    if config.runs:
        paths = [Path(run).expanduser() for run in config.runs]
        paths = [path if path.suffix == ".json" else path / "search.json" for path in paths]
    else:
        paths = sorted((results_root() / "compress").glob("*/search.json"))
    runs = [(path, json.loads(path.read_text())) for path in paths]
    if config.runs:
        refused = [f"{path.parent.name} ({record.get('status')})" for path, record in runs if record.get("status") != "delivered"]
        if refused:
            raise ValueError(f"Only runs that delivered a file can be summarized; these did not: {', '.join(refused)}. "
                             "Leave them out of --runs.")
    runs = [(path, record) for path, record in runs if record.get("status") == "delivered"]
    if not runs:
        raise FileNotFoundError(f"No compress.py run that delivered a file in {results_root() / 'compress'}. Run "
                                "`python scripts/compress.py` first.")
    for path, record in runs:
        named = [record["teacher"]] + [entry["folder"] for entry in record["files"]]
        missing = [folder for folder in named if not Path(folder).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path} names {missing[0]}, which no longer exists; summarize only runs whose "
                                    "checkpoints are still there.")
    return runs


BASELINE_PREFIX = "baseline: "


def timed_references(run: str, record: dict, teacher, teacher_accuracy: float, picked: list[dict], data, data_config,
                     config: CompressSummaryConfig, baseline_accuracies: dict) -> dict:
    """The picked files timed round-robin, at the run's latency batch and length, with the torch teacher and the
    references asked for: the run's teacher in ONNX Runtime dynamic int8 (exported and quantized in a scratch folder
    removed afterwards; --int8_reference) and --baseline, each measured on test too (the baseline once per test split:
    ``baseline_accuracies`` keeps it by data flags)."""
    from contextlib import ExitStack

    from common.evaluation import accuracy, interleaved_latency, round_speedup
    from common.experiments import dynamic_int8_copy, split_loader, test_accuracy
    from common.runtime import ModelRuntime

    batch, length = record["config"]["latency_batch_size"], record["config"]["latency_seq_length"]
    teacher_folder = Path(record["teacher"])
    torch_label, int8_label = "teacher (torch fp32)", "teacher, ONNX Runtime dynamic int8 (no project stage)"
    baseline_label = None
    with ExitStack() as scratch:
        models = {torch_label: (teacher, teacher_accuracy)}
        if config.int8_reference:
            int8 = scratch.enter_context(dynamic_int8_copy(teacher, length))
            models[int8_label] = (int8, accuracy(*int8.logits(split_loader(teacher_folder, data.test, data_config.max_length))))
        if config.baseline_model is not None:
            folder, file = config.baseline_model
            flags = tuple(record.get("data_flags", []))
            if flags not in baseline_accuracies:
                baseline_accuracies[flags], _ = test_accuracy(folder, data, data_config.max_length, file)
            baseline_label = BASELINE_PREFIX + config.baseline
            models[baseline_label] = (ModelRuntime(folder, file, spinning=False, num_threads=2), baseline_accuracies[flags])
        for row in picked:
            entry = next(f for f in record["files"] if f["name"] == row["name"])
            models[row["name"]] = (ModelRuntime(Path(entry["folder"]), entry.get("file"), spinning=False, num_threads=2),
                                   row["test_accuracy"])
        runners = {name: model.runner(model.batch(batch, length)) for name, (model, _) in models.items()}
        print(f"{run}: timing {len(runners)} models round-robin, {config.reference_rounds} rounds at {batch} x {length}",
              flush=True)
        timing = interleaved_latency(runners, 2, config.reference_rounds, batch)
        sizes = {name: model.size_bytes / 1e6 for name, (model, _) in models.items()}
    result = {"run": run, "batch_size": batch, "seq_length": length, "rounds": config.reference_rounds,
              "baseline": baseline_label, "models": []}
    against = {"speedup_vs_torch_teacher": torch_label, "speedup_vs_teacher_int8": int8_label,
               "speedup_vs_baseline": baseline_label}
    for name, (_, test) in models.items():
        measured = timing[name]["latency_ms_per_round"]
        model = {"name": name, "test_accuracy": test, "test_retention": test / teacher_accuracy, "size_mb": sizes[name],
                 "latency_ms": timing[name]["latency_ms_median"],
                 "latency_iqr_ms": [timing[name]["latency_ms_p25"], timing[name]["latency_ms_p75"]]}
        for key, label in against.items():
            if label in timing:
                model[key] = round_speedup(timing[label]["latency_ms_per_round"], measured)
        result["models"].append(model)
    return result


def main() -> None:
    (config,) = parse_config(CompressSummaryConfig)
    runs = delivered_runs(config)
    from common.checkpoints import results_root, write_json
    from common.data import load_splits
    from common.experiments import test_accuracy
    from common.search_trace import baseline_spread, reference_markdown, seed_spread, summary_markdown

    splits: dict[tuple, object] = {}
    teachers: dict[tuple, tuple] = {}  # seeds of one teacher share it: measure it once
    rows, references, baseline_accuracies = [], [], {}
    for path, record in runs:
        flags = tuple(record.get("data_flags", []))
        (data_config,) = parse_config(DataConfig, args=list(flags))
        if flags not in splits:
            splits[flags] = load_splits(data_config)
        data = splits[flags]
        if (record["teacher"], flags) not in teachers:
            teachers[record["teacher"], flags] = test_accuracy(Path(record["teacher"]), data, data_config.max_length)
        teacher_accuracy, teacher = teachers[record["teacher"], flags]
        files = {entry["name"]: entry for entry in record["files"]}
        print(f"{path.parent.name}: teacher {record['teacher']} test accuracy {teacher_accuracy:.4f}", flush=True)
        for objective, chosen in record["by_objective"].items():
            if chosen is None:
                continue
            entry = files[chosen["name"]]
            file_accuracy, _ = test_accuracy(Path(entry["folder"]), data, data_config.max_length, entry.get("file"))
            rows.append({"run": path.parent.name, "seed": record.get("seed"), "objective": objective,
                         "delivered": chosen["name"] == record["delivered"]["name"], "name": chosen["name"],
                         "validation_retention": entry["retention"], "test_accuracy": file_accuracy,
                         "teacher_test_accuracy": teacher_accuracy, "test_retention": file_accuracy / teacher_accuracy,
                         "latency_ms": entry["latency_ms"], "speedup_vs_teacher": entry.get("speedup_vs_teacher"),
                         "size_mb": entry["size_mb"], "teacher_size_mb": teacher.size_bytes / 1e6,
                         "times_smaller": teacher.size_bytes / 1e6 / entry["size_mb"]})
            print(f"  {objective}: {chosen['name']} test {file_accuracy:.4f} ({100 * rows[-1]['test_retention']:.2f}% of "
                  f"the teacher)", flush=True)
        if config.int8_reference or config.baseline is not None:
            picked = list({row["name"]: row for row in rows if row["run"] == path.parent.name}.values())
            references.append(timed_references(path.parent.name, record, teacher, teacher_accuracy, picked, data,
                                               data_config, config, baseline_accuracies))
    spread = {}
    for objective in dict.fromkeys(row["objective"] for row in rows):
        mine = [row for row in rows if row["objective"] == objective]
        speedups = [row["speedup_vs_teacher"] for row in mine if row["speedup_vs_teacher"]]
        spread[objective] = {"test_retention": seed_spread([row["test_retention"] for row in mine]),
                             "speedup_vs_teacher": seed_spread(speedups) if speedups else None,
                             "times_smaller": seed_spread([row["times_smaller"] for row in mine])}
    markdown = summary_markdown(rows, spread)
    if references:
        against_baseline = baseline_spread(rows, references)
        markdown += "\nIn new interleaved rounds:\n\n" + reference_markdown(references, against_baseline)
    else:
        against_baseline = {}
    output = results_root() / config.output_name
    write_json(output.with_suffix(".json"), {"runs": [str(path) for path, _ in runs], "rows": rows, "spread": spread,
                                             "references": references, "speedup_vs_baseline": against_baseline})
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"Summary: {output.with_suffix('.json')}")


if __name__ == "__main__":
    run_tool(main)
