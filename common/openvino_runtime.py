"""OpenVINO: converting an exported ONNX classifier to OpenVINO IR, NNCF post-training int8 and 4-bit weight
compression, and running an IR behind the same interface as ``onnx_runtime.OnnxClassifier``.

OpenVINO's CPU plugin computes in bf16 by default where the CPU has bf16 instructions (AVX-512 BF16, AMX);
``OpenVinoClassifier.inference_precision`` reports what the compiled model actually uses, and stage 13 records it.
``openvino`` and ``nncf`` are imported only here, when an OpenVINO folder is written or run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".bin"  # an IR is model.xml (the graph) + model.bin (the weights)


def weights_file(xml: Path) -> Path:
    return Path(xml).with_suffix(WEIGHTS_SUFFIX)


def _core():
    import openvino as ov

    return ov.Core()


class OpenVinoClassifier:
    """Logits from an OpenVINO IR classifier (``model.xml`` + ``model.bin``) on the CPU."""

    def __init__(self, path: str | Path, num_threads: Optional[int] = None, device: str = "CPU",
                 precision: Optional[str] = None) -> None:
        """``precision``: the CPU plugin's inference precision ('f32', 'bf16'); default: the plugin's choice."""
        self.path = Path(path)
        if not self.path.is_file() or not weights_file(self.path).is_file():
            raise FileNotFoundError(f"OpenVINO model {self.path} (with {weights_file(self.path).name}) does not exist.")
        core = _core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(core.read_model(str(self.path)), device, config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self.logits_port = next((port for port in self.compiled.outputs if "logits" in port.get_names()), self.compiled.outputs[0])

    @property
    def inference_precision(self) -> str:
        """The precision the CPU plugin computes in (e.g. 'bf16' on CPUs with AVX-512 BF16 or AMX, else 'f32')."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def output_shapes(self) -> dict[str, list]:
        return {port.get_any_name(): [dim.get_length() if dim.is_static else None for dim in port.get_partial_shape()]
                for port in self.compiled.outputs}

    def feeds(self, batch: dict) -> dict:
        from .onnx_runtime import graph_feeds

        return graph_feeds(self.input_names, batch, self.path.name)

    def run(self, feeds: dict) -> np.ndarray:
        """Logits of ready feeds (``feeds(batch)``), for the latency harness."""
        return self.request.infer(feeds)[self.logits_port]

    def logits(self, batch: dict) -> np.ndarray:
        return np.asarray(self.run(self.feeds(batch)), dtype=np.float32)


def convert_onnx(onnx_path: Path, xml_path: Path) -> None:
    """The ONNX graph as OpenVINO IR, weights kept in fp32 (no fp16 compression, so the IR equals the ONNX model)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def quantize_int8(xml_path: Path, target: Path, batches: list[dict], subset_size: int) -> dict:
    """NNCF post-training int8 (transformer preset: activations and weights of the matrix products in int8, the
    sensitive element-wise parts kept in float) calibrated on ``batches`` of feeds."""
    import nncf
    import openvino as ov

    model = _core().read_model(str(xml_path))
    quantized = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=subset_size)
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return {"method": "nncf_ptq_int8", "model_type": "transformer", "subset_size": subset_size}


def compress_weights_4bit(xml_path: Path, target: Path, mode: str, group_size: int) -> dict:
    """NNCF 4-bit weight compression of every MatMul weight (``mode`` 'nf4', 'int4_sym' or 'int4_asym'; one scale
    per ``group_size`` weights along the input dimension). Applied to the dequantized QKD weights with NF4 and the
    QKD block size, it finds the trained codes again: each block's largest weight is its absmax, the NF4 scale."""
    import nncf
    import openvino as ov

    modes = {"nf4": nncf.CompressWeightsMode.NF4, "int4_sym": nncf.CompressWeightsMode.INT4_SYM,
             "int4_asym": nncf.CompressWeightsMode.INT4_ASYM}
    model = _core().read_model(str(xml_path))
    # a pruned layer's input width is rarely a multiple of the group: NNCF then picks the nearest group size that divides it
    advanced = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST,
                                                  min_adjusted_group_size=8)
    compressed = nncf.compress_weights(model, mode=modes[mode], group_size=group_size, ratio=1.0, all_layers=True,
                                       advanced_parameters=advanced)
    ov.save_model(compressed, str(target), compress_to_fp16=False)
    return {"method": "nncf_weight_compression", "mode": mode, "group_size": group_size,
            "group_size_fallback": "adjust (layers whose input width the group does not divide)"}


def stored_constants(xml_path: Path) -> dict[str, tuple[tuple, int]]:
    """``{name: (shape, bytes)}`` of the IR's constants (its weights), for the report's bytes-read column."""
    model = _core().read_model(str(xml_path))
    result = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            shape = tuple(op.get_output_shape(0))
            element = op.get_output_element_type(0)
            result[op.get_friendly_name()] = (shape, int(np.prod(shape, dtype=np.int64) * element.bitwidth // 8))
    return result
