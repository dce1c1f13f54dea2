"""ONNX export and ONNX Runtime quantization on tiny pruned models: exactness, calibrators, 4-bit codes,
compressed embeddings, and folders that run without this project (no torch, no ``common``)."""

import copy
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from common.config import PruningConfig, PTQConfig
from common.onnx_export import _fingerprint, export_onnx, ffn_output_matmuls, save_onnx, write_runtime_files
from common.onnx_quantized import int4_blocks, use_bnb4_codes
from common.onnx_rows import pack_planes, pack_ternary_blocks, quantize_word_embeddings
from common.onnx_runtime import (
    CALIBRATION_METHODS,
    OnnxClassifier,
    calibrated_ranges,
    calibration_batches,
    entropy_threshold,
    matmul_names,
    preprocess_for_static,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from common.pruning import StructuralPruner
from common.quantization import (
    dequantize_4bit_model,
    dequantized_linear_weights,
    fake_quantize_rows,
    fake_quantize_table,
    quantize_model_4bit,
)
from common.quantization.rows import int4_row_mask
from conftest import NEGATIVE, NEUTRAL, POSITIVE, PROJECT_ROOT, tiny_bert_config, tiny_distilbert_config, tiny_model

TEXTS = ["great film and fun story", "dull boring plot", "the actor was charming", "a movie", "weak script and flat ending",
         "superb moving brilliant film and the ending was warm"]


def pruned_model(config, head_sparsity=0.5, ffn_sparsity=0.4):
    """A tiny model with uneven layers: global (MSP) ranking of L2 scores removes different counts per layer."""
    model = tiny_model(config)
    with torch.no_grad():  # make layer 0 matter more so the global ranking prunes the layers unevenly
        for name, parameter in model.named_parameters():
            if ".0." in name and parameter.dim() == 2:
                parameter.mul_(3.0)
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", head_final_sparsity=head_sparsity,
                                                   ffn_final_sparsity=ffn_sparsity, importance_normalization="global"))
    pruner.compute_importance_and_prune(head_sparsity, ffn_sparsity)
    record = pruner.prune_physically()
    assert len(set(record["heads_per_layer"])) > 1 or len(set(record["ffn_width_per_layer"])) > 1, record
    return model.eval()


def torch_logits(model, tokenizer, texts, names):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**{k: batch[k] for k in names}).logits.numpy(), batch


@pytest.mark.parametrize("make_config", [lambda: tiny_bert_config(layers=3, hidden=64, heads=4, ffn=128),
                                         lambda: tiny_distilbert_config(layers=3, dim=64, heads=4, ffn=128)],
                         ids=["bert", "distilbert"])
def test_export_round_trip_of_uneven_pruned_layers(make_config, tokenizer, tmp_path):
    model = pruned_model(make_config())
    names = export_onnx(model, tokenizer, tmp_path / "model.onnx")
    assert names == (["input_ids", "attention_mask", "token_type_ids"] if model.config.model_type == "bert"
                     else ["input_ids", "attention_mask"])
    assert set(ffn_output_matmuls(model)) <= set(matmul_names(tmp_path / "model.onnx"))
    session = OnnxClassifier(tmp_path / "model.onnx")
    for texts in (TEXTS[:1], TEXTS, TEXTS[2:5]):  # batch and sequence lengths other than the export sample's
        expected, batch = torch_logits(model, tokenizer, texts, names)
        np.testing.assert_allclose(session.logits(batch), expected, atol=1e-5, rtol=0)
    assert model.training is False, "the export must leave the model in eval mode (dropout off)"


def test_export_and_quantizer_keep_their_known_harmless_warnings_out_of_the_logs(tokenizer, tmp_path, caplog):
    """A search exports and quantizes every candidate: the tracer's shape-check warnings and ONNX Runtime's advice to
    pre-process drowned its log. Those are dropped; any other warning still reaches the user."""
    import logging
    import warnings

    from common.onnx_runtime import _quiet_quantizer

    model = pruned_model(tiny_bert_config(layers=2, hidden=64, heads=4, ffn=128))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tokenizer, tmp_path / "model.onnx")
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], [str(w.message) for w in caught]
    with caplog.at_level(logging.WARNING):
        quantize_dynamic_int8(tmp_path / "model.onnx", tmp_path / "int8.onnx")
        with _quiet_quantizer():
            logging.warning("an unrelated warning")
            with _quiet_quantizer():
                pass
            logging.warning("Please consider to run pre-processing before quantization (after a nested use)")
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "pre-processing" in m] and "an unrelated warning" in messages, messages
    assert logging.getLogger().filters == [], "the filter is removed again after quantizing"


