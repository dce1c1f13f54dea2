"""Row-wise storage of the float tables and matrices an exported ONNX graph still holds (``onnx_quantized`` stores
the encoder's 4-bit Linears).

- ``quantize_word_embeddings``: the word-embedding table in int8, int4 or int2 rows (``quantization.row_codes``),
  only the gathered rows dequantized at run time (standard ONNX ops, or ONNX Runtime's ``GatherBlockQuantized`` for
  int4); int4 rows packed in planes across the row (``pack_planes``), int2 tables may keep their most frequent
  tokens' rows at int4. Ternary rows are stored five codes a byte
  (base 3, ``pack_ternary_blocks``: 1.6 bits a code where the checkpoint packs four a byte), and per-row scales in
  fp16 (``row_scales`` rounds them to fp16 values, so that is exact).
- ``compress_leftovers``: the other large float weights (position table, pooler) in int8 rows (the pooler optionally
  in int4 rows), computed in float.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .onnx_export import _add_opset, _drop_unused_initializers, _fingerprint, _initializers

logger = logging.getLogger(__name__)


def gather_block(columns: int) -> Optional[int]:
    """The block ``GatherBlockQuantized`` can use for rows of ``columns`` values: the largest power of two from 16 to
    128 that divides them (the op takes no other sizes), or None."""
    return next((block for block in (128, 64, 32, 16) if columns % block == 0), None)


def quantize_word_embeddings(onnx_model, weight: torch.Tensor, bits: int, contrib_op: bool = False,
                             int4_rows: Optional[torch.Tensor] = None) -> dict:
    """Replace the Gather over the float word-embedding table by int8/int4/int2 row codes and per-row scales.

    Only the rows of the tokens in a batch are dequantized (Gather, then unpack, Cast and Mul, standard ops that any
    runtime runs), so the float table never exists at run time. ``contrib_op`` (int4 only): one ONNX Runtime
    ``GatherBlockQuantized`` node does all of it instead; its blocks are powers of two, so each row's scale is
    repeated over the row's blocks and the codes are the same as the standard-op graph's. ``int4_rows`` (int2 only):
    the token ids whose rows are stored at int4 among the ternary rows, as the checkpoint stores them
    (``quantization.compress_embedding_state``). Returns a record of what was stored.
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
    return _quantize_gather(onnx_model, gather, weight.detach().float(), bits, "word_embeddings", contrib_op, int4_rows)


