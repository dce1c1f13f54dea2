"""The numbered scripts run end to end, as a user runs them, on a tiny local model and a local CSV."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from common.checkpoints import RECORD_FILE
from conftest import PROJECT_ROOT

DATA_ARGS = ["--text_column", "review", "--label_column", "sentiment", "--profile", "smoke", "--max_train_samples", "96", "--max_eval_samples", "48"]


def run_stage(script, results_dir, *args, launcher=None, timeout=600):
    env = {**os.environ, "COMPRESSION_RESULTS_DIR": str(results_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = (launcher or [sys.executable]) + [str(PROJECT_ROOT / script), *map(str, args)]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed


def only_checkpoint(results_dir, stage):
    folders = [p for p in (results_dir / stage).iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1, folders
    record = json.loads((folders[0] / RECORD_FILE).read_text())
    assert record["stage"] == stage
    return folders[0], record


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Stages 1, 2, 8, 9, 10, 11 and 7 once, in order, on a tiny 4-layer BERT and a 3-label CSV."""
    from conftest import make_tokenizer, tiny_bert_config, tiny_model, write_reviews_csv

    root = tmp_path_factory.mktemp("pipeline")
    model_folder = root / "tiny-bert"
    tokenizer = make_tokenizer(model_folder)
    tiny_model(tiny_bert_config(layers=4, num_labels=2)).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    data = write_reviews_csv(root / "reviews.csv", rows=300, labels=("negative", "neutral", "positive"))
    results = root / "results"
    common = ["--dataset", data, *DATA_ARGS]
    run_stage("1_train_teacher.py", results, "--model_name_or_path", model_folder, "--batch_size", 16, *common)
    run_stage("2_distill_student.py", results, "--batch_size", 16, *common)
    run_stage("8_pruning_with_finetuning.py", results, "--batch_size", 16, "--head_final_sparsity", 0.5, "--ffn_final_sparsity", 0.5, *common)
    run_stage("9_quantize_pruned_model.py", results, *common)
    run_stage("10_qat_kd_4bit.py", results, "--num_epochs", 1, *common)
    run_stage("11_export_int8.py", results, *common)
    report = run_stage("7_evaluate_and_generate_report.py", results, "--latency_repeats", 2, "--latency_batch_size", 4, "--latency_seq_length", 16, *common)
    return results, report


def test_teacher_and_student_checkpoints(pipeline_run):
    results, _ = pipeline_run
    teacher, teacher_record = only_checkpoint(results, "teacher")
    student, student_record = only_checkpoint(results, "student")
    assert teacher_record["label_names"] == ["negative", "neutral", "positive"]
    assert teacher_record["architecture"]["num_layers"] == 4
    assert student_record["architecture"]["num_layers"] == 2  # half the teacher by default
    assert student_record["parent"] == str(teacher)
    assert 0.0 <= student_record["metrics"]["validation"]["accuracy"] <= 1.0
    assert student_record["config"]["profile"] == "smoke"
    for folder in (teacher, student):
        assert {"config.json", "model.safetensors", "compression.json", "metrics.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in (results / "teacher").iterdir() if p.name.startswith(".")], "resume state left behind"


def test_pruned_and_quantized_checkpoints(pipeline_run):
    results, _ = pipeline_run
    student, _ = only_checkpoint(results, "student")
    pruned, pruned_record = only_checkpoint(results, "pruned")
    summary = pruned_record["pruning"]
    assert summary["head_sparsity"] == pytest.approx(0.5)
    assert summary["ffn_sparsity"] == pytest.approx(0.5)
    assert summary["parameters_after"] < summary["parameters_before"]
    assert (pruned / "model.safetensors").stat().st_size < (student / "model.safetensors").stat().st_size
    for stage in ("ptq_4bit", "qkd_4bit"):
        folder, record = only_checkpoint(results, stage)
        assert record["quantization"]["method"] == "bitsandbytes_4bit"
        assert record["parent"] == str(pruned)
        assert (folder / "model.safetensors").stat().st_size < (pruned / "model.safetensors").stat().st_size
    _, qkd_record = only_checkpoint(results, "qkd_4bit")
    assert qkd_record["metrics"]["fake_vs_real_gap_points"] <= 0.5
    _, int8_record = only_checkpoint(results, "int8")
    assert int8_record["quantization"]["method"] == "torch_dynamic_int8"


def test_report_covers_every_stage(pipeline_run):
    results, completed = pipeline_run
    report = json.loads((results / "final_report.json").read_text())
    assert [row["stage"] for row in report["models"]] == ["teacher", "student", "pruned", "ptq_4bit", "qkd_4bit", "int8"]
    assert report["skipped"] == []
    assert (results / "final_report.png").stat().st_size > 10_000
    assert "Pruned + QKD-4bit (QAT)" in (results / "final_report.md").read_text()
    assert "Teacher (FP32)" in completed.stdout


def test_two_process_teacher_run_writes_same_kind_of_checkpoint(tmp_path, pretrained_folder, reviews_csv):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None, "torchrun is installed with torch"
    results = tmp_path / "results-ddp"
    run_stage(
        "1_train_teacher.py", results, "--model_name_or_path", pretrained_folder, "--dataset", reviews_csv,
        "--batch_size", 8, *DATA_ARGS,
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", "29517"],
    )
    folder, record = only_checkpoint(results, "teacher")
    assert record["num_processes"] == 2
    assert record["architecture"]["num_layers"] == 4
    assert record["metrics"]["validation"]["accuracy"] >= 0.0
    assert len(record["history"]) == 1
