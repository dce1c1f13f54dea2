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

    def set_num_heads(self, attention: nn.Module, count: int) -> None:
        setattr(attention, self.heads_attribute, count)
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = count * attention.attention_head_size


ARCHITECTURES = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec(
            model_type="bert", layers="bert.encoder.layer", embeddings="bert.embeddings.word_embeddings",
            attention="attention.self", query="attention.self.query", key="attention.self.key",
            value="attention.self.value", attn_output="attention.output.dense", ffn_in="intermediate.dense",
            ffn_out="output.dense", heads_attribute="num_attention_heads", config_layers="num_hidden_layers",
            config_heads="num_attention_heads", config_ffn="intermediate_size", config_hidden="hidden_size",
            stock_loader_class="PrunedBertForSequenceClassification",
        ),
        ArchitectureSpec(
            model_type="distilbert", layers="distilbert.transformer.layer", embeddings="distilbert.embeddings.word_embeddings",
            attention="attention", query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
            attn_output="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2", heads_attribute="n_heads",
            config_layers="n_layers", config_heads="n_heads", config_ffn="hidden_dim", config_hidden="dim",
            stock_loader_class="PrunedDistilBertForSequenceClassification",
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
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (e.g. bert-base-uncased, distilbert-base-uncased, all-MiniLM-L6-v2)."
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


def layer_views(model: nn.Module) -> list[LayerView]:
    spec = spec_for(model)
    return [LayerView(layer, spec) for layer in model.get_submodule(spec.layers)]


def word_embeddings(model: nn.Module) -> nn.Embedding:
    return model.get_submodule(spec_for(model).embeddings)


def encoder_prefix(model: nn.Module) -> str:
    return spec_for(model).layers + "."


def architecture_record(model: nn.Module) -> dict:
    views = layer_views(model)
    return {
        "model_type": model_type_of(model),
        "num_layers": len(views),
        "head_size": views[0].head_size if views else None,
        "heads_per_layer": [view.num_heads for view in views],
        "ffn_width_per_layer": [view.ffn_width for view in views],
        "vocab_size": word_embeddings(model).num_embeddings,
    }


def is_uniform(record: dict, config: dict) -> bool:
    """True when every layer has the config's head count and FFN width (stock transformers rebuilds it)."""
    spec = ARCHITECTURES[record["model_type"]]
    return (all(h == config[spec.config_heads] for h in record["heads_per_layer"])
            and all(w == config[spec.config_ffn] for w in record["ffn_width_per_layer"]))


def _resized_linear(linear: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)


def apply_architecture(model: nn.Module, record: dict) -> None:
    """Give an unpruned model built from a config the per-layer shapes of ``record`` (weights are not kept)."""
    views = layer_views(model)
    if record.get("model_type") != model_type_of(model) or record.get("num_layers") != len(views):
        raise ValueError(
            f"Architecture record ({record.get('model_type')}, {record.get('num_layers')} layers) does not match the "
            f"model config ({model_type_of(model)}, {len(views)} layers); the checkpoint is inconsistent."
        )
    for view, heads, width in zip(views, record["heads_per_layer"], record["ffn_width_per_layer"]):
        inner = heads * view.head_size
        for part in ("query", "key", "value"):
            old = view.get(part)
            view.set(part, _resized_linear(old, inner, old.in_features))
        old = view.get("attn_output")
        view.set("attn_output", _resized_linear(old, old.out_features, inner))
        old = view.get("ffn_in")
        view.set("ffn_in", _resized_linear(old, width, old.in_features))
        old = view.get("ffn_out")
        view.set("ffn_out", _resized_linear(old, old.out_features, width))
        view.set_num_heads(heads)
