"""Quantization, one format a file.

- ``base``: which modules are quantized, shared constants;
- ``fake``: fake 4-bit quantization and LSQ learned scales for QKD training, the per-layer 4-bit error;
- ``bnb4``: real bitsandbytes NF4/FP4 weights (quantize, load, dequantize exactly);
- ``mixed``: mixed 8/4-bit precision under a size budget;
- ``rows``: row-wise int8/int4 codes (compressed word embeddings, mixed precision's int8 Linears);
- ``int8``: the torch dynamic int8 CPU deployment model;
- ``loading``: loading a checkpoint's quantized weights through the table of registered formats.

A new format is one file that registers a ``QuantizedFormat`` plus its import below.
"""

from . import bnb4, int8  # noqa: F401  (each registers its checkpoint loader)
from .base import (
    ALWAYS_SKIPPED,
    DTYPES,
    EMBEDDING_BITS,
    NESTED_BLOCKSIZE,
    bits_per_weight,
    quantizable_linear_names,
)
from .bnb4 import (
    dequantize_4bit_exact,
    dequantize_4bit_model,
    dequantized_linear_weights,
    quantize_model_4bit,
)
from .fake import (
    FakeQuant4bitLinear,
    FakeQuant8bitLinear,
    FakeQuantEmbedding,
    block_absmax,
    codebook,
    fake_quantize_4bit,
    fake_quantize_4bit_values,
    layer_quantization_errors,
    prepare_fake_quantization,
    strip_fake_quantization,
    worst_layers,
)
from .int8 import int8_state_dict, quantize_model_int8
from .loading import (
    FORMATS,
    QuantizedFormat,
    is_movable,
    load_quantized_state,
    register_format,
)
from .mixed import check_8bit_budget, check_mixed_precision, estimated_checkpoint_bytes, plan_8bit_layers
from .rows import (
    Int8WeightLinear,
    compress_embedding_state,
    dequantize_rows,
    fake_quantize_rows,
    fake_quantize_table,
    quantize_rows,
    stored_int4_row_ids,
)

__all__ = [
    "ALWAYS_SKIPPED",
    "DTYPES",
    "EMBEDDING_BITS",
    "FORMATS",
    "FakeQuant4bitLinear",
    "FakeQuant8bitLinear",
    "FakeQuantEmbedding",
    "Int8WeightLinear",
    "NESTED_BLOCKSIZE",
    "QuantizedFormat",
    "bits_per_weight",
    "block_absmax",
    "check_8bit_budget",
    "check_mixed_precision",
    "codebook",
    "compress_embedding_state",
    "dequantize_4bit_exact",
    "dequantize_4bit_model",
    "dequantize_rows",
    "dequantized_linear_weights",
    "estimated_checkpoint_bytes",
    "fake_quantize_4bit",
    "fake_quantize_4bit_values",
    "fake_quantize_rows",
    "fake_quantize_table",
    "int8_state_dict",
    "is_movable",
    "layer_quantization_errors",
    "load_quantized_state",
    "plan_8bit_layers",
    "prepare_fake_quantization",
    "quantizable_linear_names",
    "quantize_model_4bit",
    "quantize_model_int8",
    "quantize_rows",
    "register_format",
    "stored_int4_row_ids",
    "strip_fake_quantization",
    "worst_layers",
]
