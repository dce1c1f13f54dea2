"""Models against their teacher with compress.py's gate: accuracy, retention, the examples each labels unlike the
teacher, and the gate's margin and lower bound, on validation and test.

compress.py gates on validation only and compress_summary.py measures on test only the files a search picked; this
tool measures any checkpoints or exported files, on both splits, the same way: e.g. a stage run by hand, a file the
search refused, or how far a gated model's validation retention stands from its test retention.

Reads:  the newest results/teacher/ checkpoint (or --teacher_model_path), the --models (checkpoint folders, or exported
        .onnx files and OpenVINO .xml IRs of a stage-12/13 folder), and the splits of the data flags given (pass the
        ones the models were made with: every record is checked against them before any model loads).
Writes: results/retention_check.json and .md (--output_name), and the table on stdout.

Run as:
    python scripts/retention_check.py --models results/pruned/<run_id> results/onnx_4bit/<run_id>/model_nf4_int8.onnx
    python scripts/retention_check.py --models results/qkd_4bit/<run_id> --target_retention 0.98 --gate_z 1.64
    python scripts/retention_check.py --models results/student/<run_id> --splits validation --validation_fraction 0.2
"""

from __future__ import annotations

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import parse_config  # noqa: E402
from common.config import DataConfig, RetentionCheckConfig, model_location  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402


def main() -> None:
    config, data_config = parse_config(RetentionCheckConfig, DataConfig)
    from common.checkpoints import read_record, results_root, write_json
    from common.data import load_splits
    from common.experiments import split_loader
    from common.models import check_matches_data, resolve_stage_checkpoint
    from common.runtime import ModelRuntime
    from common.search import compare_with_teacher
    from common.search_trace import retention_markdown

    data = load_splits(data_config)
    teacher_folder, _ = resolve_stage_checkpoint("teacher", config.teacher_model_path, data.label_names, data_config)
    models = {name: model_location(name) for name in config.models}
    for folder, _ in models.values():
        check_matches_data(folder, read_record(folder), data_config, data.label_names)

    def predictions(model: ModelRuntime, split: str):
        logits, labels = model.logits(split_loader(model.folder, getattr(data, split), data_config.max_length))
        return logits.argmax(-1), labels

    print(f"Teacher {teacher_folder}; data {data.summary()}", flush=True)
    teacher_model = ModelRuntime(teacher_folder, spinning=False)
    teacher = {split: predictions(teacher_model, split)[0] for split in config.splits}
    rows = []
    for name, (folder, file) in models.items():
        model = ModelRuntime(folder, file, spinning=False)
        for split in config.splits:
            predicted, labels = predictions(model, split)
            rows.append({"model": name, "split": split, **compare_with_teacher(predicted, teacher[split], labels,
                                                                               config.target_retention, config.gate_z)})
            print(f"{name} {split}: accuracy {rows[-1]['accuracy']:.4f}, retention {rows[-1]['retention']:.4f}, "
                  f"lower bound {rows[-1]['lower_bound_points']:+.2f} points", flush=True)
    markdown = retention_markdown(rows, config.target_retention, config.gate_z, str(teacher_folder))
    output = results_root() / config.output_name
    output.parent.mkdir(parents=True, exist_ok=True)  # a teacher given from elsewhere: the results folder may be new
    write_json(output.with_suffix(".json"), {"teacher": str(teacher_folder), "target_retention": config.target_retention,
                                             "gate_z": config.gate_z, "rows": rows})
    output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"Retention check: {output.with_suffix('.json')}")


if __name__ == "__main__":
    run_tool(main)
