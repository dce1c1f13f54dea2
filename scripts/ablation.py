"""Ablation of the algorithm claims: KGSP vs L2 importance, MSP vs uniform pruning, QKD-4bit vs PTQ, and the
options added since (per-layer normalized MSP, attention-relation KD, KD vs no KD for the student, LSQ scales,
QKD vs PTQ where 4 bits hurt more).

Reads:  the newest results/teacher/ and results/student/ checkpoints (run stages 1 and 2 first).
Does:   for every seed: stage 2 once per --student_variants row (a student distilled from the teacher with those
        loss weights); stage 8 once per --variants row (importance l2 / kd_grad / l2+kd_grad x uniform /
        multi-granularity, and options) at equal sparsity and training budget; stage 9 or 10 once per
        --quantization_variants row on that seed's 'KGSP + MSP' model. Each run goes into results/ablation/<run>/
        so the main pipeline's checkpoints are untouched; every checkpoint is evaluated on the test split and
        paired (same-seed) differences are compared with the original design's expectations where it made one.
Writes: results/ablation.json, results/ablation.png, results/ablation.md (or --output_name).

Budget (stated in the outputs): a training subset (--max_train_samples, default 1200), 2 student epochs,
2 pruning epochs, 1 QKD epoch, 3 seeds; sparsity 50% of heads and 50% of FFN neurons for every variant.

Run as:
    make ablation
    python scripts/ablation.py --seeds 1 2 3 --max_train_samples 1200
    python scripts/ablation.py --student_variants "Student, KD (logits + hidden states, default)" \
        "Student, no KD (labels only)" --variants "KGSP + MSP" "KGSP + MSP, attention-relation KD" \
        --quantization_variants "QKD-4bit (on KGSP + MSP)" "QKD-4bit, LSQ learned scales (on KGSP + MSP)"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common.checkpoints import find_checkpoint, results_root, write_json  # noqa: E402
from common.config import DataConfig  # noqa: E402
from common.data import load_splits  # noqa: E402
from common.experiments import mean_std, run_script, test_accuracy  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402

# Every stage-8 row starts from the settings of the original claims (global normalization, no attention-relation
# KD), so a row measures one change and rows stay comparable with earlier ablations when the defaults move.
ORIGINAL = {"importance_normalization": "global", "alpha_attention": 0.0}
KGSP_MSP = {**ORIGINAL, "importance_mode": "l2+kd_grad", "enable_multi_granularity": True}
# name: stage-8 flags (everything else at its default)
VARIANTS = {
    "L2, uniform (original)": {**ORIGINAL, "importance_mode": "l2", "enable_multi_granularity": False},
    "KD-grad, uniform": {**ORIGINAL, "importance_mode": "kd_grad", "enable_multi_granularity": False},
    "KGSP (L2+KD-grad), uniform": {**ORIGINAL, "importance_mode": "l2+kd_grad", "enable_multi_granularity": False},
    "L2, MSP": {**ORIGINAL, "importance_mode": "l2", "enable_multi_granularity": True},
    "KD-grad, MSP": {**ORIGINAL, "importance_mode": "kd_grad", "enable_multi_granularity": True},
    "KGSP + MSP": KGSP_MSP,
    "KGSP + MSP, per-layer normalized": {**KGSP_MSP, "importance_normalization": "per_layer"},
    "KGSP + MSP, attention-relation KD": {**KGSP_MSP, "alpha_attention": 1.0},
    "KGSP + MSP, per-layer normalized + attention-relation KD (the default)": {
        **KGSP_MSP, "importance_normalization": "per_layer", "alpha_attention": 1.0},
}
DEFAULT_VARIANTS = [name for name in VARIANTS if "per-layer" not in name and "attention" not in name]
# name: stage-2 flags; each row is a student distilled from the teacher on the same budget
STUDENT_VARIANTS = {
    "Student, KD (logits + hidden states, default)": {},
    "Student, no KD (labels only)": {"alpha_ce": 1.0, "alpha_kd": 0.0, "alpha_hidden": 0.0},
    "Student, KD + attention-relation KD": {"alpha_attention": 1.0},
}
# name: (stage script, its flags); each row quantizes the seed's 'KGSP + MSP' model
QUANTIZATION_VARIANTS = {
    "PTQ-4bit (on KGSP + MSP)": ("9_quantize_pruned_model.py", {}),
    "QKD-4bit (on KGSP + MSP)": ("10_qat_kd_4bit.py", {}),
    "QKD-4bit, LSQ learned scales (on KGSP + MSP)": ("10_qat_kd_4bit.py", {"learnable_scales": "true"}),
    "PTQ-4bit, FP4 block 4096 (on KGSP + MSP)": ("9_quantize_pruned_model.py", {"quant_type": "fp4", "blocksize": 4096}),
    "QKD-4bit, FP4 block 4096 (on KGSP + MSP)": ("10_qat_kd_4bit.py", {"quant_type": "fp4", "blocksize": 4096}),
}
DEFAULT_QUANTIZATION = ["PTQ-4bit (on KGSP + MSP)", "QKD-4bit (on KGSP + MSP)"]
CLAIMS = [
    # name, variant A, variant B (A - B), expected range in accuracy points (None: the original design claims nothing)
    ("KGSP vs L2 (uniform)", "KGSP (L2+KD-grad), uniform", "L2, uniform (original)", (0.5, 1.5)),
    ("KGSP vs L2 (MSP)", "KGSP + MSP", "L2, MSP", (0.5, 1.5)),
    ("MSP vs uniform (KGSP)", "KGSP + MSP", "KGSP (L2+KD-grad), uniform", (0.3, 1.0)),
    ("MSP vs uniform (L2)", "L2, MSP", "L2, uniform (original)", (0.3, 1.0)),
    ("MSP per-layer normalized vs uniform (KGSP)", "KGSP + MSP, per-layer normalized", "KGSP (L2+KD-grad), uniform", (0.3, 1.0)),
    ("MSP per-layer vs global normalization (KGSP)", "KGSP + MSP, per-layer normalized", "KGSP + MSP", None),
    ("Attention-relation KD on vs off (stage 8, KGSP + MSP)", "KGSP + MSP, attention-relation KD", "KGSP + MSP", None),
    ("KD vs no KD (student)", "Student, KD (logits + hidden states, default)", "Student, no KD (labels only)", None),
    ("Attention-relation KD on vs off (student)", "Student, KD + attention-relation KD", "Student, KD (logits + hidden states, default)", None),
    ("QKD-4bit vs PTQ-4bit", "QKD-4bit (on KGSP + MSP)", "PTQ-4bit (on KGSP + MSP)", (1.0, 2.0)),
    ("LSQ vs absmax scales (QKD)", "QKD-4bit, LSQ learned scales (on KGSP + MSP)", "QKD-4bit (on KGSP + MSP)", None),
    ("QKD-4bit vs PTQ-4bit at FP4, block 4096", "QKD-4bit, FP4 block 4096 (on KGSP + MSP)", "PTQ-4bit, FP4 block 4096 (on KGSP + MSP)", (1.0, 2.0)),
]


def flags(settings: dict) -> list:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else value)]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max_train_samples", type=int, default=1200)
    parser.add_argument("--pruning_epochs", type=int, default=2)
    parser.add_argument("--qkd_epochs", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--student_epochs", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help="Stage-8 variants to run (default: the six of the original claims).")
    parser.add_argument("--student_variants", nargs="*", default=[], choices=list(STUDENT_VARIANTS),
                        help="Stage-2 rows (KD vs no KD, attention-relation KD); default: none.")
    parser.add_argument("--quantization_variants", nargs="*", default=DEFAULT_QUANTIZATION, choices=list(QUANTIZATION_VARIANTS),
                        help="Stage-9/10 rows on the 'KGSP + MSP' model (default: PTQ and QKD with the default settings).")
    parser.add_argument("--skip_quantization", action="store_true", help="Skip the PTQ/QKD rows (stages 9 and 10).")
    parser.add_argument("--output_name", default="ablation", help="Writes results/<output_name>.{json,md,png}.")
    parser.add_argument("--from_json", action="store_true", help="only redraw ablation.md/.png from ablation.json")
    args = parser.parse_args()
    name = args.output_name
    if args.from_json:
        source = results_root() / f"{name}.json"
        if not source.is_file():
            raise FileNotFoundError(f"--from_json redraws {source}, which does not exist; run the ablation first, or pass "
                                    f"the --output_name of an earlier one.")
        result = json.loads(source.read_text())
        (results_root() / f"{name}.md").write_text(markdown(result))
        plot(result, results_root() / f"{name}.png")
        print(markdown(result))
        return
    started = time.time()
    data_config = DataConfig()
    data = load_splits(data_config)
    train_rows = ["--max_train_samples", args.max_train_samples]
    budget = [*train_rows, "--prune_vocabulary", "false"]
    root = results_root() / "ablation"
    quantized = [] if args.skip_quantization else args.quantization_variants
    if quantized and "KGSP + MSP" not in args.variants:
        parser.error("The PTQ/QKD rows quantize the 'KGSP + MSP' model; add it to --variants or pass --skip_quantization.")
    find_checkpoint("teacher")  # every row distills from it; refused now rather than after the first rows ran
    if args.variants:
        find_checkpoint("student")
    accuracy: dict[str, list[float]] = {variant: [] for variant in [*args.student_variants, *args.variants, *quantized]}
    for seed in args.seeds:
        for variant in args.student_variants:
            folder = root / f"seed{seed}-{slug(variant)}"
            run_script("2_distill_student.py", *train_rows, "--seed", seed, "--num_epochs", args.student_epochs,
                       *flags(STUDENT_VARIANTS[variant]), "--output_dir", folder, "--overwrite_output_dir")
            accuracy[variant].append(test_accuracy(folder, data, data_config.max_length)[0])
        for variant in args.variants:
            folder = root / f"seed{seed}-{slug(variant)}"
            run_script(
                "8_pruning_with_finetuning.py", *budget, "--seed", seed, "--num_epochs", args.pruning_epochs,
                *flags(VARIANTS[variant]),
                "--final_sparsity", args.sparsity, "--head_final_sparsity", args.sparsity, "--ffn_final_sparsity", args.sparsity,
                "--output_dir", folder, "--overwrite_output_dir",
            )
            accuracy[variant].append(test_accuracy(folder, data, data_config.max_length)[0])
        pruned = root / f"seed{seed}-{slug('KGSP + MSP')}"
        for variant in quantized:
            script, settings = QUANTIZATION_VARIANTS[variant]
            folder = root / f"seed{seed}-{slug(variant)}"
            training = [*train_rows, "--seed", seed, "--num_epochs", args.qkd_epochs] if script.startswith("10_") else []
            run_script(script, *training, "--pruned_model_path", pruned, *flags(settings), "--output_dir", folder, "--overwrite_output_dir")
            accuracy[variant].append(test_accuracy(folder, data, data_config.max_length)[0])
        print(json.dumps({name: values[-1] for name, values in accuracy.items()}, indent=1), flush=True)

    claims = []
    for claim, first, second, expected in CLAIMS:
        if first not in accuracy or second not in accuracy:
            continue
        differences = [100 * (a - b) for a, b in zip(accuracy[first], accuracy[second])]
        summary = mean_std(differences)
        claims.append({
            "claim": claim, "a": first, "b": second, "expected_points": None if expected is None else list(expected), **summary,
            "within_expected": None if expected is None else expected[0] <= summary["mean"] <= expected[1],
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
        if claim["expected_points"] is None:
            lines.append(f"| {claim['claim']} | {claim['mean']:+.2f} ± {claim['std']:.2f} | no claim | – |")
            continue
        low, high = claim["expected_points"]
        verdict = "within the expected range" if low <= claim["mean"] <= high else ("above it" if claim["mean"] > high else "below it")
        lines.append(f"| {claim['claim']} | {claim['mean']:+.2f} ± {claim['std']:.2f} | +{low} to +{high} | {verdict} |")
    budget = result["budget"]
    lines.append(
        f"\nSeeds {budget['seeds']}; {budget['max_train_samples']} training examples, {budget.get('student_epochs', 2)} student epochs, "
        f"{budget['pruning_epochs']} pruning epochs, "
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
    labelled = False
    for i, claim in enumerate(claims):
        if claim["expected_points"] is not None:
            low_e, high_e = claim["expected_points"]
            right.barh(i, high_e - low_e, left=low_e, color="#c7e9c0", height=0.6, label=None if labelled else "expected range")
            labelled = True
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
    run_tool(main)
