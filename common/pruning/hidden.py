"""The residual stream's width pruned (CoFi's hidden-dimension pruning, Xia et al. 2022): stage 8's --hidden_sparsity.

Heads and FFN neurons shrink the matrices inside a layer; every matrix product of the encoder also reads or writes the
residual stream, so removing residual dimensions shrinks all of them at once (and the embedding tables, the LayerNorms
and the classifier head). ``hidden_importance`` scores each dimension by the Fisher information of a mask on it: a
mask multiplies the embeddings' LayerNorm output and every layer's LayerNorm outputs, and the squared gradients of
the loss with respect to it are summed over a few training batches (Kwon et al. 2022 score heads and neurons this way).
``prune_hidden`` removes the lowest-scoring dimensions physically; the config then records the narrower width and a
head count that keeps the head size, so the checkpoint loads through the ordinary classes.

A LayerNorm normalizes over the dimensions it is given, so removing some changes the statistics of the rest: the
model is not the masked one exactly, which is why stage 8 prunes the width before its distillation fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..architecture import layer_views, select_linear, set_module, spec_for
from ..data import UNLABELED, model_inputs


@dataclass(frozen=True)
class HiddenLayout:
    """Where the residual stream is read and written outside the layers' attention and FFN projections."""

    tables: tuple[str, ...]  # embedding tables: one column per dimension
    embedding_norm: str
    layer_norms: tuple[str, ...]  # inside each encoder layer
    head_square: tuple[str, ...]  # hidden -> hidden Linears of the classifier head: rows and columns
    head_input: tuple[str, ...]  # the classifier's Linear that reads the hidden width: columns


def _bert_like(prefix: str, head_square: tuple[str, ...], head_input: tuple[str, ...]) -> HiddenLayout:
    return HiddenLayout(
        tables=tuple(f"{prefix}.embeddings.{name}" for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")),
        embedding_norm=f"{prefix}.embeddings.LayerNorm", layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        head_square=head_square, head_input=head_input,
    )


_ROBERTA_HEAD = (("classifier.dense",), ("classifier.out_proj",))
HIDDEN_LAYOUTS = {
    "bert": _bert_like("bert", ("bert.pooler.dense",), ("classifier",)),
    "roberta": _bert_like("roberta", *_ROBERTA_HEAD),
    "xlm-roberta": _bert_like("roberta", *_ROBERTA_HEAD),
    "camembert": _bert_like("roberta", *_ROBERTA_HEAD),
    "electra": _bert_like("electra", *_ROBERTA_HEAD),
}


def _layout(model: nn.Module) -> HiddenLayout:
    config = model.config
    spec = spec_for(model)
    if spec.model_type not in HIDDEN_LAYOUTS:
        raise ValueError(
            f"hidden_sparsity is not supported for model type {spec.model_type!r} (its residual stream is read by parts "
            f"this pruner does not know); supported: {', '.join(HIDDEN_LAYOUTS)}. Use --hidden_sparsity 0 for this model."
        )
    embedding_size = getattr(config, "embedding_size", None)
    if embedding_size is not None and embedding_size != config.hidden_size:
        raise ValueError(
            f"hidden_sparsity needs the embeddings as wide as the hidden states; this {spec.model_type} model projects "
            f"{embedding_size}-wide embeddings to {config.hidden_size}. Use --hidden_sparsity 0 for this model."
        )
    return HIDDEN_LAYOUTS[spec.model_type]


def hidden_width_to_keep(model: nn.Module, sparsity: float) -> int:
    """The residual width left after removing ``sparsity`` of it, rounded to a multiple of the head size (so the
    config's head count keeps the head size, and the matrix products stay aligned); refused when nothing would remain
    or the model type is not supported."""
    _layout(model)
    width, head_size = model.config.hidden_size, layer_views(model)[0].head_size
    kept = int(round(width * (1.0 - sparsity) / head_size)) * head_size
    if kept < head_size:
        raise ValueError(
            f"hidden_sparsity={sparsity} leaves no multiple of the head size ({head_size}) of the {width}-wide hidden "
            f"states; give a value below {1 - head_size / width:.3f}."
        )
    return min(kept, width)


def _residual_norm_paths(model: nn.Module) -> list[str]:
    """The LayerNorms whose outputs are the residual stream: the embeddings' and both of every layer's."""
    layout, spec = _layout(model), spec_for(model)
    count = len(model.get_submodule(spec.layers))
    return [layout.embedding_norm] + [f"{spec.layers}.{number}.{name}" for number in range(count) for name in layout.layer_norms]


def _residual_norms(model: nn.Module) -> list[nn.LayerNorm]:
    return [model.get_submodule(path) for path in _residual_norm_paths(model)]


def hidden_importance(model: nn.Module, loader, batches: int) -> torch.Tensor:
    """Per residual dimension, the summed squared gradient of the cross-entropy with respect to a mask on that
    dimension (all ones: the model is unchanged), over the first ``batches`` batches of ``loader``. Rows without a
    label (unlabelled distillation) count with the model's own prediction as their label."""
    norms = _residual_norms(model)
    device = next(model.parameters()).device
    mask = torch.ones(model.config.hidden_size, device=device, requires_grad=True)
    handles = [norm.register_forward_hook(lambda module, args, output: output * mask) for norm in norms]
    scores = torch.zeros_like(mask)
    was_training = model.training
    model.train(False)
    try:
        for _, batch in tqdm(zip(range(batches), loader), total=batches, desc="hidden importance", leave=False):
            logits = model(**{key: value.to(device) for key, value in model_inputs(batch).items()}).logits.float()
            labels = batch.get("labels", batch.get("label"))
            predicted = logits.argmax(-1)
            labels = predicted if labels is None else torch.where(labels.to(device) == UNLABELED, predicted, labels.to(device))
            (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels), mask)
            scores += gradient.detach() ** 2
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return scores.cpu()


