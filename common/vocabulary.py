"""Vocabulary pruning: keep only the word-embedding rows of tokens the task uses.

On the embedded default the word embeddings are 30522 x 384 = 11.7M parameters, about half the teacher.
A classifier fine-tuned on one corpus only ever updates the rows of tokens that occur in it; the rest can
go. We keep the special tokens, every token of the training split and optionally ``extra`` more (lowest ids
first), rebuild a WordPiece tokenizer over the kept tokens in their original order, and slice the embedding
matrix to match. WordPiece's greedy longest match over a subset vocabulary splits a word into the same pieces
whenever those pieces are kept, so text made of kept tokens gives exactly the same ids (remapped) and logits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .architecture import set_module, spec_for, word_embeddings

logger = logging.getLogger(__name__)


def used_token_ids(tokenizer, texts: list[str], max_length: int) -> set[int]:
    ids: set[int] = set()
    for start in range(0, len(texts), 1024):
        encoded = tokenizer(texts[start : start + 1024], truncation=True, max_length=max_length)["input_ids"]
        for row in encoded:
            ids.update(row)
    return ids


def token_coverage(tokenizer, texts: list[str], max_length: int) -> float:
    """Share of the non-special tokens of ``texts`` that are not [UNK]."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    total = unknown = 0
    for start in range(0, len(texts), 1024):
        for row in tokenizer(texts[start : start + 1024], truncation=True, max_length=max_length)["input_ids"]:
            for token in row:
                if token in special:
                    continue
                total += 1
                unknown += token == tokenizer.unk_token_id
    return 1.0 - unknown / max(1, total)


def rebuild_tokenizer(tokenizer, kept_ids: list[int]):
    """A tokenizer of the same class and settings whose vocabulary is ``kept_ids`` renumbered 0..n-1."""
    if tokenizer.backend_tokenizer.model.__class__.__name__ != "WordPiece":
        raise ValueError(
            f"Vocabulary pruning supports WordPiece tokenizers (BERT, DistilBERT); {type(tokenizer).__name__} uses "
            f"{tokenizer.backend_tokenizer.model.__class__.__name__}. Set prune_vocabulary=false."
        )
    id_to_token = {index: token for token, index in tokenizer.get_vocab().items()}
    vocab = {id_to_token[old]: new for new, old in enumerate(kept_ids)}
    settings = {key: tokenizer.init_kwargs[key] for key in ("do_lower_case", "tokenize_chinese_chars", "strip_accents") if key in tokenizer.init_kwargs}
    return type(tokenizer)(
        vocab=vocab,
        unk_token=tokenizer.unk_token, sep_token=tokenizer.sep_token, pad_token=tokenizer.pad_token,
        cls_token=tokenizer.cls_token, mask_token=tokenizer.mask_token,
        model_max_length=tokenizer.model_max_length, **settings,
    )


@torch.no_grad()
def prune_vocabulary(model: nn.Module, tokenizer, data, max_length: int, extra: int = 0):
    """Slice the word embeddings to the training split's tokens; return (model, tokenizer, summary)."""
    spec = spec_for(model)  # refuses an unsupported architecture before any work
    keep = used_token_ids(tokenizer, list(data.train["text"]), max_length) | set(tokenizer.all_special_ids)
    if extra:
        others = [i for i in range(len(tokenizer)) if i not in keep]
        keep |= set(others[:extra])
    kept_ids = sorted(keep)
    new_tokenizer = rebuild_tokenizer(tokenizer, kept_ids)
    old = word_embeddings(model)
    new = nn.Embedding(len(kept_ids), old.embedding_dim, padding_idx=None, dtype=old.weight.dtype)
    new.weight.copy_(old.weight[torch.tensor(kept_ids)])
    if old.padding_idx is not None:
        new.padding_idx = new_tokenizer.pad_token_id
    set_module(model, spec.embeddings, new)
    model.config.vocab_size = len(kept_ids)
    model.config.pad_token_id = new_tokenizer.pad_token_id
    summary = {
        "original_vocab_size": old.num_embeddings,
        "kept_vocab_size": len(kept_ids),
        "extra_tokens": extra,
        "kept_token_ids": kept_ids,  # new id -> original id, so a teacher can read the pruned ids
        "coverage": {
            split: token_coverage(new_tokenizer, list(dataset["text"]), max_length)
            for split, dataset in (("validation", data.validation), ("test", data.test))
        },
    }
    logger.info(
        "Vocabulary pruned %d -> %d tokens; token coverage validation %.4f, test %.4f",
        old.num_embeddings, len(kept_ids), summary["coverage"]["validation"], summary["coverage"]["test"],
    )
    return model, new_tokenizer, summary