def _quantize_gather(onnx_model, gather, weight: torch.Tensor, bits: int, prefix: str, contrib_op: bool = False,
                     int4_rows: Optional[torch.Tensor] = None) -> dict:
    """Replace ``gather`` (over the table ``weight``) by row-wise int8/int4/int2 codes dequantized after the Gather."""
    import onnx
    from onnx import helper

    from .quantization import quantize_rows
    from .quantization.rows import int4_row_mask

    graph = onnx_model.graph
    rows, columns = weight.shape
    mask = int4_row_mask(rows, int4_rows, bits)
    block = gather_block(columns) if contrib_op and bits == 4 else None
    if contrib_op and block is None:
        logger.info("GatherBlockQuantized takes int4 rows in blocks of 16-128 values; %d-bit rows of %d values are "
                    "stored with standard ops instead.", bits, columns)
    ids = gather.input[1]
    if block is not None:
        codes, scale = quantize_rows(weight, bits)
        high, low = (codes >> 4) & 0xF, codes & 0xF  # quantize_rows packs the high nibble first; the op reads low first
        packed = (high | (low << 4)).to(torch.uint8).numpy()
        scales = np.repeat(scale.numpy().reshape(-1, 1), columns // block, axis=1)
        nodes = [helper.make_node("GatherBlockQuantized", [f"{prefix}.int4", ids, f"{prefix}.int4_scale"],
                                  list(gather.output), name=f"{prefix}.GatherBlockQuantized", domain="com.microsoft",
                                  gather_axis=0, quantize_axis=1, block_size=block, bits=4)]
        new_initializers = [onnx.numpy_helper.from_array(packed, f"{prefix}.int4"),
                            onnx.numpy_helper.from_array(scales, f"{prefix}.int4_scale")]
        _add_opset(onnx_model, "com.microsoft", 1)
        record = {"method": "int4", "shape": [rows, columns], "row_wise": True, "op": "GatherBlockQuantized",
                  "block_size": block}
    elif mask is None:
        nodes, new_initializers = _row_table(prefix, weight, bits, ids, gather.output[0])
        record = {"method": f"int{bits}", "shape": [rows, columns], "row_wise": True}
    else:  # every row at int4 (a tiny vocabulary): one int4 table, nothing to choose between
        nodes, new_initializers = (_row_table(prefix, weight, 4, ids, gather.output[0])
                                   if mask.all() else _mixed_rows(prefix, weight, mask, bits, ids, gather.output[0]))
        record = {"method": f"int{bits}", "shape": [rows, columns], "row_wise": True, "int4_rows": int(mask.sum())}
    if bits == 2 and (mask is None or not mask.all()):
        record["packing"] = f"{TRITS_PER_BYTE} rows a byte (base 3)"
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    graph.initializer.extend(new_initializers)
    _drop_unused_initializers(graph)
    return record


def _plane_shifts(bits: int) -> list[int]:
    """The bit offset of each plane in a byte (``pack_planes``), the first plane in the highest bits: one list that
    the packing and the ONNX decode both read, so they cannot disagree."""
    return [8 - bits * (plane + 1) for plane in range(8 // bits)]


def pack_planes(codes: torch.Tensor, bits: int) -> np.ndarray:
    """Signed ``bits``-bit codes [rows, columns] (``quantization.row_codes``) as uint8 [rows, P], P = ceil(columns /
    (8 // bits)): byte j of a row holds columns j, j + P, j + 2P, ... (offset by 2^(bits-1)), the first in the highest
    bits, the row padded with code 0. The checkpoint packs neighbouring columns into a byte; packing planes instead
    lets the ONNX decode broadcast its place values over whole planes of P bytes, not over pairs, which ONNX Runtime
    runs 3.6x faster (1.2 instead of 4.2 ms for a 32 x 64 batch of 384-value int4 rows on the AVX2 CPU)."""
    per_byte = 8 // bits
    rows, columns = codes.shape
    unsigned = torch.nn.functional.pad(codes.to(torch.int32) + 2 ** (bits - 1), (0, -columns % per_byte),
                                       value=2 ** (bits - 1))
    planes = unsigned.reshape(rows, per_byte, -1)
    shifts = torch.tensor(_plane_shifts(bits), dtype=torch.int32).reshape(1, -1, 1)
    return (planes << shifts).sum(dim=1).to(torch.uint8).numpy()


def _decode_rows(prefix: str, codes: torch.Tensor, scale: torch.Tensor, bits: int, ids: str,
                 output: str) -> tuple[list, list]:
    """Nodes and initializers that gather the rows ``ids`` of row-wise signed codes [rows, columns]
    (``quantization.row_codes``) and dequantize them into ``output``: int8 codes as they are, int4/int2 codes in
    planes (``pack_planes``)."""
    import onnx
    from onnx import TensorProto, helper

    columns = codes.shape[1]
    scale_nodes, scale_initializers = _gathered_scale(prefix, scale, ids)
    stored = codes.numpy() if bits == 8 else pack_planes(codes, bits)
    new_initializers = [onnx.numpy_helper.from_array(stored, f"{prefix}.codes"), *scale_initializers]
    nodes = [helper.make_node("Gather", [f"{prefix}.codes", ids], [f"{prefix}.gathered_codes"], axis=0), *scale_nodes]
    if bits == 8:
        nodes.append(helper.make_node("Cast", [f"{prefix}.gathered_codes"], [f"{prefix}.values"], to=TensorProto.FLOAT))
    else:  # 8 // bits planes a byte, the first in the highest bits, offset by 2^(bits-1) (pack_planes)
        place_values = np.array([[2 ** shift] for shift in _plane_shifts(bits)], dtype=np.int32)
        digit_nodes, digit_initializers = _digit_nodes(prefix, f"{prefix}.bytes", f"{prefix}.place_values", 2 ** bits,
                                                       2.0 ** (bits - 1), f"{prefix}.digits")
        new_initializers += [
            onnx.numpy_helper.from_array(place_values, f"{prefix}.place_values"), *digit_initializers,
            onnx.numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{prefix}.flat_shape"),
            onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}.start"),
            onnx.numpy_helper.from_array(np.array([columns], dtype=np.int64), f"{prefix}.columns"),
            onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), f"{prefix}.last_axis"),
            onnx.numpy_helper.from_array(np.array([-2], dtype=np.int64), f"{prefix}.unsqueeze_axis"),
        ]
        nodes += [
            helper.make_node("Unsqueeze", [f"{prefix}.gathered_codes", f"{prefix}.unsqueeze_axis"], [f"{prefix}.bytes"]),
            *digit_nodes,  # [..., per_byte, P]: plane k holds columns kP .. (k + 1)P - 1
            helper.make_node("Reshape", [f"{prefix}.digits", f"{prefix}.flat_shape"], [f"{prefix}.unpacked"]),
            helper.make_node("Slice", [f"{prefix}.unpacked", f"{prefix}.start", f"{prefix}.columns", f"{prefix}.last_axis"],
                             [f"{prefix}.values"]),
        ]
    nodes.append(helper.make_node("Mul", [f"{prefix}.values", f"{prefix}.gathered_scale"], [output]))
    return nodes, new_initializers


