import json
import math

import pytest
import torch

from common import stages
from common.config import DataConfig, ReportConfig
from common.evaluation import classification_metrics
from common.models import load_checkpoint_tokenizer, load_model, save_checkpoint
from common.report import build_report, pareto_front
from common.report_render import write_report
from common.vocabulary import most_frequent_tokens, prune_vocabulary, teacher_token_ids
from conftest import tiny_bert_config, tiny_data, tiny_model


def test_vocabulary_pruning_round_trip(tokenizer, results_dir):
    model = tiny_model(tiny_bert_config())
    data = tiny_data(["great film and fun story", "dull boring plot"], ["great plot", "unseen words"])
    kept_text = ["fun story and great plot", "boring film"]
    before_inputs = tokenizer(kept_text, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(input_ids=before_inputs["input_ids"], attention_mask=before_inputs["attention_mask"]).logits
    model, pruned_tokenizer, summary = prune_vocabulary(model, tokenizer, data, max_length=32)
    assert summary["kept_vocab_size"] == 5 + 8  # special tokens + the training split's 8 distinct words
    assert model.bert.embeddings.word_embeddings.num_embeddings == 13
    folder = save_checkpoint("pruned", model, pruned_tokenizer, {"label_names": ["negative", "positive"]})
    reloaded_tokenizer = load_checkpoint_tokenizer(folder)
    reloaded = load_model(folder)
    after_inputs = reloaded_tokenizer(kept_text, padding=True, return_tensors="pt")
    with torch.no_grad():
        after = reloaded(input_ids=after_inputs["input_ids"], attention_mask=after_inputs["attention_mask"]).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    unknown = reloaded_tokenizer("unseen words")["input_ids"]
    assert unknown[1:-1] == [reloaded_tokenizer.unk_token_id] * 2
    assert summary["coverage"]["test"] == pytest.approx(2 / 4)
    assert [tokenizer.convert_ids_to_tokens(i) for i in summary["kept_token_ids"][5:8]] == ["and", "boring", "dull"]


def test_vocabulary_min_count_drops_the_rare_tokens_and_resegments_their_words(tokenizer):
    model = tiny_model(tiny_bert_config())
    data = tiny_data(["great film and fun story", "great film but dull plot", "boring"], ["great plot", "fun film"])
    _, _, every = prune_vocabulary(tiny_model(tiny_bert_config()), tokenizer, data, max_length=32)
    model, pruned_tokenizer, summary = prune_vocabulary(model, tokenizer, data, max_length=32, min_count=2)
    assert every["kept_vocab_size"] == 5 + 8 and every["rare_tokens_dropped"] == 0
    assert summary["kept_vocab_size"] == 5 + 2 and summary["rare_tokens_dropped"] == 6  # only "great" and "film" twice
    assert model.bert.embeddings.word_embeddings.num_embeddings == 7
    assert pruned_tokenizer.convert_ids_to_tokens(pruned_tokenizer("great fun film")["input_ids"])[1:-1] == [
        "great", pruned_tokenizer.unk_token, "film"]
    assert summary["coverage"]["test"] == pytest.approx(2 / 4) and every["coverage"]["test"] == 1.0
    with pytest.raises(ValueError, match="vocabulary_min_count=0 must be 1 or more"):
        prune_vocabulary(model, tokenizer, data, max_length=32, min_count=0)


def test_the_most_frequent_training_tokens_are_ranked_by_count_then_id(tokenizer):
    data = tiny_data(["great film and fun story", "great film but dull plot", "great boring"], ["great plot", "fun film"])
    great, film = tokenizer.convert_tokens_to_ids(["great", "film"])
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    # [CLS] and [SEP] once a text (3), "great" 3 times, "film" twice: the top four by count, lower id first on ties
    assert most_frequent_tokens(tokenizer, data, 32, 4).tolist() == sorted([cls, sep, great, film])
    assert most_frequent_tokens(tokenizer, data, 32, 0) is None
    assert len(most_frequent_tokens(tokenizer, data, 32, 1000)) == 2 + 9, "no more ids than distinct training tokens"
    assert tokenizer.pad_token_id not in most_frequent_tokens(tokenizer, data, 32, 1000).tolist(), "unpadded counts"


def test_a_teacher_reads_the_pruned_students_ids_through_the_kept_token_table(tokenizer):
    """Stage 8 prunes the vocabulary before fine-tuning and stage 10 may distil from the unpruned teacher: the teacher
    must see the same pieces the pruned tokenizer produced, under its own ids."""
    data = tiny_data(["great film and fun story", "great film but dull plot", "boring"], ["great plot", "fun film"])
    _, pruned_tokenizer, summary = prune_vocabulary(tiny_model(tiny_bert_config()), tokenizer, data, max_length=32, min_count=2)
    table = teacher_token_ids(pruned_tokenizer, tokenizer, summary["kept_token_ids"], "teacher")
    ids = pruned_tokenizer("great fun film and plot", return_tensors="pt")["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(table[ids].tolist()) == pruned_tokenizer.convert_ids_to_tokens(ids.tolist())
    assert table[ids].tolist() != ids.tolist()  # renumbered, so the table is needed
    assert teacher_token_ids(tokenizer, tokenizer, None, "teacher") is None  # one vocabulary: no table
    shuffled = list(reversed(summary["kept_token_ids"]))
    with pytest.raises(ValueError, match="The teacher teacher uses another vocabulary than the pruned model"):
        teacher_token_ids(pruned_tokenizer, tokenizer, shuffled, "teacher")
    with pytest.raises(ValueError, match="no token map links them"):
        teacher_token_ids(pruned_tokenizer, tokenizer, None, "teacher")


def test_the_vocabulary_benchmark_prunes_copies_by_count_and_evaluates_them(tmp_path, results_dir, tokenizer):
    """scripts/benchmark_vocabulary.py on a tiny checkpoint and CSV: one row per count, fewer tokens as it grows."""
    import os
    import subprocess
    import sys

    from conftest import PROJECT_ROOT, write_reviews_csv

    data = write_reviews_csv(tmp_path / "reviews.csv", rows=120)
    folder = save_checkpoint("pruned", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["negative", "positive"]})
    env = {**os.environ, "COMPRESSION_RESULTS_DIR": str(results_dir), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "benchmark_vocabulary.py"), "--dataset", str(data),
               "--text_column", "review", "--label_column", "sentiment"]
    completed = subprocess.run([*command, "--min_counts", "1", "15"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((results_dir / "vocabulary_benchmark.json").read_text())
    every, frequent = record["rows"]
    assert record["checkpoint"] == str(folder) and every["min_count"] == 1 and frequent["min_count"] == 15
    assert every["rare_tokens_dropped"] == 0 and frequent["rare_tokens_dropped"] > 0
    assert frequent["kept_tokens"] == every["kept_tokens"] - frequent["rare_tokens_dropped"]
    assert frequent["table_bytes_4bit_rows"] < every["table_bytes_4bit_rows"] < every["table_bytes_fp32"]
    assert frequent["coverage"]["test"] < every["coverage"]["test"] == 1.0
    assert all(0 <= row[split] <= 1 for row in record["rows"] for split in ("validation_accuracy", "test_accuracy"))
    refused = subprocess.run([*command, "--min_counts", "0"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "min_counts=[0] must list distinct counts of 1 or more" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = subprocess.run([*command, "--model_path", str(tmp_path / "nowhere")], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "nowhere': no such folder" in missing.stderr and "Traceback" not in missing.stderr


def test_metrics_on_hand_made_predictions():
    predictions = [0, 0, 1, 1, 2, 2, 2, 0]
    references = [0, 1, 1, 1, 2, 0, 2, 0]
    metrics = classification_metrics(predictions, references)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    # per-class F1: class 0: tp 2, pred 3, true 3 -> 2/3; class 1: tp 2, pred 2, true 3 -> 0.8; class 2: tp 2, pred 3, true 2 -> 0.8
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.8) / 3)


def test_pareto_front_on_hand_made_points():
    # (cost, accuracy): B dominates A; C is cheapest; D is most accurate; E is dominated by C and D
    points = [(10, 0.80), (8, 0.82), (2, 0.70), (20, 0.90), (15, 0.69)]
    assert pareto_front(points) == [False, True, True, True, False]
    assert pareto_front([(1, 0.5), (1, 0.5)]) == [True, True]


@pytest.fixture
def report_results(results_dir, tokenizer):
    """A teacher and a student checkpoint, a corrupted pruned one, and no quantized stages at all."""
    for stage in stages.with_weights("full"):
        model = tiny_model(tiny_bert_config(layers=2 if stage == "teacher" else 1))
        save_checkpoint(stage, model, tokenizer, {"label_names": ["negative", "positive"]})
    pruned = next((results_dir / "pruned").iterdir())
    weights = pruned / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return results_dir


def test_report_with_missing_and_corrupt_checkpoints(report_results):
    config = ReportConfig(latency_repeats=2, latency_warmup=0, latency_batch_size=2, latency_seq_length=8)
    data = tiny_data(["great film", "dull plot"] * 10, ["great film", "dull plot", "fun story", "boring actor"])
    report = build_report(config, data, DataConfig(max_length=16), settings={"latency_batch_size": 2, "latency_seq_length": 8, "latency_repeats": 2, "latency_warmup": 0})
    paths = write_report(report, report_results, "final_report")
    assert [row["label"] for row in report["models"]] == [
        "Teacher (FP32)", "Teacher, ONNX Runtime dynamic int8 (no project)",
        "Teacher, ONNX Runtime optimizer + dynamic int8 (no project)", "Teacher, OpenVINO + NNCF int8 (no project)",
        "Student (FP32)"]
    skipped = {item["label"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {
        "Pruned Student (FP32)", "Pruned + Quantized Student (PTQ)", "Pruned + QKD-4bit (QAT)", "Int8 CPU deployment (torch)",
        "Pruned, ONNX Runtime FP32", "Pruned, ONNX Runtime int8 dynamic", "Pruned, ONNX Runtime int8 static",
        "QKD-4bit, ONNX Runtime NF4 (MatMulBnb4)", "QKD-4bit, ONNX Runtime NF4 codes, int8 compute",
        "QKD-4bit, ONNX Runtime int4 MatMulNBits, int8 compute",
        "Pruned, OpenVINO", "Pruned, OpenVINO + NNCF int8", "QKD-4bit, OpenVINO NNCF 4-bit weights",
    }
    assert "FileNotFoundError" in skipped["Pruned + QKD-4bit (QAT)"]
    assert "FileNotFoundError" not in skipped["Pruned Student (FP32)"]  # corrupt, not missing
    written = json.loads(paths["json"].read_text())
    required = {
        "label", "stage", "path", "test_accuracy", "test_macro_f1", "parameters", "size_bytes", "size_mb", "latency_ms_median",
        "latency_ms_p25", "latency_ms_p75", "latency_ms_p90", "throughput_examples_per_s", "peak_rss_mb", "model_rss_mb",
        "inference_peak_mb", "num_threads", "accuracy_vs_teacher", "size_ratio_to_teacher", "latency_ratio_to_teacher",
        "speedup_vs_teacher", "speedup_vs_teacher_p25", "speedup_vs_teacher_p75", "speedup_vs_ort_reference", "pareto_size",
        "pareto_latency",
    }
    for row in written["models"]:
        assert required <= set(row)
        for key in required - {"label", "stage", "path", "pareto_size", "pareto_latency"}:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), key
    assert written["models"][0]["accuracy_vs_teacher"] == 1.0
    assert written["models"][0]["speedup_vs_teacher"] == 1.0  # the teacher against itself, round by round
    for row in written["models"]:
        assert row["latency_rounds"] == 2 and row["latency_ms_p25"] <= row["latency_ms_median"] <= row["latency_ms_p75"]
    reference = written["models"][1]
    assert reference["runtime"] == "onnxruntime" and reference["path"].endswith("teacher_int8.onnx")
    assert reference["parameters"] == written["models"][0]["parameters"]
    optimized = written["models"][2]  # ONNX Runtime's documented BERT path: its optimizer fuses every layer's attention
    assert optimized["path"].endswith("teacher_optimized_int8.onnx") and "Attention 2" in optimized["quantization"]
    assert optimized["parameters"] == written["models"][0]["parameters"]
    openvino = written["models"][3]  # the strongest peer: the teacher in OpenVINO + NNCF int8
    assert openvino["runtime"] == "openvino" and openvino["path"].endswith("teacher_openvino_int8.xml")
    assert openvino["quantization"].startswith("int8 (NNCF defaults") and openvino["test_examples"] == 4
    assert {"machine", "settings", "skipped", "data", "latency_method"} <= set(written)
    assert written["search"] is None and "search" not in paths  # no pruned checkpoint from scripts/compress.py here
    trace = {"target_retention": 0.99, "optimize": "size", "gate_z": 1.0, "teacher_validation_accuracy": 0.8,
             "validation_examples": 4, "candidates": [], "pruned_checkpoint": "results/pruned/x"}
    searched = write_report({**report, "search": trace}, report_results, "searched_report")
    assert searched["search"].is_file() and "(results/pruned/x) was chosen by a target-driven search" in searched["md"].read_text()
    assert {"cpu_model", "instruction_sets", "int8_acceleration"} <= set(written["machine"])
    assert "onnxruntime" in written["machine"]["versions"]
    assert paths["png"].stat().st_size > 10_000
    markdown = paths["md"].read_text()
    assert "Student (FP32)" in markdown and "Skipped:" in markdown and "Pruned Student (FP32)" in markdown
    # what the accuracy hides: per class, against the teacher, with intervals; cost; real-text latency
    teacher, student = written["models"][0], written["models"][4]
    for row in written["models"]:
        matrix = row["confusion_matrix"]
        assert sum(map(sum, matrix)) == row["test_examples"] == 4
        assert sum(matrix[i][i] for i in range(2)) / 4 == pytest.approx(row["test_accuracy"])
        assert set(row["per_class"]) == {"negative", "positive"}
        low, high = row["accuracy_ci95"]
        assert low <= row["test_accuracy"] <= high
        assert row["flops_per_example"] > 0 and row["macs_per_example"] * 2 == row["flops_per_example"]
        assert 0 < row["weight_bytes_read_per_example"] <= row["size_bytes"]
        assert row["real_text_examples"] == 4 and 0 < row["latency_b1_ms_p50"] <= row["latency_b1_ms_p95"]
        assert row["throughput_b1_examples_per_s"] > 0 and row["throughput_dynamic_examples_per_s"] > 0
    assert teacher["agreement_with_teacher"] == {"differs": 0, "differs_rate": 0.0, "fixed": 0, "broken": 0, "examples": 4}
    assert teacher["retention_ci95"] == [1.0, 1.0]
    assert student["flops_per_example"] < teacher["flops_per_example"]  # one layer instead of two
    agreement = student["agreement_with_teacher"]
    assert agreement["fixed"] + agreement["broken"] <= agreement["differs"] <= 4
    assert written["deployment"]["label"] in {row["label"] for row in written["models"]}
    assert "Quality and cost" in markdown and "Differs (fixed / broken)" in markdown
    assert paths["confusion"].stat().st_size > 5_000


def test_the_report_shows_the_search_behind_a_pruned_checkpoint(results_dir, tokenizer):
    """A pruned checkpoint published by scripts/compress.py carries its search record; the report renders the
    trace as a table and a plot, and a checkpoint from stage 8 alone has none."""
    from types import SimpleNamespace

    from common.report import search_behind

    candidates = [
        {"sparsity": 0.3, "drop_layers": 0, "validation_accuracy": 0.8, "retention": 1.0, "margin_points": 1.0,
         "passes": True, "int8_latency_ms": 5.0, "int8_size_mb": 2.0},
        {"sparsity": 0.5, "drop_layers": 1, "validation_accuracy": 0.7, "retention": 0.875, "margin_points": 1.2,
         "passes": False, "int8_latency_ms": 3.0, "int8_size_mb": 1.5, "int8_gate": {"retention": 0.5, "passes": False}},
    ]
    search = {"target_retention": 0.99, "optimize": "latency", "gate_z": 1.0, "teacher_validation_accuracy": 0.8,
              "validation_examples": 100, "status": "delivered", "candidates": candidates,
              "winner": {"sparsity": 0.3, "drop_layers": 0, "why": "the only candidate that passes"},
              "mixed_precision": {"all_4bit": {"retention": 0.95, "passes": False}, "why": "the fewest Linears at 8 bits (tried 3 pass)"}}
    model = tiny_model(tiny_bert_config(layers=1))
    searched = save_checkpoint("pruned", model, tokenizer, {"label_names": ["negative", "positive"], "search": search})
    plain = save_checkpoint("pruned", model, tokenizer, {"label_names": ["negative", "positive"]})
    student = SimpleNamespace(row={"stage": "student"}, folder=searched)
    assert search_behind([student, SimpleNamespace(row={"stage": "pruned"}, folder=plain)]) is None
    found = search_behind([student, SimpleNamespace(row={"stage": "pruned"}, folder=searched)])
    assert found["pruned_checkpoint"] == str(searched) and found["candidates"] == candidates

    from common.search_trace import search_markdown

    table = search_markdown(found)
    assert "| 0.50 | 1 | 0.7000 | 0.8750 | 1.20 | fail | 3.00 | 1.50 | 0.5000 (fail) |" in table
    assert "| 5.00 | 2.00 | — |" in table, "a trace from before the int8 copy was gated"
    assert "Winner: sparsity 0.30, the only candidate that passes." in table and "retention 0.9500 (fail)" in table
    from common.search_trace import plot_search

    plot_search(found, results_dir / "trace.png")
    assert (results_dir / "trace.png").read_bytes()[:4] == b"\x89PNG"
