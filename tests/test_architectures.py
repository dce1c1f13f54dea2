"""Every supported architecture (tiny models built from each one's config, each with its own kind of tokenizer):
pruning and reload, the stock-transformers loader, vocabulary pruning per tokenizer model, and the whole pipeline
on the smoke profile, on single texts and on sentence pairs."""

import json

import pytest
import torch
from datasets import Dataset

from common.architecture import ARCHITECTURES, layer_views, position_limit
from common.config import PruningConfig
from common.data import TextClassificationData
from common.models import load_model, save_checkpoint
from common.pruning import StructuralPruner
from common.vocabulary import prune_vocabulary, unsupported_reason
from conftest import NEW_ARCHITECTURES, SENTENCES, make_architecture_tokenizer, tiny_config, tiny_model

ALL_ARCHITECTURES = ("bert", "distilbert", *NEW_ARCHITECTURES)


def random_batch(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("model_type", [*ALL_ARCHITECTURES, "camembert", "deberta-v2-shared-key"])
def test_pruning_then_reload_gives_identical_logits(model_type, results_dir):
    from transformers import AutoModelForSequenceClassification

    shared_key = model_type.endswith("-shared-key")  # DeBERTa-v3 checkpoints share the key projection for positions
    config = tiny_config(model_type.removesuffix("-shared-key"), share_att_key=shared_key)
    model = tiny_model(config)
    batch = random_batch(config)
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5, 0.5)
    masked = logits(model, batch)
    record = pruner.prune_physically()
    pruned = logits(model, batch)
    torch.testing.assert_close(pruned, masked, atol=1e-6, rtol=0)
    assert sum(record["heads_per_layer"]) == 4 and sum(record["ffn_width_per_layer"]) == 64  # half of 2 x 4 heads, 2 x 64
    folder = save_checkpoint("pruned", model, None, {"label_names": ["a", "b"]})
    torch.testing.assert_close(logits(load_model(folder), batch), pruned, atol=0, rtol=0)
    stock = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(stock, batch), pruned, atol=0, rtol=0)



@pytest.mark.parametrize("model_type", ALL_ARCHITECTURES)
def test_dropping_a_layer_equals_skipping_it_and_survives_pruning_and_stock_reload(model_type, results_dir):
    """Stage 8's --drop_layers: the model without layer 1 computes what the full model computes with layer 1 passed
    over, keeps that through head/neuron pruning, and reloads (project loader and stock transformers) unchanged."""
    from transformers import AutoModelForSequenceClassification

    from common.architecture import architecture_record, spec_for
    from common.pruning import drop_layers

    config = tiny_config(model_type, layers=3)
    model = tiny_model(config)
    with torch.no_grad():  # a tiny initial layer barely moves the logits; give layer 1 an effect a wrong drop would show
        layer_views(model)[1].get("ffn_out").weight.normal_(0.0, 1.0)
    batch = random_batch(config)
    layers = model.get_submodule(spec_for(model).layers)
    handle = layers[1].register_forward_hook(
        lambda module, args, kwargs, output: (args[0] if args else kwargs["hidden_states"], *output[1:])
        if isinstance(output, tuple) else (args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    skipped = logits(model, batch)
    handle.remove()
    assert (logits(model, batch) - skipped).abs().max() > 1e-3, "layer 1 must matter for the test to mean anything"
    assert drop_layers(model, [1]) == [0, 2]
    torch.testing.assert_close(logits(model, batch), skipped, atol=1e-6, rtol=0)
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5, 0.5)
    masked = logits(model, batch)
    record = pruner.prune_physically()
    assert len(record["heads_per_layer"]) == 2 and architecture_record(model)["num_layers"] == 2
    folder = save_checkpoint("pruned", model, None, {"label_names": ["a", "b"]})
    torch.testing.assert_close(logits(load_model(folder), batch), masked, atol=1e-6, rtol=0)
    stock = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(stock, batch), masked, atol=1e-6, rtol=0)


