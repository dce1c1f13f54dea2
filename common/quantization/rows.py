"""Row-wise symmetric int8/int4/int2 codes: compressed word embeddings in a checkpoint, and mixed precision's int8
Linears.

Codes run from -L to L, L = 2^(bits-1) - 1 (127, 7 or 1: int2 rows are ternary). int8 and int4 rows are scaled by
their absmax over L; a ternary row by the scale among 17 clipping ratios of its absmax with the least squared error
(absmax scaling would round most of a row to zero); every scale is rounded to an fp16 value, so the ONNX files store
them in fp16 exactly. int4 and int2 codes are packed 2 and 4 per byte, first code in the highest bits, offset by
2^(bits-1) (the ONNX files pack ternary rows five a byte). ``fake_quantize_rows`` is the same quantize -> dequantize
for training through the storage (STE).

A ternary table can keep the rows of its most frequent tokens at int4 (``int4_rows``): those few rows carry most of
the text (on the default task the 1,000 most frequent of 13,646 tokens are 76% of the training split's tokens), for
about 100 bytes more per row. The checkpoint then stores two tables, the ternary rows of the other tokens in id order
and the int4 rows, with the sorted ids of the int4 rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import spec_for
from .base import EMBEDDING_BITS

TERNARY_CLIP_RATIOS = torch.linspace(0.2, 1.0, 17)


def _half_exact(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest fp16 value (within fp16's range), so a file can store it in half the bytes
    and still decode exactly what training saw; a 2^-11 relative change, far below the codes' rounding."""
    return scale.clamp(max=65504.0).half().float().clamp(min=2.0 ** -24)


def row_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The per-row scale ``quantize_rows`` uses, rounded to fp16 values (``_half_exact``). The ternary search keeps a
    stored grid exact: a row already on {-s, 0, s} re-quantizes to the same codes and scale (ratio 1 gives zero
    error, any other a clipped top value); so do int8 and int4 rows, whose largest code is then L."""
    levels = 2 ** (bits - 1) - 1
    absmax = weight.abs().amax(dim=1).clamp(min=1e-12)
    if bits > 2:
        return _half_exact(absmax / levels)
    best, best_error = _half_exact(absmax / levels), torch.full_like(absmax, float("inf"))
    for ratio in TERNARY_CLIP_RATIOS:
        scale = _half_exact(absmax * ratio / levels)
        error = ((_round_codes(weight, scale, levels) * scale.unsqueeze(1) - weight) ** 2).sum(dim=1)
        better = error < best_error  # strict: the smallest ratio wins a tie
        best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
    return best


def _round_codes(weight: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(weight / scale.unsqueeze(1)).clamp(-levels, levels)


def row_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric row-wise quantization, unpacked: (int8 codes from -L to L, per-row scale: fp16 values in fp32)."""
    scale = row_scales(weight, bits)
    return _round_codes(weight, scale, 2 ** (bits - 1) - 1).to(torch.int8), scale.float()


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric row-wise quantization: (codes, per-row scale). int4/int2 codes are packed into uint8."""
    codes, scale = row_codes(weight, bits)
    if bits < 8:
        per_byte = 8 // bits
        unsigned = (codes + 2 ** (bits - 1)).to(torch.uint8)
        if unsigned.shape[1] % per_byte:
            unsigned = F.pad(unsigned, (0, per_byte - unsigned.shape[1] % per_byte), value=2 ** (bits - 1))
        grouped = unsigned.reshape(unsigned.shape[0], unsigned.shape[1] // per_byte, per_byte)  # rows may be 0
        codes = torch.zeros(grouped.shape[:2], dtype=torch.uint8)
        for position in range(per_byte):
            codes |= grouped[:, :, position] << (8 - bits * (position + 1))
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    if bits < 8:
        mask = 2 ** bits - 1
        shifts = [8 - bits * (position + 1) for position in range(8 // bits)]
        unpacked = torch.stack([((codes >> shift) & mask).to(torch.int16) for shift in shifts], dim=2)
        codes = unpacked.reshape(codes.shape[0], codes.shape[1] * len(shifts))[:, :columns] - 2 ** (bits - 1)
    return codes.float() * scale.unsqueeze(1)


def fake_quantize_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-wise symmetric quantize -> dequantize, exactly as the checkpoint stores embeddings."""
    levels = 2 ** (bits - 1) - 1
    scale = row_scales(weight.detach(), bits)
    return _round_codes(weight.detach(), scale, levels) * scale.unsqueeze(1)


