import json
from collections import Counter

import numpy as np
import pytest

from common import checkpoints
from common.config import DataConfig, PruningConfig, QATKDConfig, StudentConfig, TeacherConfig, parse_config
from common.data import load_splits, stratified_split
from conftest import write_reviews_csv

# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: PruningConfig(importance_mode="taylor"), r"importance_mode='taylor'.*'l2', 'kd_grad', 'l2\+kd_grad'"),
        (lambda: TeacherConfig(learning_rate=-1.0), "learning_rate=-1.0 must be a positive number"),
        (lambda: DataConfig(validation_fraction=0.7), r"validation_fraction=0.7 is out of range"),
        (lambda: DataConfig(profile="tiny"), r"profile='tiny'.*'default', 'smoke'"),
        (lambda: QATKDConfig(quant_type="int3"), r"quant_type='int3'.*'nf4', 'fp4'"),
        (lambda: StudentConfig(temperature=0), "temperature=0 must be a positive number"),
        (lambda: PruningConfig(pruning_start_fraction=0.8, pruning_end_fraction=0.2), "pruning_end_fraction=0.2 is before"),
    ],
)
def test_config_validation_names_field_value_and_allowed(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_unknown_command_line_flag_is_an_error():
    with pytest.raises(ValueError, match="not used by the HfArgumentParser.*--num_epoch"):
        parse_config(DataConfig, TeacherConfig, args=["--num_epoch", "2"])


def test_json_config_with_command_line_override(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"num_epochs": 5, "learning_rate": 1e-4, "max_length": 32}))
    data, teacher = parse_config(DataConfig, TeacherConfig, args=["--config", str(path), "--num_epochs", "2"])
    assert (teacher.num_epochs, teacher.learning_rate, data.max_length) == (2, 1e-4, 32)
    path.write_text(json.dumps({"num_epochz": 5}))
    with pytest.raises(ValueError, match=r"unknown keys \['num_epochz'\]"):
        parse_config(DataConfig, TeacherConfig, args=["--config", str(path)])


def test_smoke_profile_fills_only_fields_left_at_default():
    data, pruning = parse_config(DataConfig, PruningConfig, args=["--profile", "smoke", "--max_eval_samples", "64"])
    assert data.max_train_samples == 256 and data.max_eval_samples == 64
    assert pruning.num_epochs == 1 and pruning.pruning_frequency_steps == 2


# -- data --------------------------------------------------------------------------------------------


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    first = stratified_split(labels, [0.1, 0.1], seed=7)
    second = stratified_split(labels, [0.1, 0.1], seed=7)
    other = stratified_split(labels, [0.1, 0.1], seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], other[0])
    assert sorted(np.concatenate(first).tolist()) == list(range(1000))
    validation_counts = Counter(labels[first[0]].tolist())
    assert validation_counts == {0: 60, 1: 30, 2: 10}
    assert Counter(labels[first[2]].tolist()) == {0: 480, 1: 240, 2: 80}


def test_csv_with_three_string_labels(tmp_path):
    path = write_reviews_csv(tmp_path / "three.csv", rows=300, labels=("negative", "neutral", "positive"))
    config = DataConfig(dataset=str(path), text_column="review", label_column="sentiment")
    data = load_splits(config)
    again = load_splits(config)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert (len(data.train), len(data.validation), len(data.test)) == (240, 30, 30)
    assert Counter(data.validation["label"]) == {0: 10, 1: 10, 2: 10}
    assert data.train["text"] == again.train["text"] and data.test["text"] == again.test["text"]


def test_json_lines_file_and_explicit_label_set(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(100)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    data = load_splits(DataConfig(dataset=str(path), label_names="bad,good"))
    assert data.label_names == ["bad", "good"] and data.num_labels == 2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(text_column="body"), ValueError, r"text_column='body' is not a column.*\['review', 'sentiment'\]"),
        (dict(text_column="review", label_column="stars"), ValueError, "label_column='stars' is not a column"),
        (dict(text_column="review", label_column="sentiment", label_names="negative,neutral"), ValueError, "label 'positive'.*not in the label set"),
    ],
)
def test_bad_columns_and_labels_are_named(tmp_path, kwargs, error, message):
    path = write_reviews_csv(tmp_path / "reviews.csv", rows=60, labels=("negative", "positive"))
    with pytest.raises(error, match=message):
        load_splits(DataConfig(dataset=str(path), **kwargs))


def test_missing_file_and_empty_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(DataConfig(dataset=str(tmp_path / "nope.csv")))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match="no labelled rows|empty"):
        load_splits(DataConfig(dataset=str(empty)))


def test_embedded_dataset_split():
    data = load_splits(DataConfig(max_train_samples=50, max_eval_samples=20))
    assert data.label_names == ["rotten", "fresh"]
    assert (len(data.train), len(data.validation), len(data.test)) == (50, 20, 20)