def _digit_nodes(prefix: str, packed: str, place_value: str, base: int, offset: float, output: str) -> tuple[list, list]:
    """Nodes and initializers that read, from the uint8 tensor ``packed``, the base-``base`` digit at ``place_value``
    (a tensor broadcast against it) minus ``offset``, as float ``output``: (byte // place value) mod base - offset, in
    int32 Div/Mul/Sub. Not BitShift: OpenVINO 2026.4 rounds uint8 right shifts with dynamic shapes (186 >> 4 gave
    12); ONNX Runtime does not."""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    new_initializers = [from_array(np.array(base, dtype=np.int32), f"{prefix}.base"),
                        from_array(np.array(offset, dtype=np.float32), f"{prefix}.offset")]
    nodes = [
        helper.make_node("Cast", [packed], [f"{prefix}.wide_bytes"], to=TensorProto.INT32),
        helper.make_node("Div", [f"{prefix}.wide_bytes", place_value], [f"{prefix}.shifted"]),
        helper.make_node("Div", [f"{prefix}.shifted", f"{prefix}.base"], [f"{prefix}.above"]),
        helper.make_node("Mul", [f"{prefix}.above", f"{prefix}.base"], [f"{prefix}.above_digits"]),
        helper.make_node("Sub", [f"{prefix}.shifted", f"{prefix}.above_digits"], [f"{prefix}.unsigned"]),
        helper.make_node("Cast", [f"{prefix}.unsigned"], [f"{prefix}.as_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{prefix}.as_float", f"{prefix}.offset"], [output]),
    ]
    return nodes, new_initializers


TRITS_PER_BYTE = 5  # 3^5 = 243 values fit a byte: 1.6 bits a ternary code instead of 2
# the place value of each row of a block in its byte, the first row the most significant (81, 27, 9, 3, 1)
TRIT_PLACE_VALUES = np.array([3 ** (TRITS_PER_BYTE - 1 - row) for row in range(TRITS_PER_BYTE)], dtype=np.int32)


def _row_table(prefix: str, weight: torch.Tensor, bits: int, ids: str, output: str) -> tuple[list, list]:
    """Nodes and initializers that store ``weight`` in ``bits``-bit rows and decode the rows ``ids`` into ``output``:
    ternary rows in base-3 blocks (``_decode_ternary_blocks``), int8 rows as they are, int4 rows in planes
    (``pack_planes``)."""
    from .quantization.rows import row_codes

    if bits == 2:
        return _decode_ternary_blocks(prefix, *row_codes(weight, 2), ids, output)
    return _decode_rows(prefix, *row_codes(weight, bits), bits, ids, output)


