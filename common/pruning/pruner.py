"""``StructuralPruner``: scores, masks and removes attention heads and FFN neurons during fine-tuning.

It composes the parts of this package: a ``KGSPScorer`` (importance), ``PruningTargets`` (how far), a
``PolynomialSchedule`` (when), ``StructureMasks`` (what is kept) and the selection functions (which go), and at the
end removes the pruned structures physically with ``architecture.shrink_layer``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Optional

import torch
from torch import nn

from ..architecture import (
    architecture_record,
    layer_views,
    select_bias_heads,
    shrink_layer,
)
from .importance import CRITERIA, KINDS, KGSPScorer, TaylorImportance
from .masks import StructureMasks, apply_masks
from .schedule import PolynomialSchedule
from .selection import (
    align_widths,
    progress_removals,
    prune_globally,
    prune_layers_to,
    uniform_removals,
)
from .targets import PruningTargets

logger = logging.getLogger(__name__)


class StructuralPruner:
    """Scores, masks and removes attention heads and FFN neurons of a classifier of any supported architecture.

    ``config`` is a ``PruningConfig`` (or anything with its pruning fields); ``schedule`` says when to prune
    (default: ``PolynomialSchedule.from_config(config)``); ``scorer`` how to rank (default:
    ``KGSPScorer.from_config(config)``). The classifier, pooler and embeddings are never touched. Typical use,
    inside a training loop::

        pruner = StructuralPruner(model, config)
        pruner.set_schedule(total_steps)
        ... loss.backward(); pruner.accumulate_importance_scores()
        ... optimizer.step(); pruner.step(global_step)          # prunes on schedule, re-applies masks
        pruner.finalize(); pruner.prune_physically()
    """

    def __init__(self, model: nn.Module, config, schedule: Optional[PolynomialSchedule] = None,
                 scorer: Optional[KGSPScorer] = None) -> None:
        self.model = model
        self.importance_mode = config.importance_mode
        self.multi_granularity = config.enable_multi_granularity
        self.schedule = schedule or PolynomialSchedule.from_config(config)
        self.scorer = scorer or KGSPScorer.from_config(config)
        self.views = layer_views(model)
        self.head_size = self.views[0].head_size
        self.masks = StructureMasks.of(self.views)
        self.targets = PruningTargets(config, self.masks.layer_sizes)
        self.gradient_window: deque = deque(maxlen=config.pruning_window_steps)
        self.criteria = {name: CRITERIA[name]() for name in self.scorer.weights}
        self.grad_importance = next((c for c in self.criteria.values() if c.windowed), TaylorImportance())
        self.history: list[dict] = []
        self.targets.check()

    # the masks, as the training loop, the tests and the sensitivity analysis read them ---------------------------

    @property
    def head_mask(self) -> torch.Tensor:
        return self.masks["head"]

    @property
    def ffn_mask(self) -> torch.Tensor:
        return self.masks["ffn"]

    @property
    def head_groups(self) -> list:
        return self.masks.groups["head"]

    @property
    def ffn_groups(self) -> list:
        return self.masks.groups["ffn"]

    @property
    def layer_targets(self) -> Optional[dict[str, list[int]]]:
        return self.targets.per_layer

    def mask(self, kind: str) -> torch.Tensor:
        return self.masks[kind]

    def layer_sizes(self, kind: str) -> list[int]:
        return self.masks.layer_sizes[kind]

    def layer_members(self, kind: str, layer: int) -> torch.Tensor:
        return self.masks.layer_members(kind, layer)

    def layer_mask(self, kind: str, layer: int) -> torch.Tensor:
        return self.masks.layer_mask(kind, layer)

    def kept_per_layer(self, kind: str) -> list[int]:
        return self.masks.kept_per_layer(kind)

    def achieved_sparsity(self) -> dict[str, float]:
        return self.masks.achieved_sparsity()

    def final_sparsity(self, kind: str) -> float:
        return self.targets.final_sparsity(kind)

    def apply_masks(self) -> None:
        apply_masks(self.views, self.masks)

    # importance --------------------------------------------------------------------------------------------

    def accumulate_importance_scores(self) -> None:
        """Record this step's gradient importance; call right after ``backward()``."""
        if self.scorer.needs_gradients:
            self.gradient_window.append(self.grad_importance(self.views))

    def windowed_grad_importance(self) -> dict[str, torch.Tensor]:
        if not self.gradient_window:
            raise RuntimeError(
                f"importance_mode={self.importance_mode!r} needs gradient importance, but none was accumulated; "
                f"call accumulate_importance_scores() after each backward()."
            )
        return {kind: torch.stack([s[kind] for s in self.gradient_window]).mean(dim=0) for kind in KINDS}

    def importance(self) -> dict[str, torch.Tensor]:
        """Every group's combined score now: L2 of the current weights, the window mean of the gradient scores."""
        scores = {name: self.windowed_grad_importance() if criterion.windowed else criterion(self.views)
                  for name, criterion in self.criteria.items()}
        return self.scorer(scores, self.masks.masks, self.masks.group_layer)

    # selection ----------------------------------------------------------------------------------------------

    def compute_importance_and_prune(self, head_sparsity: float, ffn_sparsity: Optional[float] = None) -> None:
        """Score every group and raise the masks to the given sparsity (uniform mode uses ``head_sparsity``)."""
        importance = self.importance()
        sparsity = {"head": head_sparsity, "ffn": head_sparsity if ffn_sparsity is None else ffn_sparsity}
        minimums = self.targets.minimums
        if self.targets.per_layer is not None:  # the sparsity is the share of each layer's own target reached
            planned = {kind: self.targets.planned_removals(kind) for kind in KINDS}
            progress = {kind: sparsity[kind] / max(self.final_sparsity(kind), 1e-12) for kind in KINDS}
            prune_layers_to(self.masks, importance, progress_removals(planned, progress), minimums)
        elif self.multi_granularity:
            prune_globally(self.masks, importance, sparsity, minimums)
        else:
            prune_layers_to(self.masks, importance, uniform_removals(self.masks.layer_sizes, head_sparsity), minimums)
        align_widths(self.masks, importance["ffn"], self.targets.round_to)
        self.apply_masks()

    # schedule ---------------------------------------------------------------------------------------------

    def set_schedule(self, total_steps: int) -> None:
        self.schedule.fit(total_steps)

    def sparsity_at(self, step: int) -> dict[str, float]:
        return {kind: self.schedule.sparsity(step, self.final_sparsity(kind)) for kind in KINDS}

    def step(self, step: int) -> bool:
        """Prune when ``step`` is a scheduled pruning step; always re-apply the masks. True if it pruned."""
        due = self.schedule.is_due(step, self.reached_final)
        if due and not self.reached_final and (not self.scorer.needs_gradients or self.gradient_window):
            target = self.sparsity_at(step)
            self.compute_importance_and_prune(target["head"], target["ffn"])
            self.history.append({"step": step, **self.achieved_sparsity()})
            return True
        self.apply_masks()
        return False

    @property
    def reached_final(self) -> bool:
        return all(self.targets.reached(kind, self.masks) for kind in KINDS)

    def finalize(self) -> None:
        """Reach the final sparsity now if the schedule did not (e.g. a run shorter than the schedule)."""
        if not self.reached_final:
            logger.info("Schedule ended below the final sparsity; pruning to it now")
            self.compute_importance_and_prune(self.final_sparsity("head"), self.final_sparsity("ffn"))

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
            if view.spec.shared_head_bias is not None:
                columns = view.bias_heads if view.bias_heads is not None else list(range(view.num_heads))
                select_bias_heads(view.get("attention"), [columns[h] for h in head_indices.tolist()])
            rows = torch.nonzero(heads.repeat_interleave(self.head_size)).flatten()
            shrink_layer(view, rows, torch.nonzero(self.layer_mask("ffn", layer)).flatten())
        record = architecture_record(self.model)
        record["kept_heads"] = kept_heads
        self.views = layer_views(self.model)
        self.masks = StructureMasks.of(self.views)
        self.gradient_window.clear()
        return record

    # resume -----------------------------------------------------------------------------------------------

    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Masks and the gradient-importance window as tensors, the history as JSON: all a resumed run needs to
        prune exactly as an uninterrupted one (the schedule is rebuilt from the same step counts)."""
        tensors = self.masks.state()
        for kind in KINDS:
            if self.gradient_window:
                tensors[f"window_{kind}"] = torch.stack([scores[kind] for scores in self.gradient_window])
        return tensors, {"history": self.history, "window_length": len(self.gradient_window)}

    def load_resume_state(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        self.masks.load_state(tensors)
        self.gradient_window.clear()
        for index in range(info.get("window_length", 0)):
            self.gradient_window.append({kind: tensors[f"window_{kind}"][index] for kind in KINDS})
        self.history = list(info.get("history", []))

    def summary(self) -> dict:
        return {
            "kept_heads_per_layer": self.kept_per_layer("head"),
            "ffn_width_per_layer": self.kept_per_layer("ffn"),
            **self.achieved_sparsity(),
            "importance_mode": self.importance_mode,
            "multi_granularity": self.multi_granularity,
            "layer_targets": self.layer_targets,
        }