def graph_ops(path):
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_dynamic_and_static_int8_with_every_calibrator(tokenizer, tmp_path):
    model = pruned_model(tiny_bert_config(layers=2, hidden=64, heads=4, ffn=128))
    names = export_onnx(model, tokenizer, tmp_path / "model.onnx")
    expected, batch = torch_logits(model, tokenizer, TEXTS, names)
    scale = np.abs(expected).max()
    quantize_dynamic_int8(tmp_path / "model.onnx", tmp_path / "dynamic.onnx")
    assert "MatMulInteger" in graph_ops(tmp_path / "dynamic.onnx") or "DynamicQuantizeMatMul" in graph_ops(tmp_path / "dynamic.onnx")
    assert np.abs(OnnxClassifier(tmp_path / "dynamic.onnx").logits(batch) - expected).max() < 0.1 * scale

    calibration = [" ".join(words) for words in zip(POSITIVE, NEGATIVE, NEUTRAL)] * 8
    batches = calibration_batches(tokenizer, calibration, None, names, max_length=16, batch_size=8, limit=64)
    assert {tuple(b["input_ids"].shape) for b in batches} == {(8, 16)}, "calibration batches share one fixed shape"
    preprocess_for_static(tmp_path / "model.onnx", tmp_path / "pre.onnx")
    constant_matmuls = sum(op == "MatMul" for op in graph_ops(tmp_path / "model.onnx")) - 2 * 2  # 2 attention MatMuls a layer
    scales = {}
    for method in CALIBRATION_METHODS:
        target = tmp_path / f"static_{method}.onnx"
        details = quantize_static_int8(tmp_path / "pre.onnx", target, batches, method, scratch=tmp_path)
        assert details["calibration"] == method and details["quantized_matmuls"] == constant_matmuls
        graph = onnx.load(str(target)).graph
        producers = {output: node.op_type for node in graph.node for output in node.output}
        matmuls = [node for node in graph.node if node.op_type == "MatMul"]
        fed_by_qdq = [node for node in matmuls if all(producers.get(name) == "DequantizeLinear" for name in node.input)]
        float_only = [node for node in matmuls if not any(producers.get(name) == "DequantizeLinear" for name in node.input)]
        assert len(fed_by_qdq) == constant_matmuls  # every weight MatMul runs in int8 ...
        assert len(float_only) == 2 * 2  # ... and the attention-score MatMuls of two activations stay in float
        logits = OnnxClassifier(target).logits(batch)
        assert np.abs(logits - expected).max() < 0.1 * scale, method
        scales[method] = sorted(float(onnx.numpy_helper.to_array(t).max()) for t in graph.initializer if t.name.endswith("_scale"))
        if method != "minmax":  # stage 12 calibrates once and quantizes both of its variants with those ranges
            ranges = calibrated_ranges(tmp_path / "pre.onnx", batches, method, 99.999, tmp_path)
            given = copy.deepcopy(ranges)
            quantize_static_int8(tmp_path / "pre.onnx", tmp_path / "shared.onnx", batches, method, ranges=ranges)
            assert ranges == given, "the shared ranges are not edited for the next variant"
            shared = onnx.load(str(tmp_path / "shared.onnx")).graph
            assert sorted(float(onnx.numpy_helper.to_array(t).max()) for t in shared.initializer
                          if t.name.endswith("_scale")) == scales[method]
    assert scales["entropy"] != scales["minmax"] and scales["percentile"] != scales["minmax"], "each calibrator sets its own ranges"
    kept = quantize_static_int8(tmp_path / "pre.onnx", tmp_path / "partial.onnx", batches, "minmax", keep_float=ffn_output_matmuls(model))
    assert kept["quantized_matmuls"] == constant_matmuls - 2 and kept["kept_float"] == sorted(ffn_output_matmuls(model))


def int8_weight_range(path):
    """The smallest and largest code over the graph's int8 weight initializers."""
    codes = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 2]
    assert codes, "no int8 weight matrix in the graph"
    return min(int(c.min()) for c in codes), max(int(c.max()) for c in codes)


def test_int8_weights_take_the_7_bit_range_where_the_cpus_int8_products_saturate(tokenizer, tmp_path, monkeypatch, caplog):
    import common.evaluation as evaluation
    import common.onnx_runtime as onnx_runtime

    model = pruned_model(tiny_bert_config(layers=2, hidden=64, heads=4, ffn=128))
    names = export_onnx(model, tokenizer, tmp_path / "model.onnx")
    expected, batch = torch_logits(model, tokenizer, TEXTS, names)
    full = quantize_dynamic_int8(tmp_path / "model.onnx", tmp_path / "full.onnx", reduce_range=False)
    reduced = quantize_dynamic_int8(tmp_path / "model.onnx", tmp_path / "reduced.onnx", reduce_range=True)
    assert int8_weight_range(tmp_path / "full.onnx") == (-127, 127)  # symmetric per channel: each row reaches 127
    low, high = int8_weight_range(tmp_path / "reduced.onnx")
    assert -64 <= low and high <= 64 and high >= 63, (low, high)
    assert not full["reduce_range"] and reduced["reduce_range"] and "7-bit weight range" in reduced["weights"]
    assert np.abs(OnnxClassifier(tmp_path / "reduced.onnx").logits(batch) - expected).max() < 0.1 * np.abs(expected).max()

    def cpu(flags, machine="x86_64"):
        monkeypatch.setattr("platform.machine", lambda: machine)
        acceleration = "AMX" if "amx_int8" in flags else "VNNI" if {"avx512_vnni", "avx_vnni"} & set(flags) else "none (no VNNI/AMX)"
        monkeypatch.setattr(evaluation, "cpu_info", lambda: {"int8_acceleration": acceleration})
        return onnx_runtime.int8_products_saturate()

    assert cpu(["avx2"]) and cpu([]) and not cpu(["avx2", "avx512_vnni"]) and not cpu(["avx2", "avx_vnni"])
    assert not cpu(["amx_int8"]) and not cpu([], machine="aarch64")
    assert onnx_runtime.int8_weight_bits() == 8 and cpu(["avx2"]) and onnx_runtime.int8_weight_bits() == 7
    assert [onnx_runtime.int8_weight_levels(bits) for bits in (7, 8)] == [63, 127]
    cpu(["avx2"])  # the default follows the CPU: a saturating one gets 7-bit weights in both quantizers
    assert quantize_dynamic_int8(tmp_path / "model.onnx", tmp_path / "auto.onnx")["reduce_range"]
    assert int8_weight_range(tmp_path / "auto.onnx") == (low, high)
    preprocess_for_static(tmp_path / "model.onnx", tmp_path / "pre.onnx")
    batches = calibration_batches(tokenizer, TEXTS * 4, None, names, max_length=16, batch_size=8, limit=24)
    static = quantize_static_int8(tmp_path / "pre.onnx", tmp_path / "static.onnx", batches, "minmax", scratch=tmp_path)
    assert static["reduce_range"] and "7-bit weight range" in static["weights"]
    assert max(map(abs, int8_weight_range(tmp_path / "static.onnx"))) <= 64
    cpu(["avx2", "avx512_vnni"])
    assert not quantize_dynamic_int8(tmp_path / "model.onnx", tmp_path / "vnni.onnx")["reduce_range"]
    assert int8_weight_range(tmp_path / "vnni.onnx") == (-127, 127)

    # a file written with full-range weights (on a VNNI CPU) and opened where the products saturate: a warning that
    # names the file and the fix, from the record's int8_weight_bits; none for 7-bit files or on a VNNI CPU
    import logging

    from common.runtime import open_onnx_file

    write_runtime_files(tmp_path, tokenizer, model.config, 16)
    files = {"vnni.onnx": {"int8_weight_bits": 8}, "auto.onnx": {"int8_weight_bits": 7}}
    (tmp_path / "compression.json").write_text(json.dumps({"stage": "onnx", "files": files}))

    def warnings_opening(name):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="common.runtime"):
            assert open_onnx_file(tmp_path, name).logits_for(batch).shape == expected.shape
        return [r.getMessage() for r in caplog.records if r.name == "common.runtime"]

    cpu(["avx2"])
    [warning] = warnings_opening("vnni.onnx")
    assert str(tmp_path / "vnni.onnx") in warning and "full 8-bit range" in warning and "12_export_onnx.py" in warning
    assert warnings_opening("auto.onnx") == [] and warnings_opening("model.onnx") == []
    # where the record does not say (an unreadable entry, a file recorded before int8_weight_bits, one the user put
    # there), the graph's own int8 weights decide: codes beyond -64..64 are the full range
    assert [onnx_runtime.int8_weight_bits_in_graph(tmp_path / name) for name in ("vnni.onnx", "reduced.onnx", "model.onnx")] \
        == [8, 7, None]
    for damaged in ({"vnni.onnx": "8 bits"}, ["vnni.onnx"], "files", {}):
        (tmp_path / "compression.json").write_text(json.dumps({"stage": "onnx", "files": damaged}))
        [warning] = warnings_opening("vnni.onnx")
        assert "full 8-bit range (its graph's int8 weights reach beyond the 7-bit range)" in warning, damaged
        assert warnings_opening("reduced.onnx") == [] and warnings_opening("model.onnx") == [], damaged
    (tmp_path / "compression.json").write_text(json.dumps({"stage": "onnx", "files": {"vnni.onnx": {"int8_weight_bits": 7}}}))
    assert warnings_opening("vnni.onnx") == [], "the record, where it says, wins over the graph"
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    assert onnx_runtime.saturation_warning(tmp_path / "garbage.onnx", None) is None, "loading it says what is wrong"
    assert onnx_runtime.saturation_warning(tmp_path / "missing.onnx", {}) is None
    (tmp_path / "compression.json").write_text(json.dumps({"stage": "onnx", "files": files}))
    cpu(["avx2", "avx512_vnni"])
    assert warnings_opening("vnni.onnx") == []


