"""How far to prune: the final sparsity of heads and FFN neurons, per-layer minimums, per-layer targets.

Three ways, read from the config once:
- uniform (``enable_multi_granularity=False``): every layer loses the same share (``final_sparsity``) of its heads
  and of its FFN neurons (the original behaviour);
- multi-granularity (MSP): heads and neurons are ranked across all layers, each kind towards its own share
  (``head_final_sparsity``, ``ffn_final_sparsity``), so layers that matter keep more;
- per-layer targets (``layer_targets``, e.g. from scripts/sensitivity.py): each layer towards its own kept counts.
"""

from __future__ import annotations

import math
from typing import Optional

from .importance import KINDS
from .masks import StructureMasks

LABELS = {"head": "heads", "ffn": "FFN neurons"}


class PruningTargets:
    def __init__(self, config, layer_sizes: dict[str, list[int]]) -> None:
        self.layer_sizes = layer_sizes
        self.multi_granularity = config.enable_multi_granularity
        self.sparsity = {"head": config.head_final_sparsity, "ffn": config.ffn_final_sparsity} if self.multi_granularity \
            else {"head": config.final_sparsity, "ffn": config.final_sparsity}
        self.round_to = config.ffn_round_to
        # an aligned layer keeps at least one multiple, so rounding down never has to go below it
        self.minimums = {"head": config.min_heads_per_layer, "ffn": max(config.min_ffn_neurons_per_layer, self.round_to)}
        self.minimum_fields = {"head": "min_heads_per_layer",
                               "ffn": "ffn_round_to" if self.round_to > config.min_ffn_neurons_per_layer else "min_ffn_neurons_per_layer"}
        self.per_layer = self._read_layer_targets(config.layer_targets)

    def _read_layer_targets(self, path: Optional[str]) -> Optional[dict[str, list[int]]]:
        if path is None:
            return None
        from ..config import read_layer_targets

        targets = read_layer_targets(path)
        counts = {"head": targets["heads_per_layer"], "ffn": targets["ffn_width_per_layer"]}
        for kind, label in (("head", "heads_per_layer"), ("ffn", "ffn_width_per_layer")):
            sizes = self.layer_sizes[kind]
            if len(counts[kind]) != len(sizes):
                raise ValueError(f"layer_targets={path!r} has {len(counts[kind])} entries in {label} but the model has "
                                 f"{len(sizes)} layers; make the targets for this model (scripts/sensitivity.py).")
            for layer, (kept, size) in enumerate(zip(counts[kind], sizes)):
                if kept > size:
                    raise ValueError(f"layer_targets={path!r}: {label}[{layer}]={kept} exceeds the layer's {size}.")
        return counts

    def planned_removals(self, kind: str) -> list[int]:
        """Per layer, the structures the layer targets remove in the end."""
        return [size - kept for size, kept in zip(self.layer_sizes[kind], self.per_layer[kind])]

    def final_sparsity(self, kind: str) -> float:
        if self.per_layer is not None:
            return sum(self.planned_removals(kind)) / sum(self.layer_sizes[kind])
        return self.sparsity[kind]

    def check(self) -> None:
        """Raise before training when the final sparsity cannot be met with the per-layer minimums."""
        for kind in KINDS:
            sizes, minimum, sparsity = self.layer_sizes[kind], self.minimums[kind], self.final_sparsity(kind)
            label, field = LABELS[kind], self.minimum_fields[kind]
            if min(sizes) < minimum:
                raise ValueError(f"{field}={minimum} exceeds the {min(sizes)} {label} of the smallest layer; lower it.")
            if self.per_layer is not None:
                if min(self.per_layer[kind]) < minimum:
                    raise ValueError(f"layer_targets keeps {min(self.per_layer[kind])} {label} in a layer, fewer than "
                                     f"{field}={minimum}; lower {field} or raise the targets.")
            elif self.multi_granularity:
                removable, wanted = sum(sizes) - minimum * len(sizes), math.floor(sparsity * sum(sizes))
                if wanted > removable:
                    raise ValueError(
                        f"{kind}_final_sparsity={sparsity} asks to remove {wanted} of {sum(sizes)} {label}, but keeping "
                        f"{field}={minimum} in each of {len(sizes)} layers allows at most {removable} "
                        f"(sparsity {removable / sum(sizes):.3f}). Lower the sparsity or {field}."
                    )
            else:
                for layer, size in enumerate(sizes):
                    if math.floor(sparsity * size) > size - minimum:
                        raise ValueError(
                            f"final_sparsity={sparsity} removes {math.floor(sparsity * size)} of the {size} {label} of "
                            f"layer {layer}, leaving fewer than {field}={minimum}. Lower final_sparsity or {field}."
                        )

    def reached(self, kind: str, masks: StructureMasks) -> bool:
        sparsity, mask = self.final_sparsity(kind), masks[kind]
        if self.per_layer is not None:
            return all(kept <= target for kept, target in zip(masks.kept_per_layer(kind), self.per_layer[kind]))
        if self.multi_granularity:
            return int((~mask).sum()) >= math.floor(sparsity * len(mask))
        sizes = self.layer_sizes[kind]
        return all(size - kept >= math.floor(sparsity * size) for size, kept in zip(sizes, masks.kept_per_layer(kind)))
