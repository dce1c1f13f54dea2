"""Stock-transformers loader for a structurally pruned BERT or DistilBERT classifier.

Written into pruned checkpoints by the compression pipeline. Its layers have different numbers of attention
heads and FFN widths, which BERT's config cannot express (transformers 5 dropped ``prune_heads``), so this
class builds the standard model and then gives every layer its recorded shapes before the weights are loaded:

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)

``config.pruned_layers`` holds ``heads_per_layer`` and ``ffn_width_per_layer``. This file imports only torch and
transformers.
"""

from torch import nn
from transformers import BertForSequenceClassification, DistilBertForSequenceClassification


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype)


def _check(config, layer_count: int) -> tuple[list, list]:
    spec = getattr(config, "pruned_layers", None) or {}
    heads, widths = spec.get("heads_per_layer"), spec.get("ffn_width_per_layer")
    if not heads or not widths or len(heads) != layer_count or len(widths) != layer_count:
        raise ValueError(
            f"config.pruned_layers must list heads_per_layer and ffn_width_per_layer for each of the {layer_count} "
            f"layers; got {spec!r}. The checkpoint's config.json is damaged."
        )
    return heads, widths


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        layers = self.bert.encoder.layer
        for layer, heads, width in zip(layers, *_check(config, len(layers))):
            attention = layer.attention.self
            inner = heads * attention.attention_head_size
            for name in ("query", "key", "value"):
                setattr(attention, name, _linear(config.hidden_size, inner, getattr(attention, name)))
            attention.num_attention_heads, attention.all_head_size = heads, inner
            layer.attention.output.dense = _linear(inner, config.hidden_size, layer.attention.output.dense)
            layer.intermediate.dense = _linear(config.hidden_size, width, layer.intermediate.dense)
            layer.output.dense = _linear(width, config.hidden_size, layer.output.dense)


class PrunedDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        layers = self.distilbert.transformer.layer
        for layer, heads, width in zip(layers, *_check(config, len(layers))):
            attention = layer.attention
            inner = heads * attention.attention_head_size
            for name in ("q_lin", "k_lin", "v_lin"):
                setattr(attention, name, _linear(config.dim, inner, getattr(attention, name)))
            attention.n_heads = heads
            attention.out_lin = _linear(inner, config.dim, attention.out_lin)
            layer.ffn.lin1 = _linear(config.dim, width, layer.ffn.lin1)
            layer.ffn.lin2 = _linear(width, config.dim, layer.ffn.lin2)
