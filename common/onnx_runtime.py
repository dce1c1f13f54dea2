"""Run and quantize ONNX classifiers with ONNX Runtime.

- ``OnnxClassifier``: an ``InferenceSession`` over one ``.onnx`` file with a fixed thread count, fed from the
  same tokenized batches as the torch models (``logits(batch)``).
- ``quantize_dynamic_int8`` / ``quantize_static_int8``: ``onnxruntime.quantization`` with the choices that
  keep accuracy on these graphs: only MatMuls with a constant weight (the attention-score MatMuls of two
  activations stay in float; quantizing them is what drops a naive static model to ~58%), per-channel
  symmetric int8 weights, and calibration on batches of one fixed shape (the histogram calibrators,
  Percentile and Entropy, fail on batches of different sequence lengths). On x86 CPUs without VNNI or AMX the
  weights take the 7-bit range (``int8_products_saturate``).
- ``optimize_graph``: ONNX Runtime's transformer optimizer (LayerNorm, Gelu, SkipLayerNorm fusions; attention
  is fused only when every layer has the same head count).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def return_freed_memory() -> None:
    """Give the heap memory freed while a session loaded back to the system (glibc's ``malloc_trim``).

    Folding a graph's constant decoding (the NF4-to-int8 file decodes its 4-bit codes when the session loads) frees
    its intermediates, but glibc keeps the freed pages: measured on the default run's 5.6 MB file, 124 MB stayed
    resident after loading, 19 MB after the trim (MatMulBnb4's file: 16 MB). Elsewhere (musl, macOS, Windows) this
    does nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def session_options(num_threads: Optional[int] = None, spinning: bool = True):
    """``spinning=False`` stops idle worker threads from busy-waiting after a run: in a round-robin benchmark a
    spinning session would steal the cores from the model timed right after it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    return options


def graph_feeds(input_names: list[str], batch: dict, model_name: str) -> dict:
    """A batch of tokenizer outputs (tensors, arrays or lists) as int64 arrays for the graph's ``input_names``; a
    missing ``token_type_ids`` is zeros (one segment). Shared by the ONNX Runtime and OpenVINO classifiers."""
    feeds = {}
    for name in input_names:
        value = batch.get(name)
        if value is None and name == "token_type_ids":
            value = np.zeros_like(np.asarray(batch["input_ids"]))
        if value is None:
            raise ValueError(f"{model_name} needs the input {name!r}, which the batch lacks.")
        feeds[name] = np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.int64)
    return feeds


class OnnxClassifier:
    """Logits from an ONNX classifier for batches of ``input_ids``/``attention_mask``(/``token_type_ids``)."""

    def __init__(self, path: str | Path, num_threads: Optional[int] = None, spinning: bool = True,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist.")
        self.session = ort.InferenceSession(str(self.path), session_options(num_threads, spinning), providers=list(providers))
        return_freed_memory()
        self.input_names = [item.name for item in self.session.get_inputs()]

    def feeds(self, batch: dict) -> dict:
        return graph_feeds(self.input_names, batch, self.path.name)

    def logits(self, batch: dict) -> np.ndarray:
        return self.session.run(["logits"], self.feeds(batch))[0]

    def run(self, feeds: dict):
        """All outputs for ready feeds (``feeds(batch)``), for the latency harness."""
        return self.session.run(None, feeds)

    def output_shapes(self) -> dict[str, list]:
        return {output.name: output.shape for output in self.session.get_outputs()}

    def __call__(self, **batch):
        """torch-like call for benchmark code that times ``model(**batch)``."""
        return self.logits(batch)


def predict_onnx(classifier: OnnxClassifier, loader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every example of a (torch) data loader."""
    all_logits, all_labels = [], []
    for batch in loader:
        all_logits.append(classifier.logits(batch))
        all_labels.append(batch["labels"].numpy())
    return np.concatenate(all_logits), np.concatenate(all_labels)


# -- quantization --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs one INFO line per tensor on the root logger: keep its warnings only, less its
    advice to pre-process (the static path does; the dynamic one quantizes only constant-weight MatMuls)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    outermost = _no_preprocessing_advice not in root.filters  # a nested use must not lift the outer one's filter
    root.addFilter(_no_preprocessing_advice)
    try:
        yield
    finally:
        if outermost:
            root.removeFilter(_no_preprocessing_advice)
        root.setLevel(level)


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


def matmul_names(path: Path) -> list[str]:
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "MatMul"]


def _constant_b_matmuls(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path))
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


