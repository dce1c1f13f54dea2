from types import SimpleNamespace

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from common.config import PruningConfig, PTQConfig
from common.models import count_parameters, load_model, save_checkpoint, word_embeddings
from common.pruning import StructuralPruner
from common.quantization import (
    FakeQuant4bitLinear,
    dequantize_4bit_exact,
    compress_embedding_state,
    dequantize_rows,
    fake_quantize_4bit,
    fake_quantize_4bit_values,
    int8_state_dict,
    prepare_fake_quantization,
    quantize_model_4bit,
    quantize_model_int8,
    quantize_rows,
    strip_fake_quantization,
)
from common.quantization.bnb4 import _linear4bit
from conftest import batch_for, tiny_bert_config, tiny_model


def inputs_for(tokenizer):
    batch = batch_for(tokenizer)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, blocksize", [((64, 96), 64), ((37, 50), 64), ((16, 256), 128)])
def test_fake_quantization_equals_bitsandbytes_elementwise(quant_type, double_quant, shape, blocksize):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.04
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    fake = fake_quantize_4bit_values(weight, quant_type, blocksize, double_quant)[0]
    assert torch.equal(fake, dequantize_4bit_exact(SimpleNamespace(data=packed, quant_state=state)))
    if shape[-1] % blocksize == 0 or shape[-1] % 2:
        # bitsandbytes' own CPU dequantize agrees only for these row lengths (see dequantize_4bit_exact)
        assert torch.equal(fake, bnb_functional.dequantize_4bit(packed, state))


def test_straight_through_estimator_passes_gradients():
    weight = torch.randn(8, 64, requires_grad=True)
    upstream = torch.randn(8, 64)
    (fake_quantize_4bit(weight) * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)
    layer = FakeQuant4bitLinear(torch.nn.Linear(64, 4), "nf4", 64, False)
    layer(torch.randn(3, 64)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_exported_weights_equal_fake_quantized_values():
    model = tiny_model(tiny_bert_config())
    settings = PTQConfig(double_quant=True)
    names = prepare_fake_quantization(model, settings)
    fake = {name: model.get_submodule(name) for name in names}
    expected = {name: fake_quantize_4bit_values(module.weight, "nf4", 64, True)[0] for name, module in fake.items()}
    strip_fake_quantization(model)
    quantize_model_4bit(model, settings)
    for name in names:
        module = model.get_submodule(name)
        assert torch.equal(dequantize_4bit_exact(module.weight), expected[name]), name


@pytest.mark.parametrize("in_features", [96, 160, 185, 384])
def test_real_4bit_layer_computes_with_the_quantized_weights(in_features):
    # bitsandbytes 0.50's CPU kernel gets 96 and 160 wrong (even, not a multiple of the block size)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 24))
    model[0].weight.data.normal_(0, 0.05)
    fake = fake_quantize_4bit_values(model[0].weight, "nf4", 64, True)[0]
    expected_fn = lambda x: torch.nn.functional.linear(x, fake, model[0].bias)  # noqa: E731
    x = torch.randn(4, in_features)
    expected = expected_fn(x)
    layer = _linear4bit(model[0], {"compute_dtype": "float32", "double_quant": True, "quant_type": "nf4"})
    import bitsandbytes as bnb

    layer.weight = bnb.nn.Params4bit(model[0].weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=True, module=layer).to("cpu")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_4bit_save_reload_gives_identical_logits(tokenizer, results_dir):
    model = tiny_model(tiny_bert_config())
    record = quantize_model_4bit(model, PTQConfig(embedding_quantization="none"))
    assert "classifier" in record["kept_full_precision"] and "bert.pooler.dense" in record["kept_full_precision"]
    inputs = inputs_for(tokenizer)
    with torch.no_grad():
        before = model(**inputs).logits
    folder = save_checkpoint("ptq_4bit", model, tokenizer, {"quantization": record})
    reloaded = load_model(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, before)
    import bitsandbytes as bnb

    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)


