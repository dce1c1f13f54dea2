"""Real 4-bit NF4/FP4 weights through bitsandbytes: quantize a model, load a checkpoint's codes, dequantize exactly.

CPU traps handled here: bitsandbytes computes in bf16 on CPUs with AVX512-BF16 unless ``support_avx512bf16_for_cpu``
is False, so loaded 4-bit models use the fp32 path unless the checkpoint's ``compute_dtype`` is bfloat16; and its CPU
``dequantize_4bit`` takes blocks per row, wrong for some pruned row lengths (``dequantize_4bit_exact``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import set_module
from .base import DTYPES, NESTED_BLOCKSIZE, quantizable_linear_names
from .fake import fake_quantize_4bit_values
from .loading import QuantizedFormat, register_format
from .rows import Int8WeightLinear


def dequantize_4bit_exact(weight) -> torch.Tensor:
    """The float32 values of a bitsandbytes 4-bit weight, blocks taken over the flattened matrix as
    ``quantize_4bit`` makes them.

    bitsandbytes 0.50's CPU ``dequantize_4bit`` kernel takes blocks per row instead, so it returns wrong values
    whenever a row length is even but not a multiple of the block size (e.g. a pruned FFN width of 186 or 5
    heads x 32 = 160 columns with blocksize 64). Our loader uses this function for those layers.
    """
    from bitsandbytes.functional import dequantize_blockwise

    state = weight.quant_state
    packed = weight.data.reshape(-1).view(torch.uint8)
    count = math.prod(state.shape)
    codes = torch.empty(packed.numel() * 2, dtype=torch.long, device=packed.device)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    values = state.code.float().to(packed.device)[codes[:count]]
    scales = torch.repeat_interleave(absmax.float(), state.blocksize)[:count]
    return (values * scales).reshape(state.shape)


@lru_cache(maxsize=None)
def _linear4bit_class():
    import bitsandbytes as bnb

    class BlockSafeLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit, except on CPU for row lengths its CPU kernel dequantizes wrongly."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            blocksize = self.weight.quant_state.blocksize
            if x.device.type == "cpu" and self.in_features % blocksize and self.in_features % 2 == 0:
                dtype = self.compute_dtype or x.dtype
                weight = dequantize_4bit_exact(self.weight).to(dtype)
                bias = None if self.bias is None else self.bias.to(dtype)
                return F.linear(x.to(dtype), weight, bias).to(x.dtype)
            return super().forward(x)

    return BlockSafeLinear4bit


def _linear4bit(linear: nn.Linear, settings_record: dict):
    module = _linear4bit_class()(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=DTYPES[settings_record["compute_dtype"]],
        compress_statistics=settings_record["double_quant"],
        quant_type=settings_record["quant_type"], quant_storage=torch.uint8, device="cpu",
    )
    # The AVX512-BF16 kernel silently computes in bf16; keep fp32 results unless bf16 was asked for.
    module.support_avx512bf16_for_cpu = settings_record["compute_dtype"] == "bfloat16"
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().to("cpu", torch.float32).clone(), requires_grad=False)
    return module


def quantize_model_4bit(model: nn.Module, settings, eight_bit: tuple | list = (),
                        learned_scales: Optional[dict[str, torch.Tensor]] = None) -> dict:
    """Replace the quantizable Linears of a CPU model by bitsandbytes 4-bit ones (``Int8WeightLinear`` for those
    named in ``eight_bit``; a layer in ``learned_scales`` takes its codes and block scales from those scales instead
    of its absmax, exactly as ``FakeQuant4bitLinear`` trained them); return the quantization record."""
    import bitsandbytes as bnb

    quantizable = quantizable_linear_names(model, settings.skip_modules)
    unknown = sorted(set(eight_bit) - set(quantizable))
    if unknown:
        raise ValueError(f"Layers {unknown} cannot be kept at 8 bits: they are not quantizable encoder Linears of this model.")
    quantized = [name for name in quantizable if name not in eight_bit]
    all_linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    learned_scales = learned_scales or {}
    record = {
        "method": "bitsandbytes_4bit",
        "quant_type": settings.quant_type,
        "blocksize": settings.blocksize,
        "double_quant": settings.double_quant,
        "compute_dtype": settings.compute_dtype,
        "modules": quantized,
        "modules_8bit": [name for name in quantizable if name in eight_bit],
        "learned_scales": sorted(set(learned_scales) & set(quantized)),
        "kept_full_precision": sorted(all_linear - set(quantizable)),
    }
    model.to("cpu")
    for name in record["modules_8bit"]:
        set_module(model, name, Int8WeightLinear.from_linear(model.get_submodule(name)))
    for name in record["modules"]:
        linear = model.get_submodule(name)
        module = _linear4bit(linear, record)
        weight = linear.weight.detach().to(torch.float32).contiguous().clone()
        module.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=settings.quant_type, blocksize=settings.blocksize,
            compress_statistics=settings.double_quant, quant_storage=torch.uint8, module=module,
        ).to("cpu")
        if name in learned_scales:
            _install_learned_codes(module.weight, weight, learned_scales[name], settings)
        set_module(model, name, module)
    return record


def _install_learned_codes(parameter, weight: torch.Tensor, scales: torch.Tensor, settings) -> None:
    """Overwrite a quantized Params4bit's codes and block absmax with those of ``scales`` (LSQ), in bitsandbytes'
    layout: two codes per byte, first in the high nibble; with double quantization the scales stored as 8-bit
    blockwise offsets from their mean, as ``quantize_4bit(compress_statistics=True)`` stores its absmax."""
    from bitsandbytes.functional import quantize_blockwise

    _, indices = fake_quantize_4bit_values(weight, settings.quant_type, settings.blocksize, False, scales)
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1))
    packed = (flat[0::2] << 4) | flat[1::2]
    parameter.data = packed.reshape(parameter.data.shape)
    state = parameter.quant_state
    scales = scales.detach().float().cpu()
    if settings.double_quant:
        state.offset = scales.mean()
        state.absmax, state.state2 = quantize_blockwise(scales - state.offset, blocksize=NESTED_BLOCKSIZE)
    else:
        state.absmax = scales


def _load_4bit_modules(model: nn.Module, state: dict, record: dict) -> set[str]:
    """Install prequantized bitsandbytes weights from ``state``; return the state keys consumed."""
    import bitsandbytes as bnb

    consumed = set()
    for name in record["modules"]:
        prefix = f"{name}.weight"
        stats = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(prefix + ".")}
        if prefix not in state or not stats:
            raise ValueError(f"The checkpoint lacks the 4-bit weight or quantization state of {name}; it is corrupt. Re-run its stage.")
        consumed.update(f"{prefix}.{key}" for key in stats)  # before from_prequantized, which pops from stats
        module = _linear4bit(model.get_submodule(name), record)
        module.weight = bnb.nn.Params4bit.from_prequantized(state[prefix], stats, requires_grad=False, device="cpu", module=module)
        if f"{name}.bias" in state:
            module.bias = nn.Parameter(state[f"{name}.bias"].float(), requires_grad=False)
            consumed.add(f"{name}.bias")
        set_module(model, name, module)
        consumed.add(prefix)
    return consumed


def dequantized_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float32 weight of every bitsandbytes 4-bit Linear and mixed precision's int8 ones, by module name."""
    import bitsandbytes as bnb

    return {name: module.dequantized_weight() if isinstance(module, Int8WeightLinear) else dequantize_4bit_exact(module.weight)
            for name, module in model.named_modules() if isinstance(module, (bnb.nn.Linear4bit, Int8WeightLinear))}


def dequantize_4bit_model(model: nn.Module) -> nn.Module:
    """Replace bitsandbytes 4-bit Linears (and mixed precision's int8 ones) by plain Linears holding their
    dequantized weights (no-op otherwise)."""
    for name, weight in dequantized_linear_weights(model).items():
        module = model.get_submodule(name)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias.float())
        set_module(model, name, plain)
    return model



def _load_4bit_checkpoint(model: nn.Module, state: dict, record: dict) -> tuple[nn.Module, set[str]]:
    consumed = _load_4bit_modules(model, state, record)
    for name in record.get("modules_8bit", []):  # plain buffers: copied by the loader like any other tensor
        linear = model.get_submodule(name)
        set_module(model, name, Int8WeightLinear(linear.in_features, linear.out_features, linear.bias is not None))
    return model, consumed


def _linear4bit_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit,)


register_format(QuantizedFormat("bitsandbytes_4bit", _load_4bit_checkpoint, _linear4bit_types, devices=("cpu", "cuda")))
