"""Latency of encoder-layer shapes, measured once per machine in the deployment runtime and cached (ZipLM's idea).

``scripts/compress.py`` predicts a stage-8 candidate's latency before training it, and does not train one that cannot
beat the fastest passing candidate found so far. The table holds, for the student's architecture, one-layer models
at a grid of (kept heads, FFN width): each is exported to ONNX, quantized to dynamic int8 and timed round-robin in
ONNX Runtime at one batch x sequence length, at the residual width the candidates will have (stage 8's
``--hidden_sparsity`` narrows every projection, so a narrowed search gets its own table). One two-layer model at the
full shape separates the cost outside the encoder layers (embeddings, pooler, classifier: ``base_ms``) from a
layer's. A model with per-layer shapes
(h_i, w_i) is then predicted as ``base + sum_i (T(h_i, w_i) - base)``, T interpolated bilinearly in the grid.

The cache is ``<results>/latency_tables/<key>.json``. The key names everything the timings depend on: CPU model,
logical cores, threads, the ONNX Runtime version, the architecture and its dimensions (the residual width timed
among them), batch and sequence length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .architecture import layer_views, num_layers, select_bias_heads, shrink_layer, spec_for
from .checkpoints import results_root, write_json
from .evaluation import cpu_info, interleaved_latency
from .models import load_checkpoint_tokenizer, model_skeleton
from .pruning.hidden import prune_hidden
from .pruning.layers import drop_layers

logger = logging.getLogger(__name__)
GRID_SHARES = (0.125, 0.25, 0.5, 0.75, 1.0)


def table_key(folder: Path, batch_size: int, seq_length: int, threads: int, hidden_width: Optional[int] = None) -> dict:
    """What the table's timings depend on; ``hidden_width`` (default: the checkpoint's) is the residual width timed."""
    import onnxruntime

    model = model_skeleton(folder)
    spec, view = spec_for(model), layer_views(model)[0]
    full_width = getattr(model.config, spec.config_hidden)
    if hidden_width is not None and not (0 < hidden_width <= full_width and hidden_width % view.head_size == 0):
        raise ValueError(f"a latency table at residual width {hidden_width} cannot be built from {folder} (width "
                         f"{full_width}, head size {view.head_size}): give a multiple of the head size up to the width.")
    return {"cpu": cpu_info().get("cpu_model"), "logical_cores": os.cpu_count(), "threads": threads,
            "runtime": f"onnxruntime {onnxruntime.__version__} dynamic int8", "model_type": spec.model_type,
            "hidden": full_width if hidden_width is None else hidden_width, "head_size": view.head_size,
            "heads": view.num_heads, "ffn": view.ffn_width, "vocab": model.get_input_embeddings().num_embeddings,
            "batch_size": batch_size, "seq_length": seq_length}


def _shaped_model(folder: Path, layers: int, heads: int, width: int, hidden_width: Optional[int] = None) -> torch.nn.Module:
    """The checkpoint's architecture (random weights) with ``layers`` encoder layers of ``heads`` heads and ``width``
    FFN neurons each, its residual stream narrowed to ``hidden_width`` when that is below the checkpoint's."""
    model = model_skeleton(folder)
    if hidden_width is not None and hidden_width < model.config.hidden_size:
        prune_hidden(model, list(range(hidden_width)))  # as stage 8 does, before the heads and neurons
    drop_layers(model, list(range(layers, num_layers(model))))
    for view in layer_views(model):
        shrink_layer(view, torch.arange(heads * view.head_size), torch.arange(width), keep_weights=False)
        if spec_for(model).shared_head_bias:
            select_bias_heads(view.get("attention"), list(range(heads)))
    return model.eval()


