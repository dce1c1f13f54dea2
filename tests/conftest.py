"""Tiny models, tokenizers and data made inside the tests: no network, seconds on two cores."""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