def _extra_options() -> dict:
    import onnx

    # DefaultTensorType: shape inference cannot type the outputs of the optimizer's fused contrib ops
    return {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}


SATURATION_NOTE = ("7-bit weight range (reduce_range): this CPU has no VNNI or AMX, and ONNX Runtime's u8 x s8 kernels "
                   "there sum pairs of products in int16, which saturates with full-range weights")


def int8_products_saturate() -> bool:
    """Whether ONNX Runtime's int8 MatMuls saturate on this CPU: x86 without VNNI or AMX multiplies uint8 activations
    by int8 weights with AVX2's vpmaddubsw, which adds pairs of products in int16 and clips. Some models then fall to
    chance: all-mpnet-base-v2 in dynamic int8 on an AVX2-only CPU scored 46.4% on validation against 87.1% in fp32,
    and 86.8% with 7-bit weights (ONNX Runtime's ``reduce_range``, its documented remedy). Unknown flags (no
    /proc/cpuinfo) count as saturating: 7-bit weights cost little where they are not needed."""
    import platform

    from .evaluation import cpu_info

    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return False
    return cpu_info()["int8_acceleration"].startswith("none")


def int8_weight_bits() -> int:
    """The range this project's int8 weights take on this CPU: 7 bits where its int8 products saturate
    (``int8_products_saturate``), else 8. Files record it (``int8_weight_bits``) so that another CPU can check."""
    return 7 if int8_products_saturate() else 8


def int8_weight_levels(bits: int) -> int:
    """The largest symmetric int8 code of ``bits``-bit weights: 63 for 7 bits, 127 for 8."""
    if bits not in (7, 8):
        raise ValueError(f"int8 weights take 7 or 8 bits, not {bits!r}.")
    return 2 ** (bits - 1) - 1


INT8_WEIGHT_INPUTS = {"MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1, "QLinearMatMul": 3,
                      "DequantizeLinear": 0}  # operator -> which of its inputs is the int8 weight matrix


def int8_weight_bits_in_graph(path: Path) -> Optional[int]:
    """The range an ONNX file's int8 weight matrices take, read from its graph: 8 when a code lies beyond the 7-bit
    range (|code| > 64; ONNX Runtime's reduce_range stores -64..64), 7 when none does, None when the graph has no int8
    weight matrix (a float or 4-bit file, or the NF4-codes int8 file, which decodes its int8 weights when the session
    loads). For files whose record does not say (``int8_weight_bits``)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    products = {name for node in graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    weights = {node.input[index] for node in graph.node
               if node.op_type in INT8_WEIGHT_INPUTS and len(node.input) > INT8_WEIGHT_INPUTS[node.op_type]
               # a DequantizeLinear counts where it feeds a matrix product (ONNX Runtime fuses the pair into an int8
               # one), not where it decodes a table for a Gather
               and (node.op_type != "DequantizeLinear" or node.output[0] in products)
               for index in [INT8_WEIGHT_INPUTS[node.op_type]]}
    largest = [int(np.abs(numpy_helper.to_array(tensor).astype(np.int16)).max()) for tensor in graph.initializer
               if tensor.name in weights and tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 2]
    if not largest:
        return None
    return 8 if max(largest) > 64 else 7


def saturation_warning(path: Path, entry) -> Optional[str]:
    """What to tell a user about to run ``path`` here when its int8 weights take the full 8-bit range and this CPU's
    int8 products saturate: its accuracy can collapse here, as all-mpnet-base-v2's did (``int8_products_saturate``).
    The range is the record's (``entry``, the folder record's ``files`` entry: ``int8_weight_bits``), or where the
    record does not say (files written before it did, a file the user put in the folder, an unreadable entry) the
    graph's own (``int8_weight_bits_in_graph``). None where nothing is wrong or nothing can be read."""
    if not int8_products_saturate():
        return None
    recorded = entry.get("int8_weight_bits") if isinstance(entry, dict) else None
    if recorded is not None:
        if recorded != 8:
            return None
        origin = "it was written on a CPU with VNNI or AMX"
    else:
        try:
            if int8_weight_bits_in_graph(path) != 8:
                return None
        except Exception:  # onnx cannot parse it: loading it says what is wrong
            return None
        origin = "its graph's int8 weights reach beyond the 7-bit range"
    return (f"{path} stores its int8 weights in the full 8-bit range ({origin}), but this CPU has neither VNNI nor AMX: "
            f"ONNX Runtime's int8 products can saturate here and cost accuracy (all-mpnet-base-v2 fell from 87.1% to "
            f"46.4% on validation that way). Check its accuracy on this machine (7_evaluate_and_generate_report.py), "
            f"or re-export it here with 12_export_onnx.py, which then stores 7-bit weights.")