class _StraightThroughRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bits, int4_mask=None):
        return fake_quantize_table(weight, bits, int4_mask)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


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


WIDE_ROW_BITS = 4  # the width of the rows a ternary table keeps for its most frequent tokens


def int4_row_mask(rows: int, int4_rows: Optional[torch.Tensor], bits: int = 2) -> Optional[torch.Tensor]:
    """A boolean mask over the table's rows, True for the rows stored at int4 among ``bits``-bit rows (None when
    there are none); only ternary tables keep int4 rows."""
    if int4_rows is None or not len(int4_rows):
        return None
    if bits != 2:
        raise ValueError(f"int4 rows are kept among int2 rows only, not among int{bits} rows.")
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[torch.as_tensor(int4_rows, dtype=torch.long)] = True
    return mask


def fake_quantize_table(rows: torch.Tensor, bits: int, int4_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fake_quantize_rows`` of table rows, the rows where ``int4_mask`` is True at int4 instead of ``bits``."""
    narrow = fake_quantize_rows(rows, bits)
    if int4_mask is None:
        return narrow
    return torch.where(int4_mask.unsqueeze(1), fake_quantize_rows(rows, WIDE_ROW_BITS), narrow)


def compress_embedding_state(model: nn.Module, state: dict, method: str,
                             int4_rows: Optional[torch.Tensor] = None) -> tuple[dict, Optional[dict]]:
    """Replace the word-embedding weight in ``state`` by row-wise codes and scales; return (state, record).
    ``int4_rows``: token ids whose rows are stored at int4 among ``int2`` rows (the others' in id order)."""
    if method == "none":
        return state, None
    name = spec_for(model).embeddings
    weight = state.pop(f"{name}.weight").float()
    bits = EMBEDDING_BITS[method]
    mask = int4_row_mask(weight.shape[0], int4_rows, bits)
    record = {"method": method, "module": name, "shape": list(weight.shape)}
    if mask is not None:
        state[f"{name}.int4_row_ids"] = torch.nonzero(mask).flatten().to(torch.int32)
        state[f"{name}.int4_codes"], state[f"{name}.int4_scale"] = quantize_rows(weight[mask], WIDE_ROW_BITS)
        weight = weight[~mask]
        record["int4_rows"] = int(mask.sum())
    state[f"{name}.weight_codes"], state[f"{name}.weight_scale"] = quantize_rows(weight, bits)
    return state, record


def _load_embedding(state: dict, record: dict) -> dict:
    name, bits = record["module"], EMBEDDING_BITS[record["method"]]
    rows, columns = record["shape"]
    codes, scale = state.pop(f"{name}.weight_codes"), state.pop(f"{name}.weight_scale")
    narrow = dequantize_rows(codes, scale, bits, columns)
    missing = [key for key in ("int4_row_ids", "int4_codes", "int4_scale") if f"{name}.{key}" not in state]
    if record.get("int4_rows") and missing:
        raise ValueError(f"The record stores {record['int4_rows']} word-embedding rows at int4, but the weights lack "
                         f"{', '.join(f'{name}.{key}' for key in missing)}: the checkpoint is incomplete. Rerun the stage "
                         "that wrote it.")
    if f"{name}.int4_row_ids" not in state:
        state[f"{name}.weight"] = narrow
        return state
    mask = int4_row_mask(rows, state.pop(f"{name}.int4_row_ids"), bits)
    weight = torch.empty(rows, columns)
    weight[~mask] = narrow
    weight[mask] = dequantize_rows(state.pop(f"{name}.int4_codes"), state.pop(f"{name}.int4_scale"), WIDE_ROW_BITS, columns)
    state[f"{name}.weight"] = weight
    return state


def stored_int4_row_ids(folder, record: dict) -> Optional[torch.Tensor]:
    """The ids of the word-embedding rows a checkpoint stores at int4 among int2 rows (None when it has none)."""
    embedding = record.get("embedding_quantization") or {}
    if not embedding.get("int4_rows"):
        return None
    from pathlib import Path

    from safetensors import safe_open

    key = f"{embedding['module']}.int4_row_ids"
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as weights:
        if key not in weights.keys():
            raise ValueError(f"{folder}: the record stores {embedding['int4_rows']} word-embedding rows at int4, but "
                             f"model.safetensors has no {key}: the checkpoint is incomplete. Rerun the stage that wrote it.")
        return weights.get_tensor(key).long()
