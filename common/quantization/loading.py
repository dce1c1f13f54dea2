"""Loading any checkpoint's quantized weights, dispatched by the record's quantization method.

Each format registers a ``QuantizedFormat`` (its method name, its loader and the module types that hold its weights)
from its own file; ``load_quantized_state`` looks the record's method up in ``FORMATS``. A new format is one file that
registers itself, imported by the package's ``__init__``: this loader does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .rows import _load_embedding


@dataclass(frozen=True)
class QuantizedFormat:
    method: str  # the record's quantization["method"]
    load: Callable[[nn.Module, dict, dict], tuple[nn.Module, set[str]]]  # (skeleton, state, record) -> (model, keys used)
    module_types: Callable[[], tuple[type, ...]]  # modules holding its weights (installed directly, not by load_state_dict)
    devices: tuple[str, ...] = ("cpu",)  # device types its kernels run on


FORMATS: dict[str, QuantizedFormat] = {}


def register_format(quantized_format: QuantizedFormat) -> None:
    FORMATS[quantized_format.method] = quantized_format


def is_movable(record: dict, device: str | torch.device = "cuda") -> bool:
    """Whether a checkpoint's model runs on ``device``: full precision anywhere (row-wise embeddings are decoded to a
    full-precision table when loaded); a quantized format where its kernels exist (``QuantizedFormat.devices``)."""
    method = (record.get("quantization") or {}).get("method")
    if method is None or method not in FORMATS:  # an unknown method is the loader's error to report
        return True
    return torch.device(device).type in FORMATS[method].devices


def load_quantized_state(model: nn.Module, state: dict, record: dict) -> nn.Module:
    """Load ``state`` into the skeleton ``model``, installing 4-bit, int8 and compressed-embedding weights."""
    state = dict(state)
    if record.get("embedding_quantization"):
        state = _load_embedding(state, record["embedding_quantization"])
    quantization = record.get("quantization") or {}
    consumed: set[str] = set()
    method = quantization.get("method")
    if method is not None:
        if method not in FORMATS:
            raise ValueError(f"Unknown quantization method {method!r} in compression.json; known: {', '.join(FORMATS)}.")
        model, consumed = FORMATS[method].load(model, state, quantization)
    remaining = {key: value for key, value in state.items() if key not in consumed}
    expected = {key for key in model.state_dict() if key not in consumed and not _is_quantized_key(model, key)}
    missing, unexpected = sorted(expected - set(remaining)), sorted(set(remaining) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint weights do not match the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            f"The checkpoint is corrupt or was written by another version; re-run its stage."
        )
    if method is None:
        model.load_state_dict(remaining, strict=True)
        return model
    # Quantized modules reject load_state_dict without their own keys, so copy the plain tensors directly.
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for key, value in remaining.items():
            if tensors[key].shape != value.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(tensors[key].shape)} in the rebuilt model.")
            tensors[key].copy_(value)
    return model


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    """State keys of quantized modules that ``load_state_dict`` must not see (they were installed directly)."""
    types = tuple(kind for quantized_format in FORMATS.values() for kind in quantized_format.module_types())
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        try:
            module = model.get_submodule(".".join(parts[:end]))
        except AttributeError:
            continue
        if isinstance(module, types):
            return True
    return False

