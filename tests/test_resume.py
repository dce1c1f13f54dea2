"""Interrupted-then-resumed training stages end where uninterrupted ones do (stages 2, 8 and 10; stage 1 in
test_training.py), and a resume with other settings is refused before anything loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from common.checkpoints import RECORD_FILE, RESUME_PREFIX
from conftest import PROJECT_ROOT, make_pretrained_folder, run_stage, run_stage_unchecked, write_reviews_csv

pytestmark = pytest.mark.slow  # stages run as subprocesses, interrupted and resumed

COMMON = ["--text_column", "review", "--label_column", "sentiment", "--profile", "smoke", "--max_train_samples", "64",
          "--max_eval_samples", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    folder = make_pretrained_folder("bert", root / "model")
    data = write_reviews_csv(root / "reviews.csv", rows=200)
    results = root / "results"
    run_stage("1_train_teacher.py", results, "--model_name_or_path", folder, "--batch_size", 16, "--dataset", data, *COMMON)
    run_stage("2_distill_student.py", results, "--batch_size", 16, "--dataset", data, *COMMON)
    return root, results, data


def interrupted_and_straight(root, results, script, stage, arguments):
    """Run ``script`` once straight and once stopped after epoch 1 and resumed; return both checkpoints."""
    straight, resumed = root / f"{stage}-straight", root / f"{stage}-resumed"
    run_stage(script, results, *arguments, "--output_dir", straight)
    run_stage(script, results, *arguments, "--stop_after_epochs", 1, "--output_dir", resumed)
    assert not resumed.exists(), "a stopped run must not write a checkpoint"
    pending = [p for p in (results / stage).iterdir() if p.name.startswith(RESUME_PREFIX)]
    assert len(pending) == 1 and json.loads((pending[0] / "trainer_state.json").read_text())["epochs_done"] == 1
    run_stage(script, results, *arguments, "--resume", "--output_dir", resumed)
    assert not pending[0].exists(), "the finished run's resume state is removed"
    return [json.loads((folder / RECORD_FILE).read_text()) for folder in (straight, resumed)], (straight, resumed)


def assert_same_weights(straight, resumed):
    first, second = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-6, rtol=1e-5)


def test_interrupted_then_resumed_pruning_equals_an_uninterrupted_run(trained):
    root, results, data = trained
    arguments = ["--dataset", data, *COMMON, "--num_epochs", 2, "--batch_size", 8, "--gradient_accumulation_steps", 2,
                 "--pruning_frequency_steps", 2, "--pruning_window_steps", 2, "--pruning_end_fraction", 0.9,
                 "--drop_layers", 1, "--layer_importance_batches", 2, "--vocabulary_min_count", 10]
    (straight, resumed), folders = interrupted_and_straight(root, results, "8_pruning_with_finetuning.py", "pruned", arguments)
    # the vocabulary is pruned before the fine-tuning (the teacher reads the renumbered ids through the kept-token
    # table), so the resumed run restores weights of the pruned table's shape, and evaluating after the physical
    # pruning sees the same tokens as evaluating the masked model did
    vocabulary = straight["pruning"]["vocabulary"]
    assert vocabulary["min_count"] == 10 and vocabulary["rare_tokens_dropped"] > 0
    assert vocabulary["kept_vocab_size"] < vocabulary["original_vocab_size"]
    assert {"validation_accuracy_full_vocabulary", "validation_accuracy_pruned_vocabulary"} <= set(vocabulary)
    assert straight["pruning"]["validation_accuracy_after"] == straight["pruning"]["validation_accuracy_masked"]
    assert resumed["pruning"]["vocabulary"] == vocabulary
    # the 2-layer student loses its less important layer, and the resumed run drops the same one
    assert straight["architecture"]["num_layers"] == 1 and len(straight["pruning"]["layers"]["skip_kl"]) == 2
    assert resumed["pruning"]["layers"] == straight["pruning"]["layers"]
    # 64 rows / 8 per batch / 2 accumulated = 4 optimizer steps per epoch; pruning goes on in epoch 2
    assert [entry["step"] for entry in straight["pruning_history"]][-1] > 4
    assert resumed["pruning_history"] == straight["pruning_history"]
    assert resumed["pruning"]["kept_heads"] == straight["pruning"]["kept_heads"]
    assert resumed["architecture"] == straight["architecture"]
    for before, after in zip(straight["history"], resumed["history"]):
        assert after["epoch"] == before["epoch"]
        assert after["train_loss"] == pytest.approx(before["train_loss"], abs=1e-6)
        assert after["validation_accuracy"] == before["validation_accuracy"]
    assert_same_weights(*folders)


def test_interrupted_then_resumed_distillation_and_qkd_equal_uninterrupted_runs(trained):
    root, results, data = trained
    arguments = ["--dataset", data, *COMMON, "--num_epochs", 2, "--batch_size", 16]
    (straight, resumed), folders = interrupted_and_straight(root, results, "2_distill_student.py", "student", arguments)
    assert [entry["train_loss"] for entry in resumed["history"]] == pytest.approx([e["train_loss"] for e in straight["history"]], abs=1e-6)
    assert_same_weights(*folders)
    pruned = root / "pruned-straight"
    if not pruned.exists():
        run_stage("8_pruning_with_finetuning.py", results, "--dataset", data, *COMMON, "--output_dir", pruned)
    arguments = ["--dataset", data, *COMMON, "--num_epochs", 2, "--pruned_model_path", pruned, "--teacher", "pruned"]
    (straight, resumed), folders = interrupted_and_straight(root, results, "10_qat_kd_4bit.py", "qkd_4bit", arguments)
    assert [entry["train_loss"] for entry in resumed["history"]] == pytest.approx([e["train_loss"] for e in straight["history"]], abs=1e-6)
    assert resumed["metrics"]["validation"] == straight["metrics"]["validation"]
    assert_same_weights(*folders)


def test_distillation_on_the_training_rest_without_labels(trained):
    root, results, data = trained
    target = root / "student-unlabelled"
    completed = run_stage("2_distill_student.py", results, "--dataset", data, *COMMON, "--batch_size", 16, "--num_epochs", 1,
                          "--unlabeled_dataset", "train_rest", "--max_unlabeled_samples", 40, "--output_dir", target)
    assert "Unlabelled distillation rows: 40 from the training rows" in completed.stderr
    record = json.loads((target / RECORD_FILE).read_text())
    assert record["config"]["unlabeled_dataset"] == "train_rest" and record["config"]["max_unlabeled_samples"] == 40
    without_cap = [arg for arg in COMMON if arg not in ("--max_train_samples", "64")]
    refused = run_stage_unchecked("2_distill_student.py", results, "--dataset", data, *without_cap,
                                  "--unlabeled_dataset", "train_rest", "--output_dir", root / "never")
    assert refused.returncode == 2 and "keeps every one of the" in refused.stderr  # the smoke profile's cap, 256 rows
    assert "Traceback" not in refused.stderr and not (root / "never").exists()


def test_resuming_with_other_settings_is_refused_before_loading(trained):
    root, results, data = trained
    arguments = ["8_pruning_with_finetuning.py", results, "--dataset", data, *COMMON, "--num_epochs", 2]
    run_stage(*arguments, "--stop_after_epochs", 1)
    pending = [p for p in (results / "pruned").iterdir() if p.name.startswith(RESUME_PREFIX)]
    completed = run_stage_unchecked(*arguments, "--resume", "--head_final_sparsity", 0.25)
    assert completed.returncode != 0
    assert "--resume: the interrupted run" in completed.stderr and "settings.head_final_sparsity: 0.5 then, 0.25 now" in completed.stderr
    assert all(p.is_dir() for p in pending), "the interrupted run's state is kept"
    assert not [p for p in (results / "student").iterdir() if p.name.startswith(RESUME_PREFIX)]
    missing = run_stage_unchecked("2_distill_student.py", results, "--dataset", data, *COMMON, "--resume")
    assert missing.returncode != 0 and "holds no interrupted run" in missing.stderr


def test_sweep_runs_stage_8_and_int8_per_sparsity_and_writes_the_curve(trained):
    root, results, data = trained

    import os
    import subprocess
    import sys

    env = {**os.environ, "COMPRESSION_RESULTS_DIR": str(results), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "sweep.py"), "--sparsities", "0.25", "0.5", "--seeds", "1", "2",
               "--max_train_samples", "48", "--pruning_epochs", "1", "--latency_rounds", "1", "--latency_batch_size", "2",
               "--latency_seq_length", "8", "--dataset", str(data), "--text_column", "review", "--label_column", "sentiment",
               "--max_eval_samples", "32"]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    sweep = json.loads((results / "sweep.json").read_text())
    assert [point["sparsity"] for point in sweep["points"]] == [0.25, 0.5]
    assert sweep["points"][1]["parameters"] < sweep["points"][0]["parameters"]
    assert sweep["points"][1]["encoder_parameters"] < sweep["points"][0]["encoder_parameters"] < sweep["teacher"]["encoder_parameters"]
    for point in sweep["points"]:
        assert len(point["pruned_accuracy"]["values"]) == 2 and len(point["int8_accuracy"]["values"]) == 2
        assert point["int8_latency_ms"] > 0
    assert (results / "sweep.png").stat().st_size > 0 and "| 0.50 |" in (results / "sweep.md").read_text()
    assert "8_pruning_with_finetuning.py" in completed.stdout
    again = subprocess.run(command + ["--reuse"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8_pruning_with_finetuning.py" not in again.stdout, "--reuse evaluates the checkpoints it finds without retraining"
    retimed = json.loads((results / "sweep.json").read_text())
    assert [p["int8_accuracy"]["values"] for p in retimed["points"]] == [p["int8_accuracy"]["values"] for p in sweep["points"]]
