"""Fake 4-bit quantization for training (QKD), LSQ learned block scales, and the per-layer 4-bit error.

Fake quantization reproduces bitsandbytes' CPU ``quantize_4bit`` exactly: flatten the weight, cut it into blocks of
``blocksize``, scale each by the reciprocal of its absmax, pick the code by bucketizing against the midpoints of the
sorted codebook, and (double quantization) store the absmax in bitsandbytes' 8-bit blockwise format. The backward pass
is the straight-through estimator. So a model trained with fake quantization and exported gives bit-identical 4-bit
weights (tested element-wise). Training never touches a real bitsandbytes module (its first ``eval()`` + ``no_grad``
forward repacks the weights, which breaks later training).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import set_module, spec_for
from .base import EMBEDDING_BITS, NESTED_BLOCKSIZE, quantizable_linear_names
from .rows import _StraightThroughRows, int4_row_mask


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
    from ..data import model_inputs

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


class FakeQuantEmbedding(nn.Embedding):
    """Word embeddings seen through their row-wise storage in every forward pass (STE backward); ``int4_rows``: the
    token ids whose rows are stored at int4 among ternary rows (``compress_embedding_state``)."""

    def __init__(self, embedding: nn.Embedding, bits: int, int4_rows: Optional[torch.Tensor] = None) -> None:
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                         device=embedding.weight.device, dtype=embedding.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(embedding.weight)
        self.bits = bits
        mask = int4_row_mask(embedding.num_embeddings, int4_rows, bits)
        # not persistent: the checkpoint stores the ids beside the codes, not this training-time mask
        self.register_buffer("int4_mask", None if mask is None else mask.to(embedding.weight.device), persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # rows are quantized independently, so only the gathered ones need it (not the whole table every step)
        rows = F.embedding(input, self.weight, self.padding_idx)
        mask = None if self.int4_mask is None else self.int4_mask[input].reshape(-1)
        return _StraightThroughRows.apply(rows.reshape(-1, rows.shape[-1]), self.bits, mask).reshape(rows.shape)


def prepare_fake_quantization(model: nn.Module, settings, eight_bit: tuple | list = (),
                              int4_rows: Optional[torch.Tensor] = None) -> list[str]:
    """Swap the quantizable Linears for ``FakeQuant4bitLinear`` (``FakeQuant8bitLinear`` for those named in
    ``eight_bit``; learned block scales when ``settings.learnable_scales``), and the word embeddings for
    ``FakeQuantEmbedding`` when they will be stored quantized (``int4_rows``: as ``compress_embedding_state``), in
    place; return the Linears' names."""
    names = quantizable_linear_names(model, settings.skip_modules)
    learnable = getattr(settings, "learnable_scales", False)
    for name in names:
        linear = model.get_submodule(name)
        set_module(model, name, FakeQuant8bitLinear(linear) if name in eight_bit else
                   FakeQuant4bitLinear(linear, settings.quant_type, settings.blocksize, settings.double_quant, learnable))
    if settings.embedding_quantization != "none":
        name = spec_for(model).embeddings
        set_module(model, name, FakeQuantEmbedding(model.get_submodule(name), EMBEDDING_BITS[settings.embedding_quantization],
                                                   int4_rows))
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

