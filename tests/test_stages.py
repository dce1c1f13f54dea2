"""The stage table is the one list of stages: everything else reads it."""

import ast
import subprocess
import sys

import pytest

from common import checkpoints, stages
from common.config import DataConfig, ReportConfig, parse_config
from conftest import PROJECT_ROOT, make_tokenizer, tiny_bert_config, tiny_model


def test_table_is_consistent():
    seen = set()
    for stage in stages.STAGE_TABLE:
        assert (PROJECT_ROOT / stage.script).is_file(), stage.script
        assert set(stage.reads) <= seen, f"{stage.name} reads a stage that runs after it: {stage.reads}"
        assert stage.runtime in stages.RUNTIMES and stage.weights in stages.WEIGHT_KINDS
        assert stage.rows and all(row.file is None for row in stage.rows) == (stage.runtime == "torch")
        seen.add(stage.name)
    labels = [row.label for stage in stages.STAGE_TABLE for row in stage.rows]
    assert len(labels) == len(set(labels)), "report labels must be unique"
    assert stages.run_order()[-1] == stages.REPORT_SCRIPT
    assert len(stages.run_order()) == len(set(stages.run_order()))


def test_makefile_runs_the_table_order_with_plain_python():
    completed = subprocess.run([sys.executable, "-I", str(PROJECT_ROOT / "common" / "stages.py")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == list(stages.run_order())
    make = subprocess.run(["make", "-s", "help", "PYTHON=" + sys.executable], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert "run order: " + " ".join(stages.run_order()) in make.stdout


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match="stage='pruned_v2' is unknown; known stages: teacher, student"):
        checkpoints.stage_dir("pruned_v2")
    with pytest.raises(ValueError, match="weight kinds"):
        stages.with_weights("fp16")


def _stage_lists(path):
    """Tuples, lists and sets in a Python file that spell out three or more stage names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in stages.STAGE_NAMES]
            if len(names) >= 3:
                found.append(f"{path}:{node.lineno}: {names}")
    return found


def test_no_list_of_stage_names_outside_the_table():
    files = [p for p in PROJECT_ROOT.rglob("*.py") if ".venv" not in p.parts and p.name != "stages.py"]
    found = [item for path in files for item in _stage_lists(path)]
    assert found == []


def test_the_stage_list_check_finds_a_planted_list(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('ORDER = ("teacher", "student", "pruned")\nPAIR = ("teacher", "student")\n')
    assert len(_stage_lists(planted)) == 1


def test_no_test_file_imports_another_test_file():
    for path in (PROJECT_ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("test_"), f"{path.name} imports {node.module}; move the helper to conftest.py"
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("test_") for alias in node.names), path.name


# -- pointing the report at folders: --checkpoint STAGE=PATH -------------------------------------------------------

def test_checkpoint_flag_is_repeatable_and_checked_early(results_dir, tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    from common.models import save_checkpoint

    teacher = save_checkpoint("teacher", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["a", "b"]})
    pruned = save_checkpoint("pruned", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["a", "b"]})
    _, config = parse_config(DataConfig, ReportConfig, args=[
        "--checkpoint", f"teacher={teacher}", "--latency_repeats", "2", "--checkpoint", f"pruned={pruned}"])
    assert config.checkpoint_paths == {"teacher": str(teacher), "pruned": str(pruned)}
    assert config.latency_repeats == 2
    _, both = parse_config(DataConfig, ReportConfig, args=["--checkpoint", f"teacher={teacher}", f"pruned={pruned}"])
    assert both.checkpoint_paths == config.checkpoint_paths
    with pytest.raises(FileNotFoundError, match="checkpoint pruned='/nowhere': no such folder"):
        parse_config(DataConfig, ReportConfig, args=["--checkpoint", "pruned=/nowhere"])
    with pytest.raises(FileNotFoundError, match="has no compression.json"):
        parse_config(DataConfig, ReportConfig, args=["--checkpoint", f"pruned={tmp_path / 'tokenizer'}"])


@pytest.mark.parametrize("entry, message", [
    ("results/pruned/x", "must look like 'STAGE=PATH'"),
    ("pruned=", "must look like 'STAGE=PATH'"),
    ("prunned=results/x", "unknown stage 'prunned'; stages: teacher, student, pruned"),
])
def test_bad_checkpoint_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        ReportConfig(checkpoint=[entry])


def test_a_stage_given_twice_is_refused():
    with pytest.raises(ValueError, match="stage 'teacher' is given twice"):
        ReportConfig(checkpoint=["teacher=a", "teacher=b"])


def test_a_new_export_format_is_one_table_row_and_one_script(results_dir, tmp_path, monkeypatch):
    """A test-double export stage: one row in the stage table and a 'script' (here a function) that writes its folder
    through the run lifecycle. The checkpoint finder, --checkpoint, the report and the runtime take it from there."""
    from common.config import ReportConfig
    from common.lifecycle import start_stage
    from common.onnx_export import export_onnx, write_runtime_files
    from common.report import build_report
    from conftest import write_reviews_csv

    new_stage = stages.Stage("onnx_double", "13_export_double.py", ("pruned",), "onnxruntime", "onnx",
                             (stages.ReportRow("Pruned, ONNX double", "double.onnx"),), "a test double of an export format")
    table = (*stages.STAGE_TABLE, new_stage)
    monkeypatch.setattr(stages, "STAGE_TABLE", table)
    monkeypatch.setattr(stages, "_BY_NAME", {stage.name: stage for stage in table})
    monkeypatch.setattr(stages, "STAGE_NAMES", tuple(stage.name for stage in table))

    data_config = DataConfig(dataset=str(write_reviews_csv(tmp_path / "reviews.csv", rows=60)), text_column="review",
                             label_column="sentiment")
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    model = tiny_model(tiny_bert_config())

    def export_double(config):  # the new script's body: start, work, finish
        run = start_stage("onnx_double", data_config, config)
        model.config.id2label = dict(enumerate(run.data.label_names))

        def write_files(folder):
            export_onnx(model, tokenizer, folder / "double.onnx", data_config.max_length)
            write_runtime_files(folder, tokenizer, model.config, data_config.max_length)
            return {"deployment_model": "double.onnx"}

        return run.finish(write_files=write_files, summary=lambda folder, record: f"double -> {folder}")

    from common.config import OnnxExportConfig

    folder = export_double(OnnxExportConfig())
    assert checkpoints.find_checkpoint("onnx_double") == folder
    assert "onnx_double" in stages.onnx_stages()
    report_config = ReportConfig(checkpoint=[f"onnx_double={folder}"], ort_reference=False, measure_memory=False,
                                 latency_repeats=1, latency_warmup=0, latency_batch_size=2, latency_seq_length=8)
    from common.data import load_splits

    report = build_report(report_config, load_splits(data_config), data_config, {})
    rows = {row["label"]: row for row in report["models"]}
    assert rows["Pruned, ONNX double"]["runtime"] == "onnxruntime" and rows["Pruned, ONNX double"]["stage"] == "onnx_double"
    # the other stages have no checkpoint here: each of their rows is skipped with its reason
    assert {item["label"] for item in report["skipped"]} == {row.label for stage in stages.STAGE_TABLE[:-1] for row in stage.rows}


def test_no_module_of_common_over_450_lines():
    """One job a module; config.py's dataclasses are one job (the fields of every stage) and are exempt."""
    sizes = {path.relative_to(PROJECT_ROOT).as_posix(): len(path.read_text().splitlines())
             for path in (PROJECT_ROOT / "common").rglob("*.py") if path.name != "config.py"}
    assert {name: lines for name, lines in sizes.items() if lines > 450} == {}