def test_mpnet_layers_read_their_own_heads_of_the_shared_relative_bias(results_dir):
    """MPNet adds one encoder-wide relative-position bias per head; a pruned layer must add its kept heads' columns,
    in order, and a wrong choice would change the logits."""
    config = tiny_config("mpnet")
    model = tiny_model(config)
    with torch.no_grad():  # a trained model's bias is far from the tiny initial one; make each head's bias count
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 3.0)
        for view in layer_views(model):
            view.get("value").weight.normal_(0.0, 0.5)
    batch = random_batch(config)
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", enable_multi_granularity=False, final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5)
    masked = logits(model, batch)
    record = pruner.prune_physically()
    assert record["bias_heads_per_layer"] == record["kept_heads"]
    torch.testing.assert_close(logits(model, batch), masked, atol=1e-6, rtol=0)
    attention = layer_views(model)[0].get("attention")
    kept = list(attention.bias_heads)
    attention._bias_head_hook.remove()
    from common.architecture import select_bias_heads

    select_bias_heads(attention, list(reversed(kept)))
    assert (logits(model, batch) - masked).abs().max() > 1e-3


def test_position_limit_counts_the_roberta_padding_offset():
    assert position_limit(tiny_config("roberta").to_dict()) == 66 - 2
    assert position_limit(tiny_config("bert").to_dict()) == 64
    assert position_limit({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512


def test_every_supported_type_has_a_stock_loader_class():
    import importlib.util

    from common.models import STOCK_LOADER

    spec = importlib.util.spec_from_file_location("modeling_pruned", STOCK_LOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for architecture in ARCHITECTURES.values():
        assert hasattr(module, architecture.stock_loader_class), architecture.model_type


def pair_data(texts):
    split = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})
    return TextClassificationData(split, split, split, ["negative", "positive"], "test")


@pytest.mark.parametrize("model_type", ["bert", "electra", "mpnet", "xlm-roberta", "deberta-v2", "roberta"])
def test_vocabulary_pruning_keeps_the_tokenization_of_kept_texts(model_type, tmp_path, results_dir):
    tokenizer = make_architecture_tokenizer(model_type, tmp_path / "tokenizer")
    model = tiny_model(tiny_config(model_type, vocab_size=len(tokenizer)))
    train_texts, kept_texts = SENTENCES[:8], [" ".join(SENTENCES[:2]), SENTENCES[3]]
    data = pair_data(train_texts)
    before_inputs = tokenizer(kept_texts, padding=True, return_tensors="pt")
    before = logits(model, dict(before_inputs))
    model, pruned_tokenizer, summary = prune_vocabulary(model, tokenizer, data, max_length=32)
    if model_type == "roberta":  # byte-level BPE: skipped, with the reason
        assert "BPE" in summary["skipped"] and pruned_tokenizer is tokenizer
        assert unsupported_reason(tokenizer) is not None
        return
    assert summary["kept_vocab_size"] < len(tokenizer)
    folder = save_checkpoint("pruned", model, pruned_tokenizer, {"label_names": data.label_names})
    from common.models import load_checkpoint_tokenizer

    reloaded_tokenizer = load_checkpoint_tokenizer(folder)
    kept = summary["kept_token_ids"]
    for text in kept_texts:
        original = tokenizer(text)["input_ids"]
        assert reloaded_tokenizer(text)["input_ids"] == [kept.index(i) for i in original]
    after_inputs = reloaded_tokenizer(kept_texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(logits(load_model(folder), dict(after_inputs)), before, atol=1e-5, rtol=0)


def test_unsupported_architecture_lists_every_supported_one():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*roberta, xlm-roberta, camembert, electra, mpnet, deberta-v2"):
        StructuralPruner(model, PruningConfig())


# -- the pipeline on each new architecture ---------------------------------------------------------------------

PAIR_ARCHITECTURES = ("electra", "deberta-v2")  # segment ids (ELECTRA) and none in the graph (DeBERTa-v3)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", NEW_ARCHITECTURES)
def test_pipeline_runs_on_each_architecture(model_type, tmp_path):
    from conftest import make_pretrained_folder, only_checkpoint, run_pipeline, run_stage, write_pairs_csv, write_reviews_csv

    pairs = model_type in PAIR_ARCHITECTURES
    folder = make_pretrained_folder(model_type, tmp_path / "model")
    if pairs:
        data = write_pairs_csv(tmp_path / "pairs.csv")
        columns = ["--text_column", "premise", "--text_pair_column", "hypothesis", "--label_column", "relation"]
    else:
        data = write_reviews_csv(tmp_path / "reviews.csv")
        columns = ["--text_column", "review", "--label_column", "sentiment"]
    results = tmp_path / "results"
    common = ["--dataset", data, *columns, "--profile", "smoke", "--max_train_samples", "64", "--max_eval_samples", "32"]
    run_pipeline(results, common, {
        "1_train_teacher.py": ["--model_name_or_path", folder, "--batch_size", 16],
        "2_distill_student.py": ["--batch_size", 16],
        "8_pruning_with_finetuning.py": ["--batch_size", 16],
        "12_export_onnx.py": ["--calibration_methods", "minmax"],
        "7_evaluate_and_generate_report.py": ["--latency_repeats", 1, "--latency_batch_size", 2, "--latency_seq_length", 16,
                                              "--ort_reference", "false", "--measure_memory", "false"],
    })

    _, teacher_record = only_checkpoint(results, "teacher")
    assert teacher_record["architecture"]["model_type"] == model_type
    _, pruned_record = only_checkpoint(results, "pruned")
    assert sum(pruned_record["architecture"]["heads_per_layer"]) == 4  # half of 2 layers x 4 heads
    vocabulary = pruned_record["pruning"]["vocabulary"]
    assert ("skipped" in vocabulary) == (model_type == "roberta")
    onnx_folder, onnx_record = only_checkpoint(results, "onnx")
    assert onnx_record["max_abs_difference_vs_torch"] < 1e-4
    report = json.loads((results / "final_report.json").read_text())
    rows = {row["label"]: row for row in report["models"]}
    assert {"Teacher (FP32)", "Pruned Student (FP32)", "Pruned + QKD-4bit (QAT)"} <= set(rows)
    assert all(row["model_rss_mb"] is None for row in rows.values())  # --measure_memory false: no memory processes
    if pairs:
        assert teacher_record["config"]["text_pair_column"] == "hypothesis"
        assert report["data"]["text_pair_column"] == "hypothesis"
        predicted = run_stage("predict.py", results, "--model", onnx_folder, "--format", "jsonl", "--pair_separator", "|||",
                              "great film a ||| superb story the", "dull plot ||| great actor")
        lines = [json.loads(line) for line in predicted.stdout.splitlines()]
        assert [line["text_pair"] for line in lines] == ["superb story the", "great actor"]
        assert all(line["label"] in ("agree", "disagree") for line in lines)


def test_reloaded_mpnet_layer_keeping_its_first_heads_still_selects_its_bias_columns():
    """A layer that keeps heads 0..k-1 of n must still select k of the n bias columns on reload (the check once
    compared against the already-resized head count and skipped the selection)."""
    from common.architecture import apply_architecture

    config = tiny_config("mpnet")
    model = tiny_model(config)
    apply_architecture(model, {"model_type": "mpnet", "num_layers": 2, "heads_per_layer": [1, 3], "ffn_width_per_layer": [32, 32],
                               "bias_heads_per_layer": [[3], [0, 1, 2]]})
    assert [view.bias_heads for view in layer_views(model)] == [[3], [0, 1, 2]]
    logits(model, random_batch(config))  # 3 heads against 3 bias columns: runs


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta", "electra", "mpnet"])
def test_cutting_the_position_table_to_the_used_rows_changes_no_prediction_within_the_limit(model_type):
    from common.architecture import truncate_positions

    model = tiny_model(tiny_config(model_type))
    limit = position_limit(model.config.to_dict())
    ids = torch.randint(5, model.config.vocab_size, (3, 12))
    ids[:, 0], ids[2, 9:] = 0, model.config.pad_token_id or 0  # one padded row
    mask = (torch.arange(12) < torch.tensor([[12], [12], [9]])).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    table = model.base_model.embeddings.position_embeddings.num_embeddings
    record = truncate_positions(model, 12)
    assert record == {"rows_before": table, "rows_kept": table - limit + 12}
    assert model.base_model.embeddings.position_embeddings.num_embeddings == record["rows_kept"] < table
    assert position_limit(model.config.to_dict()) == 12
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="max_positions=13 exceeds the 12 tokens the model's position table holds"):
        truncate_positions(model, 13)


def test_deberta_keeps_its_positions_because_its_relative_attention_is_sized_by_them():
    from common.architecture import truncate_positions

    model = tiny_model(tiny_config("deberta-v2"))
    assert truncate_positions(model, 12) is None and model.config.max_position_embeddings == 64
