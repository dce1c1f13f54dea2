"""Hostile inputs and faults: every one ends in the right result or a clear error (exact class, message naming
the bad value), raised before any model loads or any training starts, with nothing deleted or half-written."""

import builtins
import json
import logging
import os
import subprocess
import sys

import pytest

from common import checkpoints, stages
from common.config import (
    DataConfig,
    OnnxExportConfig,
    PruningConfig,
    PTQConfig,
    ReportConfig,
    TeacherConfig,
    parse_config,
)
from common.data import load_splits
from common.models import check_matches_data, load_model, load_pretrained_classifier, save_checkpoint
from conftest import PROJECT_ROOT, make_tokenizer, run_stage_unchecked, tiny_bert_config, tiny_data, tiny_model, write_reviews_csv

LABELS = ["negative", "positive"]


def checkpoint(results_dir, stage="teacher", labels=LABELS, config=None, max_positions=64):
    model_config = tiny_bert_config()
    model_config.max_position_embeddings = max_positions
    tokenizer = make_tokenizer(results_dir.parent / "tokenizer")
    record = {"label_names": labels}
    if config is not None:
        record["config"] = config
    return save_checkpoint(stage, tiny_model(model_config), tokenizer, record)


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


# -- data loss: --output_dir with --overwrite_output_dir --------------------------------------------------


def test_output_dir_at_results_root_is_refused_and_nothing_is_deleted(results_dir):
    teacher = checkpoint(results_dir)
    (results_dir / "notes.txt").write_text("mine")
    before = snapshot(results_dir)
    with pytest.raises(ValueError, match=r"output_dir=.*will not be replaced: it is the results folder"):
        parse_config(DataConfig, TeacherConfig, args=["--output_dir", str(results_dir), "--overwrite_output_dir"])
    assert snapshot(results_dir) == before and (teacher / "model.safetensors").is_file()


def test_output_dir_at_a_stage_folder_is_refused(results_dir):
    checkpoint(results_dir)
    with pytest.raises(ValueError, match="results folder or one of its stage folders"):
        parse_config(DataConfig, PTQConfig, args=["--output_dir", str(results_dir / "teacher"), "--overwrite_output_dir"])


def test_output_dir_holding_user_files_is_refused(results_dir, tmp_path):
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / checkpoints.RECORD_FILE).write_text("{}")  # even a record does not make other files ours
    with pytest.raises(ValueError, match=r"holds \['thesis.tex'\], which no stage writes"):
        parse_config(DataConfig, PruningConfig, args=["--output_dir", str(folder), "--overwrite_output_dir"])
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_output_dir_holding_other_checkpoints_is_refused(results_dir, tmp_path):
    parent = tmp_path / "runs"
    (parent / "run-a").mkdir(parents=True)
    (parent / "run-a" / checkpoints.RECORD_FILE).write_text(json.dumps({"stage": "teacher"}))
    (parent / checkpoints.RECORD_FILE).write_text(json.dumps({"stage": "teacher"}))
    with pytest.raises(ValueError, match=r"holds \['run-a/'\]"):
        checkpoints.check_output_dir(str(parent), overwrite=True)
    assert (parent / "run-a" / checkpoints.RECORD_FILE).is_file()


def test_non_empty_output_dir_is_refused_when_the_config_is_parsed(results_dir, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "x").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty. Pass --overwrite_output_dir"):
        parse_config(DataConfig, TeacherConfig, args=["--output_dir", str(folder)])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        parse_config(DataConfig, PTQConfig, args=["--output_dir", str(target)])


# -- code execution -------------------------------------------------------------------------------------------

EVIL = "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('yes')\nfrom transformers import BertConfig as EvilConfig\nfrom transformers import BertForSequenceClassification as EvilModel\n"


@pytest.fixture
def custom_code_folder(tmp_path, monkeypatch):
    folder = tmp_path / "custom-code-model"
    tiny_model(tiny_bert_config()).save_pretrained(folder)
    make_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL)
    monkeypatch.setattr(builtins, "input", lambda *args: "y")  # a user (or `yes |`) answering the prompt
    return folder