@pytest.mark.parametrize("shape", ["heavy_tails", "skewed", "relu", "gaps"])
def test_entropy_threshold_equals_onnx_runtimes_own(shape):
    """The numpy sums give ONNX Runtime's range exactly (its KL search sums bins one by one in Python)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(0)
    values = {"heavy_tails": rng.standard_t(3, 20_000),
              "skewed": np.concatenate([rng.exponential(1.0, 20_000), -rng.exponential(0.1, 2_000)]),
              "relu": np.maximum(rng.normal(size=20_000), 0),
              "gaps": np.concatenate([rng.normal(-5, 0.1, 5_000), rng.normal(3, 0.5, 5_000), [40.0]])}[shape].astype(np.float32)
    threshold = float(np.abs(values).max())
    counts, edges = np.histogram(values, 512, range=(-threshold, threshold))
    histogram = (counts, edges, values.min(), values.max(), threshold)
    collector = HistogramCollector("entropy", True, 512, 64, 99.999, None)
    expected = collector.get_entropy_threshold(histogram, 64)
    low, high = entropy_threshold(histogram, 64)
    assert (low, high) == expected and low.dtype == high.dtype == np.float32
    assert values.min() <= low < high <= values.max()


def test_unknown_calibrator_is_refused(tmp_path):
    with pytest.raises(ValueError, match="calibration method 'kl'.*minmax, percentile, entropy"):
        quantize_static_int8(tmp_path / "a.onnx", tmp_path / "b.onnx", [], "kl")


def four_bit_export(model, tokenizer, tmp_path):
    """``model`` in bitsandbytes NF4 (blocks of 64, double quantization), its dequantized float twin exported to
    ONNX: (quantized, {module: dequantized weight}, float twin, graph input names, the loaded float graph)."""
    quantized = copy.deepcopy(model)
    quantize_model_4bit(quantized, PTQConfig(blocksize=64, double_quant=True))
    weights = dequantized_linear_weights(quantized)
    plain = dequantize_4bit_model(copy.deepcopy(quantized))
    names = export_onnx(plain, tokenizer, tmp_path / "plain.onnx")
    return quantized, weights, plain, names, onnx.load(str(tmp_path / "plain.onnx"))


def test_bnb4_export_runs_the_trained_codes(tokenizer, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    model = pruned_model(tiny_bert_config(layers=2, hidden=128, heads=4, ffn=256))
    quantized, weights, plain, names, exported = four_bit_export(model, tokenizer, tmp_path)
    assert set(weights) == {n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    replaced = use_bnb4_codes(exported, quantized, weights)
    assert sorted(replaced) == sorted(weights)
    graph = exported.graph
    initializers = {tensor.name for tensor in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "MatMulBnb4"]
    assert len(nodes) == len(weights)
    assert not any(node.op_type == "MatMul" and node.input[1] in initializers for node in graph.node)
    codes = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    first = quantized.get_submodule(replaced[0])
    stored = codes[next(n for n in nodes if n.name.startswith(replaced[0] + ".")).input[1]]
    np.testing.assert_array_equal(stored, first.weight.data.reshape(-1).view(torch.uint8).numpy())
    int8_compute = onnx.load(str(tmp_path / "plain.onnx"))
    use_bnb4_codes(int8_compute, quantized, weights, compute="int8")
    save_onnx(int8_compute, tmp_path / "nf4_int8.onnx")
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in int8_compute.graph.initializer}
    np.testing.assert_array_equal(stored[f"{replaced[0]}.codes"], first.weight.data.reshape(-1).view(torch.uint8).numpy())
    float_weights = {_fingerprint(w.numpy()) for w in weights.values()} | {_fingerprint(w.numpy().T) for w in weights.values()}
    assert not any(_fingerprint(onnx.numpy_helper.to_array(t)) in float_weights for t in int8_compute.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT), "only the 4-bit codes of the encoder weights are stored"
    expected, batch = torch_logits(quantized, tokenizer, TEXTS, names)
    int8_logits = OnnxClassifier(tmp_path / "nf4_int8.onnx").logits(batch)
    assert np.abs(int8_logits - expected).max() < 0.05 * np.abs(expected).max()
    import common.onnx_runtime as onnx_runtime

    row_absmax = np.abs(weights[replaced[0]].numpy()).max(axis=1)
    for bits, levels in ((7, 63.0), (8, 127.0), (None, 63.0), (None, 127.0)):  # None: the range this CPU needs
        monkeypatch.setattr(onnx_runtime, "int8_products_saturate", lambda levels=levels: levels == 63.0)
        decoded = onnx.load(str(tmp_path / "plain.onnx"))
        use_bnb4_codes(decoded, quantized, weights, compute="int8", int8_weight_bits=bits)
        scale = {t.name: onnx.numpy_helper.to_array(t) for t in decoded.graph.initializer}[f"{replaced[0]}.scale"]
        np.testing.assert_allclose(scale * levels, row_absmax, rtol=1e-6)
        save_onnx(decoded, tmp_path / f"nf4_int8_{int(levels)}.onnx")
        logits = OnnxClassifier(tmp_path / f"nf4_int8_{int(levels)}.onnx").logits(batch)
        assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    with pytest.raises(ValueError, match="compute='int4' is not supported"):
        use_bnb4_codes(onnx.load(str(tmp_path / "plain.onnx")), quantized, weights, compute="int4")
    with pytest.raises(ValueError, match="int8 weights take 7 or 8 bits, not 4"):
        use_bnb4_codes(onnx.load(str(tmp_path / "plain.onnx")), quantized, weights, compute="int8", int8_weight_bits=4)
    embeddings = plain.get_input_embeddings().weight
    _, batch = torch_logits(quantized, tokenizer, TEXTS, names)
    in_batch = batch["input_ids"].unique()
    some_int4_rows = torch.cat([in_batch[::2], torch.tensor([embeddings.shape[0] - 1])])  # the last row too
    every_row = torch.arange(embeddings.shape[0])
    for bits, int4_rows in ((8, None), (4, None), (2, None), (2, some_int4_rows), (2, every_row)):
        variant = copy.deepcopy(exported)
        record = quantize_word_embeddings(variant, embeddings, bits, int4_rows=int4_rows)
        save_onnx(variant, tmp_path / f"bnb4_emb{bits}.onnx")
        reference = copy.deepcopy(quantized)
        with torch.no_grad():
            mask = int4_row_mask(embeddings.shape[0], int4_rows)
            reference.get_input_embeddings().weight.copy_(fake_quantize_table(embeddings, bits, mask))
        expected, batch = torch_logits(reference, tokenizer, TEXTS, names)
        np.testing.assert_allclose(OnnxClassifier(tmp_path / f"bnb4_emb{bits}.onnx").logits(batch), expected, atol=1e-4, rtol=0)
        assert record["method"] == f"int{bits}" and record.get("int4_rows") == (None if mask is None else len(int4_rows))
        if mask is not None and not mask.all():  # both halves of the batch's tokens are decoded from their own table
            stored = {t.name: list(t.dims) for t in variant.graph.initializer}
            rows, columns = embeddings.shape
            assert stored["word_embeddings.codes"] == [-(-(rows - len(some_int4_rows)) // 5), columns], "5 rows a byte"
            assert stored["word_embeddings.int4.codes"] == [len(some_int4_rows), columns // 2]
            assert not torch.equal(fake_quantize_table(embeddings, bits, mask), fake_quantize_rows(embeddings, bits))
        assert not any(t.dims == list(embeddings.shape) and t.data_type == onnx.TensorProto.FLOAT for t in variant.graph.initializer)


def test_ternary_rows_are_packed_five_a_byte_down_the_rows():
    """Base-3 blocks: byte j of block b is the digits of column j of rows 5b..5b+4 (first row most significant), the
    last block padded with zero codes; every code is recovered the way the ONNX decode reads it."""
    codes = torch.randint(-1, 2, (13, 7), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_ternary_blocks(codes)
    assert packed.shape == (3, 7) and packed.dtype == np.uint8 and packed.max() <= 242
    for row in range(13):
        block, digit = divmod(row, 5)
        decoded = (packed[block].astype(np.int32) // 3 ** (4 - digit)) % 3 - 1
        np.testing.assert_array_equal(decoded, codes[row].numpy())
    assert (packed[2].astype(np.int32) % 9 == 4).all(), "the two padding rows hold code 0 (digit 1)"


@pytest.mark.parametrize("bits, columns", [(4, 7), (4, 384), (2, 10)])
def test_int4_rows_are_packed_in_planes_across_the_row(bits, columns):
    """The ONNX files pack a row's int4 codes in planes (byte j holds columns j and j + P), not neighbours, so the
    decode broadcasts over whole planes; every code comes back as the decode reads it, padding is code 0."""
    levels = 2 ** (bits - 1) - 1
    codes = torch.randint(-levels, levels + 1, (6, columns), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_planes(codes, bits)
    per_byte, planes = 8 // bits, -(-columns // (8 // bits))
    assert packed.shape == (6, planes) and packed.dtype == np.uint8
    place_values = np.array([2 ** (8 - bits * (plane + 1)) for plane in range(per_byte)]).reshape(1, -1, 1)
    digits = (packed.astype(np.int32)[:, None, :] // place_values) % 2 ** bits - 2 ** (bits - 1)
    unpacked = digits.reshape(6, per_byte * planes)
    np.testing.assert_array_equal(unpacked[:, :columns], codes.numpy())
    assert (unpacked[:, columns:] == 0).all()
    assert packed[0, 0] >> (8 - bits) == codes[0, 0] + 2 ** (bits - 1), "the first plane is in the highest bits"


def test_row_scales_are_stored_in_fp16_and_decode_exactly(tokenizer, tmp_path):
    """Row scales are fp16 values (``row_scales``), so the files store them in fp16 and still decode exactly the
    table the torch model holds, for int8, int4 and ternary rows."""
    model = tiny_model(tiny_bert_config(layers=1, hidden=64, heads=2, ffn=128))
    names = export_onnx(model, tokenizer, tmp_path / "plain.onnx")
    embeddings = model.get_input_embeddings().weight.detach()
    _, batch = torch_logits(model, tokenizer, TEXTS, names)
    for bits in (8, 4, 2):
        graph = onnx.load(str(tmp_path / "plain.onnx"))
        quantize_word_embeddings(graph, embeddings, bits)
        stored = {t.name: t for t in graph.graph.initializer}
        assert stored["word_embeddings.scale"].data_type == onnx.TensorProto.FLOAT16
        save_onnx(graph, tmp_path / "rows.onnx")
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference.get_input_embeddings().weight.copy_(fake_quantize_rows(embeddings, bits))
        expected, _ = torch_logits(reference, tokenizer, TEXTS, names)
        np.testing.assert_allclose(OnnxClassifier(tmp_path / "rows.onnx").logits(batch), expected, atol=1e-5, rtol=0)


def test_matmulnbits_export_stores_int4_blocks_and_stays_close_to_the_torch_4bit_model(tokenizer, tmp_path):
    """MatMulNBits holds uniform int4 blocks, so the NF4 weights are re-quantized: with float compute the file is
    exactly a model with those int4 weights; int8 compute (accuracy_level 4) moves its logits by under 2% of the
    largest, and the file is as close to the torch 4-bit model (within 1.5x) as that model is to the float one. Its int4 embeddings in one GatherBlockQuantized node equal the standard-op ones."""
    import bitsandbytes as bnb

    model = pruned_model(tiny_bert_config(layers=2, hidden=128, heads=4, ffn=256))
    with torch.no_grad():  # distinct biases: the exporter shares equal (zero) ones, which then cannot be folded
        for name, parameter in model.named_parameters():
            if name.endswith("dense.bias") or name.endswith(("query.bias", "key.bias", "value.bias")):
                parameter.normal_(0, 0.02)
    quantized, weights, plain, names, exported = four_bit_export(model, tokenizer, tmp_path)
    assert set(weights) == {n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(use_bnb4_codes(exported, quantized, weights, compute="nbits")) == sorted(weights)
    nodes = [node for node in exported.graph.node if node.op_type == "MatMulNBits"]
    assert len(nodes) == len(weights)
    assert all(len(node.input) == 6 for node in nodes), "the bias Adds are folded into the op"
    assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}
    initializers = {tensor.name for tensor in exported.graph.initializer}
    assert not any(node.op_type == "MatMul" and node.input[1] in initializers for node in exported.graph.node)
    save_onnx(exported, tmp_path / "nbits.onnx")

    represented = copy.deepcopy(plain)  # the float model of exactly the stored int4 blocks
    with torch.no_grad():
        for name, weight in weights.items():
            represented.get_submodule(name).weight.copy_(torch.from_numpy(int4_blocks(weight.numpy(), 32)[2]))
    float_compute = copy.deepcopy(exported)
    for node in float_compute.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = 0
    save_onnx(float_compute, tmp_path / "nbits_float.onnx")
    expected, batch = torch_logits(represented, tokenizer, TEXTS, names)
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "nbits_float.onnx").logits(batch), expected, atol=1e-4, rtol=0)
    torch_4bit, _ = torch_logits(quantized, tokenizer, TEXTS, names)
    logits = OnnxClassifier(tmp_path / "nbits.onnx").logits(batch)
    assert np.abs(logits - expected).max() < 0.02 * np.abs(expected).max()  # int8 activations: small on top
    # re-quantizing the NF4 weights to int4 moves the logits no further than the NF4 quantization itself did
    full_precision, _ = torch_logits(model, tokenizer, TEXTS, names)
    assert np.abs(logits - torch_4bit).max() <= 1.5 * np.abs(full_precision - torch_4bit).max()

    embeddings = plain.get_input_embeddings().weight
    standard, contrib = copy.deepcopy(exported), copy.deepcopy(exported)
    quantize_word_embeddings(standard, embeddings, 4)
    record = quantize_word_embeddings(contrib, embeddings, 4, contrib_op=True)
    assert record["op"] == "GatherBlockQuantized" and record["block_size"] == 128
    assert [node.op_type for node in contrib.graph.node].count("GatherBlockQuantized") == 1
    save_onnx(standard, tmp_path / "standard.onnx")
    save_onnx(contrib, tmp_path / "contrib.onnx")
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "contrib.onnx").logits(batch),
                               OnnxClassifier(tmp_path / "standard.onnx").logits(batch), atol=1e-5, rtol=0)


def test_leftover_float_weights_are_stored_in_int8_rows_and_computed_in_float(tokenizer, tmp_path):
    from common.onnx_rows import compress_leftovers

    model = pruned_model(tiny_bert_config(layers=2, hidden=128, heads=4, ffn=256))  # positions 64 x 128, pooler 128 x 128
    quantized, weights, plain, names, exported = four_bit_export(model, tokenizer, tmp_path)
    use_bnb4_codes(exported, quantized, weights)
    embeddings = plain.get_input_embeddings().weight
    quantize_word_embeddings(exported, embeddings, 4)
    save_onnx(exported, tmp_path / "4bit.onnx")
    record = compress_leftovers(exported, min_elements=8192)
    save_onnx(exported, tmp_path / "compact.onnx")
    assert sorted(name.split(".")[-2] for name in record["int8_rows"]) == ["dense", "position_embeddings"]
    assert not any(t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 8192 for t in exported.graph.initializer)
    assert not any(node.op_type == "DynamicQuantizeMatMul" for node in exported.graph.node), "activations stay float"
    reference = copy.deepcopy(quantized)  # the same weights rounded the same way, in torch
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(fake_quantize_rows(embeddings, 4))
        for table in (reference.bert.embeddings.position_embeddings.weight, reference.bert.pooler.dense.weight):
            table.copy_(fake_quantize_rows(table, 8))
    expected, batch = torch_logits(reference, tokenizer, TEXTS, names)
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "compact.onnx").logits(batch), expected, atol=1e-4, rtol=0)
    assert (tmp_path / "compact.onnx").stat().st_size < (tmp_path / "4bit.onnx").stat().st_size - 40_000
    assert compress_leftovers(exported, min_elements=8192) == {"int8_rows": [], "int4_rows": []}  # nothing float left

    int4_pooler = onnx.load(str(tmp_path / "4bit.onnx"))  # the pooler in int4 rows instead, decoded by constant ops
    record = compress_leftovers(int4_pooler, min_elements=8192, matrix_bits=4)
    assert [name.split(".")[-2] for name in record["int8_rows"]] == ["position_embeddings"]
    assert [name.split(".")[-2] for name in record["int4_rows"]] == ["dense"]
    save_onnx(int4_pooler, tmp_path / "int4_pooler.onnx")
    with torch.no_grad():
        reference.bert.pooler.dense.weight.copy_(fake_quantize_rows(quantized.bert.pooler.dense.weight, 4))
    expected, batch = torch_logits(reference, tokenizer, TEXTS, names)
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "int4_pooler.onnx").logits(batch), expected, atol=1e-4, rtol=0)
    stored = {t.name: list(t.dims) for t in int4_pooler.graph.initializer}
    assert [dims for name, dims in stored.items() if name.endswith("int4.codes")] == [[128, 64]], "two codes a byte"
    # 8 KB fewer code bytes, less the decode's few nodes and row ids
    assert (tmp_path / "int4_pooler.onnx").stat().st_size < (tmp_path / "compact.onnx").stat().st_size - 4000
    with pytest.raises(ValueError, match="matrix_bits=2 is not supported; the matrices are stored in 8 or 4 bits"):
        compress_leftovers(onnx.load(str(tmp_path / "4bit.onnx")), matrix_bits=2)

    from common.onnx_export import compact_names

    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    saved = compact_names(exported)
    save_onnx(exported, tmp_path / "short_names.onnx")
    assert saved > 0 and (tmp_path / "short_names.onnx").stat().st_size <= (tmp_path / "compact.onnx").stat().st_size - saved + 16
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    assert stored.keys() == initializers.keys() and all(np.array_equal(stored[k], initializers[k]) for k in stored)
    assert [v.name for v in exported.graph.input] == names and [v.name for v in exported.graph.output] == ["logits"]
    intermediate = {name for node in exported.graph.node for name in node.output} - {"logits"}
    assert intermediate and max(map(len, intermediate)) <= 4 and len({n.name for n in exported.graph.node}) == len(exported.graph.node)
    np.testing.assert_array_equal(OnnxClassifier(tmp_path / "short_names.onnx").logits(batch),
                                  OnnxClassifier(tmp_path / "compact.onnx").logits(batch))


def readme_snippet(title: str) -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {title} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md lost its '{title}' snippet"
    return match.group(1)


def run_without_project(code: str, cwd, block=("common", "torch")) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which importing ``block`` fails, outside the checkout."""
    guard = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
    completed = subprocess.run([sys.executable, "-c", guard + code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_readme_onnx_snippet_runs_with_onnxruntime_and_tokenizers_only(tokenizer, tmp_path):
    model = pruned_model(tiny_bert_config(layers=2, hidden=64, heads=4, ffn=128, num_labels=2))
    model.config.id2label, model.config.label2id = {0: "rotten", 1: "fresh"}, {"rotten": 0, "fresh": 1}
    folder = tmp_path / "onnx-folder"
    folder.mkdir()
    names = export_onnx(model, tokenizer, folder / "model.onnx")
    write_runtime_files(folder, tokenizer, model.config, max_length=32)
    (folder / "compression.json").write_text(json.dumps({"deployment_model": "model.onnx"}))
    code = readme_snippet("deploy-onnx").replace("results/onnx/<run_id>", str(folder))
    completed = run_without_project(code + "\nprint(json.dumps(logits.tolist()))\n", cwd=tmp_path)
    printed = completed.stdout.strip().splitlines()
    logits = np.array(json.loads(printed[-1]))
    texts = ["a gripping, funny film", "dull and far too long"]
    expected, _ = torch_logits(model, tokenizer, texts, names)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    assert any(line.split()[0] in ("rotten", "fresh") for line in printed[:-1])


def test_readme_stock_transformers_snippet_loads_a_pruned_checkpoint(tokenizer, results_dir, tmp_path):
    from common.models import save_checkpoint

    model = pruned_model(tiny_distilbert_config(layers=2, dim=64, heads=4, ffn=128))
    folder = save_checkpoint("pruned", model, tokenizer, {"label_names": ["negative", "positive"]})
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_pruned.PrunedDistilBertForSequenceClassification"
    code = readme_snippet("deploy-transformers").replace("results/pruned/<run_id>", str(folder))
    completed = run_without_project(code + "\nimport json\nprint(json.dumps(logits.tolist()))\n", cwd=tmp_path, block=("common",))
    expected, _ = torch_logits(model, tokenizer, ["a gripping, funny film", "dull and far too long"], ["input_ids", "attention_mask"])
    np.testing.assert_allclose(np.array(json.loads(completed.stdout.strip().splitlines()[-1])), expected, atol=1e-5, rtol=0)


def test_bnb4_export_of_a_mixed_8_and_4_bit_model(tokenizer, tmp_path, monkeypatch):
    """Layers that mixed precision kept at 8 bits are exported as float MatMuls of their stored int8 values; the
    4-bit ones still get their codes; ONNX Runtime then reproduces the torch 8/4-bit model. In the int8-compute file
    the 8-bit layers keep their codes, halved to 7 bits where this CPU's int8 products saturate."""
    import bitsandbytes as bnb

    import common.onnx_runtime as onnx_runtime
    from common.quantization import Int8WeightLinear, dequantized_linear_weights, quantizable_linear_names

    model = pruned_model(tiny_bert_config(layers=2, hidden=128, heads=4, ffn=256))
    quantizable = quantizable_linear_names(model)
    eight_bit = quantizable[:3]
    quantize_model_4bit(model, PTQConfig(blocksize=64, double_quant=True), eight_bit=eight_bit)
    assert all(isinstance(model.get_submodule(name), Int8WeightLinear) for name in eight_bit)
    weights = dequantized_linear_weights(model)
    assert set(weights) == set(quantizable)
    plain = dequantize_4bit_model(copy.deepcopy(model))
    assert not any(isinstance(m, (bnb.nn.Linear4bit, Int8WeightLinear)) for m in plain.modules())
    names = export_onnx(plain, tokenizer, tmp_path / "plain.onnx")
    graph = onnx.load(str(tmp_path / "plain.onnx"))
    assert sorted(use_bnb4_codes(graph, model, weights)) == sorted(set(weights) - set(eight_bit))
    save_onnx(graph, tmp_path / "mixed.onnx")
    expected, batch = torch_logits(model, tokenizer, TEXTS, names)
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "mixed.onnx").logits(batch), expected, atol=1e-4)
    kept = model.get_submodule(eight_bit[0])
    trained_codes, trained_scale = kept.weight_codes.numpy().T, kept.weight_scale.float().numpy()
    assert np.abs(trained_codes).max() > 64, "the trained rows use the full 8-bit range"
    for saturates, bits in ((False, None), (True, None), (False, 7), (True, 8)):  # None: the range this CPU needs
        monkeypatch.setattr(onnx_runtime, "int8_products_saturate", lambda saturates=saturates: saturates)
        halved = saturates if bits is None else bits == 7  # the caller's bits win over this CPU's
        int8_compute = onnx.load(str(tmp_path / "plain.onnx"))
        assert sorted(use_bnb4_codes(int8_compute, model, weights, compute="int8", int8_weight_bits=bits)) == sorted(weights)
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in int8_compute.graph.initializer}
        codes, scale = stored[f"{eight_bit[0]}.weight_int8"], stored[f"{eight_bit[0]}.scale"]
        if halved:
            np.testing.assert_array_equal(codes, np.clip(np.round(trained_codes / 2.0), -64, 64))
            np.testing.assert_allclose(scale, 2 * trained_scale)
            assert np.abs(codes).max() <= 64
        else:
            np.testing.assert_array_equal(codes, trained_codes)
            np.testing.assert_array_equal(scale, trained_scale)
        assert not any(n.op_type == "MatMul" and n.input[1] in stored for n in int8_compute.graph.node), "every encoder weight is int8 or 4-bit"
        save_onnx(int8_compute, tmp_path / "mixed_int8.onnx")
        int8_logits = OnnxClassifier(tmp_path / "mixed_int8.onnx").logits(batch)
        assert np.abs(int8_logits - expected).max() < 0.05 * np.abs(expected).max(), (saturates, bits)


