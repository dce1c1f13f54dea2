"""4-bit NF4/FP4 quantization (real, through bitsandbytes, and fake, for training), compressed embeddings and
an int8 CPU deployment model.

What is quantized: every ``nn.Linear`` inside the encoder layers. Embeddings, LayerNorms, the pooler and the
classifier stay in full precision (bitsandbytes cannot quantize the small classifier of a pruned model, and
the head is where 4-bit error hurts most), unless ``skip_modules`` adds more to skip. Word embeddings can be
stored row-wise in int8/int4 in the checkpoint and are dequantized on load.

Fake quantization reproduces bitsandbytes' CPU ``quantize_4bit`` exactly: flatten the weight, cut it into
blocks of ``blocksize``, scale each by the reciprocal of its absmax, pick the code by bucketizing against the
midpoints of the sorted codebook, and (double quantization) store the absmax in bitsandbytes' 8-bit blockwise
format. The backward pass is the straight-through estimator. So a model trained with fake quantization and
exported gives bit-identical 4-bit weights (tested element-wise).

CPU traps handled here (see DEVELOPERS.md): bitsandbytes computes in bf16 on CPUs with AVX512-BF16 unless
``support_avx512bf16_for_cpu`` is False, and its first ``eval()`` + ``no_grad`` forward repacks the weights,
which breaks later training. Loaded 4-bit models therefore use the fp32 path unless the checkpoint's
``compute_dtype`` is bfloat16, and training never touches a real 4-bit module.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import encoder_prefix, set_module, spec_for

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALWAYS_SKIPPED = ("classifier", "pre_classifier", "pooler")
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for double-quantized absmax
EMBEDDING_BITS = {"int8": 8, "int4": 4}


# -- which modules --------------------------------------------------------------------------------------


def quantizable_linear_names(model: nn.Module, skip_modules: tuple | list = ()) -> list[str]:
    """Names of the encoder's ``nn.Linear`` modules, minus any whose name contains a ``skip_modules`` entry."""
    prefix = encoder_prefix(model)
    skipped = tuple(skip_modules) + ALWAYS_SKIPPED
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix) and not any(s in name for s in skipped)
    ]


# -- codebooks and fake quantization ------------------------------------------------------------------------


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 values of bitsandbytes' NF4 or FP4 code, sorted ascending."""
    from bitsandbytes.functional import get_4bit_type

    return torch.sort(get_4bit_type(quant_type, device="cpu").float()).values


def _double_quantize_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """absmax as bitsandbytes stores it with compress_statistics: 8-bit blockwise of (absmax - mean), + mean."""
    from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise

    device = absmax.device
    absmax = absmax.detach().float().cpu()
    offset = absmax.mean()
    quantized, state = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return (dequantize_blockwise(quantized, state) + offset).to(device)


