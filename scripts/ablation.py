"""Ablation of the three algorithm claims: KGSP vs L2 importance, MSP vs uniform pruning, QKD-4bit vs PTQ.

Reads:  the newest results/teacher/ and results/student/ checkpoints (run stages 1 and 2 first).
Does:   for every seed, runs stage 8 six times (importance l2 / kd_grad / l2+kd_grad x uniform / multi-granularity)
        at equal sparsity and training budget, then stages 9 and 10 on the KGSP+MSP pruned model, each into
        results/ablation/<run>/ so the main pipeline's checkpoints are untouched; evaluates every checkpoint
        on the test split and compares paired (same-seed) differences with the original design's expectations.
Writes: results/ablation.json, results/ablation.png, results/ablation.md.

Budget (stated in the outputs): a training subset (--max_train_samples, default 1200), 2 pruning epochs,
1 QKD epoch, 3 seeds; sparsity 50% of heads and 50% of FFN neurons for every variant.

Run as:
    make ablation
    python scripts/ablation.py --seeds 1 2 3 --max_train_samples 1200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import setup_logging  # noqa: E402
from common.checkpoints import results_root, write_json  # noqa: E402
from common.config import DataConfig  # noqa: E402
from common.data import load_splits  # noqa: E402
from common.experiments import mean_std, run_script, test_accuracy  # noqa: E402

# name: (importance_mode, multi-granularity, importance_normalization)
VARIANTS = {
    "L2, uniform (original)": ("l2", False, "global"),
    "KD-grad, uniform": ("kd_grad", False, "global"),
    "KGSP (L2+KD-grad), uniform": ("l2+kd_grad", False, "global"),
    "L2, MSP": ("l2", True, "global"),
    "KD-grad, MSP": ("kd_grad", True, "global"),
    "KGSP + MSP": ("l2+kd_grad", True, "global"),
    "KGSP + MSP, per-layer normalized": ("l2+kd_grad", True, "per_layer"),
}
DEFAULT_VARIANTS = [name for name in VARIANTS if "per-layer" not in name]
CLAIMS = [
    # name, variant A, variant B (A - B), expected range in accuracy points
    ("KGSP vs L2 (uniform)", "KGSP (L2+KD-grad), uniform", "L2, uniform (original)", (0.5, 1.5)),
    ("KGSP vs L2 (MSP)", "KGSP + MSP", "L2, MSP", (0.5, 1.5)),
    ("MSP vs uniform (KGSP)", "KGSP + MSP", "KGSP (L2+KD-grad), uniform", (0.3, 1.0)),
    ("MSP vs uniform (L2)", "L2, MSP", "L2, uniform (original)", (0.3, 1.0)),
    ("MSP per-layer normalized vs uniform (KGSP)", "KGSP + MSP, per-layer normalized", "KGSP (L2+KD-grad), uniform", (0.3, 1.0)),
    ("MSP per-layer vs global normalization (KGSP)", "KGSP + MSP, per-layer normalized", "KGSP + MSP", (0.0, 1.0)),
    ("QKD-4bit vs PTQ-4bit", "QKD-4bit (on KGSP + MSP)", "PTQ-4bit (on KGSP + MSP)", (1.0, 2.0)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max_train_samples", type=int, default=1200)
    parser.add_argument("--pruning_epochs", type=int, default=2)
    parser.add_argument("--qkd_epochs", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help="Stage-8 variants to run (default: the six of the original claims).")
    parser.add_argument("--skip_quantization", action="store_true", help="Skip the PTQ/QKD rows (stages 9 and 10).")
    parser.add_argument("--output_name", default="ablation", help="Writes results/<output_name>.{json,md,png}.")
    parser.add_argument("--from_json", action="store_true", help="only redraw ablation.md/.png from ablation.json")
    args = parser.parse_args()
    name = args.output_name
    if args.from_json:
        result = json.loads((results_root() / f"{name}.json").read_text())
        (results_root() / f"{name}.md").write_text(markdown(result))
        plot(result, results_root() / f"{name}.png")
        print(markdown(result))
        return
    started = time.time()
    data_config = DataConfig()
    data = load_splits(data_config)
    budget = ["--max_train_samples", args.max_train_samples, "--prune_vocabulary", "false"]
    root = results_root() / "ablation"
    quantized = [] if args.skip_quantization else ["PTQ-4bit (on KGSP + MSP)", "QKD-4bit (on KGSP + MSP)"]
    accuracy: dict[str, list[float]] = {variant: [] for variant in [*args.variants, *quantized]}
    for seed in args.seeds:
        for variant in args.variants:
            mode, multi, normalization = VARIANTS[variant]
            folder = root / (f"seed{seed}-{mode.replace('+', '_')}-{'msp' if multi else 'uniform'}"
                             + ("" if normalization == "global" else f"-{normalization}"))
            run_script(
                "8_pruning_with_finetuning.py", *budget, "--seed", seed, "--num_epochs", args.pruning_epochs,
                "--importance_mode", mode, "--enable_multi_granularity", str(multi).lower(),
                "--importance_normalization", normalization,
                "--final_sparsity", args.sparsity, "--head_final_sparsity", args.sparsity, "--ffn_final_sparsity", args.sparsity,
                "--output_dir", folder, "--overwrite_output_dir",
            )
            accuracy[variant].append(test_accuracy(folder, data, data_config.max_length)[0])
        if not quantized:
            print(json.dumps({variant: values[-1] for variant, values in accuracy.items()}, indent=1), flush=True)
            continue
        if "KGSP + MSP" not in args.variants:
            raise ValueError("The PTQ/QKD rows quantize the 'KGSP + MSP' model; add it to --variants or pass --skip_quantization.")
        pruned = root / f"seed{seed}-l2_kd_grad-msp"
        ptq, qkd = root / f"seed{seed}-ptq", root / f"seed{seed}-qkd"
        run_script("9_quantize_pruned_model.py", "--pruned_model_path", pruned, "--output_dir", ptq, "--overwrite_output_dir")
        run_script(
            "10_qat_kd_4bit.py", *budget[:2], "--seed", seed, "--pruned_model_path", pruned, "--num_epochs", args.qkd_epochs,
            "--output_dir", qkd, "--overwrite_output_dir",
        )
        accuracy["PTQ-4bit (on KGSP + MSP)"].append(test_accuracy(ptq, data, data_config.max_length)[0])
        accuracy["QKD-4bit (on KGSP + MSP)"].append(test_accuracy(qkd, data, data_config.max_length)[0])
        print(json.dumps({name: values[-1] for name, values in accuracy.items()}, indent=1), flush=True)

    claims = []
    for claim, first, second, expected in CLAIMS:
        if first not in accuracy or second not in accuracy:
            continue
        differences = [100 * (a - b) for a, b in zip(accuracy[first], accuracy[second])]
        summary = mean_std(differences)
        claims.append({
            "claim": claim, "a": first, "b": second, "expected_points": list(expected), **summary,
            "within_expected": expected[0] <= summary["mean"] <= expected[1],
        })
    result = {
        "variants": {name: mean_std([100 * v for v in values]) for name, values in accuracy.items()},
        "claims": claims,
        "budget": {**vars(args), "sparsity_heads": args.sparsity, "sparsity_ffn": args.sparsity, "metric": "test accuracy (%)",
                   "test_examples": len(data.test), "vocabulary_pruning": False},
        "wall_time_s": time.time() - started,
    }
    out = results_root()
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result))
    plot(result, out / f"{name}.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["| Variant | Test accuracy (%) mean ± std |", "|---|---|"]
    lines += [f"| {name} | {v['mean']:.2f} ± {v['std']:.2f} |" for name, v in result["variants"].items()]
    lines += ["", "| Claim (A − B) | Measured (points) mean ± std | Expected | Verdict |", "|---|---|---|---|"]
    for claim in result["claims"]:
        low, high = claim["expected_points"]
        verdict = "within the expected range" if low <= claim["mean"] <= high else ("above it" if claim["mean"] > high else "below it")
        lines.append(f"| {claim['claim']} | {claim['mean']:+.2f} ± {claim['std']:.2f} | +{low} to +{high} | {verdict} |")
    budget = result["budget"]
    lines.append(
        f"\nSeeds {budget['seeds']}; {budget['max_train_samples']} training examples, {budget['pruning_epochs']} pruning epochs, "
        f"{budget['qkd_epochs']} QKD epoch(s), {int(100 * budget['sparsity'])}% of heads and FFN neurons removed; "
        f"test split of {budget['test_examples']} examples; wall time {result['wall_time_s'] / 60:.0f} min."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    names = list(result["variants"])
    means = [result["variants"][n]["mean"] for n in names]
    stds = [result["variants"][n]["std"] for n in names]
    colors = plt.get_cmap("tab10")(range(len(names)))
    left.barh(names, means, xerr=stds, color=colors, capsize=4)
    low = min(m - s for m, s in zip(means, stds))
    left.set_xlim(max(0, low - 3), max(m + s for m, s in zip(means, stds)) + 1)
    left.invert_yaxis()
    left.set_xlabel("Test accuracy (%), mean ± std over seeds")
    left.set_title("Variants")
    claims = result["claims"]
    y = range(len(claims))
    for i, claim in enumerate(claims):
        low_e, high_e = claim["expected_points"]
        right.barh(i, high_e - low_e, left=low_e, color="#c7e9c0", height=0.6, label="expected range" if i == 0 else None)
        right.errorbar(claim["mean"], i, xerr=claim["std"], fmt="o", color="#d62728", capsize=4, label="measured" if i == 0 else None)
    right.axvline(0, color="grey", linewidth=1)
    right.set_yticks(list(y), [c["claim"] for c in claims])
    right.invert_yaxis()
    right.set_xlabel("Accuracy difference A − B (points)")
    right.set_title("Claims: measured vs expected")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    figure.savefig(path, dpi=130)
    plt.close(figure)


if __name__ == "__main__":
    setup_logging()
    main()