def test_model_runtime_runs_a_checkpoint_and_its_onnx_file_behind_one_interface(tokenizer, results_dir):
    """The report, predict.py, the sweep and stage 12 see a torch checkpoint and an ONNX file the same way."""
    from common.data import make_loader, tokenize_dataset
    from common.models import save_checkpoint
    from common.runtime import ModelRuntime
    from conftest import tiny_data

    model = pruned_model(tiny_bert_config(layers=3, hidden=64, heads=4, ffn=128))
    folder = save_checkpoint("pruned", model, tokenizer, {"label_names": ["negative", "positive"]})
    export_onnx(model, tokenizer, folder / "model.onnx")
    in_torch = ModelRuntime(folder)
    in_onnx = ModelRuntime(folder, "model.onnx", verify=False)  # added after the stage wrote (and listed) the folder
    assert (in_torch.runtime, in_onnx.runtime) == ("torch", "onnxruntime")
    assert in_torch.input_names == in_onnx.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert in_onnx.size_bytes == (folder / "model.onnx").stat().st_size
    assert in_torch.size_bytes == (folder / "model.safetensors").stat().st_size
    encoded = dict(tokenizer(TEXTS, padding=True, return_tensors="np"))
    np.testing.assert_allclose(in_onnx.logits_for(encoded), in_torch.logits_for(encoded), atol=1e-5, rtol=0)
    data = tiny_data(TEXTS, TEXTS)
    loader = make_loader(tokenize_dataset(data.test, tokenizer, 32), tokenizer, 4, shuffle=False)
    (torch_logits_all, torch_labels), (onnx_logits_all, onnx_labels) = in_torch.logits(loader), in_onnx.logits(loader)
    np.testing.assert_array_equal(torch_labels, onnx_labels)
    np.testing.assert_allclose(onnx_logits_all, torch_logits_all, atol=1e-5, rtol=0)
    for runtime in (in_torch, in_onnx):
        batch = runtime.batch(2, 8)
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"} and tuple(batch["input_ids"].shape) == (2, 8)
        runtime.runner(batch)()


