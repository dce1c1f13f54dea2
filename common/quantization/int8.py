"""The int8 CPU deployment model: torch dynamic int8 (per output channel), stored as plain safetensors tensors."""

from __future__ import annotations

import torch
from torch import nn

from .base import quantizable_linear_names
from .loading import QuantizedFormat, register_format


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



def _dynamic_linear_types() -> tuple[type, ...]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return (DynamicLinear,)


register_format(QuantizedFormat("torch_dynamic_int8", _load_int8, _dynamic_linear_types))
