"""Every folder a stage writes carries a manifest (size and SHA-256 of each file); loaders refuse a missing, truncated
or altered file by name before building anything, and a deployment folder is used exactly as it was written."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from common import checkpoints
from common.checkpoints import IntegrityError, verify_files
from common.models import load_checkpoint_tokenizer, load_model, save_checkpoint
from conftest import PROJECT_ROOT, assert_card_matches_record, make_tokenizer, tiny_bert_config, tiny_model, unrelated_onnx, write_onnx_checkpoint


@pytest.fixture
def torch_folder(results_dir, tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    return save_checkpoint("pruned", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["negative", "positive"]})


@pytest.fixture
def onnx_folder(results_dir, tmp_path):
    return write_onnx_checkpoint(make_tokenizer(tmp_path / "tokenizer"))


def test_the_manifest_lists_every_written_file_and_an_untouched_folder_verifies(torch_folder, onnx_folder):
    for folder in (torch_folder, onnx_folder):
        manifest = checkpoints.read_record(folder)["manifest"]
        written = {p.name for p in folder.iterdir()} - {"compression.json", "metrics.json", "README.md"}
        assert set(manifest) == written and all(len(entry["sha256"]) == 64 for entry in manifest.values())
        assert all(entry["bytes"] == (folder / name).stat().st_size for name, entry in manifest.items())
        verify_files(folder)
        assert_card_matches_record(folder)
    load_model(torch_folder)
    load_checkpoint_tokenizer(torch_folder)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _alter(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.unlink(), r"model.safetensors is missing: its stage wrote [\d,]+ bytes there"),
    (_truncate, r"model.safetensors has [\d,]+ bytes but its stage wrote [\d,]+: it is truncated or altered"),
    (_alter, r"model.safetensors is not the file its stage wrote \(SHA-256 .* it was altered"),
], ids=["deleted", "truncated", "altered"])
def test_a_damaged_weight_file_is_refused_by_name_before_loading(torch_folder, damage, message):
    damage(torch_folder / "model.safetensors")
    with pytest.raises(IntegrityError, match=message + r".*re-run 8_pruning_with_finetuning.py"):
        load_model(torch_folder)


def test_a_deleted_tokenizer_file_is_refused_instead_of_rebuilt(torch_folder):
    (torch_folder / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer.json is missing"):
        load_checkpoint_tokenizer(torch_folder)


def test_a_folder_written_before_manifests_loads_with_one_log_line(torch_folder, caplog):
    record = checkpoints.read_record(torch_folder)
    del record["manifest"]
    checkpoints.write_json(torch_folder / "compression.json", record)
    with caplog.at_level(logging.WARNING):
        load_model(torch_folder)
        load_model(torch_folder)
    assert caplog.text.count("has no integrity manifest") == 1


def predict(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "predict.py"), *map(str, args)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_predict_refuses_damaged_onnx_folders_with_exit_code_2(onnx_folder):
    intact = predict("--model", onnx_folder, "--format", "jsonl", "great film")
    assert intact.returncode == 0, intact.stderr[-2000:]
    assert json.loads(intact.stdout)["label"] in ("negative", "positive")

    unrelated_onnx(onnx_folder / "other.onnx")
    unrelated = predict("--model", onnx_folder, "--onnx_file", "other.onnx", "great film")
    assert unrelated.returncode == 2 and "takes the inputs ['x']" in unrelated.stderr, unrelated.stderr[-2000:]
    assert "Traceback" not in unrelated.stderr

    _truncate(onnx_folder / "model.onnx")
    truncated = predict("--model", onnx_folder, "great film")
    assert truncated.returncode == 2 and "model.onnx has" in truncated.stderr and "truncated" in truncated.stderr
    assert "Traceback" not in truncated.stderr

    (onnx_folder / "tokenizer.json").unlink()
    no_tokenizer = predict("--model", onnx_folder, "great film")
    assert no_tokenizer.returncode == 2 and "tokenizer.json is missing" in no_tokenizer.stderr, no_tokenizer.stderr[-2000:]


def test_a_named_onnx_file_that_onnxruntime_cannot_read_is_a_clean_error(onnx_folder):
    from common.prediction import PredictionError, open_classifier

    (onnx_folder / "broken.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(PredictionError, match="ONNX Runtime cannot load .*broken.onnx"):
        open_classifier(onnx_folder, "broken.onnx")
    copy = onnx_folder / "copy.onnx"  # a file the user names that fits: its inputs and logits are checked, then used
    copy.write_bytes((onnx_folder / "model.onnx").read_bytes())
    classifier = open_classifier(onnx_folder, "copy.onnx")
    assert np.asarray(classifier.logits(["great film"])).shape == (1, 2)
