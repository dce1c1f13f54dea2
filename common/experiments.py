"""Helpers of the experiment scripts that run stages as subprocesses and compare their checkpoints
(``scripts/ablation.py``, ``scripts/sweep.py``)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .data import make_loader, tokenize_dataset
from .evaluation import accuracy
from .models import load_checkpoint_tokenizer
from .runtime import ModelRuntime

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args, stream: bool = False) -> None:
    """Run a numbered stage script to completion; raise with the end of its output if it fails. ``stream``: let its
    output (progress bars included) through as it runs, instead of keeping it for the error."""
    command = [sys.executable, str(PROJECT_ROOT / script), *map(str, args)]
    print("$ " + " ".join(command[1:]), flush=True)
    if stream:
        completed = subprocess.run(command, cwd=PROJECT_ROOT)
        if completed.returncode != 0:
            raise RuntimeError(f"{script} failed with exit code {completed.returncode} (its output is above).")
        return
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")


def split_loader(folder: Path, split, max_length: int):
    """A data loader of one split (a Dataset) tokenized by the checkpoint folder's own tokenizer."""
    tokenizer = load_checkpoint_tokenizer(folder)
    return make_loader(tokenize_dataset(split, tokenizer, max_length), tokenizer, 64, shuffle=False)


def test_accuracy(folder: Path, data, max_length: int, onnx_file: str | None = None) -> tuple[float, ModelRuntime]:
    """Accuracy of a checkpoint (or of its ``onnx_file``: an ONNX file or OpenVINO IR of an export folder) on the test
    split, and the loaded model (for timing or counting)."""
    model = ModelRuntime(folder, onnx_file, spinning=False)
    return accuracy(*model.logits(split_loader(folder, data.test, max_length))), model


test_accuracy.__test__ = False  # a helper, not a pytest test


@contextmanager
def dynamic_int8_copy(source: ModelRuntime, seq_length: int, num_threads: int = 2) -> Iterator[ModelRuntime]:
    """A loaded torch checkpoint exported to ONNX and quantized by ONNX Runtime's dynamic int8, in a scratch folder
    removed afterwards: what a user gets from ONNX Runtime alone (no stage of this project), at ``seq_length`` tokens."""
    from .onnx_export import export_onnx, write_runtime_files
    from .onnx_runtime import quantize_dynamic_int8

    tokenizer = load_checkpoint_tokenizer(source.folder)
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        scratch = Path(scratch)
        export_onnx(source.torch_model, tokenizer, scratch / "model.onnx", seq_length)
        write_runtime_files(scratch, tokenizer, source.torch_model.config, seq_length)
        quantize_dynamic_int8(scratch / "model.onnx", scratch / "int8.onnx")
        yield ModelRuntime(scratch, "int8.onnx", verify=False, spinning=False, num_threads=num_threads)


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