def test_pruned_model_survives_quantize_save_reload(tokenizer, results_dir):
    model = tiny_model(tiny_bert_config(layers=2, heads=4, ffn=48))
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5, 0.5)
    pruner.prune_physically()
    settings = PTQConfig(embedding_quantization="int8")
    record = quantize_model_4bit(model, settings)
    state, embedding = compress_embedding_state(model, dict(model.state_dict()), "int8")
    folder = save_checkpoint("ptq_4bit", model, tokenizer, {"quantization": record, "embedding_quantization": embedding}, state_dict=state)
    reloaded = load_model(folder)
    assert [layer.attention.self.query.out_features for layer in reloaded.bert.encoder.layer] == [16, 16]
    inputs = inputs_for(tokenizer)
    with torch.no_grad():
        difference = (reloaded(**inputs).logits - model(**inputs).logits).abs().max()
    assert difference < 0.05  # only the int8 embeddings differ from the in-memory model


@pytest.mark.parametrize("bits, bound", [(8, 1 / 254), (4, 1 / 14)])
def test_row_quantized_embeddings_round_trip_within_half_a_step(bits, bound):
    weight = torch.randn(50, 33)
    codes, scale = quantize_rows(weight, bits)
    restored = dequantize_rows(codes, scale, bits, 33)
    row_max = weight.abs().amax(dim=1, keepdim=True)
    assert ((restored - weight).abs() <= row_max * bound + 1e-6).all()
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.numel() == (50 * 33 if bits == 8 else 50 * 17)
    assert torch.equal(scale.half().float(), scale), "scales are fp16 values, which the ONNX files store"
    again_codes, again_scale = quantize_rows(restored, bits)
    assert torch.equal(again_codes, codes) and torch.equal(again_scale, scale), "a stored table re-quantizes to itself"


def test_ternary_rows_pack_four_codes_a_byte_at_the_least_error_and_requantize_exactly():
    from common.quantization.rows import TERNARY_CLIP_RATIOS, _half_exact

    weight = torch.randn(40, 33)
    codes, scale = quantize_rows(weight, 2)
    assert codes.dtype == torch.uint8 and codes.shape == (40, 9)  # 33 codes in 9 bytes, the last one padded
    restored = dequantize_rows(codes, scale, 2, 33)
    assert set(torch.unique(torch.round(restored / scale.unsqueeze(1))).tolist()) <= {-1.0, 0.0, 1.0}
    error = ((restored - weight) ** 2).sum(dim=1)
    absmax = weight.abs().amax(dim=1)
    for ratio in TERNARY_CLIP_RATIOS:  # no candidate scale (an fp16 value, as stored) does better than the one chosen
        candidate_scale = _half_exact(absmax * ratio).unsqueeze(1)
        candidate = torch.round(weight / candidate_scale).clamp(-1, 1) * candidate_scale
        assert (error <= ((candidate - weight) ** 2).sum(dim=1) + 1e-5).all()
    assert (scale < absmax).all(), "Gaussian rows are clipped: at their absmax most values would round to zero"
    assert error.sum() < 0.6 * ((fake_absmax_ternary(weight) - weight) ** 2).sum()
    again_codes, again_scale = quantize_rows(restored, 2)  # what stage 12 does with the table QKD trained
    assert torch.equal(again_codes, codes) and torch.equal(again_scale, scale)
    assert torch.equal(dequantize_rows(again_codes, again_scale, 2, 33), restored)


def fake_absmax_ternary(weight):
    scale = weight.abs().amax(dim=1, keepdim=True)
    return torch.round(weight / scale).clamp(-1, 1) * scale


def test_compressed_embedding_checkpoint_round_trip(tokenizer, results_dir):
    model = tiny_model(tiny_bert_config())
    state, embedding = compress_embedding_state(model, dict(model.state_dict()), "int4")
    folder = save_checkpoint("ptq_4bit", model, tokenizer, {"embedding_quantization": embedding}, state_dict=state)
    reloaded = word_embeddings(load_model(folder)).weight
    original = word_embeddings(model).weight
    assert ((reloaded - original).abs() <= original.abs().amax(dim=1, keepdim=True) / 14 + 1e-6).all()