def test_pretrained_folder_with_custom_code_never_runs_it(custom_code_folder):
    model = load_pretrained_classifier(str(custom_code_folder), LABELS)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not (custom_code_folder / "EXECUTED").exists()


def test_checkpoint_with_custom_code_never_runs_it(custom_code_folder):
    (custom_code_folder / checkpoints.RECORD_FILE).write_text(json.dumps({"stage": "teacher", "label_names": LABELS}))
    load_model(custom_code_folder)
    assert not (custom_code_folder / "EXECUTED").exists()


def test_unknown_architecture_with_custom_code_is_refused_without_running_it(custom_code_folder):
    config = json.loads((custom_code_folder / "config.json").read_text())
    config["model_type"] = "evil"
    (custom_code_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="Could not load model"):
        load_pretrained_classifier(str(custom_code_folder), LABELS)
    assert not (custom_code_folder / "EXECUTED").exists()


# -- report and file names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "/tmp/report", "sub/report", ".hidden", "a..b", ""])
def test_report_name_cannot_leave_the_results_folder(name):
    with pytest.raises(ValueError, match="report_name=.*must be a plain file name"):
        ReportConfig(report_name=name)


def test_report_memory_repeats_must_be_positive():
    with pytest.raises(ValueError, match="memory_repeats=0 must be a positive number"):
        ReportConfig(memory_repeats=0)


def test_extra_models_entry_needs_a_label():
    with pytest.raises(ValueError, match="extra_models entry 'results/x' must look like 'Label=path"):
        ReportConfig(extra_models=["results/x"])


# -- config files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"skip_modules": "classifier"}, r"skip_modules='classifier' has the wrong type; skip_modules must be a JSON list of str"),
        ({"blocksize": 64.5}, r"blocksize=64.5 has the wrong type; blocksize must be an integer"),
        ({"double_quant": "false"}, r"double_quant='false' has the wrong type; double_quant must be true or false"),
        ({"max_length": "64"}, r"max_length='64' has the wrong type; max_length must be an integer"),
        ({"validation_fraction": "0.1"}, r"validation_fraction='0.1' has the wrong type; validation_fraction must be a number"),
        ({"quant_type": 4}, r"quant_type=4 has the wrong type; quant_type must be a string"),
        ({"max_train_samples": True}, r"max_train_samples=True has the wrong type; max_train_samples must be an integer"),
    ],
)
def test_json_config_values_of_the_wrong_type(tmp_path, values, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message):
        parse_config(DataConfig, PTQConfig, args=["--config", str(path)])


def test_json_config_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"num_epochs": 2,}')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON: .* line 1"):
        parse_config(DataConfig, TeacherConfig, args=["--config", str(path)])


@pytest.mark.parametrize("content, error, message", [
    (b"[1, 2]", ValueError, "must hold a JSON object"),
    (b'{"num_epochs": 2, "caf\xe9": 1}', ValueError, "is not UTF-8 text"),
])
def test_json_config_of_the_wrong_shape(tmp_path, content, error, message):
    path = tmp_path / "run.json"
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        parse_config(DataConfig, TeacherConfig, args=["--config", str(path)])


def test_missing_json_config_and_missing_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        parse_config(DataConfig, TeacherConfig, args=["--config", str(tmp_path / "nowhere.json")])
    with pytest.raises(ValueError, match="--config needs a path"):
        parse_config(DataConfig, TeacherConfig, args=["--config"])


@pytest.mark.parametrize("args", [["--num_epochs", "3"], ["--num_epochs=3"]])
def test_smoke_profile_keeps_a_field_set_to_its_default_value(args):
    _, teacher = parse_config(DataConfig, TeacherConfig, args=["--profile", "smoke", *args])
    assert teacher.num_epochs == 3


def test_smoke_profile_keeps_json_values_equal_to_the_default(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"num_epochs": 3, "max_train_samples": None}))
    data, teacher = parse_config(DataConfig, TeacherConfig, args=["--config", str(path), "--profile", "smoke"])
    assert teacher.num_epochs == 3 and data.max_train_samples is None and data.max_eval_samples == 128