# -- checkpoints -------------------------------------------------------------------------------------


def make_run(results_dir, stage, name, complete=True):
    folder = results_dir / stage / name
    folder.mkdir(parents=True)
    if complete:
        (folder / checkpoints.RECORD_FILE).write_text(json.dumps({"stage": stage}))
    return folder


def test_discovery_prefers_newest_complete_and_ignores_partial(results_dir):
    make_run(results_dir, "student", "20260101-000000-000000")
    newest_complete = make_run(results_dir, "student", "20260102-000000-000000")
    make_run(results_dir, "student", "20260103-000000-000000", complete=False)
    make_run(results_dir, "student", ".tmp-20260104-000000-000000")
    make_run(results_dir, "student", ".inprogress-20260105-000000-000000")
    assert checkpoints.find_checkpoint("student") == newest_complete


def test_missing_stage_names_folder_and_script(results_dir):
    with pytest.raises(FileNotFoundError, match=r"No complete pruned checkpoint in .*pruned.*8_pruning_with_finetuning.py"):
        checkpoints.find_checkpoint("pruned")


def test_explicit_path_must_be_complete(results_dir):
    partial = make_run(results_dir, "teacher", "20260101-000000-000000", complete=False)
    with pytest.raises(FileNotFoundError, match="no compression.json"):
        checkpoints.find_checkpoint("teacher", partial)
    complete = make_run(results_dir, "teacher", "elsewhere")
    assert checkpoints.find_checkpoint("teacher", complete) == complete


def test_writer_leaves_nothing_on_failure_and_never_overwrites(results_dir, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoints.checkpoint_writer("teacher") as pending:
            (pending.path / "model.safetensors").write_text("half")
            raise RuntimeError("boom")
    assert not (results_dir / "teacher").exists() or not list((results_dir / "teacher").iterdir())
    with pytest.raises(RuntimeError, match="without writing compression.json"):
        with checkpoints.checkpoint_writer("teacher"):
            pass
    target = tmp_path / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        with checkpoints.checkpoint_writer("teacher", output_dir=str(target)):
            pass
    with pytest.raises(ValueError, match="not a checkpoint this project wrote"):  # a user's folder is never replaced
        with checkpoints.checkpoint_writer("teacher", output_dir=str(target), overwrite=True):
            pass
    assert (target / "keep.txt").read_text() == "x"
    earlier = tmp_path / "earlier-run"
    with checkpoints.checkpoint_writer("teacher", output_dir=str(earlier)) as pending:
        checkpoints.write_json(pending.path / checkpoints.RECORD_FILE, {"stage": "teacher", "run": 1})
    with checkpoints.checkpoint_writer("teacher", output_dir=str(earlier), overwrite=True) as pending:
        checkpoints.write_json(pending.path / checkpoints.RECORD_FILE, {"stage": "teacher", "run": 2})
    assert checkpoints.read_record(earlier)["run"] == 2


def test_stage_10_reads_its_earlier_beta_flags_and_json_keys_as_the_shared_distillation_weights(tmp_path, caplog):
    """QATKDConfig now uses DistillationWeights (alpha_*); its old beta_* flags and JSON keys keep working."""
    _, config = parse_config(DataConfig, QATKDConfig, args=["--beta_ce", "0.25", "--beta_logits=0.75", "--beta_attention", "1"])
    assert (config.alpha_ce, config.alpha_kd, config.alpha_attention, config.alpha_hidden) == (0.25, 0.75, 1.0, 1.0)
    assert "--beta_ce is now --alpha_ce" in caplog.text
    path = tmp_path / "qkd.json"
    path.write_text(json.dumps({"beta_hidden": 0.5}))
    _, from_file = parse_config(DataConfig, QATKDConfig, args=["--config", str(path)])
    assert from_file.alpha_hidden == 0.5
    with pytest.raises(ValueError, match="alpha_attention are all 0"):
        parse_config(DataConfig, QATKDConfig, args=["--beta_ce", "0", "--beta_logits", "0", "--beta_hidden", "0"])


def test_every_config_prints_its_help_even_with_percent_signs_in_it(capsys):
    """argparse %-formats help text: a help string saying "95%" crashed ``compress.py --help`` with a traceback."""
    import dataclasses

    from common import config as config_module

    config_types = [value for value in vars(config_module).values()
                    if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == config_module.__name__
                    and any("help" in f.metadata for f in dataclasses.fields(value))]
    assert len(config_types) > 10
    percent_seen = False
    for config_type in config_types:
        with pytest.raises(SystemExit) as stop:
            parse_config(config_type, args=["--help"])
        assert stop.value.code == 0, config_type.__name__
        printed = capsys.readouterr().out
        assert "usage:" in printed, config_type.__name__
        percent_seen |= "95%" in printed
    assert percent_seen, "no help text with a percent sign was printed; the regression is not exercised"
