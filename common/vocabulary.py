"""Vocabulary pruning: keep only the word-embedding rows of tokens the task uses.

On the embedded default the word embeddings are 30522 x 384 = 11.7M parameters, about half the teacher.
A classifier fine-tuned on one corpus only ever updates the rows of tokens that occur in it; the rest can
go. We keep the special and added tokens, every token of the training split and optionally ``extra`` more
(lowest ids first), rewrite the tokenizer's model (WordPiece or Unigram) over the kept tokens in their original
order, and slice the embedding matrix to match. Both models segment a text made of kept tokens exactly as before
(see ``PRUNABLE_TOKENIZER_MODELS``), so it gets the same ids (remapped) and the same logits. Byte-level BPE
tokenizers (RoBERTa) cannot be pruned this way; stage 8 skips them and says why.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Optional

import torch
from torch import nn

from .architecture import set_module, spec_for, word_embeddings
from .data import encode, text_inputs

logger = logging.getLogger(__name__)


def _encoded_rows(tokenizer, texts: list[str], pairs: Optional[list[str]], max_length: int):
    for start in range(0, len(texts), 1024):
        chunk_pairs = pairs[start : start + 1024] if pairs is not None else None
        yield from encode(tokenizer, texts[start : start + 1024], chunk_pairs, truncation=True, max_length=max_length)["input_ids"]


def token_counts(tokenizer, texts: list[str], pairs: Optional[list[str]], max_length: int) -> Counter:
    """How often each token id occurs in ``texts`` (and their pairs), as the model sees them (truncated)."""
    counts: Counter = Counter()
    for row in _encoded_rows(tokenizer, texts, pairs, max_length):
        counts.update(row)
    return counts


def most_frequent_tokens(tokenizer, data, max_length: int, count: int) -> Optional[torch.Tensor]:
    """The ids of the ``count`` tokens most frequent in the training split as the model sees it (fewer when it has
    fewer distinct tokens; ties to the lower id), or None for ``count`` 0: the rows a ternary word-embedding table
    keeps at int4 (``embedding_int4_rows``)."""
    if not count:
        return None
    counts = token_counts(tokenizer, *text_inputs(data.train), max_length)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:count]
    covered = sum(n for _, n in ranked) / max(1, sum(counts.values()))
    logger.info("Word-embedding rows at int4: the %d most frequent of %d training tokens, %.1f%% of the training split's "
                "tokens (embedding_int4_rows=%d)", len(ranked), len(counts), 100 * covered, count)
    return torch.tensor(sorted(token for token, _ in ranked), dtype=torch.long)


def token_coverage(tokenizer, texts: list[str], pairs: Optional[list[str]], max_length: int) -> float:
    """Share of the non-special tokens of ``texts`` (and their pairs) that are not [UNK]."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    total = unknown = 0
    for row in _encoded_rows(tokenizer, texts, pairs, max_length):
        for token in row:
            if token in special:
                continue
            total += 1
            unknown += token == tokenizer.unk_token_id
    return 1.0 - unknown / max(1, total)


# Tokenizer models whose segmentation of a text only uses pieces that appear in its output, so a vocabulary
# restricted to the pieces the corpus produced segments the corpus exactly as before:
# - WordPiece: greedy longest match; every piece it matched is in the output.
# - Unigram (SentencePiece, XLM-R and DeBERTa-v3): Viterbi over the kept pieces; the best segmentation is still
#   available and nothing better was added, so it is chosen again.
# Byte-level BPE (RoBERTa) is not among them: a word is built by a chain of merges whose intermediate pieces never
# appear in the output, so dropping "unused" pieces breaks the chains and changes the segmentation.
PRUNABLE_TOKENIZER_MODELS = ("WordPiece", "Unigram")


def unsupported_reason(tokenizer) -> Optional[str]:
    """Why this tokenizer's vocabulary cannot be pruned exactly (None when it can)."""
    kind = type(tokenizer.backend_tokenizer.model).__name__
    if kind in PRUNABLE_TOKENIZER_MODELS:
        return None
    if kind == "BPE":
        return (f"{type(tokenizer).__name__} is a BPE tokenizer: its merges build words from intermediate pieces "
                f"that never appear in the output, so keeping only the corpus's tokens would change how kept texts "
                f"are tokenized")
    return f"{type(tokenizer).__name__} uses a {kind} model; vocabulary pruning supports {', '.join(PRUNABLE_TOKENIZER_MODELS)}"


def _remap_post_processor(processor: Optional[dict], new_id: dict[int, int]) -> None:
    if not processor:
        return
    for child in processor.get("processors", []) or []:
        _remap_post_processor(child, new_id)
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
        if key in processor:
            processor[key] = [processor[key][0], new_id[processor[key][1]]]
    for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
        special["ids"] = [new_id[i] for i in special["ids"]]