# -- paths -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--model_name_or_path", "./no-such-model", "model_name_or_path='./no-such-model': no such file or folder"),
    ("--model_name_or_path", "/abs/missing/model", "no such file or folder"),
    ("--dataset", "data/missing.csv", r"dataset='data/missing.csv'"),
])
def test_local_paths_that_do_not_exist_are_refused_at_parse_time(flag, value, message):
    with pytest.raises(FileNotFoundError, match=message):
        parse_config(DataConfig, TeacherConfig, args=[flag, value])


def test_checkpoint_paths_are_checked_at_parse_time(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_model_path=.*no such folder"):
        parse_config(DataConfig, PruningConfig, args=["--teacher_model_path", str(tmp_path / "nope")])
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="student_model_path=.*has no compression.json"):
        parse_config(DataConfig, PruningConfig, args=["--student_model_path", str(tmp_path / "half")])


def test_damaged_record_is_a_clear_error(results_dir):
    folder = checkpoint(results_dir)
    (folder / checkpoints.RECORD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="compression.json is not valid JSON.*Re-run its stage"):
        checkpoints.read_record(folder)


def test_checkpoint_of_the_wrong_stage_is_refused(results_dir):
    teacher = checkpoint(results_dir, "teacher")
    with pytest.raises(ValueError, match=r"is a 'teacher' checkpoint, but a 'pruned' checkpoint is needed"):
        checkpoints.find_checkpoint("pruned", teacher)
    with pytest.raises(ValueError, match="'ptq_4bit' or 'qkd_4bit'"):
        checkpoints.find_checkpoint("qkd_4bit", teacher, allowed_stages=stages.with_weights("4bit"))
    assert checkpoints.find_checkpoint("pruned", teacher, allowed_stages=stages.with_weights("full")) == teacher


# -- inputs against what the checkpoint says --------------------------------------------------------------------


def test_checkpoint_trained_on_other_labels(results_dir):
    folder = checkpoint(results_dir, labels=["rotten", "fresh"])
    with pytest.raises(ValueError, match=r"trained on labels \['rotten', 'fresh'\], but the data now has \['negative', 'positive'\]"):
        check_matches_data(folder, checkpoints.read_record(folder), DataConfig(), LABELS)


@pytest.mark.parametrize("field, then, now", [
    ("dataset", "embedded", "reviews.csv"),
    ("split_seed", 42, 7),
    ("label_column", "label", "sentiment"),
    ("test_fraction", 0.1, 0.2),
])
def test_checkpoint_made_from_other_data_settings(results_dir, field, then, now):
    settings = {"dataset": "embedded", "split_seed": 42, "label_column": "label", "test_fraction": 0.1}
    folder = checkpoint(results_dir, config={**settings, field: then})
    current = DataConfig(**{**{k: v for k, v in settings.items() if k != "dataset"}, field: now})
    with pytest.raises(ValueError, match=rf"other data settings \({field}: {then!r} then, {now!r} now\)"):
        check_matches_data(folder, checkpoints.read_record(folder), current, LABELS)


def test_max_length_beyond_the_position_embeddings(results_dir, tmp_path):
    folder = checkpoint(results_dir, max_positions=32)
    with pytest.raises(ValueError, match="max_length=64 exceeds the 32 position embeddings.*--max_length 32"):
        check_matches_data(folder, checkpoints.read_record(folder), DataConfig(max_length=64), LABELS)
    with pytest.raises(ValueError, match="max_length=128 exceeds the 32 position embeddings"):
        load_pretrained_classifier(str(folder), LABELS, max_length=128)


# -- data files -------------------------------------------------------------------------------------------------


def data_config(path, **overrides):
    return DataConfig(dataset=str(path), text_column="review", label_column="sentiment", **overrides)


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        load_splits(data_config(path))


