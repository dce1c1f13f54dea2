"""Importance criteria over structure groups (one per attention head, one per FFN neuron), Torch-Pruning style.

- ``MagnitudeImportance``: L2 norm of the group's weights (the original criterion);
- ``TaylorImportance``: |grad · weight| summed over the group, with the gradient of the distillation loss;
- ``WeightedImportance``: a weighted sum of normalized criteria;
- ``KGSPScorer``: the one KGSP sum, built from a config once (criterion weights by ``importance_mode``, the
  ``importance_normalization``). Stage 8's pruner and the sensitivity analysis both rank with it.

A new criterion is one ``Importance`` class here and one entry in ``CRITERIA`` (plus the config choice that names it).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..architecture import LayerView

KINDS = ("head", "ffn")


def _head_rows(tensor: torch.Tensor, head_size: int) -> torch.Tensor:
    """Per-head sums of a [heads*head_size, ...] tensor's rows: shape [heads]."""
    return tensor.reshape(-1, head_size, *tensor.shape[1:]).flatten(1).sum(dim=1)


def _group_scores(view: LayerView, value_of) -> dict[str, torch.Tensor]:
    """Sum ``value_of(parameter)`` (elementwise) over each head's and each neuron's slices of one layer."""
    head_size = view.head_size
    heads = 0
    for part in ("query", "key", "value"):
        linear = view.get(part)
        heads = heads + _head_rows(value_of(linear.weight), head_size)
        if linear.bias is not None:
            heads = heads + _head_rows(value_of(linear.bias), head_size)
    heads = heads + _head_rows(value_of(view.get("attn_output").weight).t(), head_size)
    ffn_in, ffn_out = view.get("ffn_in"), view.get("ffn_out")
    neurons = value_of(ffn_in.weight).sum(dim=1) + value_of(ffn_out.weight).sum(dim=0)
    if ffn_in.bias is not None:
        neurons = neurons + value_of(ffn_in.bias)
    return {"head": heads.detach().float(), "ffn": neurons.detach().float()}


def _concat(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {kind: torch.cat([scores[kind].cpu() for scores in per_layer]) for kind in KINDS}


def normalize(scores: torch.Tensor, alive: torch.Tensor, layers: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Divide by the mean over the structures still alive, so criteria of different scales can be added."""
    reference = scores[alive].mean() if alive.any() else scores.mean()
    return scores / reference.clamp_min(1e-12)


def normalize_per_layer(scores: torch.Tensor, alive: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    """Divide each layer's scores by the mean of that layer's live structures: a global ranking then compares
    structures by how they stand within their own layer. KGSP's gradient scores of the last layer of the default
    student are about a third of the first layer's, which alone makes a global ranking empty the last layer."""
    normalized = scores.clone()
    for layer in layers.unique():
        members = layers == layer
        live = members & alive
        reference = scores[live].mean() if live.any() else scores[members].mean()
        normalized[members] = scores[members] / reference.clamp_min(1e-12)
    return normalized


NORMALIZERS = {"global": normalize, "per_layer": normalize_per_layer}


class Importance:
    """Base of the importance criteria (Torch-Pruning's shape): ``criterion(views)`` returns one score per group,
    ``{"head": [all heads], "ffn": [all neurons]}``, higher = more important. A ``windowed`` criterion needs the
    gradients: the pruner scores it after every backward and averages it over its sliding window; the others are
    scored from the weights when the pruner prunes."""

    windowed = False

    def __call__(self, views: list[LayerView]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MagnitudeImportance(Importance):
    """L2 norm of each group's weights."""

    def __call__(self, views: list[LayerView]) -> dict[str, torch.Tensor]:
        squares = _concat([_group_scores(view, lambda p: p.detach() ** 2) for view in views])
        return {kind: values.sqrt() for kind, values in squares.items()}


class TaylorImportance(Importance):
    """|grad · weight| summed over each group (first-order Taylor estimate of the loss change on removal)."""

    windowed = True

    def __call__(self, views: list[LayerView]) -> dict[str, torch.Tensor]:
        def value_of(parameter):
            if parameter.grad is None:
                raise RuntimeError(
                    "TaylorImportance needs gradients: call accumulate_importance_scores() right after backward()."
                )
            return (parameter.grad.detach() * parameter.detach()).abs()

        return _concat([_group_scores(view, value_of) for view in views])


class WeightedImportance:
    """KGSP's combination: the sum of ``weight * normalizer(scores, alive)`` over named criteria whose scores are
    given (e.g. L2 now and a window mean of Taylor scores). ``normalizer`` is a parameter, so other scalings (per
    layer, by rank) plug in without touching the pruner or the sensitivity analysis, which both use this."""

    def __init__(self, weights: dict[str, float], normalizer=normalize) -> None:
        self.weights, self.normalizer = weights, normalizer

    def combine(self, scores: dict[str, dict[str, torch.Tensor]], alive: dict[str, torch.Tensor],
                layers: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        return {
            kind: sum(weight * self.normalizer(scores[name][kind], alive[kind], None if layers is None else layers[kind])
                      for name, weight in self.weights.items())
            for kind in KINDS
        }



# criterion name -> its scorer; a mode's weights (MODE_WEIGHTS) name the criteria it adds up
CRITERIA = {"magnitude": MagnitudeImportance, "gradient": TaylorImportance}
MODE_WEIGHTS = {"l2": {"magnitude": 1.0}, "kd_grad": {"gradient": 1.0}}  # any other mode: KGSP's lambda-weighted sum


class KGSPScorer:
    """KGSP importance as stage 8 computes it: ``sum(weight * normalizer(scores))`` over the mode's criteria, with
    the config's normalization, both read once here. A single criterion under global normalization is ranked as it is
    (a global scale changes no ranking)."""

    def __init__(self, weights: dict[str, float], normalization: str) -> None:
        unknown = set(weights) - set(CRITERIA)
        if unknown:
            raise ValueError(f"Unknown importance criteria {sorted(unknown)}; known: {', '.join(CRITERIA)}.")
        if sum(CRITERIA[name].windowed for name in weights) > 1:
            raise ValueError(f"At most one gradient (windowed) criterion can be combined; got {sorted(weights)}.")
        if normalization not in NORMALIZERS:
            raise ValueError(f"importance_normalization={normalization!r} is not supported; allowed: {', '.join(NORMALIZERS)}.")
        self.weights, self.normalization = dict(weights), normalization
        self.combiner = WeightedImportance(self.weights, NORMALIZERS[normalization])

    @classmethod
    def from_config(cls, config) -> "KGSPScorer":
        weights = MODE_WEIGHTS.get(config.importance_mode, {"magnitude": config.lambda_mag, "gradient": config.lambda_grad})
        return cls(weights, config.importance_normalization)

    @property
    def needs_gradients(self) -> bool:
        return any(CRITERIA[name].windowed for name in self.weights)

    def __call__(self, scores: dict[str, dict[str, torch.Tensor]], alive: dict[str, torch.Tensor],
                 layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``scores[criterion][kind]`` per group, ``alive[kind]`` the live groups, ``layers[kind]`` each group's layer."""
        if len(self.weights) == 1 and self.normalization == "global":
            return scores[next(iter(self.weights))]
        return self.combiner.combine(scores, alive, layers)

    def describe(self) -> str:
        parts = " + ".join(f"{weight} x normalized {name}" for name, weight in self.weights.items())
        return f"{parts} ({self.normalization} normalization)"