def test_the_deployment_model_is_the_fastest_file_within_the_noise_of_the_best():
    from common.exports import choose_deployment

    files = {
        "model.onnx": {"validation_accuracy": 0.850, "latency_ms_median": 30.0},
        "model_int8_dynamic.onnx": {"validation_accuracy": 0.846, "latency_ms_median": 18.0},
        "model_int8_static.onnx": {"validation_accuracy": 0.848, "latency_ms_median": 25.0},
    }
    chosen, reason = choose_deployment(files, tolerance_points=0.5)
    assert chosen == "model_int8_dynamic.onnx"  # 0.4 points below the best, and the fastest
    assert "within 0.5 validation points" in reason and "model_int8_static.onnx 84.80% / 25.0 ms" in reason
    assert choose_deployment(files, tolerance_points=0.3)[0] == "model_int8_static.onnx"  # dynamic is now too far below
    assert choose_deployment(files, tolerance_points=0.0)[0] == "model.onnx"


def test_the_deployment_model_is_the_smallest_of_the_files_the_timing_cannot_rank():
    from common.exports import choose_deployment

    def files():  # stage 12's 4-bit folder of MPNet seed 2 (ms, MB): the int8-compute file 5% slower, 2.5x smaller
        return {"model_int8_dynamic.onnx": {"validation_accuracy": 0.862, "latency_ms_median": 1347.9,
                                            "latency_ms_p75": 1488.0, "size_bytes": 108_900_000},
                "model_nf4_int8.onnx": {"validation_accuracy": 0.864, "latency_ms_median": 1420.0,
                                        "latency_ms_p75": 1491.8, "size_bytes": 43_400_000},
                "model.onnx": {"validation_accuracy": 0.866, "latency_ms_median": 2500.0,
                               "latency_ms_p75": 2600.0, "size_bytes": 42_900_000}}

    chosen, reason = choose_deployment(files(), 0.5)
    assert chosen == "model_nf4_int8.onnx"  # model.onnx is smaller still, but beyond the fastest's 75th percentile
    assert "interquartile range (model_int8_dynamic.onnx: 1347.9 ms, IQR up to 1488.0 ms, 108.90 MB)" in reason
    clear_gap = files()
    clear_gap["model_int8_dynamic.onnx"]["latency_ms_p75"] = 1400.0  # the 43 MB file's median lies beyond it
    assert choose_deployment(clear_gap, 0.5)[0] == "model_int8_dynamic.onnx"
    unlisted_size = files()
    del unlisted_size["model_int8_dynamic.onnx"]["size_bytes"]  # without a size the fastest is kept, as before
    assert choose_deployment(unlisted_size, 0.5)[0] == "model_int8_dynamic.onnx"
    too_inaccurate = files()
    too_inaccurate["model_nf4_int8.onnx"]["validation_accuracy"] = 0.855  # 1.1 points below the best: not eligible
    assert choose_deployment(too_inaccurate, 0.5)[0] == "model_int8_dynamic.onnx"


