"""The numbered scripts run end to end, as a user runs them, on a tiny local model and a local CSV."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from common import stages
from common.checkpoints import RECORD_FILE
from conftest import PROJECT_ROOT, assert_card_matches_record, only_checkpoint, run_pipeline, run_stage, run_stage_unchecked

pytestmark = pytest.mark.slow  # every test here shares one end-to-end run of all stages

DATA_ARGS = ["--text_column", "review", "--label_column", "sentiment", "--profile", "smoke", "--max_train_samples", "96", "--max_eval_samples", "48"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Stages 1, 2, 8, 9, 10, 11, 12 and 7 once, in order, on a tiny 4-layer BERT and a 3-label CSV."""
    from conftest import make_tokenizer, tiny_bert_config, tiny_model, write_reviews_csv

    root = tmp_path_factory.mktemp("pipeline")
    model_folder = root / "tiny-bert"
    tokenizer = make_tokenizer(model_folder)
    tiny_model(tiny_bert_config(layers=4, num_labels=2)).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    data = write_reviews_csv(root / "reviews.csv", rows=300, labels=("negative", "neutral", "positive"))
    results = root / "results"
    common = ["--dataset", data, *DATA_ARGS]
    completed = run_pipeline(results, common, {
        "1_train_teacher.py": ["--model_name_or_path", model_folder, "--batch_size", 16],
        "2_distill_student.py": ["--batch_size", 16],
        # a quarter of the residual width too, so every later stage and export runs on a narrowed model
        "8_pruning_with_finetuning.py": ["--batch_size", 16, "--head_final_sparsity", 0.5, "--ffn_final_sparsity", 0.5,
                                         "--hidden_sparsity", 0.25],
        "10_qat_kd_4bit.py": ["--num_epochs", 1],
        "12_export_onnx.py": ["--max_positions", 64],  # the tiny model's 64 positions, all used at --max_length 64
        stages.REPORT_SCRIPT: ["--latency_repeats", 2, "--latency_batch_size", 4, "--latency_seq_length", 16],
    })
    return results, completed[stages.REPORT_SCRIPT]