def block_absmax(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The absmax of every block of the flattened weight (the last block may be shorter), as bitsandbytes takes it."""
    flat = weight.detach().reshape(-1).float()
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1)[0]
    if flat.numel() > full:
        absmax = torch.cat([absmax, flat[full:].abs().max().unsqueeze(0)])
    return absmax


def fake_quantize_4bit_values(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                              scales: Optional[torch.Tensor] = None):
    """(quantize -> dequantize)(weight) exactly as bitsandbytes does on CPU; also returns the code indices.
    ``scales`` replaces each block's absmax (learned LSQ scales): weights beyond a block's scale are clipped to the
    largest code."""
    code = codebook(quant_type).to(weight.device)
    midpoints = (code[:-1] + code[1:]) / 2
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    absmax = block_absmax(weight, blocksize) if scales is None else scales.detach().float()
    full = n - n % blocksize
    safe = absmax.clamp(min=1e-38)
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * (1.0 / safe[: full // blocksize].view(-1, 1)), -1, 1).reshape(-1)
    if n > full:  # bitsandbytes divides the short last block by its scale instead of multiplying by the reciprocal
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / safe[-1], -1, 1)])
    indices = torch.bucketize(scaled, midpoints)
    if double_quant:
        absmax = _double_quantize_absmax(absmax)
    per_weight = torch.repeat_interleave(absmax, blocksize)[:n]
    values = (code[indices] * per_weight).reshape(weight.shape).to(weight.dtype)
    return values, indices.reshape(weight.shape)


@torch.no_grad()
def layer_quantization_errors(model: nn.Module, settings, batches, names: Optional[list[str]] = None,
                              scales: Optional[dict[str, torch.Tensor]] = None) -> dict[str, dict]:
    """How much 4-bit quantization changes each linear layer of a full-precision ``model``, before quantizing it:
    ``weight_snr_db`` = 10 log10(|W|^2 / |W - Q(W)|^2), and ``output_relative_mse`` = mean |x (W - Q(W))^T|^2 /
    mean |x W^T + b|^2 over the layer's real inputs ``x`` on ``batches`` (calibration batches of tokenizer outputs).
    Q is bitsandbytes' quantize-dequantize with the checkpoint's settings. Low SNR / high MSE marks the layers to
    keep at 8 bits first. ``scales[name]``: learned per-block scales of that layer instead of its absmax."""
    from .data import model_inputs

    names = names or quantizable_linear_names(model, settings.skip_modules)
    modules = {name: model.get_submodule(name) for name in names}
    scales = scales or {}
    quantized = {name: fake_quantize_4bit_values(module.weight, settings.quant_type, settings.blocksize, settings.double_quant,
                                                 scales.get(name))[0]
                 for name, module in modules.items()}
    sums = {name: [0.0, 0.0] for name in names}  # error energy, output energy

    def recorder(name):
        def record(module, inputs):
            x = inputs[0].float()
            output = nn.functional.linear(x, module.weight.float(), None if module.bias is None else module.bias.float())
            error = nn.functional.linear(x, (module.weight - quantized[name]).float())
            sums[name][0] += float((error ** 2).sum())
            sums[name][1] += float((output ** 2).sum())
        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(**{key: value.to(device) for key, value in model_inputs(batch).items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    errors = {}
    for name, module in modules.items():
        difference = float(((module.weight - quantized[name]).float() ** 2).sum())
        energy = float((module.weight.float() ** 2).sum())
        errors[name] = {
            "weight_snr_db": 10 * math.log10(energy / difference) if difference > 0 else None,  # None: exact
            "output_relative_mse": sums[name][0] / sums[name][1] if sums[name][1] > 0 else None,
        }
    return errors


def worst_layers(errors: dict[str, dict], count: int = 5) -> list[tuple[str, dict]]:
    """The ``count`` layers with the highest relative output error (then lowest weight SNR)."""
    return sorted(errors.items(), key=lambda item: (-(item[1]["output_relative_mse"] or 0.0),
                                                    item[1]["weight_snr_db"] if item[1]["weight_snr_db"] is not None else math.inf))[:count]


class _StraightThrough4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, quant_type, blocksize, double_quant):
        return fake_quantize_4bit_values(weight, quant_type, blocksize, double_quant)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None


def fake_quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """Forward: the 4-bit value of each weight. Backward: the gradient passes through unchanged (STE)."""
    return _StraightThrough4bit.apply(weight, quant_type, blocksize, double_quant)


class _LearnedScale4bit(torch.autograd.Function):
    """LSQ (Esser et al., 2020) on bitsandbytes' block format: value = code[nearest(w / s)] * s per block.

    Gradients: to the weight, straight through where |w| <= s and zero where it is clipped; to the block scale s,
    code - w/s inside and the clipped code (+-1) outside, summed over the block and multiplied by LSQ's
    1/sqrt(block size x largest code level) so the scales move about as fast as the weights.
    """

    @staticmethod
    def forward(ctx, weight, scales, quant_type, blocksize, double_quant):
        values, indices = fake_quantize_4bit_values(weight, quant_type, blocksize, double_quant, scales)
        ctx.save_for_backward(weight, scales, indices)
        ctx.settings = (quant_type, blocksize)
        return values

    @staticmethod
    def backward(ctx, grad_output):
        weight, scales, indices = ctx.saved_tensors
        quant_type, blocksize = ctx.settings
        n = weight.numel()
        per_weight = torch.repeat_interleave(scales.detach().float(), blocksize)[:n].reshape(weight.shape)
        ratio = weight.detach().float() / per_weight
        inside = ratio.abs() <= 1
        code = codebook(quant_type).to(weight.device)[indices]
        grad_weight = (grad_output * inside).to(weight.dtype)
        per_element = (grad_output.float() * torch.where(inside, code - ratio, code)).reshape(-1)
        per_element = F.pad(per_element, (0, scales.numel() * blocksize - n)).reshape(-1, blocksize)
        gradient_scale = 1.0 / math.sqrt(blocksize * 7)  # 7: the positive code levels of a 4-bit code
        return grad_weight, (per_element.sum(dim=1) * gradient_scale).to(scales.dtype), None, None, None


class _FakeQuantLinear(nn.Linear):
    """A Linear holding a full-precision master weight (copied from ``linear``) that its forward quantizes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)


