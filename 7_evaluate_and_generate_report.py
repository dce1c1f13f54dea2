"""Stage 7 (runs last): evaluate every stage on the test split and write the final report.

Reads:  the newest checkpoint of each stage in MODELS_TO_EVALUATE (teacher, student, pruned, ptq_4bit,
        qkd_4bit, int8), or the paths given with --teacher_path ... --int8_path, plus --extra_models
        'Label=path' rows. How a model is loaded comes from its compression.json, never from its name.
Does:   test accuracy and macro-F1 (evaluate, with the metric modules in metrics/), parameters, weight-file
        size, CPU latency and throughput (batch 32 x 64 tokens, median after warm-up, one fresh process per
        model) and peak memory; ratios to the teacher; Pareto fronts of accuracy vs size and vs latency.
        A missing or broken checkpoint is skipped and named in the report.
Writes: results/final_report.json, results/final_report.png, results/final_report.md.

Run as:
    python 7_evaluate_and_generate_report.py
    python 7_evaluate_and_generate_report.py --num_threads 2 --latency_repeats 50
    python 7_evaluate_and_generate_report.py --extra_models "L2 uniform=results/pruned/20261122-101500-000000"
"""

import dataclasses

from common import DataConfig, ReportConfig, parse_config, setup_logging
from common.checkpoints import results_root
from common.config import log_config
from common.data import load_splits
from common.report import MODELS_TO_EVALUATE, build_report, markdown_table, write_report

__all__ = ["MODELS_TO_EVALUATE"]


def main(data_config: DataConfig, config: ReportConfig) -> None:
    log_config(data_config, config)
    data = load_splits(data_config)
    settings = {**dataclasses.asdict(config), "max_length": data_config.max_length, "profile": data_config.profile}
    report = build_report(config, data, data_config, settings)
    paths = write_report(report, results_root(), config.report_name)
    print(markdown_table(report))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    setup_logging()
    main(*parse_config(DataConfig, ReportConfig))
