"""When to prune and how far: Zhu & Gupta's polynomial sparsity schedule."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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