class FakeQuant4bitLinear(_FakeQuantLinear):
    """A Linear whose master weight is fake-quantized to 4 bits in every forward pass; with ``learnable_scale``
    each block's scale is a parameter (``lsq_scale``, initialised to the block's absmax) trained by LSQ."""

    def __init__(self, linear: nn.Linear, quant_type: str, blocksize: int, double_quant: bool, learnable_scale: bool = False) -> None:
        super().__init__(linear)
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.lsq_scale = nn.Parameter(block_absmax(linear.weight, blocksize).clamp(min=1e-8)) if learnable_scale else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.lsq_scale is None:
            weight = fake_quantize_4bit(self.weight, self.quant_type, self.blocksize, self.double_quant)
        else:
            weight = _LearnedScale4bit.apply(self.weight, self.lsq_scale, self.quant_type, self.blocksize, self.double_quant)
        return F.linear(input, weight, self.bias)


class FakeQuant8bitLinear(_FakeQuantLinear):
    """A Linear seen through row-wise symmetric int8 storage (``Int8WeightLinear``) in every forward pass (STE)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, _StraightThroughRows.apply(self.weight, 8), self.bias)


def fake_quantize_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-wise symmetric quantize -> dequantize, exactly as the checkpoint stores embeddings."""
    levels = 2 ** (bits - 1) - 1
    scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / levels
    codes = torch.round(weight.detach() / scale.unsqueeze(1)).clamp(-levels, levels)
    return codes * scale.unsqueeze(1)


class _StraightThroughRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bits):
        return fake_quantize_rows(weight, bits)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class FakeQuantEmbedding(nn.Embedding):
    """Word embeddings seen through their int8/int4 row-wise storage in every forward pass (STE backward)."""

    def __init__(self, embedding: nn.Embedding, bits: int) -> None:
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                         device=embedding.weight.device, dtype=embedding.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(embedding.weight)
        self.bits = bits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, _StraightThroughRows.apply(self.weight, self.bits), self.padding_idx)


def prepare_fake_quantization(model: nn.Module, settings, eight_bit: tuple | list = ()) -> list[str]:
    """Swap the quantizable Linears for ``FakeQuant4bitLinear`` (``FakeQuant8bitLinear`` for those named in
    ``eight_bit``; learned block scales when ``settings.learnable_scales``), and the word embeddings for
    ``FakeQuantEmbedding`` when they will be stored quantized, in place; return the Linears' names."""
    names = quantizable_linear_names(model, settings.skip_modules)
    learnable = getattr(settings, "learnable_scales", False)
    for name in names:
        linear = model.get_submodule(name)
        set_module(model, name, FakeQuant8bitLinear(linear) if name in eight_bit else
                   FakeQuant4bitLinear(linear, settings.quant_type, settings.blocksize, settings.double_quant, learnable))
    if settings.embedding_quantization != "none":
        name = spec_for(model).embeddings
        set_module(model, name, FakeQuantEmbedding(model.get_submodule(name), EMBEDDING_BITS[settings.embedding_quantization]))
    return names