def pack_ternary_blocks(codes: torch.Tensor) -> np.ndarray:
    """Ternary codes [rows, columns] in {-1, 0, 1} as uint8 blocks [ceil(rows / 5), columns]: byte j of block b holds
    column j of rows 5b .. 5b + 4 as base-3 digits (code + 1), the first row the most significant. Packing down the
    rows rather than along them wastes no byte on a row whose length 5 does not divide (384 = 5 x 76 + 4)."""
    rows, columns = codes.shape
    digits = torch.nn.functional.pad(codes.to(torch.int32) + 1, (0, 0, 0, -rows % TRITS_PER_BYTE), value=1)
    blocks = digits.reshape(-1, TRITS_PER_BYTE, columns) * torch.from_numpy(TRIT_PLACE_VALUES).reshape(1, -1, 1)
    return blocks.sum(dim=1).to(torch.uint8).numpy()


def _decode_ternary_blocks(prefix: str, codes: torch.Tensor, scale: torch.Tensor, ids: str, output: str) -> tuple[list, list]:
    """Nodes and initializers that gather the rows ``ids`` of ternary codes stored by ``pack_ternary_blocks``: a
    token's block is its id // 5, its digit the id's remainder; the code is (byte // 3^(4 - remainder)) mod 3 - 1
    (``_digit_nodes``)."""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    scale_nodes, scale_initializers = _gathered_scale(prefix, scale, ids)
    digit_nodes, digit_initializers = _digit_nodes(prefix, f"{prefix}.gathered_codes", f"{prefix}.divisor", 3, 1.0,
                                                   f"{prefix}.values")
    new_initializers = [
        from_array(pack_ternary_blocks(codes), f"{prefix}.codes"), *scale_initializers, *digit_initializers,
        from_array(np.array(TRITS_PER_BYTE, dtype=np.int64), f"{prefix}.rows_per_block"),
        from_array(TRIT_PLACE_VALUES, f"{prefix}.place_values"),
        from_array(np.array([-1], dtype=np.int64), f"{prefix}.unsqueeze_axis"),
    ]
    nodes = [
        helper.make_node("Cast", [ids], [f"{prefix}.row_ids"], to=TensorProto.INT64),
        helper.make_node("Div", [f"{prefix}.row_ids", f"{prefix}.rows_per_block"], [f"{prefix}.block"]),
        helper.make_node("Mul", [f"{prefix}.block", f"{prefix}.rows_per_block"], [f"{prefix}.block_start"]),
        helper.make_node("Sub", [f"{prefix}.row_ids", f"{prefix}.block_start"], [f"{prefix}.digit"]),
        helper.make_node("Gather", [f"{prefix}.place_values", f"{prefix}.digit"], [f"{prefix}.place_value"], axis=0),
        helper.make_node("Unsqueeze", [f"{prefix}.place_value", f"{prefix}.unsqueeze_axis"], [f"{prefix}.divisor"]),
        helper.make_node("Gather", [f"{prefix}.codes", f"{prefix}.block"], [f"{prefix}.gathered_codes"], axis=0),
        *digit_nodes,
        *scale_nodes,
        helper.make_node("Mul", [f"{prefix}.values", f"{prefix}.gathered_scale"], [output]),
    ]
    return nodes, new_initializers


def _gathered_scale(prefix: str, scale: torch.Tensor, ids: str) -> tuple[list, list]:
    """The per-row scales gathered for ``ids`` as ``{prefix}.gathered_scale`` [..., 1] float, stored in fp16: half
    the bytes, and exact, since ``row_scales`` rounds every scale to an fp16 value."""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    half = scale.reshape(-1, 1).half()
    if not torch.equal(half.float(), scale.reshape(-1, 1).float()):
        raise ValueError(f"{prefix}: row scales that fp16 cannot hold exactly; quantize with quantization.row_codes.")
    return ([helper.make_node("Gather", [f"{prefix}.scale", ids], [f"{prefix}.gathered_half_scale"], axis=0),
             helper.make_node("Cast", [f"{prefix}.gathered_half_scale"], [f"{prefix}.gathered_scale"], to=TensorProto.FLOAT)],
            [from_array(half.numpy(), f"{prefix}.scale")])


