"""What every quantized format shares: which modules are quantized, the compute dtypes, the row-code widths.

Every ``nn.Linear`` inside the encoder layers is quantized; embeddings, LayerNorms, the pooler and the classifier stay
in full precision (bitsandbytes cannot quantize the small classifier of a pruned model, and the head is where 4-bit
error hurts most), unless ``skip_modules`` adds more to skip.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architecture import encoder_prefix

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ALWAYS_SKIPPED = ("classifier", "pre_classifier", "pooler")


NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for double-quantized absmax


EMBEDDING_BITS = {"int8": 8, "int4": 4, "int2": 2}


def quantizable_linear_names(model: nn.Module, skip_modules: tuple | list = ()) -> list[str]:
    """Names of the encoder's ``nn.Linear`` modules, minus any whose name contains a ``skip_modules`` entry."""
    prefix = encoder_prefix(model)
    skipped = tuple(skip_modules) + ALWAYS_SKIPPED
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix) and not any(s in name for s in skipped)
    ]


def bits_per_weight(blocksize: int, double_quant: bool) -> float:
    """Storage cost of one 4-bit weight including its absmax scale."""
    return 4 + (8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE) if double_quant else 32 / blocksize)