def test_the_deployment_band_widens_to_the_paired_noise_of_files_that_flip_borderline_examples():
    from common.metrics import paired_difference_se
    from common.exports import choose_deployment

    best = np.ones(1000, bool)
    best[:150] = False  # 85.0%
    flipping = best.copy()
    flipping[150:180], flipping[:22] = False, True  # 30 right answers lost, 22 gained: 84.2%, 52 examples differ
    same_but_one = best.copy()
    same_but_one[150:158] = False  # 8 lost, nothing gained: 84.2%, 8 examples differ
    se = paired_difference_se(flipping, best)
    assert se == pytest.approx(np.sqrt((52 - 1000 * 0.008 ** 2) / 999 / 1000), rel=1e-9)  # 22 +1s, 30 -1s, mean -0.008
    files = {"model.onnx": {"validation_accuracy": 0.850, "latency_ms_median": 30.0},
             "flipping.onnx": {"validation_accuracy": 0.842, "latency_ms_median": 10.0},
             "same_but_one.onnx": {"validation_accuracy": 0.842, "latency_ms_median": 12.0}}
    correct = {"model.onnx": best, "flipping.onnx": flipping, "same_but_one.onnx": same_but_one}
    assert choose_deployment(dict(files), 0.5)[0] == "model.onnx"  # both are 0.8 points below: outside a fixed 0.5
    chosen, reason = choose_deployment(files, 0.5, correct)
    assert chosen == "flipping.onnx" and "2 paired standard errors" in reason  # 2 SE = 1.44 points > 0.8
    assert files["same_but_one.onnx"]["paired_noise_points"] < 0.8  # 8 consistent losses: a real difference
    del files["flipping.onnx"], correct["flipping.onnx"]
    assert choose_deployment(files, 0.5, correct)[0] == "model.onnx"
    with pytest.raises(ValueError, match="same examples"):
        paired_difference_se(best, best[:10])


