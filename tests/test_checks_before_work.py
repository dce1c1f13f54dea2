"""Every stage and tool checks its arguments before any work: a refusal is one paragraph with exit code 2, loads no
model ("Loaded ..." is the loader's first log line) and leaves the results folder exactly as it was. Each case here
was, before this audit, detected only after models had loaded, data had been tokenized or evaluation had run."""

import shutil

import pytest

from common.models import save_checkpoint
from conftest import (
    VOCABULARY,
    make_tokenizer,
    run_stage_unchecked,
    tiny_bert_config,
    tiny_model,
    unrelated_onnx,
    write_onnx_checkpoint,
    write_reviews_csv,
)

LABELS = ["negative", "positive"]


@pytest.fixture
def stage_folders(results_dir, tmp_path):
    """Teacher (2 layers), student and pruned (1 layer) checkpoints of the tiny vocabulary, and the data they match."""
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    folders = {stage: save_checkpoint(stage, tiny_model(tiny_bert_config(layers=layers)), tokenizer, {"label_names": LABELS})
               for stage, layers in (("teacher", 2), ("student", 1), ("pruned", 1))}
    folders["data"] = write_reviews_csv(tmp_path / "reviews.csv", rows=60)
    return folders


def other_vocabulary_model(folder):
    """A tiny pretrained-style BERT whose vocabulary is the test vocabulary plus one word."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join([*VOCABULARY, "extra"]) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    config = tiny_bert_config(layers=1)
    config.vocab_size = len(tokenizer)
    tiny_model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def snapshot(folder):
    return sorted((str(path.relative_to(folder)), path.stat().st_size if path.is_file() else -1) for path in folder.rglob("*"))


def assert_refused_before_work(results_dir, script, expected, *args):
    before = snapshot(results_dir) if results_dir.exists() else []
    completed = run_stage_unchecked(script, results_dir, *map(str, args))
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert f"{script.rpartition('/')[2]}: error: " in completed.stderr and expected in completed.stderr, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    assert " model from " not in completed.stderr and "Loaded pretrained" not in completed.stderr, "a model was loaded first"
    assert (snapshot(results_dir) if results_dir.exists() else []) == before, "the refusal changed the results folder"


def data_args(folders):
    return ["--dataset", folders["data"], "--text_column", "review", "--label_column", "sentiment", "--profile", "smoke"]


def test_stage_1_refuses_a_max_length_beyond_the_encoders_positions_before_loading_weights(results_dir, pretrained_folder, reviews_csv):
    assert_refused_before_work(results_dir, "1_train_teacher.py", "max_length=128 exceeds the 64 position embeddings",
                               "--model_name_or_path", pretrained_folder, "--max_length", 128, "--dataset", reviews_csv,
                               "--text_column", "review", "--label_column", "sentiment", "--profile", "smoke")


def test_stage_2_refuses_a_student_with_another_vocabulary_before_loading_any_weights(results_dir, stage_folders, tmp_path):
    student = other_vocabulary_model(tmp_path / "other-vocab")
    assert_refused_before_work(results_dir, "2_distill_student.py", "uses another vocabulary than the teacher",
                               "--student_model_name_or_path", student, *data_args(stage_folders))


def test_stage_8_refuses_targets_the_student_cannot_meet_before_loading_any_model(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "8_pruning_with_finetuning.py", "min_heads_per_layer=9 exceeds the 4 heads",
                               "--min_heads_per_layer", 9, *data_args(stage_folders))



def test_stage_8_refuses_dropping_every_student_layer_before_loading_any_model(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "8_pruning_with_finetuning.py",
                               "drop_layers=1 must leave at least one of the model's 1 encoder layers",
                               "--drop_layers", 1, *data_args(stage_folders))


def test_stage_8_refuses_a_hidden_width_with_nothing_left_before_loading_any_model(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "8_pruning_with_finetuning.py",
                               "hidden_sparsity=0.9 leaves no multiple of the head size (8)",
                               "--hidden_sparsity", 0.9, *data_args(stage_folders))


def test_stage_9_refuses_a_size_budget_below_all_4bit_before_evaluating(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "9_quantize_pruned_model.py", "keep_8bit_size_budget_mb=0.001 is below the all-4-bit",
                               "--keep_8bit_size_budget_mb", 0.001, *data_args(stage_folders))


def test_stage_10_refuses_a_size_budget_below_all_4bit_before_loading_any_model(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "10_qat_kd_4bit.py", "keep_8bit_size_budget_mb=0.001 is below the all-4-bit",
                               "--keep_8bit_size_budget_mb", 0.001, *data_args(stage_folders))


def test_stage_10_refuses_more_8bit_layers_than_the_model_has_before_loading_any_model(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "10_qat_kd_4bit.py", "keep_8bit_layers=99 exceeds the 6 quantizable encoder Linears",
                               "--keep_8bit_layers", 99, *data_args(stage_folders))


def test_stage_10_refuses_a_teacher_with_an_unrelated_vocabulary_before_loading_any_model(results_dir, stage_folders, tmp_path):
    other = other_vocabulary_model(tmp_path / "other-vocab")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(other))
    config = tiny_bert_config()
    config.vocab_size = len(tokenizer)
    teacher = save_checkpoint("teacher", tiny_model(config), tokenizer, {"label_names": LABELS})
    assert_refused_before_work(results_dir, "10_qat_kd_4bit.py", "uses another vocabulary than the pruned model",
                               "--teacher_model_path", teacher, *data_args(stage_folders))


def test_stage_11_refuses_a_source_trained_on_other_labels_before_loading_it(results_dir, stage_folders, tmp_path):
    other = save_checkpoint("pruned", tiny_model(tiny_bert_config(layers=1, num_labels=3)), make_tokenizer(tmp_path / "t3"),
                            {"label_names": ["a", "b", "c"]})
    assert_refused_before_work(results_dir, "11_export_int8.py", "was trained on labels ['a', 'b', 'c']",
                               "--source_model_path", other, *data_args(stage_folders))


def test_stage_12_refuses_a_full_precision_qkd_model_path_before_the_int8_export(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "12_export_onnx.py", "a 'ptq_4bit' or 'qkd_4bit' checkpoint is needed here",
                               "--qkd_model_path", stage_folders["pruned"], *data_args(stage_folders))


def test_the_report_refuses_a_damaged_extra_model_before_evaluating_anything(results_dir, stage_folders, tmp_path):
    copy = tmp_path / "my-pruned"
    shutil.copytree(stage_folders["pruned"], copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_refused_before_work(results_dir, "7_evaluate_and_generate_report.py", "it is truncated or altered",
                               "--extra_models", f"Mine={copy}", *data_args(stage_folders))


def test_the_report_refuses_an_extra_onnx_file_that_does_not_fit_its_folder(results_dir, stage_folders, tmp_path):
    onnx_folder = write_onnx_checkpoint(make_tokenizer(tmp_path / "tokenizer-onnx"))
    unrelated_onnx(onnx_folder / "other.onnx")
    assert_refused_before_work(results_dir, "7_evaluate_and_generate_report.py", "other.onnx takes the inputs ['x']",
                               "--extra_models", f"Mine={onnx_folder}:other.onnx", *data_args(stage_folders))


def test_the_report_refuses_a_missing_extra_model_folder_at_parse_time(results_dir, stage_folders, tmp_path):
    assert_refused_before_work(results_dir, "7_evaluate_and_generate_report.py", "extra_models 'Mine'=",
                               "--extra_models", f"Mine={tmp_path / 'nowhere'}", *data_args(stage_folders))


def test_the_report_refuses_an_unknown_deployed_model_before_evaluating_anything(results_dir, stage_folders):
    assert_refused_before_work(results_dir, "7_evaluate_and_generate_report.py", "deployed_model='Nope' is none of the",
                               "--deployed_model", "Nope", *data_args(stage_folders))


@pytest.mark.parametrize("script, args, expected", [
    ("scripts/benchmark_pruning.py", ["--steps", 2], "No complete teacher checkpoint"),
    ("scripts/benchmark_fusion.py", [], "No complete teacher checkpoint"),
    ("scripts/benchmark_fusion.py", ["--rounds", 0], "--rounds 0 and --num_threads 2 must be positive"),
    ("scripts/gpu_check.py", ["--time_limit_s", 0], "--time_limit_s 0.0 must be positive"),
    ("scripts/sweep.py", ["--sparsities", 0.5, "--extra", "--ffn_round_to", 0], "ffn_round_to=0"),
    ("scripts/ablation.py", ["--from_json", "--output_name", "never_ran"], "--from_json redraws"),
    ("scripts/benchmark_alignment.py", ["--heads", "8,x"], "--heads '8,x' must be positive integers"),
])
def test_tools_refuse_bad_arguments_before_any_work(results_dir, tmp_path, script, args, expected):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    for stage in ("student", "pruned"):  # no teacher: the benchmark used to measure both before looking for it
        save_checkpoint(stage, tiny_model(tiny_bert_config(layers=1)), tokenizer, {"label_names": LABELS})
    assert_refused_before_work(results_dir, script, expected, *args)
