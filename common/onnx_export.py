"""Export a classifier to ONNX (``onnx_quantized`` rewrites the exported graph for the compressed formats).

- ``export_onnx``: torch -> ONNX with the model's real per-layer shapes baked in (pruned layers included),
  dynamic batch and sequence axes, the tokenizer's inputs and one output, ``logits``; each layer's head split is
  written as a constant (``static_head_shapes``) so ONNX Runtime's optimizer can fuse attention.
- ``write_runtime_files``: the config and tokenizer files a deployment folder needs beside the graph.
- the graph helpers the rewrites share: finding a weight's MatMul by value (the TorchScript exporter renames
  initializers, but a Linear's weight appears exactly, transposed, as its MatMul's constant input), opsets,
  dropping unused initializers, saving.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .architecture import MODEL_INPUTS, forward_input_names, position_limit

logger = logging.getLogger(__name__)

OPSET = 17
OUTPUT_NAME = "logits"


def input_names(model: nn.Module, tokenizer) -> list[str]:
    """The tokenizer outputs the model's forward accepts, in a fixed order (DistilBERT has no token types)."""
    produced = set(getattr(tokenizer, "model_input_names", MODEL_INPUTS)) | {"input_ids", "attention_mask"}
    return [name for name in forward_input_names(model) if name in produced]


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).logits


@torch.no_grad()
def export_onnx(model: nn.Module, tokenizer, path: Path, max_length: int = 64) -> list[str]:
    """Write ``model`` (a plain full-precision classifier) to ``path``; return the graph's input names."""
    model = model.to("cpu").eval()
    names = input_names(model, tokenizer)
    sample = tokenizer(["an onnx export sample", "a second, longer sample sentence for the export"],
                       padding="max_length", truncation=True, max_length=min(16, max_length), return_tensors="pt")
    inputs = tuple(sample[name] if name in sample else torch.zeros_like(sample["input_ids"]) for name in names)
    # (the wrapper is put in eval mode: the exporter restores the wrapper's mode recursively afterwards, and a
    # wrapper left in training mode would switch the model's dropout on)
    # eager attention exports to plain MatMul/Softmax, which every ONNX Runtime build and optimizer understands
    previous = getattr(model.config, "_attn_implementation", None)
    model.config._attn_implementation = "eager"
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python-level shape check and about index ops with negative indices; the
            # head indices are never negative, the axes are dynamic, and stage 12 compares the graph's logits with
            # torch's before it keeps a file, so these warnings only bury the logs of a search that exports often.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            torch.onnx.export(
                _LogitsOnly(model, names).eval(), inputs, str(path), input_names=names, output_names=[OUTPUT_NAME],
                dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
    finally:
        if previous is not None:
            model.config._attn_implementation = previous
    static_head_shapes(path)
    # the exporter drops inputs the graph never reads (DeBERTa-v3 has no token-type embeddings)
    import onnx

    graph_inputs = {item.name for item in onnx.load(str(path), load_external_data=False).graph.input}
    return [name for name in names if name in graph_inputs]