def test_header_only_csv(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("review,sentiment\n")
    with pytest.raises(ValueError, match="header.csv has a header row but no data rows"):
        load_splits(data_config(path))


def test_latin1_csv_needs_its_encoding(tmp_path):
    path = write_reviews_csv(tmp_path / "reviews.csv", rows=60)
    lines = path.read_text().splitlines()
    lines[1] = "caf\u00e9 cr\u00e8me great fun film," + lines[1].rsplit(",", 1)[1]
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match="reviews.csv is not valid utf-8 .*--encoding latin-1"):
        load_splits(data_config(path))
    data = load_splits(data_config(path, encoding="latin-1"))
    texts = list(data.train["text"]) + list(data.validation["text"]) + list(data.test["text"])
    assert any("café crème" in text for text in texts)


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="encoding='utf-9' is not a known text encoding"):
        DataConfig(encoding="utf-9")


def test_rows_with_empty_text_or_label_are_counted_in_the_log(tmp_path, caplog):
    path = write_reviews_csv(tmp_path / "reviews.csv", rows=60)
    with open(path, "a") as handle:
        handle.write(",positive\n   ,negative\ngreat film,\n")
    with caplog.at_level(logging.WARNING):
        data = load_splits(data_config(path))
    assert sum(len(split) for split in data.splits().values()) == 60
    assert "Dropped 3 row(s)" in caplog.text and "2 with an empty text" in caplog.text and "1 with an empty label" in caplog.text


def test_one_class_data_and_missing_column(tmp_path):
    path = write_reviews_csv(tmp_path / "one.csv", rows=40, labels=("positive",))
    with pytest.raises(ValueError, match="1 distinct label"):
        load_splits(data_config(path))
    with pytest.raises(ValueError, match="text_column='body' is not a column.*'review', 'sentiment'"):
        load_splits(DataConfig(dataset=str(path), text_column="body", label_column="sentiment"))


# -- report ------------------------------------------------------------------------------------------------------


def test_report_with_no_checkpoint_fails(results_dir):
    from common.report import build_report

    config = ReportConfig(latency_repeats=1, latency_warmup=0, ort_reference=False)
    with pytest.raises(RuntimeError, match=r"(?s)No model could be evaluated.*Teacher \(FP32\): FileNotFoundError"):
        build_report(config, tiny_data(["great film", "dull plot"]), DataConfig(), settings={})
    assert not (results_dir / "final_report.json").exists()


def test_report_latency_length_beyond_the_position_limit_fails_before_measuring(results_dir):
    from common.report import build_report

    checkpoint(results_dir, max_positions=64)
    config = ReportConfig(latency_seq_length=128, latency_repeats=1, latency_warmup=0)
    with pytest.raises(ValueError, match="latency_seq_length=128 exceeds the 64 position embeddings of Teacher"):
        build_report(config, tiny_data(["great film", "dull plot"]), DataConfig(), settings={})


# -- the ONNX stage's inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"calibration_methods": ["kl"]}, r"calibration_methods entry='kl' is not supported.*'minmax', 'percentile', 'entropy'"),
    ({"calibration_methods": []}, "calibration_methods is empty"),
    ({"percentile": 50.0}, r"percentile=50.0 is out of range"),
    ({"embedding_quantization": "int3"}, r"embedding_quantization='int3' is not supported.*'auto', 'none', 'int8', 'int4', 'int2'"),
    ({"calibration_samples": 0}, "calibration_samples=0 must be a positive number"),
    ({"deployment_tolerance": -1.0}, r"deployment_tolerance=-1.0 is out of range"),
])
def test_onnx_export_config(values, message):
    with pytest.raises(ValueError, match=message):
        OnnxExportConfig(**values)


# -- scripts end to end: refused before any model loads ---------------------------------------------------------


