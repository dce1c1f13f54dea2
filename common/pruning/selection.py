"""Which structures go: the lowest-scored live groups, per layer or across all layers, never below the per-layer
minimum, masks kept monotone; and rounding FFN widths to a multiple."""

from __future__ import annotations

import math

import torch

from .importance import KINDS
from .masks import StructureMasks


def prune_lowest(masks: StructureMasks, kind: str, importance: torch.Tensor, candidates: torch.Tensor, count: int,
                 minimum: int) -> None:
    """Prune the ``count`` alive candidates of lowest importance, never below ``minimum`` per layer."""
    if count <= 0:
        return
    mask = masks[kind]
    alive_per_layer = torch.bincount(masks.group_layer[kind][mask], minlength=masks.num_layers)
    order = candidates[torch.argsort(importance[candidates], stable=True)]
    pruned = 0
    for index in order.tolist():
        if pruned == count:
            break
        if not mask[index]:
            continue
        layer = int(masks.group_layer[kind][index])
        if alive_per_layer[layer] <= minimum:
            continue
        mask[index] = False
        alive_per_layer[layer] -= 1
        pruned += 1


def prune_layers_to(masks: StructureMasks, importance: dict[str, torch.Tensor], removals: dict[str, list[int]],
                    minimums: dict[str, int]) -> None:
    """Each layer loses its lowest-scored structures until ``removals[kind][layer]`` are gone."""
    for kind in KINDS:
        mask = masks[kind]
        for layer, wanted in enumerate(removals[kind]):
            members = masks.layer_members(kind, layer)
            prune_lowest(masks, kind, importance[kind], members, wanted - int((~mask[members]).sum()), minimums[kind])


def uniform_removals(layer_sizes: dict[str, list[int]], sparsity: float) -> dict[str, list[int]]:
    """Every layer loses floor(sparsity * size) of its heads and of its neurons."""
    return {kind: [math.floor(sparsity * size) for size in layer_sizes[kind]] for kind in KINDS}


def progress_removals(planned: dict[str, list[int]], progress: dict[str, float]) -> dict[str, list[int]]:
    """``progress[kind]`` (0..1) of each layer's planned removals."""
    return {kind: [math.floor(min(1.0, progress[kind]) * count + 1e-9) for count in planned[kind]] for kind in KINDS}


def prune_globally(masks: StructureMasks, importance: dict[str, torch.Tensor], sparsity: dict[str, float],
                   minimums: dict[str, int]) -> None:
    """Rank heads and neurons separately across all layers, each kind towards its own sparsity (MSP)."""
    for kind in KINDS:
        mask = masks[kind]
        target = math.floor(sparsity[kind] * len(mask))
        prune_lowest(masks, kind, importance[kind], torch.arange(len(mask)), target - int((~mask).sum()), minimums[kind])


def align_widths(masks: StructureMasks, importance: torch.Tensor, multiple: int, kind: str = "ffn") -> None:
    """Round each pruned layer's kept groups down to a multiple of ``multiple`` (never below one multiple: the
    minimum keeps that many), removing the layer's lowest-scored ones. An untouched layer keeps its width."""
    if multiple <= 1:
        return
    for layer, size in enumerate(masks.layer_sizes[kind]):
        kept = int(masks.layer_mask(kind, layer).sum())
        if kept == size:
            continue
        target = max(multiple, (kept // multiple) * multiple)
        if kept > target:
            alive = masks.layer_members(kind, layer)[masks.layer_mask(kind, layer)]
            weakest = alive[torch.argsort(importance[alive], stable=True)][: kept - target]
            masks[kind][weakest] = False
