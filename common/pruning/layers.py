"""Whole encoder layers removed (the depth half of structured pruning; TextPruner's and the seeds' layer pruning).

``layer_skip_importance`` scores each layer by the KL of the model's predictions with that layer skipped. Stage 2's
importance selection copies the highest-scoring teacher layers (``most_important_layers``); stage 8's
``--drop_layers`` removes the lowest-scoring student layers (``layers_to_drop``). ``drop_layers`` removes them from
the encoder and the config, so the saved checkpoint is an ordinary model with fewer layers that stock loading and the
architecture record describe without anything new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..architecture import set_module, spec_for
from ..data import model_inputs


@torch.no_grad()
def layer_skip_importance(model: torch.nn.Module, loader, batches: int) -> list[float]:
    """How much each encoder layer matters to the model's outputs: the KL divergence of the model's predictions
    with that layer skipped (its input passed on unchanged) from its full predictions, averaged over the first
    ``batches`` batches of ``loader``. Chooses which teacher layers a student keeps (stage 2, ``--student_layer_selection
    importance``, on validation batches) and which student layers stage 8 drops (``--drop_layers``, on training
    batches); a layer the residual stream barely uses scores near 0."""
    model.train(False)
    layers = model.get_submodule(spec_for(model).layers)
    taken = [batch for _, batch in zip(range(batches), loader)]
    device = next(model.parameters()).device
    inputs = [{k: v.to(device) for k, v in model_inputs(batch).items()} for batch in taken]
    reference = [F.log_softmax(model(**batch).logits.float(), dim=-1) for batch in inputs]

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    scores = []
    for layer in tqdm(layers, desc="layer importance", leave=False):
        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            kl = [F.kl_div(F.log_softmax(model(**batch).logits.float(), dim=-1), full, reduction="batchmean",
                           log_target=True) for batch, full in zip(inputs, reference)]
        finally:
            handle.remove()
        scores.append(float(torch.stack(kl).mean()))
    return scores


def most_important_layers(scores: list[float], count: int) -> list[int]:
    """The ``count`` highest-scoring layers, in their order in the model."""
    if not 0 < count <= len(scores):
        raise ValueError(f"student_num_layers={count} must be between 1 and the teacher's {len(scores)} layers.")
    return sorted(sorted(range(len(scores)), key=lambda index: -scores[index])[:count])


def layers_to_drop(scores: list[float], count: int) -> list[int]:
    """The ``count`` lowest-scoring layers (ties: the later layer goes first), in their order in the model."""
    if not 0 <= count < len(scores):
        raise ValueError(
            f"drop_layers={count} must leave at least one of the model's {len(scores)} encoder layers: give 0 to "
            f"{len(scores) - 1}."
        )
    order = sorted(range(len(scores)), key=lambda index: (scores[index], -index))
    return sorted(order[:count])


def drop_layers(model: nn.Module, dropped: list[int]) -> list[int]:
    """Remove the encoder layers ``dropped`` (indices) from ``model`` in place and set its config's layer count;
    returns the indices of the layers kept, in order."""
    spec = spec_for(model)
    encoder_layers = model.get_submodule(spec.layers)
    count = len(encoder_layers)
    bad = [index for index in dropped if not 0 <= index < count]
    if bad or len(set(dropped)) != len(dropped) or len(dropped) >= count:
        raise ValueError(
            f"Cannot drop layers {list(dropped)} of a {count}-layer encoder: give distinct indices from 0 to {count - 1} "
            f"and keep at least one layer."
        )
    kept = [index for index in range(count) if index not in set(dropped)]
    set_module(model, spec.layers, nn.ModuleList([encoder_layers[index] for index in kept]))
    setattr(model.config, spec.config_layers, len(kept))
    for position, layer in enumerate(model.get_submodule(spec.layers)):
        for module in layer.modules():  # transformers numbers its layers (caches); keep the numbers dense
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    return kept
