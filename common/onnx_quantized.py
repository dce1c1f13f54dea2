"""Rewrite an exported ONNX classifier for the compressed storage formats (``onnx_export`` writes the float graph).

- ``use_bnb4_codes``: replaces each encoder MatMul by the *trained* bitsandbytes NF4/FP4 codes of a 4-bit
  checkpoint (no re-quantization, so the codes are the ones the QKD run produced), run either by ONNX Runtime's
  ``MatMulBnb4`` contrib op (which takes bitsandbytes' block layout: blocks over the flattened ``[out, in]``
  weight, high nibble first), decoded once at session load into int8 for ``DynamicQuantizeMatMul``, or re-quantized
  to int4 blocks for ``MatMulNBits`` with int8 compute.
- ``quantize_word_embeddings``: stores the word-embedding table row-wise in int8 or int4 and dequantizes only
  the gathered rows at run time (standard ONNX ops, or ONNX Runtime's ``GatherBlockQuantized``).
- ``compress_leftovers``: the other large float weights (position table, pooler) in int8 rows, computed in float.

Weights are found in the graph by value, not by name: the TorchScript exporter renames initializers, but a
Linear's weight appears exactly (transposed) as its MatMul's constant input.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import nn

from .onnx_export import _add_opset, _drop_unused_initializers, _fingerprint, _initializers, _matmul_weights

logger = logging.getLogger(__name__)

BNB4_TYPES = {"fp4": 0, "nf4": 1}  # ONNX Runtime's MatMulBnb4 quant_type attribute

FOUR_BIT_COMPUTE = ("bnb4", "int8", "nbits")
NBITS_BLOCK = 32  # MatMulNBits block along the input dimension (ONNX Runtime's default for int4 weights)
NBITS_ACCURACY_LEVEL = 4  # MatMulNBits: activations quantized to int8 per block, int8 dot products


def use_bnb4_codes(onnx_model, quantized_model: nn.Module, dequantized_weights: dict[str, torch.Tensor],
                   compute: str = "bnb4") -> list[str]:
    """Store the trained bitsandbytes NF4/FP4 codes of every 4-bit Linear in the graph, in place of its weight.

    ``compute='bnb4'``: ONNX Runtime's ``MatMulBnb4`` runs the codes as they are (exactly the torch 4-bit model).
    ``compute='nbits'``: ONNX Runtime's ``MatMulNBits`` with int8 compute (``accuracy_level`` 4) on 4-bit weights
    that stay packed in memory. Its format is uniform int4 with one scale per ``NBITS_BLOCK`` inputs, which cannot
    hold an NF4/FP4 codebook, so the decoded 4-bit weights are re-quantized to it (symmetric, round to nearest): close
    to the trained codes, not equal to them.
    ``compute='int8'``: the file still holds only the 4-bit codes and block scales, but the graph decodes them
    (codebook lookup, times the block absmax) and quantizes the result per output channel to int8 for
    ``DynamicQuantizeMatMul``; every input of that decoding is a constant, so ONNX Runtime folds it once when the
    session loads and then runs int8 matrix products: the size of 4 bits, the speed of int8. Layers that mixed
    precision kept at 8 bits (``Int8WeightLinear``) feed their own int8 rows to the same op in this mode and stay
    float MatMuls of their int8 values in the exact ``bnb4`` graph.

    ``dequantized_weights[name]`` is the float weight that was exported for module ``name`` (how its MatMul is
    found). Raises when a quantized module has no matching MatMul: a half-quantized graph is never returned.
    """
    import bitsandbytes as bnb

    from .quantization import Int8WeightLinear

    if compute not in FOUR_BIT_COMPUTE:
        raise ValueError(f"compute={compute!r} is not supported; allowed: {', '.join(FOUR_BIT_COMPUTE)}.")
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
            nodes, initializers = _int8_rows_nodes(name, node, module)
        else:
            build = {"bnb4": _bnb4_nodes, "int8": _nf4_as_int8_nodes, "nbits": _nbits_nodes}[compute]
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


def _nf4_as_int8_nodes(name: str, node, weight, dequantized: torch.Tensor) -> tuple[list, list]:
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    state = weight.quant_state
    codes = _codes(weight)
    out_features, in_features = state.shape
    absmax_nodes, absmax_initializers, absmax = _absmax_nodes(name, state)
    count, blocksize = out_features * in_features, state.blocksize
    blocks = -(-count // blocksize)
    # per-output-channel int8 scales of the decoded 4-bit weight, computed here from the same values
    scale = np.maximum(np.abs(dequantized.numpy()).max(axis=1) / 127.0, 1e-12).astype(np.float32)
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


def _int8_rows_nodes(name: str, node, module) -> tuple[list, list]:
    """A layer that mixed precision kept at 8 bits: its own int8 row codes and scales feed DynamicQuantizeMatMul
    directly (per-output-channel symmetric int8 is that op's weight format, so nothing is re-quantized)."""
    from onnx import helper
    from onnx.numpy_helper import from_array

    p = f"{name}."
    initializers = [
        from_array(module.weight_codes.numpy().T.copy(), p + "weight_int8"),
        from_array(module.weight_scale.float().numpy().copy(), p + "scale"),
        from_array(np.zeros(module.out_features, np.int8), p + "zero_point"),
    ]
    matmul = helper.make_node("DynamicQuantizeMatMul", [node.input[0], p + "weight_int8", p + "scale", p + "zero_point"],
                              list(node.output), name=f"{name}.DynamicQuantizeMatMul", domain="com.microsoft")
    return [matmul], initializers


def gather_block(columns: int) -> Optional[int]:
    """The block ``GatherBlockQuantized`` can use for rows of ``columns`` values: the largest power of two from 16 to
    128 that divides them (the op takes no other sizes), or None."""
    return next((block for block in (128, 64, 32, 16) if columns % block == 0), None)


def quantize_word_embeddings(onnx_model, weight: torch.Tensor, bits: int, contrib_op: bool = False) -> dict:
    """Replace the Gather over the float word-embedding table by int8/int4 row codes and per-row scales.

    Only the rows of the tokens in a batch are dequantized (Gather, then unpack, Cast and Mul, standard ops that any
    runtime runs), so the float table never exists at run time. ``contrib_op`` (int4 only): one ONNX Runtime
    ``GatherBlockQuantized`` node does all of it instead; its blocks are powers of two, so each row's scale is
    repeated over the row's blocks and the codes are the same as the standard-op graph's. Returns a record of what
    was stored.
    """
    import onnx

    graph = onnx_model.graph
    initializers = _initializers(graph)
    target = _fingerprint(weight.detach().float().numpy())
    gather = next(
        (node for node in graph.node if node.op_type == "Gather" and node.input[0] in initializers
         and _fingerprint(onnx.numpy_helper.to_array(initializers[node.input[0]])) == target),
        None,
    )
    if gather is None:
        raise RuntimeError("The exported graph has no Gather over the word-embedding table; cannot quantize it.")
    return _quantize_gather(onnx_model, gather, weight.detach().float(), bits, "word_embeddings", contrib_op)


def _quantize_gather(onnx_model, gather, weight: torch.Tensor, bits: int, prefix: str, contrib_op: bool = False) -> dict:
    """Replace ``gather`` (over the table ``weight``) by row-wise int8/int4 codes dequantized after the Gather."""
    import onnx
    from onnx import TensorProto, helper

    from .quantization import quantize_rows

    graph = onnx_model.graph
    codes, scale = quantize_rows(weight, bits)
    rows, columns = weight.shape
    block = gather_block(columns) if contrib_op and bits == 4 else None
    if contrib_op and block is None:
        logger.warning("GatherBlockQuantized takes int4 rows in blocks of 16-128 values; %d-bit rows of %d values are "
                       "stored with standard ops instead.", bits, columns)
    if block is not None:
        high, low = (codes >> 4) & 0xF, codes & 0xF  # quantize_rows packs the high nibble first; the op reads low first
        packed = (high | (low << 4)).to(torch.uint8).numpy()
        scales = np.repeat(scale.numpy().reshape(-1, 1), columns // block, axis=1)
        node = helper.make_node("GatherBlockQuantized", [f"{prefix}.int4", gather.input[1], f"{prefix}.int4_scale"],
                                list(gather.output), name=f"{prefix}.GatherBlockQuantized", domain="com.microsoft",
                                gather_axis=0, quantize_axis=1, block_size=block, bits=4)
        position = list(graph.node).index(gather)
        graph.node.remove(gather)
        graph.node.insert(position, node)
        graph.initializer.extend([onnx.numpy_helper.from_array(packed, f"{prefix}.int4"),
                                  onnx.numpy_helper.from_array(scales, f"{prefix}.int4_scale")])
        _add_opset(onnx_model, "com.microsoft", 1)
        _drop_unused_initializers(graph)
        return {"method": "int4", "shape": [rows, columns], "row_wise": True, "op": "GatherBlockQuantized",
                "block_size": block}
    new_initializers = [
        onnx.numpy_helper.from_array(codes.numpy(), f"{prefix}.codes"),
        onnx.numpy_helper.from_array(scale.numpy().reshape(-1, 1), f"{prefix}.scale"),
    ]
    ids = gather.input[1]
    nodes = [helper.make_node("Gather", [f"{prefix}.codes", ids], [f"{prefix}.gathered_codes"], axis=0),
             helper.make_node("Gather", [f"{prefix}.scale", ids], [f"{prefix}.gathered_scale"], axis=0)]
    if bits == 8:
        nodes.append(helper.make_node("Cast", [f"{prefix}.gathered_codes"], [f"{prefix}.values"], to=TensorProto.FLOAT))
    else:
        # two codes per byte, high nibble first, stored with an offset of 8 (see quantization.quantize_rows)
        new_initializers += [
            onnx.numpy_helper.from_array(np.array(4, dtype=np.uint8), f"{prefix}.four"),
            onnx.numpy_helper.from_array(np.array(8.0, dtype=np.float32), f"{prefix}.offset"),
            onnx.numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{prefix}.flat_shape"),
            onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}.start"),
            onnx.numpy_helper.from_array(np.array([columns], dtype=np.int64), f"{prefix}.columns"),
            onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), f"{prefix}.last_axis"),
            onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{prefix}.unsqueeze_axis"),
        ]
        nodes += [
            helper.make_node("BitShift", [f"{prefix}.gathered_codes", f"{prefix}.four"], [f"{prefix}.high"], direction="RIGHT"),
            # low nibble = byte - (high << 4): BitwiseAnd needs opset 18, these ops exist since opset 11
            helper.make_node("BitShift", [f"{prefix}.high", f"{prefix}.four"], [f"{prefix}.high_shifted"], direction="LEFT"),
            helper.make_node("Sub", [f"{prefix}.gathered_codes", f"{prefix}.high_shifted"], [f"{prefix}.low"]),
            helper.make_node("Unsqueeze", [f"{prefix}.high", f"{prefix}.unsqueeze_axis"], [f"{prefix}.high3"]),
            helper.make_node("Unsqueeze", [f"{prefix}.low", f"{prefix}.unsqueeze_axis"], [f"{prefix}.low3"]),
            helper.make_node("Concat", [f"{prefix}.high3", f"{prefix}.low3"], [f"{prefix}.pairs"], axis=-1),
            helper.make_node("Reshape", [f"{prefix}.pairs", f"{prefix}.flat_shape"], [f"{prefix}.unpacked"]),
            helper.make_node("Slice", [f"{prefix}.unpacked", f"{prefix}.start", f"{prefix}.columns", f"{prefix}.last_axis"],
                             [f"{prefix}.unpadded"]),
            helper.make_node("Cast", [f"{prefix}.unpadded"], [f"{prefix}.shifted"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{prefix}.shifted", f"{prefix}.offset"], [f"{prefix}.values"]),
        ]
    nodes.append(helper.make_node("Mul", [f"{prefix}.values", f"{prefix}.gathered_scale"], list(gather.output)))
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    graph.initializer.extend(new_initializers)
    _drop_unused_initializers(graph)
    return {"method": f"int{bits}", "shape": [rows, columns], "row_wise": True}


LEFTOVER_MIN_ELEMENTS = 16384  # float tables and matrices at least this large are stored in int8 by compress_leftovers


def compress_leftovers(onnx_model, min_elements: int = LEFTOVER_MIN_ELEMENTS) -> dict:
    """Store the float weights a 4-bit export still holds in int8 rows: the embedding tables other than the word
    embeddings (positions) and the matrices outside the encoder (BERT's pooler). In the default run's 4-bit file they
    were 1.4 of its 5.5 MB. Tables keep their Gather (only the gathered rows are dequantized); a matrix is stored in
    per-output-channel int8 and decoded in front of its op. Weights under ``min_elements`` (the classifier, LayerNorms,
    biases) stay in float. Returns ``{"int8_rows": [names]}``."""
    import onnx

    graph = onnx_model.graph
    initializers = _initializers(graph)

    def large_float(name):
        tensor = initializers.get(name)
        return (tensor is not None and tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2
                and int(np.prod(tensor.dims)) >= min_elements)

    compressed = []
    for node in list(graph.node):
        if node.op_type == "Gather" and large_float(node.input[0]):
            table = torch.from_numpy(onnx.numpy_helper.to_array(initializers[node.input[0]]).copy())
            _quantize_gather(onnx_model, node, table, 8, _safe_prefix(node.input[0]))
            compressed.append(node.input[0])
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and large_float(node.input[1]):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gemm" and (attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0
                                           or attributes.get("beta", 1.0) != 1.0):
                continue
            name = node.input[1]
            matrix = onnx.numpy_helper.to_array(initializers[name])
            _int8_matmul(graph, node, matrix if attributes.get("transB", 0) else matrix.T, _safe_prefix(name))
            compressed.append(name)
    if compressed:
        _add_opset(onnx_model, "com.microsoft", 1)
        _drop_unused_initializers(graph)
    return {"int8_rows": compressed}


def _safe_prefix(name: str) -> str:
    return name.strip("/").replace("/", ".") + ".int8"


def _int8_matmul(graph, node, weight: np.ndarray, prefix: str) -> None:
    """Store the weight of ``node`` (a MatMul or Gemm by ``weight`` [out, in]) as per-output-channel int8, decoded by
    ``Cast`` and ``Mul`` in front of the same op (folded into a float weight when the session loads), so the compute
    stays float and the file equals torch with the same rounded weight. (ONNX Runtime fuses a ``DequantizeLinear``
    there into an int8 product with activations quantized per batch, which is not that model.)"""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    from .quantization import quantize_rows

    codes, scale = quantize_rows(torch.tensor(np.asarray(weight, dtype=np.float32)), 8)
    graph.initializer.extend([from_array(codes.numpy().T.copy(), prefix + ".weight"),
                              from_array(scale.numpy().reshape(1, -1), prefix + ".scale")])
    decode = [helper.make_node("Cast", [prefix + ".weight"], [prefix + ".as_float"], to=TensorProto.FLOAT),
              helper.make_node("Mul", [prefix + ".as_float", prefix + ".scale"], [prefix + ".decoded"])]
    if node.op_type == "Gemm":  # the decoded weight is [in, out]
        for attribute in node.attribute:
            if attribute.name == "transB":
                attribute.i = 0
    node.input[1] = prefix + ".decoded"
    position = list(graph.node).index(node)
    for offset, new_node in enumerate(decode):
        graph.node.insert(position + offset, new_node)


__all__ = ["compress_leftovers", "gather_block", "int4_blocks", "quantize_word_embeddings", "use_bnb4_codes"]