def _mixed_rows(prefix: str, weight: torch.Tensor, mask: torch.Tensor, bits: int, ids: str, output: str) -> tuple[list, list]:
    """Ternary rows with the rows where ``mask`` is True at int4, stored as two tables (the others in id order) and
    the sorted int4 row ids. At run time the ids become a 0/1 row table (ScatterElements) and its running count
    (CumSum), from which each token's row in either table follows; both are gathered and decoded, and Where picks.
    Costs two tables' decode per token and one pass over the row count, no per-row index table in the file."""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    from .quantization.rows import WIDE_ROW_BITS

    rows, columns = weight.shape
    wide_ids = torch.nonzero(mask).flatten()
    p = f"{prefix}.int4_rows"
    new_initializers = [  # the ids in int16 when the table is that short (ScatterElements takes int32: one Cast)
        from_array(wide_ids.numpy().astype(np.int16 if rows <= np.iinfo(np.int16).max else np.int32), f"{p}.stored_ids"),
        from_array(np.array([rows], dtype=np.int64), f"{p}.table_rows"),
        from_array(np.array([len(wide_ids)], dtype=np.int64), f"{p}.count"),
        from_array(np.array(0, dtype=np.int64), f"{p}.zero"),
        from_array(np.array(1, dtype=np.int64), f"{p}.one"),
        from_array(np.array(-1, dtype=np.int64), f"{p}.last_axis"),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("Cast", [f"{p}.stored_ids"], [f"{p}.ids"], to=TensorProto.INT32),
        helper.make_node("ConstantOfShape", [f"{p}.table_rows"], [f"{p}.zeros"], value=zero),
        helper.make_node("ConstantOfShape", [f"{p}.count"], [f"{p}.ones"], value=one),
        helper.make_node("ScatterElements", [f"{p}.zeros", f"{p}.ids", f"{p}.ones"], [f"{p}.is_wide_row"], axis=0),
        helper.make_node("CumSum", [f"{p}.is_wide_row", f"{p}.zero"], [f"{p}.wide_rows_up_to"]),
        helper.make_node("Gather", [f"{p}.is_wide_row", ids], [f"{p}.is_wide"], axis=0),
        helper.make_node("Gather", [f"{p}.wide_rows_up_to", ids], [f"{p}.rank"], axis=0),
        # a narrow token's row among the narrow rows is its id minus the int4 rows before it; a wide token's among
        # the int4 rows is its rank minus one (the other index of each is clamped to 0 and discarded by Where)
        helper.make_node("Sub", [ids, f"{p}.rank"], [f"{p}.narrow_offset"]),
        helper.make_node("Max", [f"{p}.narrow_offset", f"{p}.zero"], [f"{p}.narrow_ids"]),
        helper.make_node("Sub", [f"{p}.rank", f"{p}.one"], [f"{p}.wide_offset"]),
        helper.make_node("Max", [f"{p}.wide_offset", f"{p}.zero"], [f"{p}.wide_ids"]),
        helper.make_node("Unsqueeze", [f"{p}.is_wide", f"{p}.last_axis"], [f"{p}.is_wide_column"]),
        helper.make_node("Cast", [f"{p}.is_wide_column"], [f"{p}.use_wide"], to=TensorProto.BOOL),
    ]
    narrow_nodes, narrow_initializers = _row_table(prefix, weight[~mask], bits, f"{p}.narrow_ids", f"{prefix}.narrow_rows")
    wide_nodes, wide_initializers = _row_table(f"{prefix}.int4", weight[mask], WIDE_ROW_BITS, f"{p}.wide_ids",
                                               f"{prefix}.wide_rows")
    nodes += narrow_nodes + wide_nodes
    nodes.append(helper.make_node("Where", [f"{p}.use_wide", f"{prefix}.wide_rows", f"{prefix}.narrow_rows"], [output]))
    return nodes, new_initializers + narrow_initializers + wide_initializers


LEFTOVER_MIN_ELEMENTS = 16384  # float tables and matrices at least this large are stored in int8 by compress_leftovers