def build_latency_table(folder: Path, key: dict, rounds: int = 10) -> dict:
    """Time the grid of one-layer shapes of the checkpoint in ``folder`` at the batch, length and threads of ``key``
    (``table_key``; see the module docstring)."""
    from .onnx_export import export_onnx, write_runtime_files
    from .onnx_runtime import quantize_dynamic_int8
    from .runtime import ModelRuntime

    batch_size, seq_length, threads = key["batch_size"], key["seq_length"], key["threads"]
    heads = sorted({max(1, round(share * key["heads"])) for share in GRID_SHARES})
    widths = sorted({max(1, round(share * key["ffn"])) for share in GRID_SHARES})
    shapes = {f"1x{h}x{w}": (1, h, w) for h in heads for w in widths} | {"2-full": (2, key["heads"], key["ffn"])}
    tokenizer = load_checkpoint_tokenizer(folder)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="latency-table-") as scratch:
        runners = {}
        for label, (layers, h, w) in shapes.items():
            target = Path(scratch) / label
            target.mkdir()
            model = _shaped_model(folder, layers, h, w, key["hidden"])
            export_onnx(model, tokenizer, target / "model.onnx", seq_length)
            write_runtime_files(target, tokenizer, model.config, seq_length)
            quantize_dynamic_int8(target / "model.onnx", target / "int8.onnx")
            runtime = ModelRuntime(target, "int8.onnx", verify=False, spinning=False, num_threads=threads)
            runners[label] = runtime.runner(runtime.batch(batch_size, seq_length))
        timing = interleaved_latency(runners, 2, rounds, batch_size)
    one_layer = [[timing[f"1x{h}x{w}"]["latency_ms_median"] for w in widths] for h in heads]
    full = timing[f"1x{heads[-1]}x{widths[-1]}"]["latency_ms_median"]
    base = max(0.0, 2 * full - timing["2-full"]["latency_ms_median"])
    return {"key": key, "heads": heads, "ffn": widths, "one_layer_ms": one_layer, "base_ms": base,
            "two_full_layers_ms": timing["2-full"]["latency_ms_median"], "rounds": rounds,
            "build_seconds": round(time.time() - started, 1)}


def latency_table(folder: Path, batch_size: int, seq_length: int, rounds: int = 10, threads: int = 2,
                  hidden_width: Optional[int] = None) -> dict:
    """The cached table for this machine and architecture (at ``hidden_width``, default the checkpoint's residual
    width), built (and cached) when there is none."""
    key = table_key(folder, batch_size, seq_length, threads, hidden_width)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = results_root() / "latency_tables" / f"{digest}.json"
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except ValueError:  # a cache file cut short (an interrupted write): measured again and rewritten
            logger.warning("The cached latency table %s cannot be read; measuring it again", path)
            table = {}
        if table.get("key") == key:
            logger.info("Latency table for this machine and architecture loaded from %s", path)
            return {**table, "path": str(path), "cached": True}
    table = build_latency_table(folder, key, rounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, table)
    logger.info("Latency table built in %.0f s and cached in %s", table["build_seconds"], path)
    return {**table, "path": str(path), "cached": False}


def _interpolate(grid: list[float], value: float) -> tuple[int, int, float]:
    value = min(max(value, grid[0]), grid[-1])
    upper = int(np.searchsorted(grid, value))
    if upper == 0:
        return 0, 0, 0.0
    lower = upper - 1
    return lower, upper, (value - grid[lower]) / (grid[upper] - grid[lower])


def layer_ms(table: dict, heads: float, width: float) -> float:
    """One layer of ``heads`` heads and ``width`` FFN neurons, bilinear in the table's grid (clamped to it). A grid
    point below the base (timing noise on small shapes, where the base is estimated from two larger models) counts
    as a free layer, never as a negative cost."""
    h0, h1, a = _interpolate(table["heads"], heads)
    w0, w1, b = _interpolate(table["ffn"], width)
    grid = np.maximum(np.asarray(table["one_layer_ms"]) - table["base_ms"], 0.0)
    return float((1 - a) * ((1 - b) * grid[h0, w0] + b * grid[h0, w1]) + a * ((1 - b) * grid[h1, w0] + b * grid[h1, w1]))


def predict_ms(table: dict, heads_per_layer: list[float], ffn_per_layer: list[float]) -> float:
    """Predicted latency of a model with these per-layer shapes, at the table's batch and sequence length."""
    return table["base_ms"] + sum(layer_ms(table, h, w) for h, w in zip(heads_per_layer, ffn_per_layer))
