"""Rewrite an exported ONNX classifier for the compressed storage formats (``onnx_export`` writes the float graph).

- ``use_bnb4_codes``: replaces each encoder MatMul by the *trained* bitsandbytes NF4/FP4 codes of a 4-bit
  checkpoint (no re-quantization, so the codes are the ones the QKD run produced), run either by ONNX Runtime's
  ``MatMulBnb4`` contrib op (which takes bitsandbytes' block layout: blocks over the flattened ``[out, in]``
  weight, high nibble first), decoded once at session load into int8 for ``DynamicQuantizeMatMul``, or re-quantized
  to int4 blocks for ``MatMulNBits`` with int8 compute.

``onnx_rows`` stores the word-embedding table and the other large float weights row-wise.

Weights are found in the graph by value, not by name: the TorchScript exporter renames initializers, but a
Linear's weight appears exactly (transposed) as its MatMul's constant input.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import nn

from .onnx_export import _add_opset, _drop_unused_initializers, _fingerprint, _matmul_weights

logger = logging.getLogger(__name__)

BNB4_TYPES = {"fp4": 0, "nf4": 1}  # ONNX Runtime's MatMulBnb4 quant_type attribute

FOUR_BIT_COMPUTE = ("bnb4", "int8", "nbits")
NBITS_BLOCK = 32  # MatMulNBits block along the input dimension (ONNX Runtime's default for int4 weights)
NBITS_ACCURACY_LEVEL = 4  # MatMulNBits: activations quantized to int8 per block, int8 dot products


def use_bnb4_codes(onnx_model, quantized_model: nn.Module, dequantized_weights: dict[str, torch.Tensor],
                   compute: str = "bnb4", int8_weight_bits: Optional[int] = None) -> list[str]:
    """Store the trained bitsandbytes NF4/FP4 codes of every 4-bit Linear in the graph, in place of its weight.

    ``compute='bnb4'``: ONNX Runtime's ``MatMulBnb4`` runs the codes as they are (exactly the torch 4-bit model).
    ``compute='nbits'``: ONNX Runtime's ``MatMulNBits`` with int8 compute (``accuracy_level`` 4) on 4-bit weights
    that stay packed in memory. Its format is uniform int4 with one scale per ``NBITS_BLOCK`` inputs, which cannot
    hold an NF4/FP4 codebook, so the decoded 4-bit weights are re-quantized to it (symmetric, round to nearest): close
    to the trained codes, not equal to them.
    ``compute='int8'``: the file still holds only the 4-bit codes and block scales, but the graph decodes them
    (codebook lookup, times the block absmax) and quantizes the result per output channel to int8 (7-bit range on
    CPUs without VNNI or AMX, ``onnx_runtime.int8_products_saturate``) for
    ``DynamicQuantizeMatMul``; every input of that decoding is a constant, so ONNX Runtime folds it once when the
    session loads and then runs int8 matrix products: the size of 4 bits, the speed of int8. Layers that mixed
    precision kept at 8 bits (``Int8WeightLinear``) feed their own int8 rows to the same op in this mode (halved when
    ``int8_weight_bits`` is 7) and stay float MatMuls of their int8 values in the exact ``bnb4`` graph. The caller
    records the same ``int8_weight_bits`` with the file, so the record cannot disagree with the graph.

    ``dequantized_weights[name]`` is the float weight that was exported for module ``name`` (how its MatMul is
    found). Raises when a quantized module has no matching MatMul: a half-quantized graph is never returned.
    """
    import bitsandbytes as bnb

    from .onnx_runtime import int8_weight_levels
    from .onnx_runtime import int8_weight_bits as this_cpus_bits
    from .quantization import Int8WeightLinear

    if compute not in FOUR_BIT_COMPUTE:
        raise ValueError(f"compute={compute!r} is not supported; allowed: {', '.join(FOUR_BIT_COMPUTE)}.")
    levels = int8_weight_levels(this_cpus_bits() if int8_weight_bits is None else int8_weight_bits)
    graph = onnx_model.graph
    by_weight = _matmul_weights(graph)
    replaced, missing = [], []
    for name, module in quantized_model.named_modules():
        eight_bit = isinstance(module, Int8WeightLinear)
        if not isinstance(module, bnb.nn.Linear4bit) and not (eight_bit and compute != "bnb4"):
            continue  # mixed precision's 8-bit layers stay float MatMuls of their int8 values in the exact graph
        match = by_weight.get(_fingerprint(dequantized_weights[name].numpy()))
        if match is None:
            missing.append(name)
            continue
        node, _ = match
        if eight_bit:
            nodes, initializers = _int8_rows_nodes(name, node, module, levels)
        elif compute == "int8":
            nodes, initializers = _nf4_as_int8_nodes(name, node, module.weight, dequantized_weights[name], levels)
        else:
            build = {"bnb4": _bnb4_nodes, "nbits": _nbits_nodes}[compute]
            nodes, initializers = build(name, node, module.weight, dequantized_weights[name])
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new_node in enumerate(nodes):
            graph.node.insert(position + offset, new_node)
        known = {tensor.name for tensor in graph.initializer}
        graph.initializer.extend(tensor for tensor in initializers if tensor.name not in known)  # shared codebooks once
        replaced.append(name)
    if missing:
        raise RuntimeError(f"No MatMul in the exported graph holds the weight of {missing}; the 4-bit export is incomplete.")
    if compute != "bnb4":
        _fold_bias_adds(graph)
    _add_opset(onnx_model, "com.microsoft", 1)
    _drop_unused_initializers(graph)
    return replaced


BIAS_INPUT = {"DynamicQuantizeMatMul": 4, "MatMulNBits": 5}  # where each op takes an optional bias


def _fold_bias_adds(graph) -> None:
    """Move each ``Add(DynamicQuantizeMatMul(x), bias)`` (or ``MatMulNBits``) into the op's own bias input: one pass
    over the output instead of two (the separate Adds took about a tenth of the int8 model's time)."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in [n for n in graph.node if n.op_type in BIAS_INPUT and len(n.input) <= BIAS_INPUT[n.op_type]]:
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = next((name for name in add.input if name != node.output[0] and name in initializers
                     and len(initializers[name].dims) == 1), None)
        if bias is None:
            continue
        node.input.extend([""] * (BIAS_INPUT[node.op_type] - len(node.input)))  # skipped optional inputs
        node.input.append(bias)
        node.output[0] = add.output[0]
        graph.node.remove(add)


def _codes(weight) -> np.ndarray:
    """The packed codes in bitsandbytes' layout: flattened [out, in], high nibble first."""
    return weight.data.reshape(-1).view(torch.uint8).numpy().copy()


def _absmax_nodes(name: str, state) -> tuple[list, list, str]:
    """Nodes and initializers that give the float32 block absmax of a 4-bit weight, and the tensor's name.
    Double-quantized absmax (the project's default) is stored as trained: 8-bit codes, the 256-value codebook (named
    by content: one copy for all layers), a float scale per 256 blocks and the offset, decoded by constant ops
    (``codebook[code] * scale + offset``, bitsandbytes' ``dequantize_blockwise``) that ONNX Runtime folds at load:
    the same values bit for bit in a quarter of float32's bytes (the default run's file: 5.27 -> 5.13 MB)."""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    p = f"{name}.absmax"
    if not state.nested:
        return [], [from_array(state.absmax.float().numpy().copy(), p)], p
    nested = state.state2
    codes = state.absmax.numpy().copy()
    blocks, blocksize = codes.size, nested.blocksize
    codebook = nested.code.float().cpu().numpy().copy()
    codebook_name = f"bnb4.absmax_codebook.{_fingerprint(codebook)[:12]}"
    initializers = [
        from_array(codes, p + ".codes"), from_array(codebook, codebook_name),
        from_array(nested.absmax.float().numpy().reshape(-1, 1).copy(), p + ".scale"),
        from_array(np.array(float(state.offset), np.float32), p + ".offset"),
        from_array(np.array([0, (-blocks) % blocksize], np.int64), p + ".pad"),
        from_array(np.array([-1, blocksize], np.int64), p + ".groups"), from_array(np.array([-1], np.int64), p + ".flat"),
        from_array(np.array([0], np.int64), p + ".start"), from_array(np.array([blocks], np.int64), p + ".count"),
    ]
    nodes = [
        helper.make_node("Cast", [p + ".codes"], [p + ".indices"], to=TensorProto.INT32),
        helper.make_node("Gather", [codebook_name, p + ".indices"], [p + ".values"], axis=0),
        helper.make_node("Pad", [p + ".values", p + ".pad"], [p + ".values_padded"]),
        helper.make_node("Reshape", [p + ".values_padded", p + ".groups"], [p + ".grouped"]),
        helper.make_node("Mul", [p + ".grouped", p + ".scale"], [p + ".scaled"]),
        helper.make_node("Reshape", [p + ".scaled", p + ".flat"], [p + ".scaled_flat"]),
        helper.make_node("Slice", [p + ".scaled_flat", p + ".start", p + ".count"], [p + ".unpadded"]),
        helper.make_node("Add", [p + ".unpadded", p + ".offset"], [p]),
    ]
    return nodes, initializers, p


def _bnb4_nodes(name: str, node, weight, _dequantized) -> tuple[list, list]:
    import onnx

    state = weight.quant_state
    out_features, in_features = state.shape
    nodes, initializers, absmax = _absmax_nodes(name, state)
    initializers.append(onnx.numpy_helper.from_array(_codes(weight), f"{name}.codes"))
    matmul = onnx.helper.make_node(
        "MatMulBnb4", [node.input[0], f"{name}.codes", absmax], list(node.output), name=f"{name}.MatMulBnb4",
        domain="com.microsoft", K=in_features, N=out_features, block_size=state.blocksize,
        quant_type=BNB4_TYPES[state.quant_type],
    )
    return [*nodes, matmul], initializers


def _nf4_as_int8_nodes(name: str, node, weight, dequantized: torch.Tensor, levels: int) -> tuple[list, list]:
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    state = weight.quant_state
    codes = _codes(weight)
    out_features, in_features = state.shape
    absmax_nodes, absmax_initializers, absmax = _absmax_nodes(name, state)
    count, blocksize = out_features * in_features, state.blocksize
    blocks = -(-count // blocksize)
    # per-output-channel int8 scales of the decoded 4-bit weight, computed here from the same values
    scale = np.maximum(np.abs(dequantized.numpy()).max(axis=1) / float(levels), 1e-12).astype(np.float32)
    p = f"{name}."
    initializers = [
        *absmax_initializers, from_array(codes, p + "codes"), from_array(np.array([-1, 1], np.int64), p + "column"),
        from_array(state.code.float().cpu().numpy(), p + "codebook"), from_array(np.array(4, np.uint8), p + "four"),
        from_array(np.array([-1], np.int64), p + "flat"), from_array(np.array([0], np.int64), p + "start"),
        from_array(np.array([count], np.int64), p + "count"), from_array(np.array([0, blocks * blocksize - count], np.int64), p + "pad"),
        from_array(np.array([blocks, blocksize], np.int64), p + "blocks"),
        from_array(np.array([out_features, in_features], np.int64), p + "shape"),
        from_array(scale, p + "scale"), from_array(np.zeros(out_features, np.int8), p + "zero_point"),
    ]
    nodes = [
        *absmax_nodes, helper.make_node("Reshape", [absmax, p + "column"], [p + "absmax_column"]),
        helper.make_node("BitShift", [p + "codes", p + "four"], [p + "high"], direction="RIGHT"),
        helper.make_node("BitShift", [p + "high", p + "four"], [p + "high_shifted"], direction="LEFT"),
        helper.make_node("Sub", [p + "codes", p + "high_shifted"], [p + "low"]),
        helper.make_node("Unsqueeze", [p + "high", p + "flat"], [p + "high2"]),
        helper.make_node("Unsqueeze", [p + "low", p + "flat"], [p + "low2"]),
        helper.make_node("Concat", [p + "high2", p + "low2"], [p + "pairs"], axis=-1),
        helper.make_node("Reshape", [p + "pairs", p + "flat"], [p + "indices8"]),
        helper.make_node("Cast", [p + "indices8"], [p + "indices"], to=TensorProto.INT32),
        helper.make_node("Gather", [p + "codebook", p + "indices"], [p + "values"], axis=0),
        helper.make_node("Slice", [p + "values", p + "start", p + "count"], [p + "values_n"]),
        helper.make_node("Pad", [p + "values_n", p + "pad"], [p + "values_padded"]),
        helper.make_node("Reshape", [p + "values_padded", p + "blocks"], [p + "block_values"]),
        helper.make_node("Mul", [p + "block_values", p + "absmax_column"], [p + "scaled"]),
        helper.make_node("Reshape", [p + "scaled", p + "flat"], [p + "scaled_flat"]),
        helper.make_node("Slice", [p + "scaled_flat", p + "start", p + "count"], [p + "weight_flat"]),
        helper.make_node("Reshape", [p + "weight_flat", p + "shape"], [p + "weight"]),
        helper.make_node("Transpose", [p + "weight"], [p + "weight_t"], perm=[1, 0]),
        helper.make_node("QuantizeLinear", [p + "weight_t", p + "scale", p + "zero_point"], [p + "weight_int8"], axis=1),
        helper.make_node("DynamicQuantizeMatMul", [node.input[0], p + "weight_int8", p + "scale", p + "zero_point"],
                         list(node.output), name=f"{name}.DynamicQuantizeMatMul", domain="com.microsoft"),
    ]
    return nodes, initializers


def int4_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int4 of ``weight`` [out, in] with one scale per ``block`` inputs of each output (the input padded with
    zeros to whole blocks), in ``MatMulNBits``' layout: codes + 8 packed two per byte, low nibble first, as
    [out, blocks, block / 2] uint8; scales [out, blocks] float32. Also returns the weight the codes stand for."""
    out_features, in_features = weight.shape
    blocks = -(-in_features // block)
    padded = np.zeros((out_features, blocks * block), np.float32)
    padded[:, :in_features] = weight
    grouped = padded.reshape(out_features, blocks, block)
    scales = np.maximum(np.abs(grouped).max(axis=-1) / 7.0, 1e-12).astype(np.float32)
    codes = np.clip(np.round(grouped / scales[..., None]), -7, 7).astype(np.int8)
    unsigned = (codes + 8).astype(np.uint8)
    packed = (unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)).astype(np.uint8)
    represented = (codes.astype(np.float32) * scales[..., None]).reshape(out_features, -1)[:, :in_features]
    return packed, scales, represented


def _nbits_nodes(name: str, node, _weight, dequantized: torch.Tensor) -> tuple[list, list]:
    from onnx import helper
    from onnx.numpy_helper import from_array

    out_features, in_features = dequantized.shape
    packed, scales, _ = int4_blocks(dequantized.numpy(), NBITS_BLOCK)
    p = f"{name}."
    initializers = [from_array(packed, p + "int4"), from_array(scales.reshape(-1), p + "int4_scale")]
    matmul = helper.make_node(
        "MatMulNBits", [node.input[0], p + "int4", p + "int4_scale"], list(node.output), name=f"{name}.MatMulNBits",
        domain="com.microsoft", K=in_features, N=out_features, bits=4, block_size=NBITS_BLOCK,
        accuracy_level=NBITS_ACCURACY_LEVEL,
    )
    return [matmul], initializers


def _int8_rows_nodes(name: str, node, module, levels: int) -> tuple[list, list]:
    """A layer that mixed precision kept at 8 bits: its own int8 row codes and scales feed DynamicQuantizeMatMul
    directly (per-output-channel symmetric int8 is that op's weight format, so nothing is re-quantized), except for
    7-bit weights (``levels`` 63, where this CPU's int8 products saturate): there the codes are halved and the scales
    doubled, as every other int8 weight there is stored in 7 bits."""
    from onnx import helper
    from onnx.numpy_helper import from_array

    codes, scale = module.weight_codes.numpy().T.copy(), module.weight_scale.float().numpy().copy()
    if levels < 127:
        codes, scale = np.clip(np.round(codes / 2.0), -64, 64).astype(np.int8), scale * 2.0  # int8 halved
    p = f"{name}."
    initializers = [
        from_array(codes, p + "weight_int8"),
        from_array(scale, p + "scale"),
        from_array(np.zeros(module.out_features, np.int8), p + "zero_point"),
    ]
    matmul = helper.make_node("DynamicQuantizeMatMul", [node.input[0], p + "weight_int8", p + "scale", p + "zero_point"],
                              list(node.output), name=f"{name}.DynamicQuantizeMatMul", domain="com.microsoft")
    return [matmul], initializers


__all__ = ["int4_blocks", "use_bnb4_codes"]