def test_predict_batches_texts_by_length_and_keeps_their_order(tokenizer, results_dir):
    from common.models import save_checkpoint
    from common.prediction import classify, length_buckets, open_classifier

    texts = ["great", "dull boring plot and a weak flat ending", "fun", "the actor was charming and clever", "bland"]
    buckets = length_buckets(texts, 2)
    assert sorted(index for bucket in buckets for index in bucket) == list(range(5))
    assert [len(texts[bucket[0]]) for bucket in buckets] == sorted(len(texts[bucket[0]]) for bucket in buckets)
    folder = save_checkpoint("pruned", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["negative", "positive"]})
    classifier = open_classifier(folder)
    batched = classify(classifier, texts, batch_size=2)
    assert [result["text"] for result in batched] == texts
    for text, result in zip(texts, batched):  # padding to a batch's longest text does not change a text's result
        alone = classify(classifier, [text])[0]
        assert result["label"] == alone["label"] and result["probability"] == pytest.approx(alone["probability"], abs=1e-5)


def test_attention_fuses_in_onnx_runtime_with_uneven_heads_per_layer(tokenizer, tmp_path):
    """The export writes each layer's head split as a constant, so ONNX Runtime's optimizer fuses one Attention node
    per layer, each with its own head count, and the fused graph gives the plain graph's logits."""
    import onnx

    from common.architecture import apply_architecture
    from common.onnx_export import export_onnx
    from common.onnx_runtime import OnnxClassifier, optimize_graph

    model = tiny_model(tiny_bert_config(layers=3))
    apply_architecture(model, {"model_type": "bert", "num_layers": 3, "heads_per_layer": [1, 3, 4],
                               "ffn_width_per_layer": [10, 64, 33]})
    torch.manual_seed(1)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    model.eval()
    batch = dict(tokenizer(["great film and fun story", "dull boring plot", "the actor"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    export_onnx(model, tokenizer, tmp_path / "model.onnx", 32)
    static = [node for node in onnx.load(str(tmp_path / "model.onnx")).graph.node
              if node.op_type == "Reshape" and node.input[1].endswith("/static_shape")]
    assert len(static) == 9  # Q, K and V of each of the 3 layers
    fusions = optimize_graph(tmp_path / "model.onnx", tmp_path / "fused.onnx")
    assert fusions.get("Attention") == 3, fusions
    heads = [attribute.i for node in onnx.load(str(tmp_path / "fused.onnx")).graph.node if node.op_type == "Attention"
             for attribute in node.attribute if attribute.name == "num_heads"]
    assert sorted(heads) == [1, 3, 4]
    plain = OnnxClassifier(tmp_path / "model.onnx").logits(batch)
    fused = OnnxClassifier(tmp_path / "fused.onnx").logits(batch)
    np.testing.assert_allclose(plain, expected, atol=1e-5)
    np.testing.assert_allclose(fused, plain, atol=1e-5)


def test_double_quantized_absmax_is_stored_in_8_bits_and_decodes_to_the_trained_values_bit_for_bit(tokenizer, tmp_path):
    """The 4-bit files store bitsandbytes' nested absmax (8-bit codes, one shared codebook, a scale per 256 blocks),
    decoded by constant ops: the same float32 values as bitsandbytes, whether or not ONNX Runtime folds them."""
    import onnxruntime as ort
    from bitsandbytes.functional import dequantize_blockwise
    from onnx import TensorProto, helper

    from common.onnx_quantized import _absmax_nodes

    model = pruned_model(tiny_bert_config(layers=2, hidden=128, heads=4, ffn=320))
    quantized, weights, _, names, exported = four_bit_export(model, tokenizer, tmp_path)
    states = [quantized.get_submodule(name).weight.quant_state for name in weights]
    # several groups of 256 blocks, the last one padded
    state = next(s for s in states if s.absmax.numel() > s.state2.blocksize and s.absmax.numel() % s.state2.blocksize)
    assert state.nested
    expected = (dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    nodes, initializers, output = _absmax_nodes("layer", state)
    graph = helper.make_graph(nodes, "absmax", [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, [state.absmax.numel()])],
                              initializer=initializers)
    decoder = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    save_onnx(decoder, tmp_path / "absmax.onnx")
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        decoded = ort.InferenceSession(str(tmp_path / "absmax.onnx"), options).run(None, {})[0]
        np.testing.assert_array_equal(decoded, expected)

    use_bnb4_codes(exported, quantized, weights)
    save_onnx(exported, tmp_path / "bnb4.onnx")
    stored = {tensor.name: tensor for tensor in exported.graph.initializer}
    codebooks = [name for name in stored if name.startswith("bnb4.absmax_codebook.")]
    assert len(codebooks) == 1, codebooks
    for name in weights:
        blocks = quantized.get_submodule(name).weight.quant_state.absmax.numel()
        assert stored[f"{name}.absmax.codes"].data_type == TensorProto.UINT8
        assert not any(t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) == blocks for t in stored.values()
                       if t.name.startswith(name + ".")), f"{name}: float32 absmax stored"
    expected_logits, batch = torch_logits(quantized, tokenizer, TEXTS, names)
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "bnb4.onnx").logits(batch), expected_logits, atol=1e-4, rtol=0)
