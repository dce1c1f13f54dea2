"""One spec per supported architecture: where its parts live and what its config calls them.

The ground floor of ``common``: pruning, quantization, vocabulary pruning, loading, student building and export
all read ``spec_for(model)`` instead of branching on the model type, so adding an architecture means adding one
``ArchitectureSpec`` (and its tests). Imports nothing else from ``common`` (TextPruner's ``BertStructure`` keeps
module paths the same way).

Also here: ``LayerView`` (the prunable parts of one encoder layer), the architecture record that every checkpoint
carries (per-layer kept heads and FFN widths), and ``apply_architecture``, which gives a model built from a
config the recorded per-layer shapes before its weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths (relative to the classifier, or to one encoder layer) and config attribute names."""

    model_type: str
    layers: str  # the ModuleList of encoder layers
    embeddings: str  # the word-embedding table
    attention: str  # the module holding the head count
    query: str
    key: str
    value: str
    attn_output: str
    ffn_in: str
    ffn_out: str
    heads_attribute: str  # on the attention module
    config_layers: str  # config attribute names
    config_heads: str
    config_ffn: str
    config_hidden: str
    stock_loader_class: str  # class in remote_code/modeling_pruned.py that rebuilds uneven layers
    # Further per-head projections of a layer (output rows grouped by head), pruned with the heads where the
    # layer has them: DeBERTa's relative-position key/query projections (absent with share_att_key).
    head_projections: tuple = ()
    # An encoder-wide table with one column per head, shared by every layer (MPNet's relative attention bias):
    # each pruned layer selects its own kept heads' columns (``select_bias_heads``).
    shared_head_bias: Optional[str] = None
    # Position ids start after the padding id (RoBERTa-style), so fewer tokens fit than there are positions.
    positions_after_padding: bool = False

    def set_num_heads(self, attention: nn.Module, count: int) -> None:
        setattr(attention, self.heads_attribute, count)
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = count * attention.attention_head_size


def _bert_like(model_type: str, prefix: str, loader: str, **extra) -> ArchitectureSpec:
    """BERT's layer layout (RoBERTa, XLM-R and ELECTRA keep it under their own prefix)."""
    return ArchitectureSpec(
        model_type=model_type, layers=f"{prefix}.encoder.layer", embeddings=f"{prefix}.embeddings.word_embeddings",
        attention="attention.self", query="attention.self.query", key="attention.self.key",
        value="attention.self.value", attn_output="attention.output.dense", ffn_in="intermediate.dense",
        ffn_out="output.dense", heads_attribute="num_attention_heads", config_layers="num_hidden_layers",
        config_heads="num_attention_heads", config_ffn="intermediate_size", config_hidden="hidden_size",
        stock_loader_class=loader, **extra,
    )


