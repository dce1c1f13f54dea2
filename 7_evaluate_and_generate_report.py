"""Stage 7 (runs last): evaluate every stage on the test split and write the final report.

Reads:  the newest checkpoint of every stage in the stage table (common/stages.py: teacher, student, pruned,
        ptq_4bit, qkd_4bit, int8, and the ONNX folders onnx and onnx_4bit; each contributes the report rows the
        table lists), or the folders given with --checkpoint STAGE=PATH (repeatable), plus --extra_models
        'Label=path[:file.onnx]' rows. How a model is loaded comes from its
        compression.json, never from its name. Also builds the reference row "Teacher, ONNX Runtime dynamic int8
        (no project)": the teacher exported and quantized with ONNX Runtime's defaults in a temporary folder.
Does:   test accuracy and macro-F1 (evaluate, with the metric modules in metrics/), parameters, file size,
        memory (one fresh process per model) and CPU latency and throughput: every model timed round-robin in
        one process (batch 32 x 64 tokens, 30 rounds after 3 warm-up rounds, fixed threads), median and IQR,
        speed-ups against the teacher computed round by round; ratios to the teacher; Pareto fronts of accuracy
        vs size and vs latency; the CPU model and its int8 instruction sets; GPU rows where CUDA is present.
        A missing or broken checkpoint is skipped and named in the report; with no model at all it fails.
Writes: results/final_report.json, results/final_report.png, results/final_report.md.

Run as:
    python 7_evaluate_and_generate_report.py
    python 7_evaluate_and_generate_report.py --num_threads 2 --latency_repeats 50
    python 7_evaluate_and_generate_report.py --checkpoint pruned=results/pruned/<run_id> --checkpoint teacher=results/teacher/<run_id>
    python 7_evaluate_and_generate_report.py --extra_models "Teacher ONNX=results/onnx/<run_id>:model.onnx"
    python 7_evaluate_and_generate_report.py --extra_models "L2 uniform=results/pruned/20261122-101500-000000"
"""

import dataclasses

from common import DataConfig, ReportConfig
from common.checkpoints import results_root
from common.config import log_config
from common.data import load_splits
from common.lifecycle import run_script
from common.report import build_report
from common.report_render import markdown_table, write_report


def main(data_config: DataConfig, config: ReportConfig) -> None:
    log_config(data_config, config)
    data = load_splits(data_config)
    settings = {**dataclasses.asdict(config), "max_length": data_config.max_length, "profile": data_config.profile}
    report = build_report(config, data, data_config, settings)
    paths = write_report(report, results_root(), config.report_name)
    print(markdown_table(report))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    run_script(main, DataConfig, ReportConfig)
