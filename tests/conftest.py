"""Tiny models, tokenizers and data made inside the tests: no network, seconds on two cores."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import stages  # noqa: E402  (after the path is set)

POSITIVE = ["great", "superb", "moving", "brilliant", "fun", "charming", "clever", "warm"]
NEGATIVE = ["dull", "boring", "awful", "messy", "flat", "tedious", "weak", "bland"]
NEUTRAL = ["film", "movie", "story", "plot", "actor", "scene", "script", "ending", "the", "a", "is", "was", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCABULARY = SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL + ["unseen", "words", "here"]))


def make_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCABULARY) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)


SENTENCES = [" ".join(words) for words in zip(POSITIVE + NEGATIVE, NEUTRAL + NEUTRAL[:3], reversed(POSITIVE + NEGATIVE))]


def make_architecture_tokenizer(model_type: str, folder: Path):
    """A small tokenizer of the kind each architecture's real checkpoints ship: WordPiece (BERT, DistilBERT,
    ELECTRA, MPNet), byte-level BPE (RoBERTa) or Unigram/SentencePiece (XLM-R, DeBERTa-v3), saved in ``folder``."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = [word for word in VOCABULARY if word not in SPECIAL]
    corpus = SENTENCES * 20 + words * 20
    if model_type in ("bert", "distilbert"):
        return make_tokenizer(folder)
    if model_type in ("electra", "mpnet"):
        specials = SPECIAL if model_type == "electra" else ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
        vocab = {token: i for i, token in enumerate(specials + words)}
        cls = transformers.ElectraTokenizer if model_type == "electra" else transformers.MPNetTokenizer
        tokenizer = cls(vocab=vocab)
    elif model_type == "roberta":
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
        state = json.loads(bpe.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
        tokenizer = transformers.RobertaTokenizer(vocab=state["vocab"], merges=merges)
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if model_type == "xlm-roberta" else ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
        unigram = SentencePieceUnigramTokenizer()
        unigram.train_from_iterator(corpus, vocab_size=120, special_tokens=specials, unk_token=specials[3], show_progress=False)
        pieces = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
        if model_type == "xlm-roberta":
            tokenizer = transformers.XLMRobertaTokenizer(vocab=pieces)
        else:
            tokenizer = transformers.DebertaV2Tokenizer(vocab=pieces, unk_id=3)
    tokenizer.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def make_pretrained_folder(model_type: str, folder: Path, layers: int = 4, num_labels: int = 2) -> Path:
    """A tiny 'pretrained' model of ``model_type`` with its kind of tokenizer, saved like a hub model."""
    tokenizer = make_architecture_tokenizer(model_type, folder)
    model = tiny_model(tiny_config(model_type, num_labels=num_labels, layers=layers, vocab_size=len(tokenizer)))
    model.save_pretrained(folder)
    return folder


def tiny_bert_config(num_labels: int = 2, layers: int = 2, heads: int = 4, hidden: int = 32, ffn: int = 64):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(VOCABULARY), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def tiny_distilbert_config(num_labels: int = 2, layers: int = 2, heads: int = 4, dim: int = 32, ffn: int = 64):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=len(VOCABULARY), dim=dim, n_layers=layers, n_heads=heads, hidden_dim=ffn,
        max_position_embeddings=64, num_labels=num_labels, dropout=0.0, attention_dropout=0.0,
    )


NEW_ARCHITECTURES = ("roberta", "xlm-roberta", "electra", "mpnet", "deberta-v2")