ARCHITECTURES = {
    spec.model_type: spec
    for spec in (
        _bert_like("bert", "bert", "PrunedBertForSequenceClassification"),
        ArchitectureSpec(
            model_type="distilbert", layers="distilbert.transformer.layer", embeddings="distilbert.embeddings.word_embeddings",
            attention="attention", query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
            attn_output="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2", heads_attribute="n_heads",
            config_layers="n_layers", config_heads="n_heads", config_ffn="hidden_dim", config_hidden="dim",
            stock_loader_class="PrunedDistilBertForSequenceClassification",
        ),
        _bert_like("roberta", "roberta", "PrunedRobertaForSequenceClassification", positions_after_padding=True),
        _bert_like("xlm-roberta", "roberta", "PrunedXLMRobertaForSequenceClassification", positions_after_padding=True),
        _bert_like("camembert", "roberta", "PrunedCamembertForSequenceClassification", positions_after_padding=True),
        _bert_like("electra", "electra", "PrunedElectraForSequenceClassification"),
        ArchitectureSpec(
            model_type="mpnet", layers="mpnet.encoder.layer", embeddings="mpnet.embeddings.word_embeddings",
            attention="attention.attn", query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
            attn_output="attention.attn.o", ffn_in="intermediate.dense", ffn_out="output.dense",
            heads_attribute="num_attention_heads", config_layers="num_hidden_layers", config_heads="num_attention_heads",
            config_ffn="intermediate_size", config_hidden="hidden_size",
            stock_loader_class="PrunedMPNetForSequenceClassification",
            shared_head_bias="mpnet.encoder.relative_attention_bias", positions_after_padding=True,
        ),
        ArchitectureSpec(
            model_type="deberta-v2", layers="deberta.encoder.layer", embeddings="deberta.embeddings.word_embeddings",
            attention="attention.self", query="attention.self.query_proj", key="attention.self.key_proj",
            value="attention.self.value_proj", attn_output="attention.output.dense", ffn_in="intermediate.dense",
            ffn_out="output.dense", heads_attribute="num_attention_heads", config_layers="num_hidden_layers",
            config_heads="num_attention_heads", config_ffn="intermediate_size", config_hidden="hidden_size",
            stock_loader_class="PrunedDebertaV2ForSequenceClassification",
            head_projections=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
        ),
    )
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
PARTS = ("attention", "query", "key", "value", "attn_output", "ffn_in", "ffn_out")


def check_supported(config) -> ArchitectureSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Model type {model_type!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (e.g. bert-base-uncased, distilbert-base-uncased, all-MiniLM-L6-v2, "
            f"roberta-base, xlm-roberta-base, google/electra-small-discriminator, all-mpnet-base-v2, "
            f"microsoft/deberta-v3-small)."
        )
    return ARCHITECTURES[model_type]


def spec_for(model: nn.Module) -> ArchitectureSpec:
    return check_supported(getattr(model, "module", model).config)


def model_type_of(model: nn.Module) -> str:
    return spec_for(model).model_type


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "module", model).config
    return getattr(config, spec_for(model).config_layers)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def forward_input_names(model: nn.Module) -> list[str]:
    """The tokenizer outputs ``model.forward`` accepts, in a fixed order (DistilBERT takes no token types)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return [name for name in MODEL_INPUTS if name in accepted]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


@dataclass
class LayerView:
    """The prunable parts of one encoder layer, whatever the architecture calls them."""

    module: nn.Module
    spec: ArchitectureSpec

    @property
    def model_type(self) -> str:
        return self.spec.model_type

    def get(self, part: str) -> nn.Module:
        return self.module.get_submodule(getattr(self.spec, part))

    def set(self, part: str, new_module: nn.Module) -> None:
        set_module(self.module, getattr(self.spec, part), new_module)

    @property
    def head_size(self) -> int:
        return self.get("attention").attention_head_size

    @property
    def num_heads(self) -> int:
        return self.get("query").out_features // self.head_size

    @property
    def ffn_width(self) -> int:
        return self.get("ffn_in").out_features

    def set_num_heads(self, count: int) -> None:
        self.spec.set_num_heads(self.get("attention"), count)

    def head_projections(self) -> list[str]:
        """The spec's further per-head projections this layer actually has (module paths in the layer)."""
        present = []
        for path in self.spec.head_projections:
            try:
                if isinstance(self.module.get_submodule(path), nn.Linear):
                    present.append(path)
            except AttributeError:
                continue
        return present

    @property
    def bias_heads(self) -> Optional[list[int]]:
        """Columns of the shared head-bias table this layer uses (None: all, in order)."""
        return getattr(self.get("attention"), "bias_heads", None)


class _BiasHeadSelector:
    """Forward pre-hook: hand a pruned attention only its kept heads' slice of the shared position bias."""

    def __init__(self, heads: list[int]) -> None:
        self.heads = list(heads)

    def __call__(self, module, args, kwargs):
        if len(args) > 2 and args[2] is not None:
            args = (*args[:2], args[2].index_select(1, torch.tensor(self.heads, device=args[2].device)), *args[3:])
        elif kwargs.get("position_bias") is not None:
            bias = kwargs["position_bias"]
            kwargs = {**kwargs, "position_bias": bias.index_select(1, torch.tensor(self.heads, device=bias.device))}
        return args, kwargs


def select_bias_heads(attention: nn.Module, heads: list[int]) -> None:
    """Make ``attention`` (an MPNet self-attention) read columns ``heads`` of the shared relative-position bias."""
    attention.bias_heads = list(heads)
    handle = getattr(attention, "_bias_head_hook", None)
    if handle is not None:
        handle.remove()
    attention._bias_head_hook = attention.register_forward_pre_hook(_BiasHeadSelector(heads), with_kwargs=True)


def layer_views(model: nn.Module) -> list[LayerView]:
    spec = spec_for(model)
    return [LayerView(layer, spec) for layer in model.get_submodule(spec.layers)]


def word_embeddings(model: nn.Module) -> nn.Embedding:
    return model.get_submodule(spec_for(model).embeddings)


def encoder_prefix(model: nn.Module) -> str:
    return spec_for(model).layers + "."


def architecture_record(model: nn.Module) -> dict:
    views = layer_views(model)
    record = {
        "model_type": model_type_of(model),
        "num_layers": len(views),
        "head_size": views[0].head_size if views else None,
        "heads_per_layer": [view.num_heads for view in views],
        "ffn_width_per_layer": [view.ffn_width for view in views],
        "vocab_size": word_embeddings(model).num_embeddings,
    }
    if spec_for(model).shared_head_bias:
        record["bias_heads_per_layer"] = [
            view.bias_heads if view.bias_heads is not None else list(range(view.num_heads)) for view in views
        ]
    return record


def is_uniform(record: dict, config: dict) -> bool:
    """True when every layer has the config's head count and FFN width (stock transformers rebuilds it)."""
    spec = ARCHITECTURES[record["model_type"]]
    return (all(h == config[spec.config_heads] for h in record["heads_per_layer"])
            and all(w == config[spec.config_ffn] for w in record["ffn_width_per_layer"]))


def _resized_linear(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)


def select_linear(linear: nn.Linear, indices: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) ``indices`` of ``linear``."""
    indices = indices.to(linear.weight.device)
    weight = linear.weight.index_select(dim, indices).clone()
    out_features, in_features = weight.shape
    smaller = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        smaller.weight.copy_(weight)
        if linear.bias is not None:
            smaller.bias.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, indices))
    return smaller


def shrink_layer(view: LayerView, head_rows: torch.Tensor, neurons: torch.Tensor, keep_weights: bool = True) -> None:
    """Give one encoder layer the attention rows ``head_rows`` (query/key/value and further per-head projections;
    the matching input columns of the attention output) and the FFN neurons ``neurons``: the one layer-shrinking
    step of pruning (``keep_weights``: the kept weights are copied) and of rebuilding a pruned checkpoint's skeleton
    (``keep_weights=False``: fresh layers of the right shapes, filled by the weights loaded next). Which relative-bias
    heads a layer reads (MPNet) is set by the caller."""

    def fit(linear: nn.Linear, indices: torch.Tensor, dim: int) -> nn.Linear:
        if keep_weights:
            return select_linear(linear, indices, dim)
        if dim == 0:
            return _resized_linear(linear, len(indices), linear.in_features)
        return _resized_linear(linear, linear.out_features, len(indices))

    for part in ("query", "key", "value"):
        view.set(part, fit(view.get(part), head_rows, 0))
    for path in view.head_projections():
        set_module(view.module, path, fit(view.module.get_submodule(path), head_rows, 0))
    view.set("attn_output", fit(view.get("attn_output"), head_rows, 1))
    view.set_num_heads(len(head_rows) // view.head_size)
    view.set("ffn_in", fit(view.get("ffn_in"), neurons, 0))
    view.set("ffn_out", fit(view.get("ffn_out"), neurons, 1))


def apply_architecture(model: nn.Module, record: dict) -> None:
    """Give an unpruned model built from a config the per-layer shapes of ``record`` (weights are not kept)."""
    views = layer_views(model)
    if record.get("model_type") != model_type_of(model) or record.get("num_layers") != len(views):
        raise ValueError(
            f"Architecture record ({record.get('model_type')}, {record.get('num_layers')} layers) does not match the "
            f"model config ({model_type_of(model)}, {len(views)} layers); the checkpoint is inconsistent."
        )
    bias_heads = record.get("bias_heads_per_layer")
    if spec_for(model).shared_head_bias and bias_heads is None and any(h != views[0].num_heads for h in record["heads_per_layer"]):
        raise ValueError(
            f"The architecture record of this {record['model_type']} model has pruned heads but no bias_heads_per_layer "
            f"(which relative-bias columns each layer keeps); the checkpoint is damaged or was written by an older version."
        )
    for layer, (view, heads, width) in enumerate(zip(views, record["heads_per_layer"], record["ffn_width_per_layer"])):
        if bias_heads is not None and list(bias_heads[layer]) != list(range(view.num_heads)):
            if len(bias_heads[layer]) != heads:
                raise ValueError(f"bias_heads_per_layer[{layer}] lists {len(bias_heads[layer])} heads but the layer keeps {heads}.")
            select_bias_heads(view.get("attention"), bias_heads[layer])
        shrink_layer(view, torch.arange(heads * view.head_size), torch.arange(width), keep_weights=False)


def position_limit(model_config: dict) -> Optional[int]:
    """Most tokens one example may have: the position embeddings, less RoBERTa-style models' padding offset."""
    limit = model_config.get("max_position_embeddings")
    spec = ARCHITECTURES.get(model_config.get("model_type"))
    if limit is not None and spec is not None and spec.positions_after_padding:
        limit -= (model_config.get("pad_token_id") or 0) + 1
    return limit


@torch.no_grad()
def truncate_positions(model: nn.Module, max_tokens: int) -> Optional[dict]:
    """Keep only the absolute-position rows that sequences of up to ``max_tokens`` tokens use (plus RoBERTa-style
    models' padding offset), in place, and say so in ``model.config.max_position_embeddings``. Predictions on such
    sequences do not change; longer ones no longer fit. Returns ``{"rows_before", "rows_kept"}``, or None for a
    model without an absolute position table to cut (DeBERTa: its relative attention is sized by the same setting)."""
    spec = spec_for(model)
    embeddings = model.get_submodule(spec.embeddings.rpartition(".")[0])
    table = getattr(embeddings, "position_embeddings", None)
    if spec.model_type == "deberta-v2" or not isinstance(table, nn.Embedding):
        return None
    limit = position_limit(model.config.to_dict())
    if max_tokens > limit:
        raise ValueError(f"max_positions={max_tokens} exceeds the {limit} tokens the model's position table holds; "
                         f"pass at most {limit}.")
    rows = table.num_embeddings - limit + max_tokens
    kept = nn.Embedding(rows, table.embedding_dim, padding_idx=table.padding_idx, dtype=table.weight.dtype,
                        device=table.weight.device)
    kept.weight.copy_(table.weight[:rows])
    embeddings.position_embeddings = kept
    for name in ("position_ids", "token_type_ids"):  # BERT-style buffers as long as the table, sliced per batch
        buffer = getattr(embeddings, name, None)
        if isinstance(buffer, torch.Tensor) and buffer.dim() == 2 and buffer.shape[1] == table.num_embeddings:
            embeddings.register_buffer(name, buffer[:, :rows].clone(), persistent=False)
    model.config.max_position_embeddings = rows
    return {"rows_before": table.num_embeddings, "rows_kept": rows}