def _reduce_range(reduce_range: Optional[bool]) -> bool:
    return int8_products_saturate() if reduce_range is None else reduce_range


def _int8_weights(reduce_range: bool) -> str:
    return "int8 per channel, symmetric" + (f", {SATURATION_NOTE}" if reduce_range else "")


def quantize_dynamic_int8(source: Path, target: Path, reduce_range: Optional[bool] = None) -> dict:
    """Dynamic int8: weights of every constant-weight MatMul per channel; activations quantized at run time.
    ``reduce_range`` (default: ``int8_products_saturate()``) stores the weights in 7 bits."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = _constant_b_matmuls(source)
    reduce_range = _reduce_range(reduce_range)
    with _quiet_quantizer():
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, extra_options=_extra_options(),
        )
    return {"method": "ort_dynamic_int8", "weights": _int8_weights(reduce_range), "reduce_range": reduce_range,
            "quantized_matmuls": len(nodes)}


class FixedShapeReader:
    """``CalibrationDataReader`` over batches padded to one fixed length (histogram calibrators need it)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.position = 0

    def get_next(self) -> Optional[dict]:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def calibration_batches(tokenizer, texts: list[str], pairs: Optional[list[str]], input_names: Iterable[str], max_length: int,
                        batch_size: int, limit: int) -> list[dict]:
    """Tokenized calibration feeds (single texts or pairs), every one padded to ``max_length`` so all share one shape."""
    from .data import encode

    texts = texts[:limit]
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk_pairs = pairs[start : start + batch_size] if pairs is not None else None
        encoded = encode(tokenizer, texts[start : start + batch_size], chunk_pairs, padding="max_length", truncation=True,
                         max_length=max_length, return_tensors="np")
        batch = {}
        for name in input_names:
            value = encoded.get(name)
            batch[name] = (np.zeros_like(encoded["input_ids"]) if value is None else value).astype(np.int64)
        batches.append(batch)
    if len(batches) > 1 and len(batches[-1]["input_ids"]) != len(batches[0]["input_ids"]):
        batches.pop()  # a short last batch would break the fixed shape
    if not batches:
        raise ValueError("No calibration batches: the calibration split is empty.")
    return batches


