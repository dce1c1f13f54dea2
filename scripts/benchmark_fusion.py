"""Fused vs unfused attention in ONNX Runtime: the teacher and the pruned model, fp32 and dynamic int8, interleaved.

Reads:  the newest results/teacher/ and results/pruned/ checkpoints.
Does:   exports each to ONNX (each layer's head split written as a constant), fuses a copy with ONNX Runtime's
        transformer optimizer (one Attention node per layer), quantizes both with dynamic int8, and times the eight
        graphs round-robin in one process (batch 32 x 64, 2 threads, --rounds rounds), median and IQR.
Writes: results/fusion_benchmark.json.

Run as:
    python scripts/benchmark_fusion.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common.checkpoints import find_checkpoint, results_root, write_json  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=25, help="Timed rounds of the interleaved benchmark.")
    parser.add_argument("--num_threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < 1 or args.num_threads < 1:
        parser.error(f"--rounds {args.rounds} and --num_threads {args.num_threads} must be positive.")
    folders = {stage: find_checkpoint(stage) for stage in ("teacher", "pruned")}  # both found before any work

    import torch

    from common.exports import compare_speed
    from common.models import load_checkpoint_tokenizer, load_model
    from common.onnx_export import export_onnx
    from common.onnx_runtime import optimize_graph, quantize_dynamic_int8

    torch.set_num_threads(args.num_threads)
    paths, fusions, vocab_size = {}, {}, None
    with tempfile.TemporaryDirectory(prefix="fusion-benchmark-") as scratch:
        scratch = Path(scratch)
        for stage, folder in folders.items():
            model = load_model(folder)
            export_onnx(model, load_checkpoint_tokenizer(folder), scratch / f"{stage}.onnx", 64)
            fusions[stage] = optimize_graph(scratch / f"{stage}.onnx", scratch / f"{stage}_fused.onnx")
            for variant in ("", "_fused"):
                quantize_dynamic_int8(scratch / f"{stage}{variant}.onnx", scratch / f"{stage}{variant}_int8.onnx")
                paths[f"{stage}{variant} fp32"] = scratch / f"{stage}{variant}.onnx"
                paths[f"{stage}{variant} int8"] = scratch / f"{stage}{variant}_int8.onnx"
            vocab_size = min(vocab_size or model.config.vocab_size, model.config.vocab_size)  # ids every graph knows
        speed = compare_speed(paths, vocab_size, args.num_threads, rounds=args.rounds)
    result = {"fusions": fusions, "settings": vars(args), "batch": "32 x 64",
              "latency": {label: {key: value for key, value in timing.items() if key != "latency_ms_per_round"}
                          for label, timing in speed.items()}}
    write_json(results_root() / "fusion_benchmark.json", result)
    print(f"fusions: {fusions}")
    for label, timing in speed.items():
        print(f"{label:22} {timing['latency_ms_median']:.1f} ms [{timing['latency_ms_p25']:.1f}-{timing['latency_ms_p75']:.1f}]")
    print(f"-> {results_root() / 'fusion_benchmark.json'}")


if __name__ == "__main__":
    run_tool(main)
