"""KGSP/MSP structured pruning of attention heads and FFN neurons.

Structure groups (one per attention head, one per FFN neuron) are the units that are scored, masked and
finally removed. Importance is a callable over the encoder layers (Torch-Pruning style):

- ``MagnitudeImportance``: L2 norm of the group's weights (the original criterion);
- ``TaylorImportance``: |grad · weight| summed over the group, with the gradient of the distillation loss.

``StructuralPruner`` owns the masks. It accumulates gradient importance after every backward over a sliding
window, raises sparsity along a polynomial schedule (``step``), keeps masks monotone, and at the end removes
the pruned structures physically (``prune_physically``), leaving smaller matrices and an architecture record.

Granularity:
- uniform (``enable_multi_granularity=False``): every layer loses the same share of its heads and of its
  FFN neurons, one sparsity for both (the original behaviour);
- multi-granularity (MSP): heads and neurons are ranked separately across all layers, each kind with its own
  target, so layers that matter keep more.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .architecture import LayerView, architecture_record, layer_views, select_bias_heads, set_module

logger = logging.getLogger(__name__)

KINDS = ("head", "ffn")


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


# -- importance criteria --------------------------------------------------------------------------------


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
    ``{"head": [all heads], "ffn": [all neurons]}``, higher = more important."""

    def __call__(self, views: list[LayerView]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MagnitudeImportance(Importance):
    """L2 norm of each group's weights."""

    def __call__(self, views: list[LayerView]) -> dict[str, torch.Tensor]:
        squares = _concat([_group_scores(view, lambda p: p.detach() ** 2) for view in views])
        return {kind: values.sqrt() for kind, values in squares.items()}


class TaylorImportance(Importance):
    """|grad · weight| summed over each group (first-order Taylor estimate of the loss change on removal)."""

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


def polynomial_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int, power: float = 3.0) -> float:
    """Zhu & Gupta's schedule: 0 before ``start_step``, ``initial`` at it, ``final`` from ``end_step`` on."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return final
    progress = (step - start_step) / max(1, end_step - start_step)
    return final + (initial - final) * (1.0 - progress) ** power


@dataclass
class PolynomialSchedule:
    """When to prune and how far: Zhu & Gupta's polynomial rise from ``start_fraction`` to ``end_fraction`` of the
    run, every ``frequency`` optimizer steps. Passed into ``StructuralPruner`` (built from the config by default),
    so another schedule plugs in without touching the pruner."""

    start_fraction: float
    end_fraction: float
    frequency: int
    power: float = 3.0
    initial: float = 0.0
    start_step: int = 0
    end_step: int = 0

    @classmethod
    def from_config(cls, config) -> "PolynomialSchedule":
        return cls(config.pruning_start_fraction, config.pruning_end_fraction, config.pruning_frequency_steps,
                   config.schedule_power, config.initial_sparsity)

    def fit(self, total_steps: int) -> None:
        self.start_step = int(self.start_fraction * total_steps)
        self.end_step = max(self.start_step, int(self.end_fraction * total_steps))
        logger.info("Pruning schedule: sparsity rises from step %d to step %d of %d, every %d steps (power %.1f)",
                    self.start_step, self.end_step, total_steps, self.frequency, self.power)

    def sparsity(self, step: int, final: float) -> float:
        return polynomial_sparsity(step, min(self.initial, final), final, self.start_step, self.end_step, self.power)

    def is_due(self, step: int, reached_final: bool) -> bool:
        return step >= self.start_step and ((step - self.start_step) % self.frequency == 0 or (step >= self.end_step and not reached_final))


# -- the pruner ---------------------------------------------------------------------------------------------


class StructuralPruner:
    """Scores, masks and removes attention heads and FFN neurons of a classifier of any supported architecture.

    ``config`` is a ``PruningConfig`` (or anything with its pruning fields); ``schedule`` says when to prune
    (default: ``PolynomialSchedule.from_config(config)``). The classifier, pooler and embeddings are never
    touched. Typical use, inside a training loop::

        pruner = StructuralPruner(model, config)
        pruner.set_schedule(total_steps)
        ... loss.backward(); pruner.accumulate_importance_scores()
        ... optimizer.step(); pruner.step(global_step)          # prunes on schedule, re-applies masks
        pruner.finalize(); pruner.prune_physically()
    """

    def __init__(self, model: nn.Module, config, schedule: Optional[PolynomialSchedule] = None) -> None:
        self.model = model
        self.config = config
        self.schedule = schedule or PolynomialSchedule.from_config(config)
        self.views = layer_views(model)
        self.head_size = self.views[0].head_size
        self._build_structure_groups()
        self.head_mask = torch.ones(len(self.head_groups), dtype=torch.bool)
        self.ffn_mask = torch.ones(len(self.ffn_groups), dtype=torch.bool)
        self.gradient_window: deque = deque(maxlen=config.pruning_window_steps)
        self.l2_importance = MagnitudeImportance()
        self.grad_importance = TaylorImportance()
        self.history: list[dict] = []
        self.layer_targets = self._read_layer_targets()
        self.check_targets()

    # structure --------------------------------------------------------------------------------------------

    def _build_structure_groups(self) -> None:
        self.head_groups: list[StructureGroup] = []
        self.ffn_groups: list[StructureGroup] = []
        self.layer_offsets = {"head": [], "ffn": []}
        for layer, view in enumerate(self.views):
            self.layer_offsets["head"].append(len(self.head_groups))
            self.layer_offsets["ffn"].append(len(self.ffn_groups))
            self.head_groups.extend(StructureGroup("head", layer, h) for h in range(view.num_heads))
            self.ffn_groups.extend(StructureGroup("ffn", layer, n) for n in range(view.ffn_width))
        self.group_layer = {
            "head": torch.tensor([g.layer for g in self.head_groups]),
            "ffn": torch.tensor([g.layer for g in self.ffn_groups]),
        }

    def _layer_sizes(self, kind: str) -> list[int]:
        return [view.num_heads if kind == "head" else view.ffn_width for view in self.views]

    def _minimum(self, kind: str) -> int:
        if kind == "head":
            return self.config.min_heads_per_layer
        # an aligned layer keeps at least one multiple, so rounding down never has to go below it
        return max(self.config.min_ffn_neurons_per_layer, getattr(self.config, "ffn_round_to", 1))

    def _read_layer_targets(self) -> Optional[dict[str, list[int]]]:
        path = getattr(self.config, "layer_targets", None)
        if path is None:
            return None
        from .config import read_layer_targets

        targets = read_layer_targets(path)
        counts = {"head": targets["heads_per_layer"], "ffn": targets["ffn_width_per_layer"]}
        for kind, label in (("head", "heads_per_layer"), ("ffn", "ffn_width_per_layer")):
            sizes = self._layer_sizes(kind)
            if len(counts[kind]) != len(sizes):
                raise ValueError(f"layer_targets={path!r} has {len(counts[kind])} entries in {label} but the model has "
                                 f"{len(sizes)} layers; make the targets for this model (scripts/sensitivity.py).")
            for layer, (kept, size) in enumerate(zip(counts[kind], sizes)):
                if kept > size:
                    raise ValueError(f"layer_targets={path!r}: {label}[{layer}]={kept} exceeds the layer's {size}.")
        return counts

    def _layer_target_removals(self, kind: str) -> list[int]:
        return [size - kept for size, kept in zip(self._layer_sizes(kind), self.layer_targets[kind])]

    def final_sparsity(self, kind: str) -> float:
        if self.layer_targets is not None:
            return sum(self._layer_target_removals(kind)) / sum(self._layer_sizes(kind))
        if not self.config.enable_multi_granularity:
            return self.config.final_sparsity
        return self.config.head_final_sparsity if kind == "head" else self.config.ffn_final_sparsity

    def check_targets(self) -> None:
        """Raise before training when the final sparsity cannot be met with the per-layer minimums."""
        for kind in KINDS:
            sizes, minimum, sparsity = self._layer_sizes(kind), self._minimum(kind), self.final_sparsity(kind)
            label = "heads" if kind == "head" else "FFN neurons"
            field = "min_heads_per_layer" if kind == "head" else "min_ffn_neurons_per_layer"
            if kind == "ffn" and getattr(self.config, "ffn_round_to", 1) > self.config.min_ffn_neurons_per_layer:
                field = "ffn_round_to"
            if min(sizes) < minimum:
                raise ValueError(f"{field}={minimum} exceeds the {min(sizes)} {label} of the smallest layer; lower it.")
            if self.layer_targets is not None:
                if min(self.layer_targets[kind]) < minimum:
                    raise ValueError(f"layer_targets keeps {min(self.layer_targets[kind])} {label} in a layer, fewer than "
                                     f"{field}={minimum}; lower {field} or raise the targets.")
            elif self.config.enable_multi_granularity:
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

    # importance --------------------------------------------------------------------------------------------

    def _compute_l2_importance(self) -> dict[str, torch.Tensor]:
        return self.l2_importance(self.views)

    def _compute_grad_importance(self) -> dict[str, torch.Tensor]:
        return self.grad_importance(self.views)

    def accumulate_importance_scores(self) -> None:
        """Record this step's gradient importance; call right after ``backward()``."""
        if self.config.importance_mode != "l2":
            self.gradient_window.append(self._compute_grad_importance())

    def windowed_grad_importance(self) -> dict[str, torch.Tensor]:
        if not self.gradient_window:
            raise RuntimeError(
                f"importance_mode={self.config.importance_mode!r} needs gradient importance, but none was accumulated; "
                f"call accumulate_importance_scores() after each backward()."
            )
        return {kind: torch.stack([s[kind] for s in self.gradient_window]).mean(dim=0) for kind in KINDS}

    def _get_combined_importance(self) -> dict[str, torch.Tensor]:
        mode = self.config.importance_mode
        weights = {"l2": {"magnitude": 1.0}, "kd_grad": {"gradient": 1.0}}.get(
            mode, {"magnitude": self.config.lambda_mag, "gradient": self.config.lambda_grad})
        scores = {}
        if "magnitude" in weights:
            scores["magnitude"] = self._compute_l2_importance()
        if "gradient" in weights:
            scores["gradient"] = self.windowed_grad_importance()
        normalization = getattr(self.config, "importance_normalization", "global")
        if len(weights) == 1 and normalization == "global":
            return next(iter(scores.values()))  # one criterion ranked as it is (a global scale changes no ranking)
        return WeightedImportance(weights, NORMALIZERS[normalization]).combine(
            scores, {"head": self.head_mask, "ffn": self.ffn_mask}, self.group_layer)

    # selection ----------------------------------------------------------------------------------------------

    def _mask(self, kind: str) -> torch.Tensor:
        return self.head_mask if kind == "head" else self.ffn_mask

    def _prune_lowest(self, kind: str, importance: torch.Tensor, candidates: torch.Tensor, count: int) -> None:
        """Prune the ``count`` alive candidates of lowest importance, never below the per-layer minimum."""
        if count <= 0:
            return
        mask = self._mask(kind)
        alive_per_layer = torch.bincount(self.group_layer[kind][mask], minlength=len(self.views))
        minimum = self._minimum(kind)
        order = candidates[torch.argsort(importance[candidates], stable=True)]
        pruned = 0
        for index in order.tolist():
            if pruned == count:
                break
            if not mask[index]:
                continue
            layer = int(self.group_layer[kind][index])
            if alive_per_layer[layer] <= minimum:
                continue
            mask[index] = False
            alive_per_layer[layer] -= 1
            pruned += 1

    def _prune_layers_to(self, importance: dict[str, torch.Tensor], removals: dict[str, list[int]]) -> None:
        """Each layer loses its lowest-scored structures until ``removals[kind][layer]`` are gone (masks stay monotone)."""
        for kind in KINDS:
            mask = self._mask(kind)
            for layer, wanted in enumerate(removals[kind]):
                members = self.layer_members(kind, layer)
                self._prune_lowest(kind, importance[kind], members, wanted - int((~mask[members]).sum()))

    def _prune_uniform(self, importance: dict[str, torch.Tensor], sparsity: float) -> None:
        """Each layer loses floor(sparsity * size) of its heads and of its neurons."""
        self._prune_layers_to(importance, {kind: [math.floor(sparsity * size) for size in self._layer_sizes(kind)] for kind in KINDS})

    def _prune_to_layer_targets(self, importance: dict[str, torch.Tensor], head_progress: float, ffn_progress: float) -> None:
        """Each layer towards its own target: ``progress`` (0..1) of its planned removals, lowest-scored first."""
        progress = {"head": min(1.0, head_progress), "ffn": min(1.0, ffn_progress)}
        self._prune_layers_to(importance, {kind: [math.floor(progress[kind] * planned + 1e-9) for planned in
                                                  self._layer_target_removals(kind)] for kind in KINDS})

    def _prune_multi_granularity(self, importance: dict[str, torch.Tensor], head_sparsity: float, ffn_sparsity: float) -> None:
        """Rank heads and neurons separately across all layers, each kind towards its own sparsity."""
        for kind, sparsity in (("head", head_sparsity), ("ffn", ffn_sparsity)):
            mask = self._mask(kind)
            target = math.floor(sparsity * len(mask))
            self._prune_lowest(kind, importance[kind], torch.arange(len(mask)), target - int((~mask).sum()))

    def compute_importance_and_prune(self, head_sparsity: float, ffn_sparsity: Optional[float] = None) -> None:
        """Score every group and raise the masks to the given sparsity (uniform mode uses ``head_sparsity``)."""
        importance = self._get_combined_importance()
        if self.layer_targets is not None:  # the head sparsity is the share of each layer's own target reached
            self._prune_to_layer_targets(importance, head_sparsity / max(self.final_sparsity("head"), 1e-12),
                                         (head_sparsity if ffn_sparsity is None else ffn_sparsity) / max(self.final_sparsity("ffn"), 1e-12))
        elif self.config.enable_multi_granularity:
            self._prune_multi_granularity(importance, head_sparsity, head_sparsity if ffn_sparsity is None else ffn_sparsity)
        else:
            self._prune_uniform(importance, head_sparsity)
        self._align_ffn_widths(importance["ffn"])
        self.apply_masks()

    def _align_ffn_widths(self, importance: torch.Tensor) -> None:
        """Round each pruned layer's kept FFN neurons down to a multiple of ``ffn_round_to`` (never below one multiple:
        ``_minimum`` keeps that many), removing the layer's lowest-scored ones: masks stay monotone."""
        multiple = getattr(self.config, "ffn_round_to", 1)
        if multiple <= 1:
            return
        for layer, size in enumerate(self._layer_sizes("ffn")):
            kept = int(self.layer_mask("ffn", layer).sum())
            if kept == size:
                continue  # an untouched layer keeps its (already aligned) width
            target = max(multiple, (kept // multiple) * multiple)
            if kept > target:
                alive = self.layer_members("ffn", layer)[self.layer_mask("ffn", layer)]
                weakest = alive[torch.argsort(importance[alive], stable=True)][: kept - target]
                self.ffn_mask[weakest] = False

    # schedule ---------------------------------------------------------------------------------------------

    def set_schedule(self, total_steps: int) -> None:
        self.schedule.fit(total_steps)

    def sparsity_at(self, step: int) -> dict[str, float]:
        return {kind: self.schedule.sparsity(step, self.final_sparsity(kind)) for kind in KINDS}

    def step(self, step: int) -> bool:
        """Prune when ``step`` is a scheduled pruning step; always re-apply the masks. True if it pruned."""
        due = self.schedule.is_due(step, self.reached_final)
        if due and not self.reached_final and (self.config.importance_mode == "l2" or self.gradient_window):
            target = self.sparsity_at(step)
            self.compute_importance_and_prune(target["head"], target["ffn"])
            self.history.append({"step": step, **self.achieved_sparsity()})
            return True
        self.apply_masks()
        return False

    def _target_reached(self, kind: str) -> bool:
        sparsity, mask = self.final_sparsity(kind), self._mask(kind)
        if self.layer_targets is not None:
            return all(kept <= target for kept, target in zip(self.kept_per_layer(kind), self.layer_targets[kind]))
        if self.config.enable_multi_granularity:
            return int((~mask).sum()) >= math.floor(sparsity * len(mask))
        sizes = self._layer_sizes(kind)
        return all(size - kept >= math.floor(sparsity * size) for size, kept in zip(sizes, self.kept_per_layer(kind)))

    @property
    def reached_final(self) -> bool:
        return all(self._target_reached(kind) for kind in KINDS)

    def finalize(self) -> None:
        """Reach the final sparsity now if the schedule did not (e.g. a run shorter than the schedule)."""
        if not self.reached_final:
            logger.info("Schedule ended below the final sparsity; pruning to it now")
            self.compute_importance_and_prune(self.final_sparsity("head"), self.final_sparsity("ffn"))

    # masks ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the weights of pruned groups: a zeroed head or neuron contributes exactly nothing."""
        for layer, view in enumerate(self.views):
            heads = self.layer_mask("head", layer)
            if not heads.all():
                rows = heads.repeat_interleave(self.head_size).to(view.get("query").weight.device)
                for part in ("query", "key", "value"):
                    linear = view.get(part)
                    linear.weight.mul_(rows.unsqueeze(1).to(linear.weight.dtype))
                    if linear.bias is not None:
                        linear.bias.mul_(rows.to(linear.bias.dtype))
                output = view.get("attn_output").weight
                output.mul_(rows.unsqueeze(0).to(output.dtype))
            neurons = self.layer_mask("ffn", layer)
            if not neurons.all():
                neurons = neurons.to(view.get("ffn_in").weight.device)
                ffn_in, ffn_out = view.get("ffn_in"), view.get("ffn_out")
                ffn_in.weight.mul_(neurons.unsqueeze(1).to(ffn_in.weight.dtype))
                if ffn_in.bias is not None:
                    ffn_in.bias.mul_(neurons.to(ffn_in.bias.dtype))
                ffn_out.weight.mul_(neurons.unsqueeze(0).to(ffn_out.weight.dtype))

    def layer_members(self, kind: str, layer: int) -> torch.Tensor:
        """Indices of one layer's groups of ``kind`` in the global masks and scores."""
        start = self.layer_offsets[kind][layer]
        return torch.arange(start, start + self._layer_sizes(kind)[layer])

    def layer_mask(self, kind: str, layer: int) -> torch.Tensor:
        start = self.layer_offsets[kind][layer]
        return self._mask(kind)[start : start + self._layer_sizes(kind)[layer]]

    def kept_per_layer(self, kind: str) -> list[int]:
        return [int(self.layer_mask(kind, layer).sum()) for layer in range(len(self.views))]

    def achieved_sparsity(self) -> dict[str, float]:
        return {
            "head_sparsity": 1.0 - float(self.head_mask.float().mean()),
            "ffn_sparsity": 1.0 - float(self.ffn_mask.float().mean()),
        }

    # removal ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prune_physically(self) -> dict:
        """Replace every layer's matrices by smaller ones holding only the kept heads and neurons.

        Returns the architecture record (per-layer head counts and FFN widths, plus the original indices of
        the kept heads). After this the pruner's views describe the smaller model and the masks are all-true.
        """
        kept_heads = []
        for layer, view in enumerate(self.views):
            heads = self.layer_mask("head", layer).clone()
            head_indices = torch.nonzero(heads).flatten()
            kept_heads.append(head_indices.tolist())
            rows = torch.nonzero(heads.repeat_interleave(self.head_size)).flatten()
            if view.spec.shared_head_bias is not None:
                columns = view.bias_heads if view.bias_heads is not None else list(range(view.num_heads))
                select_bias_heads(view.get("attention"), [columns[h] for h in head_indices.tolist()])
            for part in ("query", "key", "value"):
                view.set(part, _select(view.get(part), rows, dim=0))
            for path in view.head_projections():
                set_module(view.module, path, _select(view.module.get_submodule(path), rows, dim=0))
            view.set("attn_output", _select(view.get("attn_output"), rows, dim=1))
            view.set_num_heads(len(head_indices))
            neurons = torch.nonzero(self.layer_mask("ffn", layer)).flatten()
            view.set("ffn_in", _select(view.get("ffn_in"), neurons, dim=0))
            view.set("ffn_out", _select(view.get("ffn_out"), neurons, dim=1))
        record = architecture_record(self.model)
        record["kept_heads"] = kept_heads
        self.views = layer_views(self.model)
        self._build_structure_groups()
        self.head_mask = torch.ones(len(self.head_groups), dtype=torch.bool)
        self.ffn_mask = torch.ones(len(self.ffn_groups), dtype=torch.bool)
        self.gradient_window.clear()
        return record

    # resume -----------------------------------------------------------------------------------------------

    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Masks and the gradient-importance window as tensors, the history as JSON: all a resumed run needs to
        prune exactly as an uninterrupted one (the schedule is rebuilt from the same step counts)."""
        tensors = {"head_mask": self.head_mask.to(torch.uint8), "ffn_mask": self.ffn_mask.to(torch.uint8)}
        for kind in KINDS:
            if self.gradient_window:
                tensors[f"window_{kind}"] = torch.stack([scores[kind] for scores in self.gradient_window])
        return tensors, {"history": self.history, "window_length": len(self.gradient_window)}

    def load_resume_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        for kind in KINDS:
            saved = tensors[f"{kind}_mask"].bool()
            if saved.shape != self._mask(kind).shape:
                raise ValueError(f"The resume state's {kind} mask has {saved.numel()} groups but the model has "
                                 f"{self._mask(kind).numel()}; it belongs to another model.")
            self._mask(kind).copy_(saved)
        self.gradient_window.clear()
        for index in range(info.get("window_length", 0)):
            self.gradient_window.append({kind: tensors[f"window_{kind}"][index] for kind in KINDS})
        self.history = list(info.get("history", []))

    def summary(self) -> dict:
        return {
            "kept_heads_per_layer": self.kept_per_layer("head"),
            "ffn_width_per_layer": self.kept_per_layer("ffn"),
            **self.achieved_sparsity(),
            "importance_mode": self.config.importance_mode,
            "multi_granularity": self.config.enable_multi_granularity,
            "layer_targets": self.layer_targets,
        }


def _select(linear: nn.Linear, indices: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) ``indices`` of ``linear``."""
    indices = indices.to(linear.weight.device)
    weight = linear.weight.index_select(dim, indices).clone()
    out_features, in_features = weight.shape
    smaller = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    smaller.weight.copy_(weight)
    if linear.bias is not None:
        smaller.bias.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, indices))
    return smaller