def test_resuming_a_teacher_run_with_other_data_is_refused(results_dir, tmp_path, pretrained_folder, reviews_csv):
    interrupted = results_dir / "teacher" / f"{checkpoints.RESUME_PREFIX}20260101-000000-000000"
    interrupted.mkdir(parents=True)
    (interrupted / "trainer_state.json").write_text(json.dumps({"epochs_done": 1, "global_step": 3}))
    (interrupted / "run.json").write_text(json.dumps({
        "data": {"dataset": "embedded", "dataset_config": None, "text_column": None, "label_column": "label", "split_seed": 42,
                 "validation_fraction": 0.1, "test_fraction": 0.1},
        "label_names": ["rotten", "fresh"], "model_name_or_path": str(pretrained_folder), "max_length": 64}))
    completed = run_stage_unchecked("1_train_teacher.py", results_dir, "--resume", "--model_name_or_path", pretrained_folder,
                           "--dataset", reviews_csv, "--text_column", "review", "--label_column", "sentiment", "--profile", "smoke")
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "1_train_teacher.py: error: --resume: the interrupted run" in completed.stderr and "label_names" in completed.stderr
    assert "Loaded pretrained" not in completed.stderr, "refused before the model was loaded"
    assert (interrupted / "trainer_state.json").is_file()


def test_quantizing_a_teacher_as_the_pruned_model_is_refused(results_dir):
    teacher = checkpoint(results_dir)
    completed = run_stage_unchecked("9_quantize_pruned_model.py", results_dir, "--pruned_model_path", teacher, "--profile", "smoke")
    assert completed.returncode != 0 and "is a 'teacher' checkpoint, but a 'pruned' checkpoint is needed" in completed.stderr
    assert not (results_dir / "ptq_4bit").exists() or not list((results_dir / "ptq_4bit").iterdir())


def test_int8_export_with_other_data_than_its_source_is_refused(results_dir, reviews_csv):
    checkpoint(results_dir, "pruned", labels=["rotten", "fresh"])
    completed = run_stage_unchecked("11_export_int8.py", results_dir, "--source", "pruned", "--dataset", reviews_csv,
                           "--text_column", "review", "--label_column", "sentiment", "--profile", "smoke")
    assert completed.returncode != 0
    assert "trained on labels ['rotten', 'fresh'], but the data now has ['negative', 'positive']" in completed.stderr
    assert not (results_dir / "int8").exists() or not list((results_dir / "int8").iterdir())


# -- sentence pairs, accumulation, resume (issue 12 surfaces) ---------------------------------------------------


def test_pair_column_that_is_missing_empty_or_the_text_column(tmp_path, caplog):
    from conftest import write_pairs_csv

    path = write_pairs_csv(tmp_path / "pairs.csv", rows=40)
    with pytest.raises(ValueError, match="text_pair_column='hypotheses' is not a column of .*premise.*hypothesis"):
        load_splits(DataConfig(dataset=str(path), text_column="premise", text_pair_column="hypotheses", label_column="relation"))
    with pytest.raises(ValueError, match="text_pair_column='premise' is also the text_column"):
        DataConfig(dataset=str(path), text_column="premise", text_pair_column="premise")
    with pytest.raises(ValueError, match="embedded dataset has single texts only"):
        DataConfig(text_pair_column="hypothesis")
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",," + lines[1].split(",")[2]  # an empty second text
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        data = load_splits(DataConfig(dataset=str(path), text_column="premise", text_pair_column="hypothesis", label_column="relation"))
    assert "Dropped 1 row(s)" in caplog.text and "'premise/hypothesis'" in caplog.text
    assert data.is_pair and sum(len(split) for split in data.splits().values()) == 39


