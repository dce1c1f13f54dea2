"""Stock-transformers loader for a structurally pruned classifier (BERT, DistilBERT, RoBERTa, XLM-R, CamemBERT,
ELECTRA, MPNet, DeBERTa-v2).

Written into pruned checkpoints by the compression pipeline. Its layers have different numbers of attention
heads and FFN widths, which these configs cannot express (transformers 5 dropped ``prune_heads``), so each class
builds the standard model and then gives every layer its recorded shapes before the weights are loaded:

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)

``config.pruned_layers`` holds ``heads_per_layer`` and ``ffn_width_per_layer`` (and, for MPNet, which columns of
the shared relative-position bias each layer keeps: ``bias_heads_per_layer``). This file imports only torch and
transformers, so it cannot share code with the pipeline's ``common/architecture.py``; the layouts below mirror
its specs.
"""

import torch
from torch import nn
from transformers import (
    BertForSequenceClassification,
    CamembertForSequenceClassification,
    DebertaV2ForSequenceClassification,
    DistilBertForSequenceClassification,
    ElectraForSequenceClassification,
    MPNetForSequenceClassification,
    RobertaForSequenceClassification,
    XLMRobertaForSequenceClassification,
)

_BERT_PARTS = ("attention.self", ("attention.self.query", "attention.self.key", "attention.self.value"),
               "attention.output.dense", "intermediate.dense", "output.dense", "num_attention_heads")
# layers path, then (attention module, per-head projections, attention output, FFN in, FFN out, head-count attribute)
LAYOUTS = {
    "bert": ("bert.encoder.layer", _BERT_PARTS),
    "roberta": ("roberta.encoder.layer", _BERT_PARTS),
    "electra": ("electra.encoder.layer", _BERT_PARTS),
    "distilbert": ("distilbert.transformer.layer",
                   ("attention", ("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attention.out_lin",
                    "ffn.lin1", "ffn.lin2", "n_heads")),
    "mpnet": ("mpnet.encoder.layer",
              ("attention.attn", ("attention.attn.q", "attention.attn.k", "attention.attn.v"), "attention.attn.o",
               "intermediate.dense", "output.dense", "num_attention_heads")),
    "deberta-v2": ("deberta.encoder.layer",
                   ("attention.self", ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                                       "attention.self.pos_key_proj", "attention.self.pos_query_proj"),
                    "attention.output.dense", "intermediate.dense", "output.dense", "num_attention_heads")),
}


def _check(config, layer_count: int) -> tuple[list, list, list]:
    spec = getattr(config, "pruned_layers", None) or {}
    heads, widths = spec.get("heads_per_layer"), spec.get("ffn_width_per_layer")
    if not heads or not widths or len(heads) != layer_count or len(widths) != layer_count:
        raise ValueError(
            f"config.pruned_layers must list heads_per_layer and ffn_width_per_layer for each of the {layer_count} "
            f"layers; got {spec!r}. The checkpoint's config.json is damaged."
        )
    return heads, widths, spec.get("bias_heads_per_layer") or [None] * layer_count


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


class _BiasHeads:
    """Forward pre-hook: a pruned MPNet attention reads only its kept heads' columns of the shared bias."""

    def __init__(self, heads):
        self.heads = list(heads)

    def __call__(self, module, args, kwargs):
        if len(args) > 2 and args[2] is not None:
            args = (*args[:2], args[2].index_select(1, torch.tensor(self.heads, device=args[2].device)), *args[3:])
        elif kwargs.get("position_bias") is not None:
            bias = kwargs["position_bias"]
            kwargs = {**kwargs, "position_bias": bias.index_select(1, torch.tensor(self.heads, device=bias.device))}
        return args, kwargs


def _rebuild(model: nn.Module, config, layout_name: str) -> None:
    layers_path, (attention_path, projections, output_path, ffn_in_path, ffn_out_path, heads_attribute) = LAYOUTS[layout_name]
    layers = model.get_submodule(layers_path)
    for layer, heads, width, bias_heads in zip(layers, *_check(config, len(layers))):
        attention = layer.get_submodule(attention_path)
        inner = heads * attention.attention_head_size
        for path in projections:
            try:
                old = layer.get_submodule(path)
            except AttributeError:  # DeBERTa's position projections exist only without share_att_key
                continue
            _set(layer, path, _resized(old, old.in_features, inner))
        old = layer.get_submodule(output_path)
        _set(layer, output_path, _resized(old, inner, old.out_features))
        old = layer.get_submodule(ffn_in_path)
        _set(layer, ffn_in_path, _resized(old, old.in_features, width))
        old = layer.get_submodule(ffn_out_path)
        _set(layer, ffn_out_path, _resized(old, width, old.out_features))
        setattr(attention, heads_attribute, heads)
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = inner
        if bias_heads is not None and list(bias_heads) != list(range(config.num_attention_heads)):
            attention.register_forward_pre_hook(_BiasHeads(bias_heads), with_kwargs=True)


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "bert")


class PrunedDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "distilbert")


class PrunedRobertaForSequenceClassification(RobertaForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "roberta")


class PrunedXLMRobertaForSequenceClassification(XLMRobertaForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "roberta")


class PrunedCamembertForSequenceClassification(CamembertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "roberta")


class PrunedElectraForSequenceClassification(ElectraForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "electra")


class PrunedMPNetForSequenceClassification(MPNetForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "mpnet")


class PrunedDebertaV2ForSequenceClassification(DebertaV2ForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        _rebuild(self, config, "deberta-v2")