def tiny_config(model_type: str, num_labels: int = 2, layers: int = 2, heads: int = 4, hidden: int = 32, ffn: int = 64,
                vocab_size: int = len(VOCABULARY), share_att_key: bool = False):
    """A tiny config of any supported architecture, shaped like its real checkpoints (RoBERTa's position
    offset, ELECTRA's narrower embeddings, DeBERTa-v3's relative attention)."""
    from transformers import AutoConfig

    if model_type == "bert":
        return tiny_bert_config(num_labels, layers, heads, hidden, ffn)
    if model_type == "distilbert":
        return tiny_distilbert_config(num_labels, layers, heads, hidden, ffn)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=ffn, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    extra = {
        "roberta": dict(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1),
        "xlm-roberta": dict(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1),
        "camembert": dict(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1),
        "electra": dict(max_position_embeddings=64, embedding_size=hidden // 2),
        "mpnet": dict(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, relative_attention_num_buckets=32),
        "deberta-v2": dict(max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
                           position_biased_input=False, share_att_key=share_att_key, max_relative_positions=-1,
                           position_buckets=16, norm_rel_ebd="layer_norm", type_vocab_size=0, pad_token_id=0),
    }[model_type]
    return AutoConfig.for_model(model_type, **common, **extra)


def tiny_model(config):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.eval()
    return model


def write_reviews_csv(path: Path, rows: int = 300, labels: tuple = ("negative", "positive"), seed: int = 0) -> Path:
    """Short reviews whose label follows their sentiment words, so a tiny model can learn something."""
    rng = random.Random(seed)
    words = {"negative": NEGATIVE, "positive": POSITIVE, "neutral": NEUTRAL[:6]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(rows):
            label = labels[i % len(labels)]
            body = rng.sample(words[label], 2) + rng.sample(NEUTRAL, 3)
            rng.shuffle(body)
            writer.writerow([" ".join(body), label])
    return path


def write_pairs_csv(path: Path, rows: int = 300, seed: int = 0) -> Path:
    """Sentence pairs labelled 'agree' when both texts carry the same sentiment, else 'disagree' (an NLI stand-in:
    the label depends on both texts, so neither alone decides it)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["premise", "hypothesis", "relation"])
        for i in range(rows):
            first, second = rng.choice((POSITIVE, NEGATIVE)), rng.choice((POSITIVE, NEGATIVE))
            texts = [" ".join(rng.sample(words, 1) + rng.sample(NEUTRAL, 2)) for words in (first, second)]
            writer.writerow([*texts, "agree" if first is second else "disagree"])
    return path


@pytest.fixture
def tokenizer(tmp_path):
    return make_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def pretrained_folder(tmp_path) -> Path:
    """A tiny 'pretrained' BERT encoder saved like a hub model, to stand in for MiniLM in pipeline runs."""
    folder = tmp_path / "tiny-bert"
    tokenizer = make_tokenizer(folder)
    model = tiny_model(tiny_bert_config(layers=4))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def reviews_csv(tmp_path) -> Path:
    return write_reviews_csv(tmp_path / "reviews.csv")


@pytest.fixture
def results_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "results"
    monkeypatch.setenv("COMPRESSION_RESULTS_DIR", str(folder))
    return folder


def batch_for(tokenizer, texts=("great film and fun story", "dull boring plot", "the actor was charming")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def tiny_data(train_texts, test_texts=("great film",)):
    """A TextClassificationData of the given texts, labels alternating negative/positive."""
    from datasets import Dataset

    from common.data import TextClassificationData

    def split(texts):
        return Dataset.from_dict({"text": list(texts), "label": [i % 2 for i in range(len(texts))]})

    return TextClassificationData(split(train_texts), split(test_texts), split(test_texts), ["negative", "positive"], "test")


def write_onnx_checkpoint(tokenizer, model=None, max_length: int = 32) -> Path:
    """An ONNX folder written as stage 12 writes one (through the lifecycle's writer, with its manifest)."""
    from common import checkpoints
    from common.onnx_export import export_onnx, write_runtime_files

    model = model or tiny_model(tiny_bert_config())
    model.config.id2label = {0: "negative", 1: "positive"}

    def write_files(folder):
        export_onnx(model, tokenizer, folder / "model.onnx", max_length)
        write_runtime_files(folder, tokenizer, model.config, max_length)
        return {"deployment_model": "model.onnx"}

    return checkpoints.write_checkpoint("onnx", {"label_names": ["negative", "positive"], "config": {"max_length": max_length}},
                                        write_files)


def unrelated_onnx(path: Path) -> Path:
    """A valid ONNX model that is no classifier of any folder here: it takes 'x' and returns 'y'."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "unrelated",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def assert_card_matches_record(folder: Path) -> dict:
    """The folder's README.md is a model card whose numbers are its compression.json's; returns the card's header."""
    from common.checkpoints import read_record
    from common.model_card import card_numbers, read_header

    record = read_record(folder)
    header = read_header(folder / "README.md")
    numbers = card_numbers(record)
    assert header["compression"] == {"stage": record["stage"], "parent": record.get("parent"), **numbers}, folder
    metrics = header["model-index"][0]["results"][0]["metrics"]
    accuracy = ((record.get("metrics") or {}).get("validation") or {}).get("accuracy")
    assert metrics == ([] if accuracy is None else [{"type": "accuracy", "value": accuracy, "name": "validation accuracy"}])
    body = (folder / "README.md").read_text()
    if accuracy is not None:
        assert f"validation accuracy: {100 * accuracy:.2f}%" in body
    if numbers["size_bytes"] is not None:
        assert f"({numbers['size_bytes']:,} bytes)" in body
    if numbers["latency_ms_batch1"] is not None:
        assert f"latency: {numbers['latency_ms_batch1']:.2f} ms median" in body
    assert header["pipeline_tag"] == "text-classification" and "## How to run it" in body
    return header


# -- running the scripts as a user does ------------------------------------------------------------------------

def run_stage_unchecked(script, results_dir, *args, launcher=None, timeout=600):
    env = {**os.environ, "COMPRESSION_RESULTS_DIR": str(results_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = (launcher or [sys.executable]) + [str(PROJECT_ROOT / script), *map(str, args)]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_stage(script, results_dir, *args, launcher=None, timeout=600):
    completed = run_stage_unchecked(script, results_dir, *args, launcher=launcher, timeout=timeout)
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed


def run_pipeline(results_dir, common_args, script_args: dict) -> dict:
    """Every script in the stage table's run order, each with ``common_args`` plus its own ``script_args[script]``;
    returns the completed processes by script."""
    unknown = set(script_args) - set(stages.run_order())
    assert not unknown, f"not scripts of the run order: {unknown}"
    return {script: run_stage(script, results_dir, *script_args.get(script, ()), *common_args)
            for script in stages.run_order()}


def only_checkpoint(results_dir, stage):
    from common.checkpoints import RECORD_FILE

    folders = [p for p in (results_dir / stage).iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1, folders
    record = json.loads((folders[0] / RECORD_FILE).read_text())
    assert record["stage"] == stage
    return folders[0], record