def test_int8_model_save_reload_gives_identical_logits(tokenizer, results_dir):
    model = tiny_model(tiny_bert_config())
    quantized, record = quantize_model_int8(model)
    inputs = inputs_for(tokenizer)
    with torch.no_grad():
        before = quantized(**inputs).logits
    folder = save_checkpoint("int8", quantized, tokenizer, {"quantization": record}, state_dict=int8_state_dict(quantized))
    reloaded = load_model(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, before)
    assert "classifier" not in record["modules"]
    assert count_parameters(reloaded) == count_parameters(model)  # packed int8 weights still count


def test_a_cpu_only_format_is_refused_on_a_gpu_before_loading(tokenizer, results_dir, caplog):
    from common.quantization import is_movable

    quantized, record = quantize_model_int8(tiny_model(tiny_bert_config()))
    folder = save_checkpoint("int8", quantized, tokenizer, {"quantization": record}, state_dict=int8_state_dict(quantized))
    with pytest.raises(ValueError, match="holds torch_dynamic_int8 weights, which run on the CPU only"):
        load_model(folder, "cuda")  # refused from the record, before any weight or CUDA call (runs on a CPU machine)
    assert not is_movable({"quantization": record}, "cuda") and is_movable({"quantization": record}, "cpu")
    assert is_movable({"quantization": {"method": "bitsandbytes_4bit"}}, "cuda")  # bitsandbytes has CUDA kernels
    assert is_movable({"embedding_quantization": {"method": "int4"}}, "cuda")  # decoded to a float table when loaded


def test_corrupt_4bit_checkpoint_is_reported(tokenizer, results_dir):
    model = tiny_model(tiny_bert_config())
    record = quantize_model_4bit(model, PTQConfig())
    state = {k: v for k, v in model.state_dict().items() if "layer.1.output.dense.weight." not in k}
    folder = save_checkpoint("ptq_4bit", model, tokenizer, {"quantization": record}, state_dict=state)
    with pytest.raises(ValueError, match="lacks the 4-bit weight or quantization state of bert.encoder.layer.1.output.dense"):
        load_model(folder)