def preprocess_for_static(source: Path, target: Path) -> None:
    """ONNX Runtime's recommended pre-processing (graph optimization, shape inference) before QDQ quantization.
    Symbolic shape inference fails on these graphs, so it is skipped."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet_quantizer():
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)


HISTOGRAM_BINS = 2048  # the histogram calibrators' resolution (see calibrated_ranges)


def calibrated_ranges(source: Path, batches: list[dict], method: str, percentile: float, scratch: Path) -> dict:
    """Activation ranges of the MatMul inputs and outputs by ONNX Runtime's Percentile or Entropy calibrator.

    ``quantize_static`` builds these calibrators with 128 histogram bins, and the Entropy search then has a single
    candidate, the full range (measured: its scales equal MinMax's to the bit). Run here with 2048 bins, they give
    their own ranges, which ``quantize_static`` then takes as ``TensorQuantOverrides``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrate = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[method]
    options = {"num_bins": HISTOGRAM_BINS, "percentile": percentile} if method == "percentile" else {
        "num_bins": HISTOGRAM_BINS, "num_quantized_bins": 128}
    with _quiet_quantizer():
        calibrator = create_calibrator(str(source), ["MatMul"], augmented_model_path=str(scratch / f"augmented_{method}.onnx"),
                                       calibrate_method=calibrate, extra_options=options)
        # one batch a call: a call holds every MatMul activation of all it is given (the 512 rows of a 12-layer base
        # model exceeded 20 GB) before adding them to its histograms
        for batch in batches:
            calibrator.collect_data(FixedShapeReader([batch]))
        if method == "entropy":
            calibrator.collector.get_entropy_threshold = entropy_threshold
        ranges = calibrator.compute_data()
    return {name: [{"rmin": np.float32(data.range_value[0]), "rmax": np.float32(data.range_value[1])}]
            for name, data in ranges.data.items()}


def entropy_threshold(histogram: tuple, num_quantized_bins: int) -> tuple:
    """ONNX Runtime's ``HistogramCollector.get_entropy_threshold`` with its element-by-element Python sums of the
    integer bin counts done by numpy: the same candidates, the same float32 KL divergences, hence the same range.
    ONNX Runtime's own took about 1 s a tensor at 2048 bins, minutes for the MatMuls of a 12-layer model."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    counts, edges, min_value, max_value = histogram[:4]
    zero_bin = counts.size // 2
    counts_before = np.concatenate([[0], np.cumsum(counts)])
    thresholds, divergences = [], []
    for half_width in range(num_quantized_bins // 2, zero_bin + 1):
        start, end = zero_bin - half_width, min(zero_bin + half_width + 1, counts.size)
        thresholds.append((edges[start], edges[end]))
        sliced = counts[start:end]
        reference = sliced.copy()  # the outliers clipped into the end bins
        reference[0] += counts_before[start]
        reference[-1] += counts_before[-1] - counts_before[end]
        merged = sliced.size // num_quantized_bins
        body = merged * num_quantized_bins
        quantized = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[body:].sum()
        nonzero = (reference[:body] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        candidate = np.zeros(reference.size, dtype=np.int64)  # integer, as ONNX Runtime's: the mean bin truncates
        candidate[:body] = np.repeat(np.where(nonzero != 0, quantized / np.maximum(nonzero, 1), 0).astype(np.int64), merged)
        reference, candidate = smooth_distribution(reference), smooth_distribution(candidate)
        divergence = np.inf if reference is None or candidate is None else entropy(reference, candidate)
        divergences.append(np.array(divergence, dtype=edges.dtype))
    low, high = thresholds[int(np.argmin(divergences))]
    return (min_value if low < min_value else low, max_value if high > max_value else high)


def quantize_static_int8(source: Path, target: Path, batches: list[dict], method: str, percentile: float = 99.999,
                         keep_float: Iterable[str] = (), scratch: Optional[Path] = None, ranges: Optional[dict] = None,
                         reduce_range: Optional[bool] = None) -> dict:
    """Static QDQ int8 (per-channel weights, activations calibrated with ``method``) of constant-weight MatMuls,
    except the MatMul nodes named in ``keep_float``. ``ranges``: what ``calibrated_ranges`` gave for the same source,
    batches and method, so that several variants share one histogram pass (minutes on a 12-layer model).
    ``reduce_range`` as in ``quantize_dynamic_int8``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not supported; allowed: {', '.join(CALIBRATION_METHODS)}.")
    keep_float = set(keep_float)
    nodes = [name for name in _constant_b_matmuls(source) if name not in keep_float]
    extra = {**_extra_options(), "WeightSymmetric": True, "ActivationSymmetric": False}
    if method != "minmax":
        if ranges is None:
            ranges = calibrated_ranges(source, batches, method, percentile, scratch or Path(target).parent)
        extra["TensorQuantOverrides"] = copy.deepcopy(ranges)  # the quantizer may edit it
    reduce_range = _reduce_range(reduce_range)
    with _quiet_quantizer():
        quantize_static(
            str(source), str(target), FixedShapeReader(batches), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra,
        )
    return {"method": "ort_static_int8_qdq", "calibration": method, "calibration_batches": len(batches),
            "calibration_shape": list(batches[0]["input_ids"].shape), "quantized_matmuls": len(nodes),
            "kept_float": sorted(keep_float), "reduce_range": reduce_range, "weights": _int8_weights(reduce_range)}


def optimize_graph(source: Path, target: Path) -> dict:
    """ONNX Runtime's BERT optimizer; returns which fusions it made. Head count and width are left for the
    optimizer to read from each layer's own Reshape, since pruned layers differ (a wrong global count would fuse
    attention wrongly; the caller checks the optimized logits against the plain graph's)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=1)
    optimized.save_model_to_file(str(target))
    return {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}
