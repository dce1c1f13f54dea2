"""The per-machine latency table of layer shapes (common/latency_table.py): its arithmetic on a hand-made table,
the shapes it times, and its cache. No timing is asserted: the numbers are whatever this machine measures."""

from pathlib import Path

import pytest
import torch

from common.architecture import architecture_record
from common.latency_table import _shaped_model, latency_table, layer_ms, predict_ms
from common.models import save_checkpoint
from conftest import make_architecture_tokenizer, tiny_config, tiny_model

HAND_MADE = {"heads": [1, 2, 4], "ffn": [16, 64], "base_ms": 1.0,
             "one_layer_ms": [[2.0, 3.0], [3.0, 5.0], [5.0, 9.0]]}  # rows: heads, columns: FFN width


def test_prediction_is_the_base_plus_each_layers_interpolated_cost():
    assert layer_ms(HAND_MADE, 2, 64) == pytest.approx(4.0)  # a grid point, less the base
    assert layer_ms(HAND_MADE, 3, 40) == pytest.approx(0.5 * (3.0 + 5.0 - 2) / 2 + 0.5 * (5.0 + 9.0 - 2) / 2)
    assert layer_ms(HAND_MADE, 8, 128) == layer_ms(HAND_MADE, 4, 64)  # clamped to the grid
    assert predict_ms(HAND_MADE, [4, 1], [64, 16]) == pytest.approx(1.0 + 8.0 + 1.0)
    assert predict_ms(HAND_MADE, [], []) == 1.0
    noisy = {**HAND_MADE, "base_ms": 2.5}  # the smallest shape timed faster than the estimated base
    assert layer_ms(noisy, 1, 16) == 0.0 and predict_ms(noisy, [1, 1], [16, 16]) == 2.5


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_the_timed_shapes_have_the_layers_heads_and_width_asked_for(model_type, tmp_path, results_dir):
    tokenizer = make_architecture_tokenizer(model_type, tmp_path / "tokenizer")
    config = tiny_config(model_type, layers=3, vocab_size=len(tokenizer))
    folder = save_checkpoint("student", tiny_model(config), tokenizer, {"label_names": ["a", "b"]})
    shaped = _shaped_model(folder, 1, 3, 16)
    record = architecture_record(shaped)
    assert record["num_layers"] == 1 and record["heads_per_layer"] == [3] and record["ffn_width_per_layer"] == [16]
    batch = tokenizer(["a short text"], return_tensors="pt")
    with torch.no_grad():
        assert shaped(**{k: v for k, v in batch.items() if k != "token_type_ids" or model_type == "bert"}).logits.shape == (1, 2)


def test_a_narrowed_search_times_its_shapes_at_the_narrower_residual_width(tmp_path, results_dir):
    tokenizer = make_architecture_tokenizer("bert", tmp_path / "tokenizer")
    folder = save_checkpoint("student", tiny_model(tiny_config("bert", layers=2, vocab_size=len(tokenizer))), tokenizer,
                             {"label_names": ["a", "b"]})
    shaped = _shaped_model(folder, 1, 3, 16, hidden_width=16)  # width 32 in heads of 8, narrowed to 16
    record = architecture_record(shaped)
    assert record["heads_per_layer"] == [3] and record["ffn_width_per_layer"] == [16]
    assert shaped.config.hidden_size == 16 and shaped.get_input_embeddings().embedding_dim == 16
    assert shaped.bert.encoder.layer[0].attention.self.query.in_features == 16
    with torch.no_grad():
        assert shaped(**tokenizer(["a short text"], return_tensors="pt")).logits.shape == (1, 2)
    assert _shaped_model(folder, 1, 3, 16, hidden_width=32).config.hidden_size == 32, "the full width is not narrowed"
    narrowed = latency_table(folder, batch_size=2, seq_length=8, rounds=2, hidden_width=16)
    full = latency_table(folder, batch_size=2, seq_length=8, rounds=2)
    assert narrowed["key"]["hidden"] == 16 and full["key"]["hidden"] == 32 and narrowed["path"] != full["path"]
    assert not full["cached"], "another width is another key: measured anew"
    assert latency_table(folder, batch_size=2, seq_length=8, rounds=2, hidden_width=32)["cached"], "the full width named is the default"
    for bad in (12, 48, 0):
        with pytest.raises(ValueError, match=f"a latency table at residual width {bad} cannot be built .* head size 8"):
            latency_table(folder, batch_size=2, seq_length=8, rounds=2, hidden_width=bad)


