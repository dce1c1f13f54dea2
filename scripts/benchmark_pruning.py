"""Benchmark of stage 8's output and cost: student vs pruned model, and the training-step price of KGSP.

Reads:  the newest results/student/, results/pruned/ and results/teacher/ checkpoints.
Prints: parameters, weight-file size and CPU latency (batch 32 x 64 tokens, median of repeated runs, one fresh
        process per model) of student and pruned; then the mean time of a KD training step of the student
        with the pruner attached in importance_mode 'l2' and 'l2+kd_grad' (the gradient importance is
        accumulated after every backward), and the overhead of the latter.
Writes: results/benchmark_pruning.json.

Run as:
    make benchmark
    python scripts/benchmark_pruning.py --steps 40 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import torch  # noqa: E402

from common.checkpoints import find_checkpoint, results_root, write_json  # noqa: E402
from common.config import DataConfig, PruningConfig  # noqa: E402
from common.data import build_loaders, load_splits  # noqa: E402
from common.distillation import distillation_for  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402
from common.models import (  # noqa: E402
    count_parameters,
    load_checkpoint_tokenizer,
    load_model,
    weights_size_bytes,
)
from common.pruning import StructuralPruner  # noqa: E402
from common.runtime import measure_in_subprocess  # noqa: E402
from common.training import make_optimizer  # noqa: E402


def step_times(mode: str, steps: int, student_folder: Path, teacher, loader) -> list[float]:
    torch.manual_seed(0)
    student = load_model(student_folder).train()
    config = PruningConfig(importance_mode=mode, pruning_frequency_steps=10, pruning_window_steps=20, pruning_start_fraction=0.0)
    pruner = StructuralPruner(student, config)
    pruner.set_schedule(steps)
    optimizer = make_optimizer(student, config)
    _, compute_loss = distillation_for(config, student, teacher)  # stage 8's own loss
    timings = []
    batches = iter(loader)
    for step in range(1, steps + 1):
        batch = next(batches)
        start = time.perf_counter()
        value, _ = compute_loss(student, batch)
        value.backward()
        pruner.accumulate_importance_scores()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step(step)
        timings.append(time.perf_counter() - start)
    return timings[3:]  # the first steps include one-off allocations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per importance mode")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward passes per model for latency")
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args()

    # every input is found before any work, so a missing one is refused before anything is measured
    folders = {stage: find_checkpoint(stage) for stage in ("student", "pruned")}
    teacher_folder = find_checkpoint("teacher")
    rows = {}
    for stage, folder in folders.items():
        model = load_model(folder)
        rows[stage] = {
            "path": str(folder),
            "parameters": count_parameters(model),
            "size_mb": weights_size_bytes(folder) / 1e6,
            **measure_in_subprocess(folder, 32, 64, 3, args.repeats, args.num_threads),
        }
        del model
    student_folder = folders["student"]
    teacher = load_model(teacher_folder)
    data = load_splits(DataConfig())
    tokenizer = load_checkpoint_tokenizer(student_folder)
    loader, _ = build_loaders(data, tokenizer, DataConfig(), 32, 64, seed=0)
    training = {}
    for mode in ("l2", "l2+kd_grad"):
        timings = step_times(mode, args.steps, student_folder, teacher, loader)
        training[mode] = {"mean_step_s": statistics.mean(timings), "median_step_s": statistics.median(timings), "steps": len(timings)}
    overhead = training["l2+kd_grad"]["median_step_s"] / training["l2"]["median_step_s"] - 1
    result = {"models": rows, "training_step": training, "kgsp_overhead": overhead, "threads": torch.get_num_threads()}
    write_json(results_root() / "benchmark_pruning.json", result)

    print(f"{'':10} {'parameters':>12} {'size (MB)':>10} {'latency (ms)':>13} {'examples/s':>11}")
    for stage, row in rows.items():
        print(f"{stage:10} {row['parameters']:>12,} {row['size_mb']:>10.2f} {row['latency_ms_median']:>13.1f} {row['throughput_examples_per_s']:>11.0f}")
    student, pruned = rows["student"], rows["pruned"]
    print(f"pruned/student: parameters {pruned['parameters'] / student['parameters']:.3f}, size {pruned['size_mb'] / student['size_mb']:.3f}, "
          f"latency {pruned['latency_ms_median'] / student['latency_ms_median']:.3f}")
    for mode, row in training.items():
        print(f"training step with importance_mode={mode:11}: median {1000 * row['median_step_s']:.0f} ms, mean {1000 * row['mean_step_s']:.0f} ms")
    print(f"KGSP (l2+kd_grad) step-time overhead over l2: {100 * overhead:+.1f}% (batch 32, {torch.get_num_threads()} threads)")
    print(json.dumps({"written": str(results_root() / 'benchmark_pruning.json')}))


if __name__ == "__main__":
    run_tool(main)
