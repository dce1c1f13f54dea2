"""Mixed 8/4-bit precision: which encoder Linears stay at 8 bits under a checkpoint size budget."""

from __future__ import annotations

import logging
import math
from typing import Optional

from torch import nn

from ..architecture import spec_for
from .base import EMBEDDING_BITS, bits_per_weight, quantizable_linear_names
from .fake import worst_layers
from .rows import WIDE_ROW_BITS

logger = logging.getLogger(__name__)

def estimated_checkpoint_bytes(model: nn.Module, settings, eight_bit: tuple | list = ()) -> float:
    """Weight bytes of ``model`` (full precision) once stored by stage 9/10 with ``settings``: quantizable Linears
    in 4 bits (``bits_per_weight``), those in ``eight_bit`` as int8 plus a scale per row, the word embeddings per
    ``settings.embedding_quantization`` (at most ``embedding_int4_rows`` of them at int4), everything else at its own dtype."""
    quantizable = set(quantizable_linear_names(model, settings.skip_modules))
    embedding_key = f"{spec_for(model).embeddings}.weight"
    embedding_bits = EMBEDDING_BITS.get(settings.embedding_quantization)
    total = 0.0
    for key, tensor in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in quantizable and key.endswith(".weight"):
            rows, columns = tensor.shape
            if module in eight_bit:
                total += rows * columns + 4 * rows
            else:  # codes and block scales, plus bitsandbytes' per-layer state: code map, nested code map, packed record
                total += rows * columns * bits_per_weight(settings.blocksize, settings.double_quant) / 8 + 64 + 170
                total += 1024 if settings.double_quant else 0
        elif key == embedding_key and embedding_bits:
            rows, columns = tensor.shape
            total += rows * math.ceil(columns * embedding_bits / 8) + 4 * rows
            int4_rows = min(rows, getattr(settings, "embedding_int4_rows", 0)) if embedding_bits == 2 else 0
            total += int4_rows * (math.ceil(columns * WIDE_ROW_BITS / 8) - math.ceil(columns * embedding_bits / 8) + 4)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def check_8bit_budget(model: nn.Module, settings) -> float:
    """Refuse a ``keep_8bit_size_budget_mb`` below the all-4-bit checkpoint of ``model`` (which only needs the
    model's shapes, so stages call it on a weightless skeleton before any work); returns that all-4-bit size in bytes."""
    budget_mb = settings.keep_8bit_size_budget_mb
    all_4bit = estimated_checkpoint_bytes(model, settings)
    if budget_mb is not None and all_4bit > budget_mb * 1e6:
        raise ValueError(
            f"keep_8bit_size_budget_mb={budget_mb} is below the all-4-bit checkpoint of this model ({all_4bit / 1e6:.2f} MB "
            f"estimated), so no layer can stay at 8 bits; raise it above {all_4bit / 1e6:.2f} or leave it unset."
        )
    return all_4bit


def check_mixed_precision(model: nn.Module, settings) -> None:
    """Refuse, from the model's shapes alone (a weightless skeleton, before any work), a size budget below the
    all-4-bit checkpoint or more 8-bit Linears than the model has."""
    if settings.keep_8bit_size_budget_mb is not None:
        check_8bit_budget(model, settings)
    count = settings.keep_8bit_layers
    if count is not None:
        available = len(quantizable_linear_names(model, settings.skip_modules))
        if count > available:
            raise ValueError(f"keep_8bit_layers={count} exceeds the {available} quantizable encoder Linears of this model; "
                             f"give 1 to {available}.")


def plan_8bit_layers(model: nn.Module, settings, errors: dict[str, dict]) -> tuple[list[str], Optional[dict]]:
    """The Linears to keep at 8 bits, worst 4-bit output error first (``worst_layers``): the first
    ``settings.keep_8bit_layers`` of them, or under ``settings.keep_8bit_size_budget_mb`` each one while the estimated
    checkpoint stays within the budget (a layer that does not fit is passed over for smaller ones). Returns
    ([], None) when neither is set."""
    budget_mb = settings.keep_8bit_size_budget_mb
    count = settings.keep_8bit_layers
    if count is not None:
        check_mixed_precision(model, settings)
        chosen = [name for name, _ in worst_layers(errors, count=count)]
        size = estimated_checkpoint_bytes(model, settings, chosen)
        logger.info("Mixed precision: the %d of %d Linears with the largest 4-bit output error kept at 8 bits; estimated "
                    "%.2f MB", len(chosen), len(errors), size / 1e6)
        return chosen, {"count": count, "all_4bit_estimated_mb": estimated_checkpoint_bytes(model, settings) / 1e6,
                        "estimated_mb": size / 1e6, "layers_8bit": chosen}
    if budget_mb is None:
        return [], None
    all_4bit = check_8bit_budget(model, settings)
    chosen, size = [], all_4bit
    for name, _ in worst_layers(errors, count=len(errors)):
        candidate = estimated_checkpoint_bytes(model, settings, [*chosen, name])
        if candidate <= budget_mb * 1e6:
            chosen.append(name)
            size = candidate
    plan = {"budget_mb": budget_mb, "all_4bit_estimated_mb": all_4bit / 1e6, "estimated_mb": size / 1e6, "layers_8bit": chosen}
    logger.info("Mixed precision: %d of %d Linears kept at 8 bits (worst 4-bit output error first); estimated %.2f MB "
                "of a %.2f MB budget (all 4-bit: %.2f MB)", len(chosen), len(errors), size / 1e6, budget_mb, all_4bit / 1e6)
    return chosen, plan

