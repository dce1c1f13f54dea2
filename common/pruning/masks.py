"""Structure groups and their masks: which heads and FFN neurons of each layer are kept, and zeroing the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..architecture import LayerView
from .importance import KINDS


@dataclass(frozen=True)
class StructureGroup:
    """One prunable unit: attention head ``index`` or FFN neuron ``index`` of encoder layer ``layer``.

    A head is its query/key/value output rows (weights and biases) and the matching input columns of the
    attention output projection; a neuron is its intermediate row and bias and the matching input column of
    the FFN output projection.
    """

    kind: str
    layer: int
    index: int


class StructureMasks:
    """One boolean per group and kind (True = kept), all layers end to end, with each group's layer. Masks only
    ever lose groups while pruning (monotone); they are tensors changed in place."""

    def __init__(self, layer_sizes: dict[str, list[int]]) -> None:
        self.layer_sizes = {kind: list(layer_sizes[kind]) for kind in KINDS}
        self.groups = {kind: [StructureGroup(kind, layer, index) for layer, size in enumerate(sizes) for index in range(size)]
                       for kind, sizes in self.layer_sizes.items()}
        self.offsets = {kind: [sum(sizes[:layer]) for layer in range(len(sizes))] for kind, sizes in self.layer_sizes.items()}
        self.group_layer = {kind: torch.tensor([group.layer for group in groups]) for kind, groups in self.groups.items()}
        self.masks = {kind: torch.ones(len(groups), dtype=torch.bool) for kind, groups in self.groups.items()}

    @classmethod
    def of(cls, views: list[LayerView]) -> "StructureMasks":
        return cls({"head": [view.num_heads for view in views], "ffn": [view.ffn_width for view in views]})

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.masks[kind]

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes["head"])

    def layer_members(self, kind: str, layer: int) -> torch.Tensor:
        """Indices of one layer's groups of ``kind`` in the global masks and scores."""
        start = self.offsets[kind][layer]
        return torch.arange(start, start + self.layer_sizes[kind][layer])

    def layer_mask(self, kind: str, layer: int) -> torch.Tensor:
        start = self.offsets[kind][layer]
        return self.masks[kind][start : start + self.layer_sizes[kind][layer]]

    def kept_per_layer(self, kind: str) -> list[int]:
        return [int(self.layer_mask(kind, layer).sum()) for layer in range(self.num_layers)]

    def achieved_sparsity(self) -> dict[str, float]:
        return {f"{kind}_sparsity": 1.0 - float(self.masks[kind].float().mean()) for kind in KINDS}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{kind}_mask": self.masks[kind].to(torch.uint8) for kind in KINDS}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for kind in KINDS:
            saved = tensors[f"{kind}_mask"].bool()
            if saved.shape != self.masks[kind].shape:
                raise ValueError(f"The resume state's {kind} mask has {saved.numel()} groups but the model has "
                                 f"{self.masks[kind].numel()}; it belongs to another model.")
            self.masks[kind].copy_(saved)


@torch.no_grad()
def apply_masks(views: list[LayerView], masks: StructureMasks) -> None:
    """Zero the weights of pruned groups: a zeroed head or neuron contributes exactly nothing."""
    for layer, view in enumerate(views):
        heads = masks.layer_mask("head", layer)
        if not heads.all():
            rows = heads.repeat_interleave(view.head_size).to(view.get("query").weight.device)
            for part in ("query", "key", "value"):
                linear = view.get(part)
                linear.weight.mul_(rows.unsqueeze(1).to(linear.weight.dtype))
                if linear.bias is not None:
                    linear.bias.mul_(rows.to(linear.bias.dtype))
            output = view.get("attn_output").weight
            output.mul_(rows.unsqueeze(0).to(output.dtype))
        neurons = masks.layer_mask("ffn", layer)
        if not neurons.all():
            neurons = neurons.to(view.get("ffn_in").weight.device)
            ffn_in, ffn_out = view.get("ffn_in"), view.get("ffn_out")
            ffn_in.weight.mul_(neurons.unsqueeze(1).to(ffn_in.weight.dtype))
            if ffn_in.bias is not None:
                ffn_in.bias.mul_(neurons.to(ffn_in.bias.dtype))
            ffn_out.weight.mul_(neurons.unsqueeze(0).to(ffn_out.weight.dtype))
