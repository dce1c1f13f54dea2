"""Helpers of the experiment scripts that run stages as subprocesses and compare their checkpoints
(``scripts/ablation.py``, ``scripts/sweep.py``)."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

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


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
