"""One runtime object for every way a model runs here, and the memory it costs.

``ModelRuntime`` runs a checkpoint in torch (rebuilt by the project's loader: pruned, 4-bit, int8) or one ``.onnx``
file of an ONNX folder in ONNX Runtime, on the CPU or a GPU, behind one interface: logits for a batch of tokenizer
outputs or a whole loader, its input names, its size on disk, a synthetic batch and a runner for the latency harness.
The report, ``predict.py``, the sweep and stage 12 all run models through it. ``measure_in_subprocess`` loads one in
a fresh process to measure its memory, so that one model's allocations never count against another.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .evaluation import predict

logger = logging.getLogger(__name__)


def synthetic_batch(vocab_size: int, batch_size: int, seq_length: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    # ids above 999 avoid BERT's special and unused tokens
    low = min(1000, vocab_size - 1)
    input_ids = torch.randint(low, vocab_size, (batch_size, seq_length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class ModelRuntime:
    """One model to evaluate, time or serve: a checkpoint folder in torch, or one file of an export folder: a
    ``.onnx`` file in ONNX Runtime or an OpenVINO IR (``.xml`` with its ``.bin``) in OpenVINO (``onnx_file`` names it).

    ``device='cuda'`` runs it on a GPU (``half`` casts a torch model to fp16; an ONNX file gets ONNX Runtime's CUDA
    provider). ``spinning=False`` keeps ONNX Runtime's idle threads from busy-waiting, for round-robin timing."""

    def __init__(self, folder: str | Path, onnx_file: Optional[str] = None, *, num_threads: Optional[int] = None,
                 device: str = "cpu", half: bool = False, spinning: bool = True, vocab_size: Optional[int] = None,
                 verify: bool = True) -> None:
        """``verify``: check the files against the folder's manifest first (stage 12 turns it off for the files it
        is still writing)."""
        self.folder, self.onnx_file, self.device = Path(folder), onnx_file, torch.device(device)
        self.graph, self.torch_model = None, None  # graph: an OnnxClassifier or an OpenVinoClassifier
        if onnx_file is not None:
            from .checkpoints import verify_files

            if verify:
                verify_files(self.folder, [*graph_files(onnx_file), "config.json"])
            if is_openvino_file(onnx_file):
                from .openvino_runtime import OpenVinoClassifier

                if self.device.type != "cpu":
                    raise ValueError(f"{onnx_file} is an OpenVINO model; this project runs OpenVINO on the CPU only.")
                self.graph = OpenVinoClassifier(self.folder / onnx_file, num_threads)
            else:
                from .onnx_runtime import OnnxClassifier

                providers = ("CUDAExecutionProvider",) if self.device.type == "cuda" else ("CPUExecutionProvider",)
                self.graph = OnnxClassifier(self.folder / onnx_file, num_threads, spinning=spinning, providers=providers)
            self._vocab_size = vocab_size  # read from the folder's config.json when a synthetic batch needs it
        else:
            from .architecture import word_embeddings
            from .models import load_model

            model = load_model(self.folder, self.device)  # refuses a format whose kernels do not run there
            self.torch_model = (model.half() if half else model).eval()
            self._vocab_size = word_embeddings(self.torch_model).num_embeddings

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            self._vocab_size = int(json.loads((self.folder / "config.json").read_text())["vocab_size"])
        return self._vocab_size

    @property
    def onnx(self):
        """The ONNX Runtime classifier (its ``session``), or None for a torch or OpenVINO model."""
        from .onnx_runtime import OnnxClassifier

        return self.graph if isinstance(self.graph, OnnxClassifier) else None

    @property
    def runtime(self) -> str:
        if self.graph is None:
            return "torch"
        return "openvino" if is_openvino_file(self.onnx_file) else "onnxruntime"

    @property
    def input_names(self) -> list[str]:
        if self.graph is not None:
            return self.graph.input_names
        from .architecture import forward_input_names

        return forward_input_names(self.torch_model)

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the checkpoint's weight files, or the graph's files (an ONNX file, an IR's .xml and .bin)."""
        if self.graph is not None:
            return sum(path.stat().st_size for path in self.weight_files)
        from .models import weights_size_bytes

        return weights_size_bytes(self.folder)

    def logits_for(self, batch: dict) -> np.ndarray:
        """Logits of one batch of tokenizer outputs (torch tensors or numpy arrays); inputs the model does not take
        (e.g. ``token_type_ids`` of a DistilBERT tokenizer) are left out."""
        if self.graph is not None:
            return self.graph.logits(batch)
        accepted = set(self.input_names)
        inputs = {key: torch.as_tensor(value).to(self.device) for key, value in batch.items() if key in accepted}
        with torch.no_grad():
            return self.torch_model(**inputs).logits.float().cpu().numpy()

    def logits(self, loader) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of every example of a data loader."""
        if self.graph is not None:
            from .onnx_runtime import predict_onnx

            return predict_onnx(self.graph, loader)
        return predict(self.torch_model, loader)

    def batch(self, batch_size: int, seq_length: int) -> dict:
        """A synthetic batch of this model's vocabulary, shaped for its inputs and placed where it runs."""
        batch = synthetic_batch(self.vocab_size, batch_size, seq_length)
        if "token_type_ids" in self.input_names:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if self.graph is not None:
            return self.graph.feeds(batch)
        return {key: value.to(self.device) for key, value in batch.items()}

    def inputs(self, encoded: dict) -> dict:
        """Tokenizer outputs (numpy arrays, tensors or lists) as this model's inputs, placed where it runs."""
        if self.graph is not None:
            return self.graph.feeds(encoded)
        accepted = set(self.input_names)
        return {key: torch.as_tensor(value).to(self.device) for key, value in encoded.items() if key in accepted}

    @property
    def weight_files(self) -> list[Path]:
        """The files holding the weights: the checkpoint's safetensors, or the graph's files."""
        if self.graph is not None:
            names = [*graph_files(self.onnx_file), self.onnx_file + ".data"]  # .data: ONNX external weights, if any
            return [path for path in (self.folder / name for name in names) if path.is_file()]
        return sorted(self.folder.glob("*.safetensors"))

    def runner(self, batch: dict) -> Callable[[], object]:
        """A no-argument call of one forward pass on ``batch``, for the latency harness."""
        if self.graph is not None:
            run_feeds = self.graph.run
            return lambda: run_feeds(batch)
        model, on_gpu = self.torch_model, self.device.type == "cuda"

        def run():
            with torch.no_grad():
                output = model(**batch)
            if on_gpu:
                torch.cuda.synchronize()
            return output

        return run


TOKENIZER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")


def is_openvino_file(name: Optional[str]) -> bool:
    return bool(name) and name.endswith(".xml")


def graph_files(name: str) -> list[str]:
    """The files one graph of an export folder consists of: an ONNX file (and its external data, if any), or an
    OpenVINO IR's .xml and .bin."""
    if is_openvino_file(name):
        return [name, name[: -len(".xml")] + ".bin"]
    return [name]


def open_onnx_file(folder: str | Path, onnx_file: str, *, num_threads: Optional[int] = None, spinning: bool = True,
                   device: str = "cpu") -> ModelRuntime:
    """``onnx_file`` of a project folder, checked before it is used. A file the folder's stage wrote is verified
    against the manifest; a file the user put there and names instead is loaded and must take what the folder's
    tokenizer gives and return one logit per label of its config. Raises ``FileNotFoundError``/``ValueError``
    (``IntegrityError`` for a damaged file) naming the file and the fix."""
    from .checkpoints import MANIFEST_KEY, read_record

    folder = Path(folder)
    path = folder / onnx_file
    if not path.is_file():
        available = sorted(p.name for p in folder.glob("*.onnx"))
        raise FileNotFoundError(f"{folder} has no {onnx_file}; its ONNX files are {available}. Name one of them.")
    record = read_record(folder)
    manifest = record.get(MANIFEST_KEY)
    written = manifest is None or onnx_file in manifest  # a folder without a manifest is used as before, with a warning
    try:
        runtime = ModelRuntime(folder, onnx_file, num_threads=num_threads, spinning=spinning, device=device, verify=written)
    except ValueError:
        raise
    except Exception as error:  # onnxruntime raises its own types for a file it cannot read
        engine = "OpenVINO" if is_openvino_file(onnx_file) else "ONNX Runtime"
        raise ValueError(f"{engine} cannot load {path}: {type(error).__name__}: {error}. The file is damaged or not a "
                         f"model {engine} reads; name another file of the folder.") from error
    if not written:
        _check_fits(runtime, path)
    if not is_openvino_file(onnx_file):
        from .onnx_runtime import saturation_warning

        files = record.get("files")
        warning = saturation_warning(path, files.get(onnx_file) if isinstance(files, dict) else None)
        if warning:
            logger.warning(warning)
    return runtime


def _check_fits(runtime: ModelRuntime, path: Path) -> None:
    """A user-named ONNX file must take the folder tokenizer's outputs and return one logit per label of its config."""
    inputs = runtime.input_names
    if "input_ids" not in inputs or not set(inputs) <= set(TOKENIZER_OUTPUTS):
        raise ValueError(f"{path} takes the inputs {inputs}, but this folder's tokenizer gives {list(TOKENIZER_OUTPUTS)}; "
                         f"name an ONNX file exported for this model (e.g. its model.onnx).")
    num_labels = len(json.loads((runtime.folder / "config.json").read_text()).get("id2label") or {})
    outputs = runtime.graph.output_shapes()
    shape = outputs.get("logits")
    if not shape or (isinstance(shape[-1], int) and shape[-1] != num_labels):
        raise ValueError(f"{path} returns {outputs}, but this folder's config has {num_labels} labels and expects an "
                         f"output 'logits' of that width; name an ONNX file exported for this model.")


# -- memory, in a fresh process per model -------------------------------------------------------------------


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measure_child(folder: str, settings: dict, queue) -> None:
    try:
        logging.disable(logging.INFO)
        if settings.get("num_threads"):
            torch.set_num_threads(settings["num_threads"])
        before = _current_rss_bytes()
        model = ModelRuntime(folder, settings.get("onnx_file"), num_threads=settings.get("num_threads"), spinning=False)
        gc.collect()
        loaded = _current_rss_bytes()
        run = model.runner(model.batch(settings["batch_size"], settings["seq_length"]))
        # Loading builds and converts layers, so its transient peak is not what serving the model costs.
        peak_was_reset = _reset_peak_rss()
        for _ in range(settings["warmup"]):
            run()
        timings = []
        for _ in range(settings["repeats"]):
            start = time.perf_counter()
            run()
            timings.append(time.perf_counter() - start)
        median = statistics.median(timings)
        result = {
            "latency_ms_median": 1000 * median,
            "latency_ms_p90": 1000 * float(np.percentile(timings, 90)),
            "throughput_examples_per_s": settings["batch_size"] / median,
        }
        peak = _peak_rss_bytes()
        result.update(
            peak_rss_mb=peak / 2**20,
            model_rss_mb=(loaded - before) / 2**20,
            inference_peak_mb=(peak - before) / 2**20,
            peak_covers_loading=not peak_was_reset,
            num_threads=torch.get_num_threads(),
        )
        queue.put(("ok", result))
    except BaseException as error:  # the parent reports it; a child must never hang the report
        queue.put(("error", f"{type(error).__name__}: {error}"))


def measure_in_subprocess(folder: str | Path, batch_size: int, seq_length: int, warmup: int, repeats: int,
                          num_threads: Optional[int], onnx_file: Optional[str] = None) -> dict:
    """Load a checkpoint (or one ``.onnx`` file of an ONNX folder) in a fresh process; return its memory use and a
    sequential latency (the report times models with ``interleaved_latency`` instead)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    settings = {"batch_size": batch_size, "seq_length": seq_length, "warmup": warmup, "repeats": repeats,
                "num_threads": num_threads, "onnx_file": onnx_file}
    process = context.Process(target=_measure_child, args=(str(folder), settings, queue))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {folder} failed: {payload}")
    return payload
