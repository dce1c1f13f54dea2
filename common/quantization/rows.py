"""Row-wise symmetric int8/int4 codes: compressed word embeddings in a checkpoint, and mixed precision's int8 Linears.

A row's scale is its absmax over the largest code (127 or 7); int4 codes are packed two per byte, high nibble first,
offset by 8. ``fake_quantize_rows`` is the same quantize -> dequantize for training through the storage (STE).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import spec_for
from .base import EMBEDDING_BITS


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric row-wise quantization: (codes, per-row scale). int4 codes are packed two per byte."""
    levels = 2 ** (bits - 1) - 1  # 127 or 7
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / levels
    codes = torch.round(weight / scale.unsqueeze(1)).clamp(-levels, levels).to(torch.int8)
    if bits == 4:
        unsigned = (codes + 8).to(torch.uint8)
        if unsigned.shape[1] % 2:
            unsigned = F.pad(unsigned, (0, 1), value=8)
        codes = (unsigned[:, ::2] << 4) | unsigned[:, 1::2]
    return codes, scale.float()


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    if bits == 4:
        high = (codes >> 4).to(torch.int16) - 8
        low = (codes & 0xF).to(torch.int16) - 8
        codes = torch.stack([high, low], dim=2).reshape(codes.shape[0], -1)[:, :columns]
    return codes.float() * scale.unsqueeze(1)


def fake_quantize_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-wise symmetric quantize -> dequantize, exactly as the checkpoint stores embeddings."""
    levels = 2 ** (bits - 1) - 1
    scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / levels
    codes = torch.round(weight.detach() / scale.unsqueeze(1)).clamp(-levels, levels)
    return codes * scale.unsqueeze(1)


class _StraightThroughRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bits):
        return fake_quantize_rows(weight, bits)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class Int8WeightLinear(nn.Module):
    """An encoder Linear that mixed precision keeps at 8 bits: row-wise symmetric int8 codes and one fp32 scale per
    output row (as ``FakeQuant8bitLinear`` trains it), computed in the input's dtype with the dequantized weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, scale = quantize_rows(linear.weight.detach().float().cpu(), 8)
        with torch.no_grad():
            module.weight_codes.copy_(codes)
            module.weight_scale.copy_(scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().float().cpu())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_scale.unsqueeze(1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.dequantized_weight().to(input.dtype), bias)


def compress_embedding_state(model: nn.Module, state: dict, method: str) -> tuple[dict, Optional[dict]]:
    """Replace the word-embedding weight in ``state`` by row-wise codes and scales; return (state, record)."""
    if method == "none":
        return state, None
    name = spec_for(model).embeddings
    weight = state.pop(f"{name}.weight")
    codes, scale = quantize_rows(weight.float(), EMBEDDING_BITS[method])
    state[f"{name}.weight_codes"] = codes
    state[f"{name}.weight_scale"] = scale
    return state, {"method": method, "module": name, "shape": list(weight.shape)}


def _load_embedding(state: dict, record: dict) -> dict:
    name, bits = record["module"], EMBEDDING_BITS[record["method"]]
    codes, scale = state.pop(f"{name}.weight_codes"), state.pop(f"{name}.weight_scale")
    state[f"{name}.weight"] = dequantize_rows(codes, scale, bits, record["shape"][1])
    return state

