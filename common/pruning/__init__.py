"""KGSP/MSP structured pruning of attention heads and FFN neurons, split by job (Torch-Pruning's layout):

- ``importance``: criteria over structure groups (L2 magnitude, Taylor |grad x weight|), normalizers, and
  ``KGSPScorer``, the one weighted sum stage 8 and the sensitivity analysis rank with;
- ``targets``: how far (uniform, multi-granularity MSP, per-layer targets; minimums; the early checks);
- ``schedule``: when (Zhu & Gupta's polynomial schedule);
- ``masks``: structure groups, their masks and zeroing;
- ``selection``: which groups go (lowest-scored, per layer or across layers; width alignment);
- ``layers``: whole encoder layers scored by the KL of skipping them, and dropped (stage 8's ``--drop_layers``);
- ``hidden``: the residual stream's width, scored by the Fisher information of a mask and narrowed (stage 8's
  ``--hidden_sparsity``);
- ``pruner``: ``StructuralPruner``, which composes them and removes pruned structures physically.

A new importance criterion is one ``Importance`` class and one ``CRITERIA`` entry in ``importance.py``.
"""

from .importance import (
    CRITERIA,
    KINDS,
    NORMALIZERS,
    Importance,
    KGSPScorer,
    MagnitudeImportance,
    TaylorImportance,
    WeightedImportance,
    normalize,
    normalize_per_layer,
)
from .layers import (
    drop_layers,
    layer_skip_importance,
    layers_to_drop,
    most_important_layers,
)
from .masks import StructureGroup, StructureMasks, apply_masks
from .pruner import StructuralPruner
from .schedule import PolynomialSchedule, polynomial_sparsity
from .targets import PruningTargets

__all__ = [
    "CRITERIA",
    "KINDS",
    "NORMALIZERS",
    "Importance",
    "KGSPScorer",
    "MagnitudeImportance",
    "PolynomialSchedule",
    "PruningTargets",
    "StructuralPruner",
    "StructureGroup",
    "StructureMasks",
    "TaylorImportance",
    "WeightedImportance",
    "apply_masks",
    "drop_layers",
    "layer_skip_importance",
    "layers_to_drop",
    "most_important_layers",
    "normalize",
    "normalize_per_layer",
    "polynomial_sparsity",
]