def strip_fake_quantization(model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn fake-quantized modules back into plain Linears and Embeddings holding the master weights; return the
    learned block scales by module name (empty without LSQ), which ``quantize_model_4bit`` must be given."""
    learned = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuant4bitLinear) and module.lsq_scale is not None:
            learned[name] = module.lsq_scale.detach().float().cpu().clone()
        if isinstance(module, _FakeQuantLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=module.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(module.weight)
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            set_module(model, name, plain)
        elif isinstance(module, FakeQuantEmbedding):
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx, dtype=module.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(module.weight)
            set_module(model, name, plain)
    return learned


# -- real 4-bit (bitsandbytes) ------------------------------------------------------------------------------


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


class Int8WeightLinear(nn.Module):
    """An encoder Linear that mixed precision keeps at 8 bits: row-wise symmetric int8 codes and one fp32 scale per
    output row (as ``FakeQuant8bitLinear`` trains it), computed in the input's dtype with the dequantized weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, scale = quantize_rows(linear.weight.detach().float().cpu(), 8)
        with torch.no_grad():
            module.weight_codes.copy_(codes)
            module.weight_scale.copy_(scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().float().cpu())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_scale.unsqueeze(1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.dequantized_weight().to(input.dtype), bias)


# -- mixed precision: which Linears stay at 8 bits ------------------------------------------------------------


def estimated_checkpoint_bytes(model: nn.Module, settings, eight_bit: tuple | list = ()) -> float:
    """Weight bytes of ``model`` (full precision) once stored by stage 9/10 with ``settings``: quantizable Linears
    in 4 bits (``bits_per_weight``), those in ``eight_bit`` as int8 plus a scale per row, the word embeddings per
    ``settings.embedding_quantization``, everything else at its own dtype."""
    quantizable = set(quantizable_linear_names(model, settings.skip_modules))
    embedding_key = f"{spec_for(model).embeddings}.weight"
    embedding_bits = EMBEDDING_BITS.get(settings.embedding_quantization)
    total = 0.0
    for key, tensor in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in quantizable and key.endswith(".weight"):
            rows, columns = tensor.shape
            if module in eight_bit:
                total += rows * columns + 4 * rows
            else:  # codes and block scales, plus bitsandbytes' per-layer state: code map, nested code map, packed record
                total += rows * columns * bits_per_weight(settings.blocksize, settings.double_quant) / 8 + 64 + 170
                total += 1024 if settings.double_quant else 0
        elif key == embedding_key and embedding_bits:
            rows, columns = tensor.shape
            total += rows * math.ceil(columns * embedding_bits / 8) + 4 * rows
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def plan_8bit_layers(model: nn.Module, settings, errors: dict[str, dict]) -> tuple[list[str], Optional[dict]]:
    """The Linears to keep at 8 bits under ``settings.keep_8bit_size_budget_mb``: worst 4-bit output error first
    (``worst_layers``), each kept while the estimated checkpoint stays within the budget (a layer that does not fit
    is passed over for smaller ones). Returns ([], None) when no budget is set."""
    budget_mb = settings.keep_8bit_size_budget_mb
    if budget_mb is None:
        return [], None
    all_4bit = estimated_checkpoint_bytes(model, settings)
    if all_4bit > budget_mb * 1e6:
        raise ValueError(
            f"keep_8bit_size_budget_mb={budget_mb} is below the all-4-bit checkpoint of this model ({all_4bit / 1e6:.2f} MB "
            f"estimated), so no layer can stay at 8 bits; raise it above {all_4bit / 1e6:.2f} or leave it unset."
        )
    chosen, size = [], all_4bit
    for name, _ in worst_layers(errors, count=len(errors)):
        candidate = estimated_checkpoint_bytes(model, settings, [*chosen, name])
        if candidate <= budget_mb * 1e6:
            chosen.append(name)
            size = candidate
    plan = {"budget_mb": budget_mb, "all_4bit_estimated_mb": all_4bit / 1e6, "estimated_mb": size / 1e6, "layers_8bit": chosen}
    logger.info("Mixed precision: %d of %d Linears kept at 8 bits (worst 4-bit output error first); estimated %.2f MB "
                "of a %.2f MB budget (all 4-bit: %.2f MB)", len(chosen), len(errors), size / 1e6, budget_mb, all_4bit / 1e6)
    return chosen, plan


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


# -- compressed word embeddings ---------------------------------------------------------------------------


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric row-wise quantization: (codes, per-row scale). int4 codes are packed two per byte."""
    levels = 2 ** (bits - 1) - 1  # 127 or 7
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / levels
    codes = torch.round(weight / scale.unsqueeze(1)).clamp(-levels, levels).to(torch.int8)
    if bits == 4:
        unsigned = (codes + 8).to(torch.uint8)
        if unsigned.shape[1] % 2:
            unsigned = F.pad(unsigned, (0, 1), value=8)
        codes = (unsigned[:, ::2] << 4) | unsigned[:, 1::2]
    return codes, scale.float()


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    if bits == 4:
        high = (codes >> 4).to(torch.int16) - 8
        low = (codes & 0xF).to(torch.int16) - 8
        codes = torch.stack([high, low], dim=2).reshape(codes.shape[0], -1)[:, :columns]
    return codes.float() * scale.unsqueeze(1)


def compress_embedding_state(model: nn.Module, state: dict, method: str) -> tuple[dict, Optional[dict]]:
    """Replace the word-embedding weight in ``state`` by row-wise codes and scales; return (state, record)."""
    if method == "none":
        return state, None
    name = spec_for(model).embeddings
    weight = state.pop(f"{name}.weight")
    codes, scale = quantize_rows(weight.float(), EMBEDDING_BITS[method])
    state[f"{name}.weight_codes"] = codes
    state[f"{name}.weight_scale"] = scale
    return state, {"method": method, "module": name, "shape": list(weight.shape)}


def _load_embedding(state: dict, record: dict) -> dict:
    name, bits = record["module"], EMBEDDING_BITS[record["method"]]
    codes, scale = state.pop(f"{name}.weight_codes"), state.pop(f"{name}.weight_scale")
    state[f"{name}.weight"] = dequantize_rows(codes, scale, bits, record["shape"][1])
    return state


# -- int8 CPU deployment model (torch dynamic quantization) ------------------------------------------------


def quantize_model_int8(model: nn.Module) -> tuple[nn.Module, dict]:
    """Dynamic int8 quantization of every Linear but the classifier head; weights per output channel."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = quantizable_linear_names(model)
    model = quantize_dynamic(model.to("cpu").eval(), {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8)
    return model, {"method": "torch_dynamic_int8", "modules": names}


def int8_state_dict(model: nn.Module) -> dict:
    """Plain tensors for safetensors: int8 codes, per-channel scales and zero points, and float biases."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    state = {}
    quantized = {name for name, module in model.named_modules() if isinstance(module, DynamicLinear)}
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(q + ".") for q in quantized) and isinstance(tensor, torch.Tensor):
            state[name] = tensor
    for name in quantized:
        weight, bias = model.get_submodule(name)._weight_bias()
        state[f"{name}.weight_int8"] = weight.int_repr()
        state[f"{name}.weight_scales"] = weight.q_per_channel_scales().float()
        state[f"{name}.weight_zero_points"] = weight.q_per_channel_zero_points().to(torch.int64)
        if bias is not None:
            state[f"{name}.bias"] = bias.float()
    return state


def _load_int8(model: nn.Module, state: dict, record: dict) -> tuple[nn.Module, set[str]]:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = quantize_dynamic(model.eval(), {name: per_channel_dynamic_qconfig for name in record["modules"]}, dtype=torch.qint8)
    consumed = set()
    for name in record["modules"]:
        keys = [f"{name}.weight_int8", f"{name}.weight_scales", f"{name}.weight_zero_points"]
        if any(key not in state for key in keys):
            raise ValueError(f"The int8 checkpoint lacks the weights of {name}; it is corrupt. Re-run 11_export_int8.py.")
        weight = torch._make_per_channel_quantized_tensor(state[keys[0]], state[keys[1]].double(), state[keys[2]], axis=0)
        bias = state.get(f"{name}.bias")
        model.get_submodule(name).set_weight_bias(weight, bias)
        consumed.update(keys + ([f"{name}.bias"] if bias is not None else []))
    return model, consumed


# -- loading any checkpoint -----------------------------------------------------------------------------------


def is_movable(record: dict) -> bool:
    """Only full-precision models move to a GPU; the quantized ones here are CPU models."""
    return not record.get("quantization") and not record.get("embedding_quantization")


def load_quantized_state(model: nn.Module, state: dict, record: dict) -> nn.Module:
    """Load ``state`` into the skeleton ``model``, installing 4-bit, int8 and compressed-embedding weights."""
    state = dict(state)
    if record.get("embedding_quantization"):
        state = _load_embedding(state, record["embedding_quantization"])
    quantization = record.get("quantization") or {}
    consumed: set[str] = set()
    method = quantization.get("method")
    if method == "bitsandbytes_4bit":
        consumed = _load_4bit_modules(model, state, quantization)
        for name in quantization.get("modules_8bit", []):  # plain buffers: copied below like any other tensor
            linear = model.get_submodule(name)
            set_module(model, name, Int8WeightLinear(linear.in_features, linear.out_features, linear.bias is not None))
    elif method == "torch_dynamic_int8":
        model, consumed = _load_int8(model, state, quantization)
    elif method is not None:
        raise ValueError(f"Unknown quantization method {method!r} in compression.json; known: bitsandbytes_4bit, torch_dynamic_int8.")
    remaining = {key: value for key, value in state.items() if key not in consumed}
    expected = {key for key in model.state_dict() if key not in consumed and not _is_quantized_key(model, key)}
    missing, unexpected = sorted(expected - set(remaining)), sorted(set(remaining) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint weights do not match the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            f"The checkpoint is corrupt or was written by another version; re-run its stage."
        )
    if method is None:
        model.load_state_dict(remaining, strict=True)
        return model
    # Quantized modules reject load_state_dict without their own keys, so copy the plain tensors directly.
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for key, value in remaining.items():
            if tensors[key].shape != value.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(tensors[key].shape)} in the rebuilt model.")
            tensors[key].copy_(value)
    return model


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    """State keys of 4-bit/int8 modules that ``load_state_dict`` must not see (they were installed directly)."""
    import bitsandbytes as bnb
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        try:
            module = model.get_submodule(".".join(parts[:end]))
        except AttributeError:
            continue
        if isinstance(module, (bnb.nn.Linear4bit, DynamicLinear)):
            return True
    return False


def bits_per_weight(blocksize: int, double_quant: bool) -> float:
    """Storage cost of one 4-bit weight including its absmax scale."""
    return 4 + (8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE) if double_quant else 32 / blocksize)


__all__ = [
    "FakeQuant4bitLinear",
    "FakeQuant8bitLinear",
    "Int8WeightLinear",
    "estimated_checkpoint_bytes",
    "plan_8bit_layers",
    "bits_per_weight",
    "compress_embedding_state",
    "dequantized_linear_weights",
    "fake_quantize_4bit",
    "fake_quantize_4bit_values",
    "int8_state_dict",
    "load_quantized_state",
    "prepare_fake_quantization",
    "quantizable_linear_names",
    "quantize_model_4bit",
    "quantize_model_int8",
    "strip_fake_quantization",
]
