"""Sparsity sweep: the accuracy–size–speed curve of stage 8, with mean ± std over seeds.

Reads:  the newest results/teacher/ and results/student/ checkpoints (run stages 1 and 2 first) and the data
        flags they were made with (default: the embedded data), which are passed on to every stage.
Does:   for every seed and every sparsity s, runs stage 8 with s of the heads and s of the FFN neurons removed
        (every other field at its default, except vocabulary pruning: off unless --prune_vocabulary, because on a
        reduced training set it drops the test tokens the subset never saw and confounds the curve) and stage 11
        (the int8 CPU model) on it, each
        into results/sweep/<s>-seed<seed>/ so the main pipeline's checkpoints are untouched; evaluates both on the
        test split; times the teacher and every sparsity's int8 model (first seed) round-robin in one process.
Writes: results/sweep.json, results/sweep.png (test accuracy vs encoder parameters and vs int8 latency, mean ± std) and
        results/sweep.md. Budget (stated in the outputs): --max_train_samples training rows, --pruning_epochs epochs.

Run as:
    make sweep
    python scripts/sweep.py --sparsities 0.3 0.4 0.5 0.6 0.7 --seeds 1 2 3 --max_train_samples 1200
    python scripts/sweep.py --sparsities 0.4 0.6 --extra --ffn_round_to 16      # further stage-8 flags after --extra
    python scripts/sweep.py --reuse                    # evaluate and time the checkpoints of the last sweep again
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import parse_config  # noqa: E402
from common.architecture import encoder_prefix  # noqa: E402
from common.checkpoints import RECORD_FILE, find_checkpoint, results_root, write_json  # noqa: E402
from common.config import DataConfig, PruningConfig  # noqa: E402
from common.data import load_splits  # noqa: E402
from common.evaluation import interleaved_latency  # noqa: E402
from common.experiments import mean_std, run_script, test_accuracy  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402
from common.models import count_parameters, weights_size_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max_train_samples", type=int, default=1200)
    parser.add_argument("--pruning_epochs", type=int, default=2)
    parser.add_argument("--latency_rounds", type=int, default=20)
    parser.add_argument("--latency_batch_size", type=int, default=32)
    parser.add_argument("--latency_seq_length", type=int, default=64)
    parser.add_argument("--prune_vocabulary", action="store_true",
                        help="Also prune the vocabulary in stage 8 (sensible with the full training set only).")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the checkpoints an earlier sweep left in results/sweep/ (same settings) and only evaluate and "
                             "time them again, e.g. to re-time on a quiet machine.")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Further stage-8 flags, e.g. --extra --ffn_round_to 16")
    args, data_flags = parser.parse_known_args()
    data_config = parse_config(DataConfig, args=data_flags)[0]
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        parser.error(f"--sparsities {args.sparsities} must be shares between 0 and 1.")
    parse_config(DataConfig, PruningConfig, args=[*data_flags, *args.extra])  # a bad --extra flag is refused before any run
    teacher_folder = find_checkpoint("teacher")
    find_checkpoint("student")  # stage 8 prunes it
    started = time.time()
    data = load_splits(data_config)  # the test split does not depend on max_train_samples
    teacher_accuracy, teacher = test_accuracy(teacher_folder, data, data_config.max_length)
    root = results_root() / "sweep"
    points, runners = [], {}
    for sparsity in sorted(args.sparsities):
        row = {"sparsity": sparsity, "pruned_accuracy": [], "int8_accuracy": []}
        for seed in args.seeds:
            pruned, int8 = root / f"{sparsity:.2f}-seed{seed}", root / f"{sparsity:.2f}-seed{seed}-int8"
            reused = args.reuse and (pruned / RECORD_FILE).is_file() and (int8 / RECORD_FILE).is_file()
            if args.reuse and not reused:
                print(f"--reuse: {pruned} or {int8} has no checkpoint; running stages 8 and 11 for it", flush=True)
            if not reused:
                run_script("8_pruning_with_finetuning.py", *data_flags, "--max_train_samples", args.max_train_samples, "--seed", seed,
                    "--num_epochs", args.pruning_epochs, "--head_final_sparsity", sparsity, "--ffn_final_sparsity", sparsity,
                    "--final_sparsity", sparsity, "--prune_vocabulary", str(args.prune_vocabulary).lower(),
                    "--output_dir", pruned, "--overwrite_output_dir", *args.extra)
                run_script("11_export_int8.py", *data_flags, "--source_model_path", pruned, "--output_dir", int8, "--overwrite_output_dir")
            pruned_accuracy, pruned_model = test_accuracy(pruned, data, data_config.max_length)
            int8_accuracy, int8_model = test_accuracy(int8, data, data_config.max_length)
            row["pruned_accuracy"].append(100 * pruned_accuracy)
            row["int8_accuracy"].append(100 * int8_accuracy)
            if seed == args.seeds[0]:
                row["parameters"] = count_parameters(pruned_model.torch_model)
                row["encoder_parameters"] = encoder_parameters(pruned_model.torch_model)
                row["pruned_size_mb"] = weights_size_bytes(pruned) / 1e6
                row["int8_size_mb"] = weights_size_bytes(int8) / 1e6
                runners[f"{sparsity:.2f}"] = int8_model.runner(int8_model.batch(args.latency_batch_size, args.latency_seq_length))
        row["pruned_accuracy"], row["int8_accuracy"] = mean_std(row["pruned_accuracy"]), mean_std(row["int8_accuracy"])
        points.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "values"}, default=str), flush=True)
    runners["teacher"] = teacher.runner(teacher.batch(args.latency_batch_size, args.latency_seq_length))
    import torch

    torch.set_num_threads(2)
    timings = interleaved_latency(runners, 2, args.latency_rounds, args.latency_batch_size, reference="teacher")
    for row in points:
        timing = timings[f"{row['sparsity']:.2f}"]
        row["int8_latency_ms"] = timing["latency_ms_median"]
        row["int8_latency_iqr_ms"] = [timing["latency_ms_p25"], timing["latency_ms_p75"]]
        row["int8_speedup_vs_teacher"] = timing.get("speedup_vs_reference_median")
    result = {
        "teacher": {"test_accuracy": 100 * teacher_accuracy, "parameters": count_parameters(teacher.torch_model),
                    "encoder_parameters": encoder_parameters(teacher.torch_model),
                    "size_mb": weights_size_bytes(teacher_folder) / 1e6, "latency_ms": timings["teacher"]["latency_ms_median"]},
        "points": points,
        "budget": {**{k: v for k, v in vars(args).items() if k != "extra"}, "stage8_extra": args.extra,
                   "data_flags": data_flags, "data": data.source, "test_examples": len(data.test), "metric": "test accuracy (%)"},
        "wall_time_s": time.time() - started,
    }
    out = results_root()
    write_json(out / "sweep.json", result)
    (out / "sweep.md").write_text(markdown(result))
    plot(result, out / "sweep.png")
    print(markdown(result))


def encoder_parameters(model) -> int:
    """Parameters of the encoder layers alone: what pruning removes (the embeddings are most of a small model)."""
    prefix = encoder_prefix(model)
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))


def markdown(result: dict) -> str:
    teacher = result["teacher"]
    lines = ["| Sparsity (heads = FFN) | Parameters | Encoder parameters | Pruned FP32 test acc. (%) | int8 test acc. (%) | int8 MB | int8 latency ms | × faster than teacher |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher | {teacher['parameters']:,} | {teacher['encoder_parameters']:,} | {teacher['test_accuracy']:.2f} | – | {teacher['size_mb']:.1f} | "
             f"{teacher['latency_ms']:.1f} | 1.0 |"]
    for row in result["points"]:
        speedup = row.get("int8_speedup_vs_teacher")
        lines.append(
            f"| {row['sparsity']:.2f} | {row['parameters']:,} | {row['encoder_parameters']:,} | {row['pruned_accuracy']['mean']:.2f} ± {row['pruned_accuracy']['std']:.2f} | "
            f"{row['int8_accuracy']['mean']:.2f} ± {row['int8_accuracy']['std']:.2f} | {row['int8_size_mb']:.1f} | "
            f"{row['int8_latency_ms']:.1f} | {'–' if speedup is None else f'{speedup:.1f}'} |"
        )
    budget = result["budget"]
    lines.append(f"\nSeeds {budget['seeds']}; {budget['max_train_samples']} training rows, {budget['pruning_epochs']} pruning "
                 f"epochs; test split of {budget['test_examples']}; int8 latency of the first seed's models, batch "
                 f"{budget['latency_batch_size']} x {budget['latency_seq_length']}, {budget['latency_rounds']} interleaved "
                 f"rounds; wall time {result['wall_time_s'] / 60:.0f} min.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for key, label, marker in (("pruned_accuracy", "pruned FP32", "o"), ("int8_accuracy", "int8", "s")):
        means, stds = [p[key]["mean"] for p in points], [p[key]["std"] for p in points]
        left.errorbar([p["encoder_parameters"] / 1e6 for p in points], means, yerr=stds, marker=marker, capsize=3, label=label)
        if key == "int8_accuracy":
            by_latency = sorted(zip([p["int8_latency_ms"] for p in points], means, stds))
            right.errorbar([x for x, _, _ in by_latency], [m for _, m, _ in by_latency], yerr=[s for _, _, s in by_latency],
                           marker=marker, capsize=3, label=label)
    for axis, x_label in ((left, "encoder parameters (M; embeddings excluded)"), (right, "int8 latency (ms), batch of the budget")):
        axis.axhline(result["teacher"]["test_accuracy"], color="grey", linestyle="--", label="teacher")
        axis.axhline(0.99 * result["teacher"]["test_accuracy"], color="grey", linestyle=":", label="99% of teacher")
        axis.set_xlabel(x_label)
        axis.set_ylabel("test accuracy (%), mean ± std over seeds")
        axis.legend()
    for p in points:
        left.annotate(f"{p['sparsity']:.2f}", (p["encoder_parameters"] / 1e6, p["pruned_accuracy"]["mean"]), fontsize=8)
    figure.savefig(path, dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    run_tool(main)