@pytest.mark.parametrize("method, int4_rows", [("int8", 0), ("int4", 0), ("int2", 0), ("int2", 7), ("int2", "all")])
def test_fake_quantized_embeddings_equal_stored_ones(method, int4_rows):
    from common.quantization import estimated_checkpoint_bytes
    from common.quantization.loading import _load_embedding
    from common.quantization.rows import int4_row_mask

    model = tiny_model(tiny_bert_config())
    if int4_rows == "all":  # a vocabulary smaller than the rows asked for: no ternary row is left
        int4_rows = word_embeddings(model).num_embeddings
    settings = PTQConfig(embedding_quantization=method, embedding_int4_rows=int4_rows)
    wide = torch.tensor([0, 1, 5, 9, 20, 30, 36])[:int4_rows] if int4_rows == 7 else torch.arange(int4_rows) if int4_rows else None
    prepare_fake_quantization(model, settings, int4_rows=wide)
    embedding = word_embeddings(model)
    ids = torch.arange(embedding.num_embeddings)
    seen = embedding(ids).detach()
    embedding.weight.grad = None
    embedding(ids).sum().backward()
    expected_grad = torch.ones_like(embedding.weight)
    expected_grad[embedding.padding_idx] = 0  # the padding row never receives gradient
    assert torch.equal(embedding.weight.grad, expected_grad)  # straight through
    strip_fake_quantization(model)
    master = word_embeddings(model).weight.detach().clone()
    state, record = compress_embedding_state(model, dict(model.state_dict()), method, wide)
    name, (rows, columns) = record["module"], record["shape"]
    assert f"{name}.weight" not in state
    stored = _load_embedding(dict(state), record)[f"{name}.weight"]
    assert torch.equal(seen, stored)
    assert state[f"{name}.weight_codes"].shape[0] == rows - int4_rows
    if int4_rows:
        mask = int4_row_mask(rows, wide)
        assert record["int4_rows"] == int4_rows and state[f"{name}.int4_row_ids"].tolist() == wide.tolist()
        assert list(state[f"{name}.int4_codes"].shape) == [int4_rows, columns // 2]
        incomplete = {key: value for key, value in state.items() if key != f"{name}.int4_row_ids"}
        with pytest.raises(ValueError, match=f"lack {name}.int4_row_ids: the checkpoint is incomplete"):
            _load_embedding(incomplete, record)
        # the int4 rows are closer to the trained rows than the ternary ones (that is what their bytes buy)
        error = ((stored - master) ** 2).sum(dim=1)
        assert mask.all() or error[mask].mean() < 0.2 * error[~mask].mean()
        estimate = estimated_checkpoint_bytes(model, settings) - estimated_checkpoint_bytes(
            model, PTQConfig(embedding_quantization="int2"))
        assert estimate == int4_rows * (columns // 2 - columns // 4 + 4)
        with pytest.raises(ValueError, match="int4 rows are kept among int2 rows only, not among int4 rows"):
            compress_embedding_state(tiny_model(tiny_bert_config()), dict(model.state_dict()), "int4", wide)


def test_layer_quantization_errors_grow_with_the_block_size(tokenizer):
    from common.config import PTQConfig
    from common.quantization import layer_quantization_errors, quantizable_linear_names, worst_layers
    from conftest import batch_for

    model = tiny_model(tiny_bert_config())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fine = layer_quantization_errors(model, PTQConfig(blocksize=64), [batch_for(tokenizer)])
    coarse = layer_quantization_errors(model, PTQConfig(blocksize=1024), [batch_for(tokenizer)])
    assert set(fine) == set(coarse) == set(quantizable_linear_names(model))
    for name, values in fine.items():
        assert 10 < values["weight_snr_db"] < 30 and 0 < values["output_relative_mse"] < 0.1  # NF4: about 20 dB
        # one absmax per 1024 weights instead of per 64: coarser steps, lower SNR, larger output error
        assert coarse[name]["weight_snr_db"] < values["weight_snr_db"]
    mean_error = {size: sum(v["output_relative_mse"] for v in errors.values()) / len(errors) for size, errors in ((64, fine), (1024, coarse))}
    assert mean_error[1024] > mean_error[64]
    ranked = [values["output_relative_mse"] for _, values in worst_layers(fine, len(fine))]
    assert ranked == sorted(ranked, reverse=True) and len(worst_layers(fine)) == 5
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items()), "measuring changes nothing"


# -- LSQ learned scales and mixed 8/4-bit precision -------------------------------------------------------------


def test_learned_scale_at_the_absmax_is_plain_fake_quantization_and_gets_gradients():
    from common.quantization import block_absmax

    weight = (torch.randn(6, 100, generator=torch.Generator().manual_seed(2)) * 0.05).requires_grad_()
    layer = FakeQuant4bitLinear(torch.nn.Linear(100, 6), "nf4", 64, True, learnable_scale=True)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.lsq_scale.copy_(block_absmax(weight, 64))
    x = torch.randn(3, 100)
    expected = torch.nn.functional.linear(x, fake_quantize_4bit_values(weight, "nf4", 64, True)[0], layer.bias)
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        layer.lsq_scale.mul_(0.5)  # half the block range: the largest weights are now clipped
    layer(x).pow(2).sum().backward()
    assert layer.lsq_scale.grad is not None and layer.lsq_scale.grad.abs().sum() > 0
    clipped = layer.weight.detach().abs() > torch.repeat_interleave(layer.lsq_scale.detach(), 64)[:600].reshape(6, 100)
    assert clipped.any() and torch.all(layer.weight.grad[clipped] == 0) and layer.weight.grad[~clipped].abs().sum() > 0


@pytest.mark.parametrize("double_quant", [False, True])
def test_learned_scales_are_exported_exactly(tokenizer, results_dir, double_quant):
    from common.config import QATKDConfig

    model = tiny_model(tiny_bert_config())
    settings = QATKDConfig(learnable_scales=True, double_quant=double_quant, embedding_quantization="none")
    names = prepare_fake_quantization(model, settings)
    from common.training import make_optimizer

    no_decay = {id(p) for group in make_optimizer(model, settings).param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert all(id(model.get_submodule(name).lsq_scale) in no_decay for name in names), "learned scales are not weight-decayed"
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in names:  # as if training had moved every scale by up to 30%
            scale = model.get_submodule(name).lsq_scale
            scale.mul_(0.7 + 0.6 * torch.rand(scale.shape, generator=generator))
    inputs = inputs_for(tokenizer)
    model.eval()
    with torch.no_grad():
        fake_logits = model(**inputs).logits
    learned = strip_fake_quantization(model)
    assert sorted(learned) == sorted(names)
    model_master_weights = {key: value.clone() for key, value in model.state_dict().items()}
    record = quantize_model_4bit(model, settings, learned_scales=learned)
    assert record["learned_scales"] == sorted(names)
    folder = save_checkpoint("qkd_4bit", model, tokenizer, {"quantization": record})
    reloaded = load_model(folder)
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits
    assert torch.allclose(reloaded_logits, fake_logits, atol=1e-5), (reloaded_logits - fake_logits).abs().max()
    absmax_only = tiny_model(tiny_bert_config())
    absmax_only.load_state_dict(model_master_weights)
    quantize_model_4bit(absmax_only, settings)
    layer = names[0]
    assert not torch.equal(dequantize_4bit_exact(absmax_only.get_submodule(layer).weight),
                           dequantize_4bit_exact(reloaded.get_submodule(layer).weight)), "the learned scales are what was stored"


def test_mixed_precision_keeps_the_worst_layers_at_8_bits_after_reload(tokenizer, results_dir):
    from common.quantization import (
        FakeQuant8bitLinear,
        Int8WeightLinear,
        estimated_checkpoint_bytes,
        fake_quantize_rows,
        quantizable_linear_names,
        layer_quantization_errors,
        plan_8bit_layers,
        worst_layers,
    )

    config = tiny_bert_config(hidden=64, ffn=256)
    model = tiny_model(config)
    batches = [batch_for(tokenizer)]
    all_4bit_mb = estimated_checkpoint_bytes(model, PTQConfig()) / 1e6
    all_8bit_mb = estimated_checkpoint_bytes(model, PTQConfig(), quantizable_linear_names(model)) / 1e6
    assert all_8bit_mb > all_4bit_mb
    with pytest.raises(ValueError, match=r"below the all-4-bit checkpoint .*raise it above"):
        plan_8bit_layers(model, PTQConfig(keep_8bit_size_budget_mb=all_4bit_mb * 0.9), layer_quantization_errors(model, PTQConfig(), batches))
    settings = PTQConfig(keep_8bit_size_budget_mb=(all_4bit_mb + all_8bit_mb) / 2)  # room for some layers, not all
    errors = layer_quantization_errors(model, settings, batches)
    eight_bit, plan = plan_8bit_layers(model, settings, errors)
    assert eight_bit and len(eight_bit) < len(errors)
    assert eight_bit[0] == worst_layers(errors, 1)[0][0]  # the largest 4-bit output error is kept first
    assert plan["estimated_mb"] <= settings.keep_8bit_size_budget_mb
    assert plan["estimated_mb"] == pytest.approx(estimated_checkpoint_bytes(model, settings, eight_bit) / 1e6)
    assert plan_8bit_layers(model, PTQConfig(), errors) == ([], None)
    by_count, count_plan = plan_8bit_layers(model, PTQConfig(keep_8bit_layers=3), errors)
    assert by_count == [name for name, _ in worst_layers(errors, 3)] and count_plan["count"] == 3
    assert count_plan["estimated_mb"] == pytest.approx(estimated_checkpoint_bytes(model, settings, by_count) / 1e6)
    linears = len(quantizable_linear_names(model))
    with pytest.raises(ValueError, match=f"keep_8bit_layers=99 exceeds the {linears} quantizable encoder Linears of this model; give 1 to {linears}"):
        plan_8bit_layers(model, PTQConfig(keep_8bit_layers=99), errors)
    with pytest.raises(ValueError, match="both choose the 8-bit Linears; give one of them"):
        PTQConfig(keep_8bit_layers=2, keep_8bit_size_budget_mb=5.0)

    fake = tiny_model(config)
    fake.load_state_dict(model.state_dict())
    prepare_fake_quantization(fake, settings, eight_bit)
    assert all(isinstance(fake.get_submodule(name), FakeQuant8bitLinear) for name in eight_bit)
    record = quantize_model_4bit(model, settings, eight_bit=eight_bit)
    assert record["modules_8bit"] == [name for name in record["modules_8bit"] if name in eight_bit] and set(record["modules_8bit"]) == set(eight_bit)
    assert not set(record["modules"]) & set(eight_bit)
    state, embedding = compress_embedding_state(model, dict(model.state_dict()), settings.embedding_quantization)
    folder = save_checkpoint("ptq_4bit", model, tokenizer, {"quantization": record, "embedding_quantization": embedding}, state_dict=state)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        tensor_bytes = sum(stored.get_tensor(key).numel() * stored.get_tensor(key).element_size() for key in stored.keys())
    assert tensor_bytes == pytest.approx(plan["estimated_mb"] * 1e6, rel=0.03)  # the estimate the budget is checked on
    reloaded = load_model(folder)
    import bitsandbytes as bnb

    for name in record["modules"]:
        assert isinstance(reloaded.get_submodule(name), bnb.nn.Linear4bit), name
    for name in eight_bit:
        layer = reloaded.get_submodule(name)
        assert isinstance(layer, Int8WeightLinear) and layer.weight_codes.dtype == torch.int8, name
        assert torch.equal(layer.dequantized_weight(), fake_quantize_rows(fake.get_submodule(name).weight.detach(), 8)), name
    inputs = inputs_for(tokenizer)
    fake.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, fake(**inputs).logits, atol=1e-5), "trained (fake) and stored 8/4-bit models agree"



def test_a_new_format_loads_through_the_format_table(results_dir, tokenizer):
    """A format registered from outside the loader (here fp16 storage of the encoder Linears, a test double) is
    loaded by load_model through the record's method, with no change to the loader."""
    from torch import nn

    from common.architecture import set_module
    from common.quantization import FORMATS, QuantizedFormat, quantizable_linear_names, register_format

    class HalfLinear(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.register_buffer("weight_half", torch.zeros(linear.out_features, linear.in_features, dtype=torch.float16))
            self.bias = linear.bias

        def forward(self, input):
            return nn.functional.linear(input, self.weight_half.float(), self.bias)

    def load_half(model, state, record):
        consumed = set()
        for name in record["modules"]:
            module = HalfLinear(model.get_submodule(name))
            with torch.no_grad():
                module.weight_half.copy_(state[f"{name}.weight_half"])
                module.bias.copy_(state[f"{name}.bias"])
            set_module(model, name, module)
            consumed.update({f"{name}.weight_half", f"{name}.bias"})
        return model, consumed

    model = tiny_model(tiny_bert_config())
    names = quantizable_linear_names(model)
    state = {key: value for key, value in model.state_dict().items() if not any(key == f"{n}.weight" for n in names)}
    state.update({f"{name}.weight_half": model.get_submodule(name).weight.detach().half() for name in names})
    register_format(QuantizedFormat("test_fp16", load_half, lambda: (HalfLinear,)))
    try:
        folder = save_checkpoint("ptq_4bit", model, tokenizer, {"quantization": {"method": "test_fp16", "modules": names}},
                                 state_dict=state)
        reloaded = load_model(folder)
        assert all(isinstance(reloaded.get_submodule(name), HalfLinear) for name in names)
        with torch.no_grad():
            expected, got = model(**inputs_for(tokenizer)).logits, reloaded(**inputs_for(tokenizer)).logits
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)
        assert not torch.equal(got, expected)  # the fp16 weights really were used
    finally:
        FORMATS.pop("test_fp16")
    with pytest.raises(ValueError, match="Unknown quantization method 'test_fp16'.*known: bitsandbytes_4bit, torch_dynamic_int8"):
        load_model(folder)