def compress_leftovers(onnx_model, min_elements: int = LEFTOVER_MIN_ELEMENTS, matrix_bits: int = 8) -> dict:
    """Store the float weights a 4-bit export still holds in row-wise codes: the embedding tables other than the word
    embeddings (positions) in int8 rows, and the matrices outside the encoder (BERT's pooler) in int8 or, with
    ``matrix_bits`` 4, int4 rows. In the default run's 4-bit file they were 1.4 of its 5.5 MB. Tables keep their
    Gather (only the gathered rows are dequantized); a matrix is stored per output channel and decoded in front of its
    op. Weights under ``min_elements`` (the classifier, LayerNorms, biases) stay in float. Returns the names stored,
    ``{"int8_rows": [...], "int4_rows": [...]}``."""
    import onnx

    if matrix_bits not in (8, 4):
        raise ValueError(f"matrix_bits={matrix_bits} is not supported; the matrices are stored in 8 or 4 bits.")
    graph = onnx_model.graph
    initializers = _initializers(graph)

    def large_float(name):
        tensor = initializers.get(name)
        return (tensor is not None and tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2
                and int(np.prod(tensor.dims)) >= min_elements)

    compressed = {"int8_rows": [], "int4_rows": []}
    for node in list(graph.node):
        if node.op_type == "Gather" and large_float(node.input[0]):
            table = torch.from_numpy(onnx.numpy_helper.to_array(initializers[node.input[0]]).copy())
            _quantize_gather(onnx_model, node, table, 8, _safe_prefix(node.input[0]))
            compressed["int8_rows"].append(node.input[0])
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and large_float(node.input[1]):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gemm" and (attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0
                                           or attributes.get("beta", 1.0) != 1.0):
                continue
            name = node.input[1]
            matrix = onnx.numpy_helper.to_array(initializers[name])
            _row_quantized_matmul(graph, node, matrix if attributes.get("transB", 0) else matrix.T,
                                  _safe_prefix(name, matrix_bits), matrix_bits)
            compressed[f"int{matrix_bits}_rows"].append(name)
    if compressed["int8_rows"] or compressed["int4_rows"]:
        _add_opset(onnx_model, "com.microsoft", 1)
        _drop_unused_initializers(graph)
    return compressed


def _safe_prefix(name: str, bits: int = 8) -> str:
    return name.strip("/").replace("/", ".") + f".int{bits}"


def _row_quantized_matmul(graph, node, weight: np.ndarray, prefix: str, bits: int) -> None:
    """Store the weight of ``node`` (a MatMul or Gemm by ``weight`` [out, in]) as per-output-channel int8 or int4
    codes, decoded by constant ops in front of the same op (folded into a float weight when the session loads), so the
    compute stays float and the file equals torch with the same rounded weight. (ONNX Runtime fuses a
    ``DequantizeLinear`` there into an int8 product with activations quantized per batch, which is not that model.)"""
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    from .quantization.rows import row_codes

    codes, scale = row_codes(torch.tensor(np.asarray(weight, dtype=np.float32)), bits)
    if bits == 8:
        graph.initializer.extend([from_array(codes.numpy().T.copy(), prefix + ".weight"),
                                  from_array(scale.numpy().reshape(1, -1), prefix + ".scale")])
        decode = [helper.make_node("Cast", [prefix + ".weight"], [prefix + ".as_float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [prefix + ".as_float", prefix + ".scale"], [prefix + ".decoded"])]
    else:  # rows in planes: every row "gathered" at once by the embedding decode, then [out, in] turned to [in, out]
        rows, columns = weight.shape
        decode, new_initializers = _decode_rows(prefix, codes, scale, bits, prefix + ".all_rows", prefix + ".rows")
        graph.initializer.extend([*new_initializers, from_array(np.arange(rows, dtype=np.int32).reshape(1, -1), prefix + ".all_rows"),
                                  from_array(np.array([rows, columns], dtype=np.int64), prefix + ".matrix_shape")])
        decode += [helper.make_node("Reshape", [prefix + ".rows", prefix + ".matrix_shape"], [prefix + ".out_in"]),
                   helper.make_node("Transpose", [prefix + ".out_in"], [prefix + ".decoded"], perm=[1, 0])]
    if node.op_type == "Gemm":  # the decoded weight is [in, out]
        for attribute in node.attribute:
            if attribute.name == "transB":
                attribute.i = 0
    node.input[1] = prefix + ".decoded"
    position = list(graph.node).index(node)
    for offset, new_node in enumerate(decode):
        graph.node.insert(position + offset, new_node)


__all__ = ["compress_leftovers", "gather_block", "quantize_word_embeddings"]
