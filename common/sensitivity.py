"""Layer sensitivity: how much validation accuracy each layer's heads and FFN neurons can lose, without fine-tuning.

For every encoder layer and each of its two kinds of structure (attention heads, FFN neurons), ``measure_sensitivity``
masks the lowest-scored share of that layer alone (25/50/75/90 % by default) by the KGSP score (normalized L2
magnitude + normalized |gradient x weight| on a few training batches, the same parts stage 8 uses) and records the
validation accuracy drop. ``recommend_targets`` turns the drop table into per-layer kept counts for a global
parameter budget: it repeatedly takes the cheapest next step (the smallest added accuracy drop per parameter
removed) until the budget is met.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import model_inputs
from .pruning import KINDS, MagnitudeImportance, StructuralPruner, TaylorImportance

logger = logging.getLogger(__name__)


def kgsp_scores(model: torch.nn.Module, pruner: StructuralPruner, loader, batches: int) -> dict[str, torch.Tensor]:
    """Per-group importance ranked as stage 8 ranks: the pruner's ``KGSPScorer`` (its config's KGSP weights and
    normalization) over the L2 magnitude and |grad x weight| of the cross-entropy loss, averaged over ``batches``
    training batches."""
    model.train(False)  # gradients of the deployed (dropout-free) function
    gradient_scores = []
    taylor = TaylorImportance()
    for index, batch in enumerate(loader):
        if index == batches:
            break
        model.zero_grad()
        loss = F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])
        loss.backward()
        gradient_scores.append(taylor(pruner.views))
    model.zero_grad()
    if not gradient_scores:
        raise ValueError("The training loader is empty; sensitivity needs at least one batch for gradient scores.")
    gradient = {kind: torch.stack([scores[kind] for scores in gradient_scores]).mean(0) for kind in KINDS}
    scores = {"magnitude": MagnitudeImportance()(pruner.views), "gradient": gradient}
    return pruner.scorer({name: scores[name] for name in pruner.scorer.weights}, pruner.masks.masks, pruner.masks.group_layer)


def parameters_per_group(pruner: StructuralPruner) -> dict[str, int]:
    """Weights one head (q, k, v rows with biases and its output columns) or one FFN neuron removes."""
    view = pruner.views[0]
    hidden = view.get("query").in_features
    head = pruner.head_size * (4 * hidden + 3)
    neuron = 2 * hidden + 1
    return {"head": head, "ffn": neuron}


@torch.no_grad()
def _masked_accuracy(model, pruner: StructuralPruner, original: dict, evaluate) -> float:
    pruner.apply_masks()
    accuracy = evaluate(model)
    model.load_state_dict(original)
    return accuracy


def measure_sensitivity(model: torch.nn.Module, pruning_config, train_loader, evaluate, sparsities: list[float],
                        gradient_batches: int = 8) -> dict:
    """Validation accuracy drop (points) for each layer x kind x sparsity, one layer pruned at a time."""
    pruner = StructuralPruner(model, pruning_config)
    scores = kgsp_scores(model, pruner, train_loader, gradient_batches)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    baseline = evaluate(model)
    drops = {kind: [[0.0] * len(sparsities) for _ in pruner.views] for kind in KINDS}
    work = [(kind, layer, column) for kind in KINDS for layer in range(len(pruner.views)) for column in range(len(sparsities))]
    for kind, layer, column in tqdm(work, desc="Sensitivity", unit="eval"):
        members = pruner.layer_members(kind, layer)
        count = min(len(members) - 1, math.floor(sparsities[column] * len(members)))  # a layer keeps at least one
        weakest = members[torch.argsort(scores[kind][members], stable=True)][:count]
        mask = pruner.mask(kind)
        mask[:] = True
        mask[weakest] = False
        drops[kind][layer][column] = 100.0 * (baseline - _masked_accuracy(model, pruner, original, evaluate))
        mask[:] = True
    return {
        "baseline_accuracy": baseline,
        "sparsities": list(sparsities),
        "accuracy_drop_points": drops,
        "layer_sizes": {kind: pruner.layer_sizes(kind) for kind in KINDS},
        "parameters_per_group": parameters_per_group(pruner),
        "score": f"KGSP: {pruner.scorer.describe()}; gradients of the cross-entropy on {gradient_batches} training batches",
    }


def recommend_targets(table: dict, parameter_budget: float) -> dict:
    """Per-layer kept heads and FFN neurons removing at least ``parameter_budget`` of the prunable encoder
    parameters, choosing each layer's sparsity level from the measured ones by the least accuracy drop per
    parameter (greedy; the measured drops of single layers are added, an approximation)."""
    if not 0.0 < parameter_budget < 1.0:
        raise ValueError(f"parameter_budget={parameter_budget} must be between 0 and 1 (the share of prunable parameters to remove).")
    sparsities, sizes, cost = table["sparsities"], table["layer_sizes"], table["parameters_per_group"]
    total = sum(cost[kind] * sum(sizes[kind]) for kind in KINDS)
    level = {kind: [-1] * len(sizes[kind]) for kind in KINDS}  # index into sparsities; -1 = untouched

    def removed(kind, layer, index):
        return 0 if index < 0 else min(sizes[kind][layer] - 1, math.floor(sparsities[index] * sizes[kind][layer])) * cost[kind]

    def drop(kind, layer, index):
        return 0.0 if index < 0 else max(0.0, table["accuracy_drop_points"][kind][layer][index])

    current = 0
    while current < parameter_budget * total:
        best = None
        for kind in KINDS:
            for layer, index in enumerate(level[kind]):
                if index + 1 >= len(sparsities):
                    continue
                gained = removed(kind, layer, index + 1) - removed(kind, layer, index)
                if gained <= 0:
                    continue
                price = (drop(kind, layer, index + 1) - drop(kind, layer, index)) / gained
                if best is None or price < best[0]:
                    best = (price, kind, layer, gained)
        if best is None:
            raise ValueError(f"parameter_budget={parameter_budget} cannot be met with the measured sparsities "
                             f"{sparsities}; add higher ones or lower the budget.")
        _, kind, layer, gained = best
        level[kind][layer] += 1
        current += gained
    kept = {kind: [sizes[kind][layer] - removed(kind, layer, index) // cost[kind] for layer, index in enumerate(level[kind])]
            for kind in KINDS}
    return {
        "parameter_budget": parameter_budget,
        "removed_share": current / total,
        "heads_per_layer": kept["head"],
        "ffn_width_per_layer": kept["ffn"],
        "predicted_drop_points": sum(drop(kind, layer, index) for kind in KINDS for layer, index in enumerate(level[kind])),
    }


def plot_heatmap(table: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(table["layer_sizes"]["head"]) + 2.5))
    figure.suptitle(f"Validation accuracy drop (points) when one layer alone is pruned, no fine-tuning "
                    f"(baseline {100 * table['baseline_accuracy']:.2f}%)")
    highest = max(1.0, max(max(row) for kind in KINDS for row in table["accuracy_drop_points"][kind]))
    for axis, kind, title in zip(axes, KINDS, ("attention heads", "FFN neurons")):
        values = table["accuracy_drop_points"][kind]
        image = axis.imshow(values, cmap="Reds", vmin=0.0, vmax=highest, aspect="auto")
        axis.set_xticks(range(len(table["sparsities"])), [f"{100 * s:.0f}%" for s in table["sparsities"]])
        axis.set_yticks(range(len(values)), [f"layer {i}" for i in range(len(values))])
        axis.set_xlabel("share pruned in this layer only")
        axis.set_title(title)
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                axis.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
