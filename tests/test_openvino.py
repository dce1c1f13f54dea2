"""OpenVINO: the IR of a pruned model with uneven heads per layer gives ONNX Runtime's labels and logits; NNCF int8
and 4-bit weights stay close to it. Skipped, with the reason, where openvino or nncf is not installed."""

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install -r requirements.txt)")
pytest.importorskip("nncf", reason="nncf is not installed (pip install -r requirements.txt)")

from common.config import PruningConfig  # noqa: E402
from common.onnx_export import export_onnx  # noqa: E402
from common.onnx_runtime import OnnxClassifier  # noqa: E402
from common.openvino_runtime import (  # noqa: E402
    OpenVinoClassifier,
    compress_weights_4bit,
    convert_onnx,
    quantize_int8,
    stored_constants,
)
from common.pruning import StructuralPruner  # noqa: E402
from conftest import batch_for, tiny_bert_config, tiny_model  # noqa: E402

TEXTS = ("great film and fun story", "dull boring plot", "the actor was charming", "a weak and bland ending")


@pytest.fixture
def uneven_onnx(tmp_path, tokenizer):
    """A 2-layer BERT pruned to different head counts and FFN widths per layer, exported to ONNX."""
    model = tiny_model(tiny_bert_config(layers=2, heads=4, hidden=32, ffn=64))
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5, 0.5)
    architecture = pruner.prune_physically()
    assert len(set(architecture["heads_per_layer"])) > 1 or len(set(architecture["ffn_width_per_layer"])) > 1
    export_onnx(model, tokenizer, tmp_path / "model.onnx", 32)
    convert_onnx(tmp_path / "model.onnx", tmp_path / "model.xml")
    return tmp_path, dict(batch_for(tokenizer, TEXTS))


def test_openvino_gives_onnx_runtimes_labels_and_logits(uneven_onnx):
    folder, batch = uneven_onnx
    reference = OnnxClassifier(folder / "model.onnx").logits(batch)
    exact = OpenVinoClassifier(folder / "model.xml", precision="f32")
    assert exact.inference_precision == "f32"
    np.testing.assert_allclose(exact.logits(batch), reference, atol=1e-4)  # fp32 compute: the same graph
    default = OpenVinoClassifier(folder / "model.xml")  # bf16 where the CPU has it
    logits = default.logits(batch)
    assert np.abs(logits - reference).max() < 0.05 and (logits.argmax(-1) == reference.argmax(-1)).all()


def test_nncf_int8_and_4bit_weights_stay_close_to_the_float_model(uneven_onnx):
    folder, batch = uneven_onnx
    float_model = OpenVinoClassifier(folder / "model.xml", precision="f32")
    reference = float_model.logits(batch)
    record = quantize_int8(folder / "model.xml", folder / "int8.xml", [float_model.feeds(batch)] * 4, 4)
    assert record["method"] == "nncf_ptq_int8" and record["fake_quantize_ops"] > 0
    int8 = OpenVinoClassifier(folder / "int8.xml", precision="f32").logits(batch)
    assert np.abs(int8 - reference).max() < 0.05
    compress_weights_4bit(folder / "model.xml", folder / "nf4.xml", "nf4", 64)
    nf4 = OpenVinoClassifier(folder / "nf4.xml", precision="f32").logits(batch)
    assert np.abs(nf4 - reference).max() < 0.1
    # 4-bit weights are smaller on disk than the fp32 IR's
    assert sum(size for _, size in stored_constants(folder / "nf4.xml").values()) < \
        sum(size for _, size in stored_constants(folder / "model.xml").values())