def rebuild_tokenizer(tokenizer, kept_ids: list[int]):
    """The same tokenizer (class, normalizer, pre-tokenizer, templates, settings) with only ``kept_ids``,
    renumbered 0..n-1 in their original order."""
    import copy

    from tokenizers import Tokenizer

    reason = unsupported_reason(tokenizer)
    if reason is not None:
        raise ValueError(f"Vocabulary pruning is not possible: {reason}. Set prune_vocabulary=false.")
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(kept_ids)}
    model = state["model"]
    if model["type"] == "WordPiece":
        model["vocab"] = {token: new_id[old] for token, old in model["vocab"].items() if old in new_id}
    else:
        model["vocab"] = [model["vocab"][old] for old in kept_ids]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    for added in state.get("added_tokens") or []:
        added["id"] = new_id[added["id"]]
    _remap_post_processor(state.get("post_processor"), new_id)
    pruned = copy.deepcopy(tokenizer)
    pruned._tokenizer = Tokenizer.from_str(json.dumps(state))
    return pruned


@torch.no_grad()
def prune_vocabulary(model: nn.Module, tokenizer, data, max_length: int, extra: int = 0, min_count: int = 1):
    """Slice the word embeddings to the training split's tokens; return (model, tokenizer, summary).

    ``min_count`` > 1 also drops the tokens seen fewer times than that in the training split: a smaller table, at the
    price of exactness, since the pruned tokenizer segments a word that used a dropped piece anew (WordPiece: into
    kept pieces, or [UNK] when none match). The summary's coverage and the validation accuracy show what it cost."""
    if min_count < 1:
        raise ValueError(f"vocabulary_min_count={min_count} must be 1 or more (1 keeps every token of the training split).")
    spec = spec_for(model)  # refuses an unsupported architecture before any work
    reason = unsupported_reason(tokenizer)
    if reason is not None:
        logger.warning("Vocabulary pruning skipped: %s. The model keeps all %d word embeddings.", reason, len(tokenizer))
        return model, tokenizer, {"skipped": reason, "original_vocab_size": len(tokenizer)}
    counts = token_counts(tokenizer, *text_inputs(data.train), max_length)
    keep = {token for token, count in counts.items() if count >= min_count} | set(tokenizer.all_special_ids)
    keep |= set(tokenizer.added_tokens_decoder)
    if extra:
        others = [i for i in range(len(tokenizer)) if i not in keep]
        keep |= set(others[:extra])
    kept_ids = sorted(keep)
    new_tokenizer = rebuild_tokenizer(tokenizer, kept_ids)
    old = word_embeddings(model)
    # on the old table's device: stage 8 prunes the vocabulary of a model that was just trained on the GPU
    new = nn.Embedding(len(kept_ids), old.embedding_dim, padding_idx=None, dtype=old.weight.dtype, device=old.weight.device)
    new.weight.copy_(old.weight[torch.tensor(kept_ids, device=old.weight.device)])
    if old.padding_idx is not None:
        new.padding_idx = new_tokenizer.pad_token_id
    set_module(model, spec.embeddings, new)
    embeddings = model.get_submodule(spec.embeddings.rpartition(".")[0])
    if getattr(embeddings, "padding_idx", None) is not None:  # RoBERTa-style position ids count from the pad id
        embeddings.padding_idx = new_tokenizer.pad_token_id
    model.config.vocab_size = len(kept_ids)
    model.config.pad_token_id = new_tokenizer.pad_token_id
    summary = {
        "original_vocab_size": old.num_embeddings,
        "kept_vocab_size": len(kept_ids),
        "extra_tokens": extra,
        "min_count": min_count,
        "rare_tokens_dropped": sum(1 for token, count in counts.items() if count < min_count and token not in keep),
        "kept_token_ids": kept_ids,  # new id -> original id, so a teacher can read the pruned ids
        "coverage": {
            split: token_coverage(new_tokenizer, *text_inputs(dataset), max_length)
            for split, dataset in (("validation", data.validation), ("test", data.test))
        },
    }
    logger.info(
        "Vocabulary pruned %d -> %d tokens (%d seen fewer than %d times in training dropped); token coverage "
        "validation %.4f, test %.4f", old.num_embeddings, len(kept_ids), summary["rare_tokens_dropped"], min_count,
        summary["coverage"]["validation"], summary["coverage"]["test"],
    )
    return model, new_tokenizer, summary


def teacher_token_ids(student_tokenizer, teacher_tokenizer, kept_token_ids: Optional[list[int]],
                      teacher_name: str) -> Optional[torch.Tensor]:
    """None when teacher and student share a vocabulary, else the student-id -> teacher-id table of a student whose
    vocabulary was pruned (``kept_token_ids``, new id -> original id, from ``prune_vocabulary``'s summary).
    Refuses a teacher whose vocabulary the table does not lead into."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_tokenizer.get_vocab() == teacher_vocab:
        return None
    id_to_token = {index: token for token, index in student_tokenizer.get_vocab().items()}
    if kept_token_ids is None or any(teacher_vocab.get(id_to_token[new]) != old for new, old in enumerate(kept_token_ids)):
        raise ValueError(
            f"The teacher {teacher_name} uses another vocabulary than the pruned model and no token map links them. "
            f"Pass a teacher with the student's tokenizer (stage 10 can also distil from the pruned model itself: "
            f"--teacher pruned)."
        )
    return torch.tensor(kept_token_ids)