def static_head_shapes(path: Path) -> int:
    """Give every attention head split its layer's head count as a constant, in place; returns how many it rewrote.

    The exported graph splits the Q/K/V projections into heads with ``Reshape(x, Concat(batch, seq, -1, head_size))``
    (transformers writes ``view(*shape, -1, head_size)``), so ONNX Runtime's transformer optimizer cannot read a
    layer's head count and fuses no attention block, not even the unpruned teacher's. ``[0, 0, heads, head_size]``
    (0 keeps the input's dimension) is the same reshape with the count written out: the optimizer then fuses each
    layer into one ``Attention`` node with that layer's own head count, pruned or not. The count is the projection's
    output width over ``head_size``, read from its weight."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def constant(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        return numpy_helper.to_array(node.attribute[0].t) if node is not None and node.op_type == "Constant" else None

    def projection_width(name):
        node = producers.get(name)
        if node is not None and node.op_type == "Add":  # the bias of the projection
            node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
        if node is None or node.op_type != "MatMul":
            return None
        weight = next((value for value in map(constant, node.input) if value is not None and value.ndim == 2), None)
        return None if weight is None else int(weight.shape[-1])

    rewritten = 0
    for node in graph.node:
        shape = producers.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            continue
        heads, head_size = constant(shape.input[2]), constant(shape.input[3])
        width = projection_width(node.input[0])
        if heads is None or head_size is None or heads.tolist() != [-1] or width is None or width % int(head_size[0]):
            continue
        name = f"{node.name}/static_shape"
        graph.initializer.append(numpy_helper.from_array(
            np.array([0, 0, width // int(head_size[0]), int(head_size[0])], dtype=np.int64), name))
        node.input[1] = name
        rewritten += 1
    if rewritten:
        onnx.save(model, str(path))
    return rewritten


def ffn_output_matmuls(model: nn.Module) -> list[str]:
    """Names the exporter gives the FFN output projections' MatMuls: the ones whose input is the GELU output,
    whose long-tailed range suffers most from per-tensor uint8 activation quantization."""
    from .architecture import num_layers, spec_for

    spec = spec_for(model)
    layers, part = spec.layers.replace(".", "/"), spec.ffn_out.replace(".", "/")
    return [f"/model/{layers}.{index}/{part}/MatMul" for index in range(num_layers(model))]


# -- finding weights in the graph ---------------------------------------------------------------------------


def _fingerprint(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def _initializers(graph) -> dict:
    return {tensor.name: tensor for tensor in graph.initializer}


def _matmul_weights(graph) -> dict[str, tuple]:
    """fingerprint of W (torch layout [out, in]) -> (MatMul node, initializer) for MatMuls with a constant B."""
    import onnx.numpy_helper

    initializers = _initializers(graph)
    found = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            weight_t = onnx.numpy_helper.to_array(initializers[node.input[1]])
            if weight_t.ndim == 2:
                found[_fingerprint(weight_t.T)] = (node, initializers[node.input[1]])
    return found


def _add_opset(onnx_model, domain: str, version: int) -> None:
    import onnx

    if not any(opset.domain == domain for opset in onnx_model.opset_import):
        onnx_model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def compact_names(onnx_model) -> int:
    """Rename the exporter's intermediate tensors and nodes ("/model/bert/encoder/layer.0/attention/self/MatMul_output_0")
    to a few characters each: a lossless cut of 40-85 KB per 4-bit file of the default model (1.0-2.3% of them with
    ternary embeddings), at the price of readable profiles. Graph inputs, outputs and initializers keep their names.
    A graph with subgraphs is left alone (their nodes may read outer names). Returns the bytes saved."""
    import onnx

    graph = onnx_model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node for a in node.attribute):
        return 0
    before = onnx_model.ByteSize()
    kept = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    short_names = (name for name in (f"_{_base36(i)}" for i in itertools.count()) if name not in kept)
    renamed: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        for position, name in enumerate(node.input):
            node.input[position] = renamed.get(name, name)
        for position, name in enumerate(node.output):
            if name and name not in kept:
                node.output[position] = renamed.setdefault(name, next(short_names))
        node.name = f"n{_base36(index)}"
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
    return before - onnx_model.ByteSize()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = digits[number % 36]
    while number >= 36:
        number //= 36
        text = digits[number % 36] + text
    return text


def save_onnx(onnx_model, path: Path) -> None:
    """Check and save a graph as one self-contained file (our models are far below protobuf's 2 GB limit)."""
    import onnx

    onnx.checker.check_model(onnx_model)
    onnx.save_model(onnx_model, str(path))


def write_runtime_files(folder: Path, tokenizer, model_config, max_length: int) -> None:
    """What a deployment needs beside the graph: ``config.json`` (``id2label``) and the tokenizer files, with
    padding and truncation to ``max_length`` stored in ``tokenizer.json`` so that the ``tokenizers`` library alone
    encodes batches exactly as the pipeline did. The tokenizer's ``model_max_length`` is capped at the model's
    position limit, so ``truncation=True`` in transformers never makes a sequence the graph cannot take."""
    import copy

    from tokenizers import Tokenizer

    model_config.save_pretrained(folder)
    limit = position_limit(model_config.to_dict())
    if limit is not None and tokenizer.model_max_length > limit:
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its setting
        tokenizer.model_max_length = limit
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise RuntimeError(f"{type(tokenizer).__name__} wrote no tokenizer.json; ONNX folders need a fast tokenizer.")
    backend = Tokenizer.from_file(str(path))
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    backend.save(str(path))


__all__ = ["compact_names", "export_onnx", "ffn_output_matmuls", "input_names", "save_onnx", "static_head_shapes", "write_runtime_files"]