def test_static_shapes_pad_behind_the_mask_and_give_the_dynamic_models_logits(uneven_onnx, tokenizer):
    folder, _ = uneven_onnx
    tokenizer.backend_tokenizer.enable_truncation(max_length=32)
    tokenizer.save_pretrained(folder)  # tokenizer.json with a truncation of 32 tokens: batch-1 buckets 16 and 32
    static = OpenVinoClassifier(folder / "model.xml", precision="f32")
    dynamic = OpenVinoClassifier(folder / "model.xml", precision="f32", static_shapes=False)
    assert sorted(static._static) == [(1, 16), (1, 32)] and not dynamic._static
    for texts in (TEXTS[:1], TEXTS[1:2], TEXTS):  # batch 1 at two lengths, then a batch of 4 compiled on first use
        batch = dict(batch_for(tokenizer, texts))
        length = np.shape(batch["input_ids"])[1]
        assert length % 16, "the test needs lengths that are padded"
        np.testing.assert_allclose(static.logits(batch), dynamic.logits(batch), atol=1e-4)
    assert (len(TEXTS), 16) in static._static
    no_mask = {"input_ids": np.asarray(batch["input_ids"])}  # without a mask padding would change the result
    feeds, request, _ = static._padded(no_mask)
    assert feeds is no_mask and request is static.request


def test_nncf_accuracy_aware_int8_keeps_the_validation_drop_within_its_bound(uneven_onnx):
    from common.openvino_runtime import quantize_int8_with_accuracy_control

    folder, batch = uneven_onnx
    float_model = OpenVinoClassifier(folder / "model.xml", precision="f32")
    feeds = float_model.feeds(batch)
    labels = float_model.logits(batch).argmax(-1)  # the float model is right on every example: drops are measurable
    record = quantize_int8_with_accuracy_control(folder / "model.xml", folder / "aware.xml", [feeds] * 4, 4,
                                                 [(feeds, labels)] * 2, max_drop_points=0.0)
    assert record["method"] == "nncf_accuracy_control_int8" and record["max_drop_points"] == 0.0
    aware = OpenVinoClassifier(folder / "aware.xml", precision="f32").logits(batch)
    assert (aware.argmax(-1) == labels).all()  # no drop allowed, none left
    plain = quantize_int8(folder / "model.xml", folder / "plain.xml", [feeds] * 4, 4)
    assert 0 <= record["fake_quantize_ops"] <= plain["fake_quantize_ops"]  # layers sent back to float lose theirs


@pytest.mark.parametrize("bits, int4_rows", [(4, None), (2, None), (2, [0, 2, 5, 9, 20, 33])])
def test_openvino_decodes_the_row_quantized_word_embeddings_as_onnx_runtime_does(uneven_onnx, bits, int4_rows):
    """The 4-bit files' word-embedding decode (packed int4/int2 codes, int4 rows among ternary ones) is standard ops:
    OpenVINO must read the same values from it, with static and dynamic shapes. (With dynamic shapes its uint8
    BitShift rounds, 186 >> 4 giving 12, so the decode divides int32 instead.)"""
    import onnx
    import torch

    from common.onnx_rows import quantize_word_embeddings

    folder, batch = uneven_onnx
    graph = onnx.load(str(folder / "model.onnx"))
    tables = {t.name: t for t in graph.graph.initializer}
    gather = next(node for node in graph.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids")
    table = torch.from_numpy(onnx.numpy_helper.to_array(tables[gather.input[0]]).copy())
    quantize_word_embeddings(graph, table, bits, int4_rows=None if int4_rows is None else torch.tensor(int4_rows))
    onnx.save(graph, str(folder / f"rows{bits}.onnx"))
    reference = OnnxClassifier(folder / f"rows{bits}.onnx").logits(batch)
    assert np.abs(reference - OnnxClassifier(folder / "model.onnx").logits(batch)).max() > 1e-4, "the rows were quantized"
    convert_onnx(folder / f"rows{bits}.onnx", folder / f"rows{bits}.xml")
    for static_shapes in (True, False):
        openvino = OpenVinoClassifier(folder / f"rows{bits}.xml", precision="f32", static_shapes=static_shapes)
        np.testing.assert_allclose(openvino.logits(batch), reference, atol=1e-4, err_msg=f"static_shapes={static_shapes}")