def test_glue_pair_tasks_pick_their_columns_and_matched_splits(monkeypatch):
    import datasets

    config = DataConfig(dataset="glue", dataset_config="mnli")
    assert (config.text_column, config.text_pair_column) == ("premise", "hypothesis")
    assert DataConfig(dataset="glue", dataset_config="sst2").text_pair_column is None
    assert DataConfig(dataset="glue", dataset_config="qqp", text_column="question2", text_pair_column="question1").text_column == "question2"

    def split(rows, labelled=True):
        return datasets.Dataset.from_dict({
            "premise": [f"premise {i}" for i in range(rows)], "hypothesis": [f"hypothesis {i}" for i in range(rows)],
            "label": [i % 3 if labelled else -1 for i in range(rows)],
        }, features=datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                       "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])}))

    fake = datasets.DatasetDict({"train": split(90), "validation_matched": split(12), "validation_mismatched": split(15),
                                 "test_matched": split(9, labelled=False)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    data = load_splits(config)
    assert len(data.validation) == 12 and data.validation["text_pair"][0].startswith("hypothesis")
    assert len(data.test) == 9  # the unlabelled GLUE test split is dropped and a test split carved from train
    assert data.label_names == ["entailment", "neutral", "contradiction"]


@pytest.mark.parametrize("field, value", [("gradient_accumulation_steps", 0), ("stop_after_epochs", -1)])
def test_training_counts_must_be_positive(field, value):
    with pytest.raises(ValueError, match=f"{field}={value} must be a positive"):
        TeacherConfig(**{field: value})


def test_predict_needs_pairs_for_a_pair_model_and_a_separator_in_each_text(tmp_path):
    from common.prediction import Classifier, PredictionError, check_input_kind, read_texts

    pair_model = Classifier(tmp_path, "test", None, {0: "a", 1: "b"}, 16, runtime=None, pair_column="hypothesis")
    with pytest.raises(PredictionError, match="classifies sentence pairs .*hypothesis.*--pair_separator"):
        check_input_kind(pair_model, ["just one text"])
    single_model = Classifier(tmp_path, "test", None, {0: "a", 1: "b"}, 16, runtime=None)
    with pytest.raises(PredictionError, match="classifies single texts, but pairs were given"):
        check_input_kind(single_model, [("a", "b")])
    with pytest.raises(PredictionError, match="'no separator here' has no '|||'"):
        read_texts(["first ||| second", "no separator here"], None, None, pair_separator="|||")
    assert read_texts(["first ||| second"], None, None, pair_separator="|||") == [("first", "second")]
    with pytest.raises(PredictionError, match="--text_pair_column names a column of --input_file"):
        read_texts(["a"], None, None, text_pair_column="hypothesis")
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("premise,hypothesis\na man sleeps,nobody sleeps\nit rains,the street is wet\n")
    assert read_texts([], str(pairs_csv), "premise", text_pair_column="hypothesis") == [
        ("a man sleeps", "nobody sleeps"), ("it rains", "the street is wet")]
    with pytest.raises(PredictionError, match="--text_pair_column 'hypotheses' is not a column of .*premise"):
        read_texts([], str(pairs_csv), "premise", text_pair_column="hypotheses")
    lines = tmp_path / "lines.txt"
    lines.write_text("a man sleeps\nit rains\n")
    with pytest.raises(PredictionError, match="is a .txt file .* no --text_pair_column 'hypothesis'; use --pair_separator"):
        read_texts([], str(lines), None, text_pair_column="hypothesis")


@pytest.mark.parametrize("config_type, values, message", [
    (PruningConfig, {"ffn_round_to": 0}, "ffn_round_to=0 must be a positive"),
    (PruningConfig, {"alpha_attention": -1.0}, "alpha_attention=-1.0"),
    (PruningConfig, {"attention_relation_heads": 0}, "attention_relation_heads=0 must be a positive"),
    (PruningConfig, {"vocabulary_min_count": 0}, r"vocabulary_min_count=0 is out of range; it must lie in \[1, inf\]"),
    (PruningConfig, {"alpha_ce": 0.0, "alpha_kd": 0.0, "alpha_hidden": 0.0, "alpha_attention": 0.0}, "alpha_attention are all 0"),
    ("QATKDConfig", {"alpha_attention": -0.5}, "alpha_attention=-0.5"),
    ("PTQConfig", {"keep_8bit_size_budget_mb": -1.0}, "keep_8bit_size_budget_mb=-1.0 must be a positive"),
    ("QATKDConfig", {"keep_8bit_size_budget_mb": 0.0}, "keep_8bit_size_budget_mb=0.0 must be a positive"),
    ("QATKDConfig", {"keep_8bit_layers": 0}, "keep_8bit_layers=0 must be a positive"),
    ("PTQConfig", {"keep_8bit_layers": -2}, "keep_8bit_layers=-2 must be a positive"),
    ("QATKDConfig", {"embedding_int4_rows": 500}, r"embedding_int4_rows=500 keeps some word-embedding rows at int4 among "
     r"ternary ones, but embedding_quantization='int4'; set embedding_quantization=int2 or embedding_int4_rows=0"),
    ("PTQConfig", {"embedding_int4_rows": -1, "embedding_quantization": "int2"},
     r"embedding_int4_rows=-1 is out of range; it must lie in \[0, inf\]"),
    ("SensitivityConfig", {"sparsities": [0.5, 1.5]}, r"sparsities=\[0.5, 1.5\] must be shares between 0 and 1"),
    ("SensitivityConfig", {"sparsities": []}, r"sparsities=\[\] must be shares"),
    ("SensitivityConfig", {"parameter_budget": 1.0}, "parameter_budget=1.0"),
    ("SensitivityConfig", {"output_name": "../escape"}, "output_name='../escape' must be a plain file name"),
    ("SensitivityConfig", {"gradient_batches": 0}, "gradient_batches=0 must be a positive"),
    ("OpenVinoExportConfig", {"weight_mode": "int3"}, "weight_mode='int3' is not supported; allowed values: 'nf4'"),
    ("OpenVinoExportConfig", {"calibration_samples": 0}, "calibration_samples=0 must be a positive"),
    ("OpenVinoExportConfig", {"int8_max_drop": -0.1}, r"int8_max_drop=-0.1 is out of range; it must lie in \[0.0, 100.0\]"),
    ("OnnxExportConfig", {"deployment_tolerance": -1.0}, "deployment_tolerance=-1.0 is out of range"),
    ("OnnxExportConfig", {"max_positions": 0}, "max_positions=0 must be a positive"),
    ("OnnxExportConfig", {"leftover_matrix_bits": 2}, r"leftover_matrix_bits=2 is not supported; allowed values: 8, 4"),
    ("StudentConfig", {"student_layer_selection": "random"}, "student_layer_selection='random' is not supported; allowed"),
    ("StudentConfig", {"student_layer_selection": "importance", "student_model_name_or_path": "distilbert-base-uncased"},
     "chooses teacher layers to copy, but student_model_name_or_path loads a pretrained student"),
    ("StudentConfig", {"layer_importance_batches": 0}, "layer_importance_batches=0 must be a positive"),
    ("CompressConfig", {"target_retention": 0.0}, r"target_retention=0.0 is out of range; it must lie in \(0.0, 1.0\]"),
    ("CompressConfig", {"target_retention": 1.01}, "target_retention=1.01 is out of range"),
    ("CompressConfig", {"optimize": "speed"}, "optimize='speed' is not supported; allowed values: 'latency', 'size'"),
    ("CompressConfig", {"max_latency_ms": 0.0}, "max_latency_ms=0.0 must be a positive"),
    ("CompressConfig", {"max_size_mb": -5.0}, "max_size_mb=-5.0 must be a positive"),
    ("CompressConfig", {"sparsities": [0.5, 0.5]}, "lists a value twice"),
    ("CompressConfig", {"sparsities": [0.0]}, r"sparsities entry=0.0 is out of range"),
    ("CompressConfig", {"time_budget_s": 0.0}, "time_budget_s=0.0 must be a positive"),
    ("CompressConfig", {"seed": -3}, r"seed=-3 is out of range"),
    ("CompressConfig", {"vocabulary_min_count": 0}, r"vocabulary_min_count=0 is out of range"),
    ("CompressSummaryConfig", {"output_name": "../elsewhere/summary"},
     r"output_name='../elsewhere/summary' must be a plain file name, e.g. compress_summary"),
    ("CompressSummaryConfig", {"output_name": ""}, "output_name='' must be a plain file name"),
    ("RetentionCheckConfig", {"target_retention": 0.0}, r"target_retention=0.0 is out of range; it must lie in \(0.0, 1.0\]"),
    ("RetentionCheckConfig", {"gate_z": -1.0}, r"gate_z=-1.0 is out of range; it must lie in \[0.0, 5.0\]"),
    ("RetentionCheckConfig", {"splits": ["train"]}, "splits entry='train' is not supported; allowed values: 'validation', 'test'"),
    ("RetentionCheckConfig", {"splits": []}, r"splits=\[\] must name validation and/or test, each once"),
    ("RetentionCheckConfig", {"splits": ["test", "test"]}, "must name validation and/or test, each once"),
    ("RetentionCheckConfig", {"output_name": "../out"}, "output_name='../out' must be a plain file name, e.g. retention_check"),
    ("RetentionCheckConfig", {}, "models is empty: pass the models to check, e.g. --models results/pruned/<run_id>"),
    ("ReportConfig", {"deploy_min_retention": 1.5}, r"deploy_min_retention=1.5 must be a share in \(0, 1\]"),
    ("ReportConfig", {"real_text_examples": -1}, "real_text_examples=-1 is out of range"),
])
def test_new_training_and_analysis_fields_refuse_bad_values(config_type, values, message):
    import common.config as config_module

    config_type = getattr(config_module, config_type) if isinstance(config_type, str) else config_type
    with pytest.raises(ValueError, match=message):
        config_type(**values)


def test_predict_pair_separator_must_not_be_empty():
    from common.prediction import PredictionError, read_texts

    with pytest.raises(PredictionError, match="--pair_separator '' is empty"):
        read_texts(["a ||| b"], None, None, pair_separator="")


def test_sweep_refuses_sparsities_outside_zero_to_one(results_dir):
    completed = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "sweep.py"), "--sparsities", "0.5", "1.2"],
                               cwd=PROJECT_ROOT, env={**os.environ, "COMPRESSION_RESULTS_DIR": str(results_dir)},
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "--sparsities [0.5, 1.2] must be shares between 0 and 1" in completed.stderr
    assert not results_dir.exists() or not any(results_dir.iterdir()), "nothing written"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_alignment_benchmark_on_cuda_without_a_gpu_is_refused(results_dir):
    completed = run_stage_unchecked("scripts/benchmark_alignment.py", results_dir, "--device", "cuda")
    assert completed.returncode == 2
    assert "--device cuda: torch sees no CUDA device here; use --device cpu" in completed.stderr
    assert not (results_dir / "alignment_benchmark_cuda.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(results_dir):
    completed = run_stage_unchecked("scripts/gpu_check.py", results_dir)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "gpu-check: no GPU here" in completed.stdout and "Nothing was run" in completed.stdout
    assert not results_dir.exists(), "nothing written"


def test_ablation_quantization_rows_without_their_pruned_model_are_refused_before_any_run(results_dir):
    completed = run_stage_unchecked("scripts/ablation.py", results_dir, "--variants", "L2, MSP",
                           "--quantization_variants", "QKD-4bit (on KGSP + MSP)")
    assert completed.returncode == 2
    assert "quantize the 'KGSP + MSP' model; add it to --variants or pass --skip_quantization" in completed.stderr
    assert not (results_dir / "ablation").exists(), "no stage ran"


# -- refusals: one paragraph, exit code 2, nothing written -------------------------------------------------------

def _snapshot(folder):
    return sorted((str(path.relative_to(folder)), path.stat().st_size if path.is_file() else -1) for path in folder.rglob("*"))


def test_only_the_projects_own_refusals_are_shortened():
    import json as json_module

    from common.lifecycle import _raised_by_project

    try:
        PruningConfig(ffn_round_to=0)
    except ValueError as error:
        assert _raised_by_project(error)
    try:
        json_module.loads("{")
    except ValueError as error:  # raised inside the standard library: a bug here, so the traceback stays
        assert not _raised_by_project(error)


def test_a_tool_without_the_checkpoints_it_needs_says_so_in_one_paragraph(results_dir):
    completed = run_stage_unchecked("scripts/benchmark_pruning.py", results_dir, "--steps", 2)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "benchmark_pruning.py: error: No complete student checkpoint" in completed.stderr
    assert "Run `python 2_distill_student.py` first" in completed.stderr and "Traceback" not in completed.stderr