def dimensions_to_keep(scores: torch.Tensor, width: int) -> list[int]:
    """The ``width`` highest-scoring dimensions, in their order in the model (ties: the earlier one)."""
    if not 0 < width <= len(scores):
        raise ValueError(f"Cannot keep {width} of {len(scores)} hidden dimensions.")
    order = sorted(range(len(scores)), key=lambda index: (-float(scores[index]), index))
    return sorted(order[:width])


def _sliced_norm(norm: nn.LayerNorm, kept: torch.Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(len(kept), eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                       device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(norm.weight.index_select(0, kept))
        if norm.bias is not None:
            new.bias.copy_(norm.bias.index_select(0, kept))
    return new


@torch.no_grad()
def prune_hidden(model: nn.Module, kept: list[int]) -> None:
    """Keep only the residual dimensions ``kept`` (indices) everywhere the residual stream is read or written, in
    place; the config gets the new width and the head count that keeps the head size."""
    layout = _layout(model)
    width = model.config.hidden_size
    views = layer_views(model)
    head_size = views[0].head_size
    if not kept or len(set(kept)) != len(kept) or not all(0 <= index < width for index in kept) or len(kept) % head_size:
        raise ValueError(
            f"Cannot keep hidden dimensions {list(kept)[:8]}... ({len(kept)} of {width}): give distinct indices from 0 "
            f"to {width - 1}, a multiple of the head size {head_size} of them."
        )
    index = torch.tensor(sorted(kept), device=next(model.parameters()).device)
    for path in layout.tables:
        table = model.get_submodule(path)
        sliced = nn.Embedding(table.num_embeddings, len(index), padding_idx=table.padding_idx,
                              device=table.weight.device, dtype=table.weight.dtype)
        sliced.weight.copy_(table.weight.index_select(1, index))
        set_module(model, path, sliced)
    for path in _residual_norm_paths(model):
        set_module(model, path, _sliced_norm(model.get_submodule(path), index))
    for view in views:
        for part in ("query", "key", "value", "ffn_in"):
            view.set(part, select_linear(view.get(part), index, 1))
        for part in ("attn_output", "ffn_out"):
            view.set(part, select_linear(view.get(part), index, 0))
    for path in layout.head_square:
        set_module(model, path, select_linear(select_linear(model.get_submodule(path), index, 0), index, 1))
    for path in layout.head_input:
        set_module(model, path, select_linear(model.get_submodule(path), index, 1))
    model.config.hidden_size = len(index)
    model.config.num_attention_heads = len(index) // head_size
    if getattr(model.config, "embedding_size", None) is not None:
        model.config.embedding_size = len(index)
