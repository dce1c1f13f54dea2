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


def _logits_port(compiled):
    """The compiled model's ``logits`` output (its first output when none is named so)."""
    return next((port for port in compiled.outputs if "logits" in port.get_names()), compiled.outputs[0])


LENGTH_STEP = 16  # sequence lengths are padded up to a multiple of this, so a few static shapes cover every input
STATIC_SHAPES = 12  # compiled static shapes kept per model (batch-1 buckets included); others run the dynamic one


def padded_length(length: int) -> int:
    return -(-max(length, 1) // LENGTH_STEP) * LENGTH_STEP


def tokenizer_limits(folder: Path) -> tuple[Optional[int], int]:
    """The truncation length and the padding id of the folder's ``tokenizer.json`` (None, 0 when it has none)."""
    import json

    try:
        tokenizer = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 0
    truncation, padding = tokenizer.get("truncation") or {}, tokenizer.get("padding") or {}
    return truncation.get("max_length"), int(padding.get("pad_id") or 0)


class OpenVinoClassifier:
    """Logits from an OpenVINO IR classifier (``model.xml`` + ``model.bin``) on the CPU.

    The CPU plugin runs a model compiled for one static shape about twice as fast at batch 1 as the dynamic-shape
    model, and the dynamic one pays 10-25 ms the first time it meets each new length (measured on the default run's
    pruned int8 IR, 2 threads: static p50 0.51 / p95 0.76 ms against 1.13 / 1.37 ms warm and p95 25 ms cold). So
    inputs are padded (masked, so the logits do not change) to a multiple of ``LENGTH_STEP`` tokens and run by a
    model compiled for that shape: at batch 1 for every such length up to the folder's tokenizer truncation, compiled
    when the classifier is made, and for other batch sizes on first use, up to ``STATIC_SHAPES`` shapes in all;
    anything else runs the dynamic model. ``static_shapes=False`` runs everything dynamically.
    """

    def __init__(self, path: str | Path, num_threads: Optional[int] = None, device: str = "CPU",
                 precision: Optional[str] = None, static_shapes: bool = True) -> None:
        """``precision``: the CPU plugin's inference precision ('f32', 'bf16'); default: the plugin's choice."""
        self.path = Path(path)
        if not self.path.is_file() or not weights_file(self.path).is_file():
            raise FileNotFoundError(f"OpenVINO model {self.path} (with {weights_file(self.path).name}) does not exist.")
        self._core, self.device = _core(), device
        self._config = {"PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            self._config["INFERENCE_NUM_THREADS"] = int(num_threads)
        if precision:
            self._config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = self._core.compile_model(self._core.read_model(str(self.path)), device, self._config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self.logits_port = _logits_port(self.compiled)
        self.static_shapes = static_shapes
        self._static: dict[tuple[int, int], object] = {}  # (batch, padded length) -> infer request
        max_length, self.pad_id = tokenizer_limits(self.path.parent)
        if static_shapes and max_length:
            for length in range(LENGTH_STEP, padded_length(max_length) + 1, LENGTH_STEP):
                if len(self._static) < STATIC_SHAPES:
                    self._static[(1, length)] = self._compile_static(1, length)

    def _compile_static(self, batch: int, length: int):
        import openvino as ov

        model = self._core.read_model(str(self.path))
        model.reshape({name: ov.PartialShape([batch, length]) for name in self.input_names})
        compiled = self._core.compile_model(model, self.device, self._config)
        return compiled.create_infer_request(), _logits_port(compiled)

    def _padded(self, feeds: dict) -> tuple[dict, object, object]:
        """The feeds padded to their static shape, with the request and output port that run them."""
        if not self.static_shapes or "attention_mask" not in feeds:  # padding is only invisible behind a mask
            return feeds, self.request, self.logits_port
        batch, length = np.shape(next(iter(feeds.values())))
        shape = (int(batch), padded_length(int(length)))
        if shape not in self._static:
            if len(self._static) >= STATIC_SHAPES:
                return feeds, self.request, self.logits_port
            self._static[shape] = self._compile_static(*shape)
        request, port = self._static[shape]
        extra = shape[1] - int(length)
        if extra:
            fill = {"input_ids": self.pad_id}
            feeds = {name: np.pad(value, ((0, 0), (0, extra)), constant_values=fill.get(name, 0))
                     for name, value in feeds.items()}
        return feeds, request, port

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
        feeds, request, port = self._padded(feeds)
        return request.infer(feeds)[port]

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
    return {"method": "nncf_ptq_int8", "model_type": "transformer", "subset_size": subset_size,
            "fake_quantize_ops": _fake_quantize_ops(quantized)}


def _fake_quantize_ops(model) -> int:
    """The int8 quantizers left in a quantized model: the accuracy-aware mode's count below the plain one's is the
    layers it sent back to float."""
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def quantize_int8_with_accuracy_control(xml_path: Path, target: Path, batches: list[dict], subset_size: int,
                                        validation: list[tuple[dict, np.ndarray]], max_drop_points: float) -> dict:
    """NNCF's accuracy-aware int8: post-training int8 as ``quantize_int8``, then layers back to float, ranked by how
    much they cost, until the accuracy on ``validation`` ((feeds, labels) batches) is at most ``max_drop_points``
    below the float model's."""
    import nncf
    import openvino as ov

    def validate(compiled, items) -> float:
        port = _logits_port(compiled)
        correct = total = 0
        for feeds, labels in items:
            predicted = np.asarray(compiled(feeds)[port]).argmax(-1)
            correct += int((predicted == labels).sum())
            total += len(labels)
        return correct / total

    model = _core().read_model(str(xml_path))
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(batches), nncf.Dataset(validation), validate, max_drop=max_drop_points / 100,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=subset_size, model_type=nncf.ModelType.TRANSFORMER,
    )
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return {"method": "nncf_accuracy_control_int8", "model_type": "transformer", "subset_size": subset_size,
            "max_drop_points": max_drop_points, "validation_batches": len(validation),
            "fake_quantize_ops": _fake_quantize_ops(quantized)}


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