def test_teacher_and_student_checkpoints(pipeline_run):
    results, _ = pipeline_run
    teacher, teacher_record = only_checkpoint(results, "teacher")
    student, student_record = only_checkpoint(results, "student")
    assert teacher_record["label_names"] == ["negative", "neutral", "positive"]
    assert teacher_record["architecture"]["num_layers"] == 4
    assert student_record["architecture"]["num_layers"] == 2  # half the teacher by default
    assert student_record["parent"] == str(teacher)
    accuracy = student_record["metrics"]["validation"]["accuracy"]
    assert accuracy == max(epoch["validation_accuracy"] for epoch in student_record["history"])  # the best epoch is kept
    assert round(accuracy * 48) == pytest.approx(accuracy * 48)  # a share of the 48 validation rows
    assert student_record["config"]["profile"] == "smoke"
    for folder in (teacher, student):
        assert {"config.json", "model.safetensors", "compression.json", "metrics.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in (results / "teacher").iterdir() if p.name.startswith(".")], "resume state left behind"


def test_retention_check_measures_models_against_the_teacher_on_both_splits(pipeline_run):
    results, _ = pipeline_run
    data = ["--dataset", results.parent / "reviews.csv", *DATA_ARGS]
    teacher, teacher_record = only_checkpoint(results, "teacher")
    student, student_record = only_checkpoint(results, "student")
    onnx_file = only_checkpoint(results, "onnx")[0] / "model_int8_dynamic.onnx"
    run_stage("scripts/retention_check.py", results, *data, "--models", student, onnx_file, "--output_name", "check")
    report = json.loads((results / "check.json").read_text())
    rows = {(row["model"], row["split"]): row for row in report["rows"]}
    assert set(rows) == {(str(model), split) for model in (student, onnx_file) for split in ("validation", "test")}
    # the same validation examples and model as stage 2's own evaluation, so the same accuracy
    assert rows[str(student), "validation"]["accuracy"] == pytest.approx(student_record["metrics"]["validation"]["accuracy"])
    assert rows[str(student), "validation"]["teacher_accuracy"] == pytest.approx(teacher_record["metrics"]["validation"]["accuracy"])
    for row in rows.values():
        agreement = row["agreement"]
        assert row["accuracy"] - row["teacher_accuracy"] == pytest.approx((agreement["fixed"] - agreement["broken"]) / agreement["examples"])
        assert row["passes"] == (row["lower_bound_points"] >= 0) and row["margin_points"] >= 0
    markdown = (results / "check.md").read_text()
    row = rows[str(onnx_file), "test"]
    assert f"| {onnx_file} | test | {100 * row['accuracy']:.2f}% | {100 * row['teacher_accuracy']:.2f}% |" in markdown
    # another split of the data than the models were made with: refused before any model loads, nothing written
    refused = run_stage_unchecked("scripts/retention_check.py", results, *data, "--split_seed", 7, "--models", student,
                                  "--output_name", "refused")
    assert refused.returncode == 2 and "split_seed: 42 then, 7 now" in refused.stderr, refused.stderr[-2000:]
    assert not (results / "refused.json").exists()
    # a checkpoint of another stage named as the teacher: refused the same way
    refused = run_stage_unchecked("scripts/retention_check.py", results, *data, "--teacher_model_path", student,
                                  "--models", onnx_file, "--output_name", "refused")
    assert refused.returncode == 2 and "is a 'student' checkpoint, but a 'teacher' checkpoint is needed" in refused.stderr
    assert "Traceback" not in refused.stderr and not (results / "refused.json").exists()
    # the teacher named from another results folder: this one is created for the tables
    elsewhere = results.parent / "elsewhere"
    run_stage("scripts/retention_check.py", elsewhere, *data, "--teacher_model_path", teacher, "--models", student,
              "--splits", "validation")
    rows = json.loads((elsewhere / "retention_check.json").read_text())["rows"]
    assert [row["split"] for row in rows] == ["validation"]  # --splits validation: no test rows
    assert rows[0]["accuracy"] == pytest.approx(student_record["metrics"]["validation"]["accuracy"])


def test_pruned_and_quantized_checkpoints(pipeline_run):
    results, _ = pipeline_run
    student, _ = only_checkpoint(results, "student")
    pruned, pruned_record = only_checkpoint(results, "pruned")
    summary = pruned_record["pruning"]
    assert summary["head_sparsity"] == pytest.approx(0.5)
    assert summary["ffn_sparsity"] == pytest.approx(0.5)
    assert summary["parameters_after"] < summary["parameters_before"]
    assert summary["hidden"]["width_before"] == 32 and summary["hidden"]["width_after"] == 24  # head size 8
    assert pruned_record["architecture"]["head_size"] == 8
    # the vocabulary was pruned before the fine-tuning; with every training token kept that changes no prediction
    vocabulary = summary["vocabulary"]
    assert vocabulary["validation_accuracy_pruned_vocabulary"] == vocabulary["validation_accuracy_full_vocabulary"]
    assert summary["validation_accuracy_after"] == summary["validation_accuracy_masked"]
    assert (pruned / "model.safetensors").stat().st_size < (student / "model.safetensors").stat().st_size
    for stage in ("ptq_4bit", "qkd_4bit"):
        folder, record = only_checkpoint(results, stage)
        assert record["quantization"]["method"] == "bitsandbytes_4bit"
        assert record["parent"] == str(pruned)
        assert (folder / "model.safetensors").stat().st_size < (pruned / "model.safetensors").stat().st_size
        errors = record["quantization"]["layer_errors"]
        assert set(errors) == set(record["quantization"]["modules"])
        assert all(values["weight_snr_db"] > 0 for values in errors.values())
    _, qkd_record = only_checkpoint(results, "qkd_4bit")
    assert qkd_record["metrics"]["fake_vs_real_gap_points"] <= 0.5
    _, int8_record = only_checkpoint(results, "int8")
    assert int8_record["quantization"]["method"] == "torch_dynamic_int8"


def test_mixed_precision_learned_scales_and_ternary_embeddings_through_stages_9_10_and_12(pipeline_run, tmp_path):
    results, _ = pipeline_run
    ptq_folder, ptq_record = only_checkpoint(results, "ptq_4bit")
    budget = 1.3 * (ptq_folder / "model.safetensors").stat().st_size / 1e6
    mixed = tmp_path / "ptq_mixed"
    run_stage("9_quantize_pruned_model.py", results, "--keep_8bit_size_budget_mb", budget, "--output_dir", mixed, *data_args(results))
    record = json.loads((mixed / RECORD_FILE).read_text())["quantization"]
    assert record["modules_8bit"] and record["mixed_precision"]["estimated_mb"] <= budget
    assert set(record["modules"]) | set(record["modules_8bit"]) == set(ptq_record["quantization"]["modules"])
    qkd = tmp_path / "qkd_lsq"
    run_stage("10_qat_kd_4bit.py", results, "--num_epochs", 1, "--learnable_scales", "true", "--keep_8bit_layers", 2,
              "--embedding_quantization", "int2", "--embedding_int4_rows", 20, "--output_dir", qkd, *data_args(results))
    qkd_record = json.loads((qkd / RECORD_FILE).read_text())
    assert qkd_record["embedding_quantization"]["method"] == "int2"
    assert qkd_record["embedding_quantization"]["int4_rows"] == 20, "the 20 most frequent tokens' rows at int4"
    assert qkd_record["quantization"]["learned_scales"] == sorted(qkd_record["quantization"]["modules"])
    # by count (what scripts/compress.py asks for when 4 bits everywhere misses the target): the two worst Linears
    assert len(qkd_record["quantization"]["modules_8bit"]) == 2 and qkd_record["quantization"]["mixed_precision"]["count"] == 2
    assert qkd_record["metrics"]["fake_vs_real_gap_points"] <= 0.5  # the stage refuses to save a larger gap
    too_small = run_stage_unchecked("9_quantize_pruned_model.py", results, "--keep_8bit_size_budget_mb", 0.001, *data_args(results))
    assert too_small.returncode == 2 and "below the all-4-bit checkpoint" in too_small.stderr
    # stage 10 finds this after making its per-epoch state folder: the refusal still leaves nothing behind
    refused = run_stage_unchecked("10_qat_kd_4bit.py", results, "--keep_8bit_size_budget_mb", 0.001, *data_args(results))
    assert refused.returncode == 2 and "below the all-4-bit checkpoint" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert not [p.name for p in (results / "qkd_4bit").iterdir() if p.name.startswith(".")], "an .inprogress-* folder was left"

    # stage 12 stores the ternary (and int4) rows QKD trained as they are (--embedding_quantization auto), in a results folder of
    # its own so the pipeline's folders stay one per stage; it refuses a 4-bit file more than 0.1 points off torch
    pruned, _ = only_checkpoint(results, "pruned")
    exports = tmp_path / "exports"
    run_stage("12_export_onnx.py", exports, "--source_model_path", pruned, "--qkd_model_path", qkd, "--calibration_methods",
              "minmax", "--optimize_graph", "false", *data_args(results))
    _, record_4bit = only_checkpoint(exports, "onnx_4bit")
    for name, entry in record_4bit["files"].items():
        assert entry["embedding_quantization"]["method"] == "int2", name
        assert "op" not in entry["embedding_quantization"], "GatherBlockQuantized holds int4 rows only"
    assert record_4bit["files"]["model.onnx"]["max_abs_difference_vs_torch_4bit"] < 1e-4
    import onnx

    rows, columns = qkd_record["embedding_quantization"]["shape"]
    folder_4bit, _ = only_checkpoint(exports, "onnx_4bit")
    stored = {t.name: list(t.dims) for t in onnx.load(str(folder_4bit / "model.onnx")).graph.initializer}
    assert stored["word_embeddings.codes"] == [-(-(rows - 20) // 5), columns], "five ternary rows a byte"
    assert stored["word_embeddings.int4.codes"] == [20, -(-columns // 2)], "the frequent tokens' int4 rows carried over"


def data_args(results):
    return ["--dataset", str(results.parent / "reviews.csv"), *DATA_ARGS]


def test_report_covers_every_stage(pipeline_run):
    results, completed = pipeline_run
    report = json.loads((results / "final_report.json").read_text())
    expected = [stage.name for stage in stages.STAGE_TABLE for _ in stage.rows]
    expected[1:1] = ["onnx_reference"] * 3  # the teacher in ONNX Runtime int8, optimized + int8, OpenVINO + NNCF int8
    assert [row["stage"] for row in report["models"]] == expected
    assert [row["label"] for row in report["models"] if row["stage"] != "onnx_reference"] == [
        row.label for stage in stages.STAGE_TABLE for row in stage.rows]
    assert report["skipped"] == []
    onnx_rows = {row["label"]: row for row in report["models"] if row["runtime"] == "onnxruntime"}
    pruned_row = next(row for row in report["models"] if row["stage"] == "pruned")
    assert onnx_rows["Pruned, ONNX Runtime FP32"]["test_accuracy"] == pruned_row["test_accuracy"]
    assert all(row["speedup_vs_teacher"] > 0 for row in report["models"])
    assert all(row["model_rss_mb"] is not None and row["peak_rss_mb"] > 0 for row in report["models"])  # memory measured
    assert (results / "final_report.png").stat().st_size > 10_000
    assert "Pruned + QKD-4bit (QAT)" in (results / "final_report.md").read_text()
    assert "4-bit quantization error per layer" in (results / "final_report.md").read_text()
    assert "Teacher (FP32)" in completed.stdout
    # per-class and agreement metrics, cost and real-text latency for every row
    teacher = report["models"][0]
    for row in report["models"]:
        assert len(row["confusion_matrix"]) == 3 and set(row["per_class"]) == {"negative", "neutral", "positive"}, row["label"]
        assert row["agreement_with_teacher"]["examples"] == row["test_examples"] and row["retention_ci95"], row["label"]
        assert row["flops_per_example"] > 0 and row["weight_bytes_read_per_example"] > 0, row["label"]
        assert 0 < row["latency_b1_ms_p50"] <= row["latency_b1_ms_p95"], row["label"]
    assert pruned_row["flops_per_example"] < teacher["flops_per_example"]
    assert report["deployment"]["label"] in {row["label"] for row in report["models"]}
    assert "Quality and cost" in (results / "final_report.md").read_text()
    assert (results / "final_report_confusion.png").stat().st_size > 5_000


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
    accuracy = record["metrics"]["validation"]["accuracy"]
    assert accuracy == record["history"][0]["validation_accuracy"] and round(accuracy * 48) == pytest.approx(accuracy * 48)
    assert len(record["history"]) == 1


def test_onnx_stage_folders(pipeline_run):
    results, _ = pipeline_run
    pruned, _ = only_checkpoint(results, "pruned")
    folder, record = only_checkpoint(results, "onnx")
    assert record["parent"] == str(pruned) and record["max_abs_difference_vs_torch"] <= 1e-4
    assert set(record["calibrations"]) == {f"{method}{variant}" for method in ("minmax", "percentile", "entropy")
                                           for variant in ("", "+ffn_out_float")}
    assert record["files"]["model_int8_static.onnx"]["calibration"] in record["calibrations"]
    # chosen by measured speed among the files within the noise of the most accurate (the rule is unit-tested in
    # test_onnx): on a tiny model the fp32 file can be the fastest, so any of the three may win here
    chosen = record["deployment_model"]
    assert chosen in record["files"] and chosen in record["deployment_choice"]
    assert all(entry["latency_ms_median"] > 0 for entry in record["files"].values())
    for name in ("model.onnx", "model_int8_dynamic.onnx", "model_int8_static.onnx", "tokenizer.json", "config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    qkd, _ = only_checkpoint(results, "qkd_4bit")
    folder_4bit, record_4bit = only_checkpoint(results, "onnx_4bit")
    assert record_4bit["parent"] == str(qkd) and record_4bit["quantization"]["codes"] == "the checkpoint's own"
    exact = record_4bit["files"]["model.onnx"]
    assert exact["validation_accuracy"] == pytest.approx(record_4bit["metrics"]["validation_torch_4bit"]["accuracy"], abs=1e-3)
    assert exact["max_abs_difference_vs_torch_4bit"] < 1e-4
    assert record_4bit["deployment_model"] in ("model.onnx", "model_nf4_int8.onnx", "model_int4_nbits.onnx")
    for name in ("model_nf4_int8.onnx", "model_int4_nbits.onnx"):
        assert (folder_4bit / name).is_file() and "int8_leftovers" in record_4bit["files"][name]
    from common.onnx_runtime import int8_products_saturate

    saturates = int8_products_saturate()  # the int8 files record the 7-bit range exactly where this CPU needs it
    assert ("7-bit weight range" in record_4bit["files"]["model_nf4_int8.onnx"].get("weights", "")) == saturates
    assert ("7-bit weight range" in record["files"]["model_int8_dynamic.onnx"]["weights"]) == saturates
    for folder_record, name in ((record_4bit, "model_nf4_int8.onnx"), (record, "model_int8_dynamic.onnx"),
                                (record, "model_int8_static.onnx")):  # what predict.py checks where it runs the file
        assert folder_record["files"][name]["int8_weight_bits"] == (7 if saturates else 8), name
    # the narrowed width (24) has no block of 16-128 values GatherBlockQuantized takes: the rows stay in standard ops
    # (the op itself is tested in test_onnx)
    int4_embeddings = record_4bit["files"]["model_int4_nbits.onnx"]["embedding_quantization"]
    assert int4_embeddings["method"] == "int4" and int4_embeddings["shape"][1] == 24 and "op" not in int4_embeddings
    assert record_4bit["position_table"] == {"rows_before": 64, "rows_kept": 64}
    assert json.loads((folder_4bit / "config.json").read_text())["max_position_embeddings"] == 64
    assert json.loads((folder_4bit / "tokenizer_config.json").read_text())["model_max_length"] == 64  # capped at the limit
    assert (pruned / "modeling_pruned.py").is_file(), "pruned checkpoints ship their stock-transformers loader"


def predict(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "predict.py"), *map(str, args)], cwd=PROJECT_ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


# every ONNX folder, and the last torch stage of each kind of weights (full precision, 4-bit, int8)
PREDICT_STAGES = [*stages.export_stages(), *(stages.with_weights(kind)[-1] for kind in ("full", "4bit", "int8"))]


@pytest.mark.parametrize("stage", PREDICT_STAGES)
def test_predict_with_every_kind_of_folder(pipeline_run, stage):
    results, _ = pipeline_run
    folder, _ = only_checkpoint(results, stage)
    completed = predict("--model", folder, "--format", "jsonl", "great superb film", "dull boring plot")
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [json.loads(line) for line in completed.stdout.strip().splitlines()]
    assert [row["text"] for row in rows] == ["great superb film", "dull boring plot"]
    for row in rows:
        assert row["label"] in ("negative", "neutral", "positive")
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["probability"] == max(row["probabilities"].values())


def test_predict_reads_stdin_and_files(pipeline_run, tmp_path):
    results, _ = pipeline_run
    folder, _ = only_checkpoint(results, "onnx")
    from_stdin = predict("--model", folder, stdin="great film\n\nboring plot\n")
    assert from_stdin.returncode == 0, from_stdin.stderr[-2000:]
    table = from_stdin.stdout.strip().splitlines()
    assert table[0].split("\t")[:2] == ["label", "probability"] and len(table) == 3  # the empty line is skipped
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"review": text}) + "\n" for text in ["great film", "dull plot", "fun story"]))
    from_file = predict("--model", folder, "--input_file", data, "--text_column", "review", "--format", "jsonl")
    assert from_file.returncode == 0 and len(from_file.stdout.strip().splitlines()) == 3


def test_predict_refuses_bad_input_with_exit_code_2(pipeline_run, tmp_path):
    results, _ = pipeline_run
    folder, _ = only_checkpoint(results, "onnx")
    csv_file = tmp_path / "texts.csv"
    csv_file.write_text("review,stars\ngreat film,5\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text\ncaf\xe9 cr\xe8me film\n".encode("latin-1"))
    cases = [
        (("--model", tmp_path, "great"), "has no compression.json"),
        (("--model", tmp_path / "missing", "great"), "no such folder"),
        (("--model", folder, "--input_file", csv_file, "--text_column", "body"), "'body' is not a column"),
        (("--model", folder, "--input_file", tmp_path / "none.csv"), "no such file"),
        (("--model", folder, "--input_file", latin), "not valid utf-8.*--encoding latin-1"),
        (("--model", folder, "--onnx_file", "other.onnx", "great"), "has no other.onnx"),
        (("--model", folder, "   "), "No text to classify"),
        (("--model", folder, "--batch_size", "0", "great"), "--batch_size 0 must be a positive integer"),
    ]
    for args, message in cases:
        completed = predict(*args)
        assert completed.returncode == 2, (args, completed.stderr[-1500:])
        assert re.search(message, completed.stderr), (message, completed.stderr[-1500:])
    decoded = predict("--model", folder, "--input_file", latin, "--encoding", "latin-1", "--format", "jsonl")
    assert decoded.returncode == 0 and "café crème film" in decoded.stdout


ONLY_DEPLOYMENT_IMPORTS = """
import builtins, importlib, sys
for name in sys.argv[2].split(","):  # what the card's snippet may use, with whatever they import themselves
    importlib.import_module(name)
allowed = set(sys.modules) | set(sys.stdlib_module_names)
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.partition(".")[0] not in allowed:
        raise ImportError(f"the snippet imported {name}, which a deployment without this project does not have")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
sys.path = [p for p in sys.path if p != ""]  # not the project either
exec(compile(open(sys.argv[1]).read(), "card_snippet.py", "exec"))
"""


@pytest.mark.parametrize("stage", stages.export_stages())
def test_an_export_folders_card_snippet_runs_with_its_runtime_tokenizers_and_numpy_only(pipeline_run, tmp_path, stage):
    results, _ = pipeline_run
    folder, _ = only_checkpoint(results, stage)
    card = (folder / "README.md").read_text()
    snippet = card.split("## How to run it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "import torch" not in snippet and "common" not in snippet
    (tmp_path / "snippet.py").write_text(snippet)
    allowed = f"numpy,tokenizers,{stages.get(stage).runtime}"  # onnxruntime or openvino
    completed = subprocess.run([sys.executable, "-c", ONLY_DEPLOYMENT_IMPORTS, str(tmp_path / "snippet.py"), allowed],
                               cwd=folder, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = [line.split()[0] for line in completed.stdout.strip().splitlines()]
    assert len(printed) == 2 and set(printed) <= {"negative", "neutral", "positive"}, completed.stdout


def test_every_stage_folder_carries_a_manifest_that_verifies(pipeline_run):
    from common.checkpoints import verify_files

    results, _ = pipeline_run
    for stage in stages.STAGE_NAMES:
        folder, record = only_checkpoint(results, stage)
        assert set(record["manifest"]) == {p.name for p in folder.iterdir()} - {RECORD_FILE, "metrics.json", "README.md"}, stage
        verify_files(folder)
        header = assert_card_matches_record(folder)  # a model card whose numbers are the record's
        assert record["card_latency"]["median_ms"] > 0 and header["compression"]["validation_accuracy"] is not None, stage


def test_stage_12_refuses_a_position_cut_below_max_length_before_any_export(pipeline_run):
    results, _ = pipeline_run
    before = {stage: sorted(p.name for p in (results / stage).iterdir()) for stage in ("onnx", "onnx_4bit")}
    completed = run_stage_unchecked("12_export_onnx.py", results, "--dataset", results.parent / "reviews.csv", *DATA_ARGS,
                                    "--max_positions", 32)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "max_positions=32 must lie between --max_length (64" in completed.stderr and "64 tokens the model's" in completed.stderr
    beyond = run_stage_unchecked("12_export_onnx.py", results, "--dataset", results.parent / "reviews.csv", *DATA_ARGS,
                                 "--max_positions", 65)
    assert beyond.returncode == 2 and "Traceback" not in beyond.stderr
    assert "max_positions=65 must lie between --max_length (64" in beyond.stderr and "64 tokens the model's" in beyond.stderr
    assert {stage: sorted(p.name for p in (results / stage).iterdir()) for stage in before} == before