def test_the_table_is_built_once_per_machine_and_key_then_read_from_the_cache(tmp_path, results_dir, monkeypatch):
    tokenizer = make_architecture_tokenizer("bert", tmp_path / "tokenizer")
    folder = save_checkpoint("student", tiny_model(tiny_config("bert", layers=2, vocab_size=len(tokenizer))), tokenizer,
                             {"label_names": ["a", "b"]})
    table = latency_table(folder, batch_size=2, seq_length=8, rounds=2)
    assert not table["cached"] and table["heads"] == [1, 2, 3, 4] and table["ffn"] == [8, 16, 32, 48, 64]
    assert len(table["one_layer_ms"]) == 4 and all(len(row) == 5 and min(row) > 0 for row in table["one_layer_ms"])
    assert table["key"]["heads"] == 4 and table["key"]["batch_size"] == 2 and table["base_ms"] >= 0
    import common.latency_table as module

    monkeypatch.setattr(module, "build_latency_table", lambda *args, **kwargs: pytest.fail("rebuilt a cached table"))
    again = latency_table(folder, batch_size=2, seq_length=8, rounds=2)
    assert again["cached"] and again["one_layer_ms"] == table["one_layer_ms"] and again["path"] == table["path"]
    with pytest.raises(pytest.fail.Exception):  # another batch size is another key: measured anew
        latency_table(folder, batch_size=4, seq_length=8, rounds=2)
    Path(table["path"]).write_text('{"key": ')  # a cache file cut short is measured again, not a crash
    with pytest.raises(pytest.fail.Exception, match="rebuilt a cached table"):
        latency_table(folder, batch_size=2, seq_length=8, rounds=2)


def test_the_table_check_predicts_and_times_pruned_checkpoints(tmp_path, results_dir):
    """scripts/benchmark_latency_table.py: every pruned checkpoint timed and predicted from its real and its even shapes."""
    import json
    import os
    import subprocess
    import sys

    from common.config import PruningConfig
    from common.pruning import StructuralPruner
    from common.pruning.hidden import prune_hidden
    from conftest import PROJECT_ROOT

    tokenizer = make_architecture_tokenizer("bert", tmp_path / "tokenizer")
    config = tiny_config("bert", layers=2, vocab_size=len(tokenizer))
    save_checkpoint("student", tiny_model(config), tokenizer, {"label_names": ["a", "b"]})
    pruned = tiny_model(config)
    pruner = StructuralPruner(pruned, PruningConfig(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5, 0.5)
    architecture = pruner.prune_physically()
    save_checkpoint("pruned", pruned, tokenizer, {"label_names": ["a", "b"]})
    narrowed = tiny_model(config)
    prune_hidden(narrowed, list(range(16)))  # the width 32 halved, as stage 8 --hidden_sparsity 0.5 would
    save_checkpoint("pruned", narrowed, tokenizer, {"label_names": ["a", "b"]})
    env = {**os.environ, "COMPRESSION_RESULTS_DIR": str(results_dir), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "benchmark_latency_table.py"), "--rounds", "2",
               "--batch_size", "2", "--seq_length", "8"]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    check = json.loads((results_dir / "latency_table_check.json").read_text())
    row, narrow_row = sorted(check["checkpoints"].values(), key=lambda row: -row["hidden_width"])
    assert row["heads_per_layer"] == architecture["heads_per_layer"] and row["measured_ms"] > 0
    assert narrow_row["hidden_width"] == 16 and narrow_row["heads_per_layer"] == [4, 4] and narrow_row["measured_ms"] > 0
    assert sorted(check["tables"]) == ["16", "32"] and narrow_row["table"] == check["tables"]["16"]["path"] != row["table"]
    assert row["predicted_ms_real_shapes"] > 0 and row["predicted_ms_even_shapes"] > 0
    refused = subprocess.run([*command, "--checkpoints", str(tmp_path / "nowhere")], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no finished checkpoint in" in refused.stderr and "Traceback" not in refused.stderr
    no_rounds = subprocess.run([*command, "--rounds", "0"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert no_rounds.returncode == 2 and "must be positive" in no_rounds.stderr and "Traceback" not in no_rounds.stderr
