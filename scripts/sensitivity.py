"""Per-layer pruning sensitivity: how much can each layer's heads and FFN neurons lose before accuracy drops?

Reads:  a full-precision checkpoint (--model_path; default the newest results/student/ run) and the same data split
        as the stage that made it (pass the same data flags).
Does:   scores every head and FFN neuron by KGSP (normalized L2 + normalized |grad x weight| on --gradient_batches
        training batches), then for each layer alone masks the lowest-scored 25/50/75/90 % of its heads, and
        separately of its FFN neurons, and measures validation accuracy; no fine-tuning. From the drop table it
        recommends per-layer kept heads and FFN widths that remove --parameter_budget of the prunable parameters at
        the least summed drop.
Writes: results/sensitivity.json (drop table, baseline, recommendation), results/sensitivity.png (heat map) and
        results/sensitivity_targets.json (heads_per_layer, ffn_width_per_layer).

Run as:
    make sensitivity
    python scripts/sensitivity.py --model_path results/student/<run_id> --parameter_budget 0.6
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import DataConfig, stages  # noqa: E402
from common.lifecycle import run_script  # noqa: E402
from common.checkpoints import results_root, write_json  # noqa: E402
from common.config import PruningConfig, SensitivityConfig  # noqa: E402
from common.data import build_loaders, load_splits  # noqa: E402
from common.evaluation import evaluate_accuracy  # noqa: E402
from common.models import load_checkpoint_tokenizer, load_model, resolve_stage_checkpoint  # noqa: E402
from common.sensitivity import measure_sensitivity, plot_heatmap, recommend_targets  # noqa: E402


def main(data_config: DataConfig, config: SensitivityConfig) -> None:
    data = load_splits(data_config)
    folder, _ = resolve_stage_checkpoint("student", config.model_path, data.label_names, data_config,
                                         allowed_stages=stages.with_weights("full") if config.model_path else None)
    model = load_model(folder)
    tokenizer = load_checkpoint_tokenizer(folder)
    train_loader, eval_loader = build_loaders(data, tokenizer, data_config, config.batch_size, config.eval_batch_size, seed=0)
    scoring = PruningConfig(lambda_mag=config.lambda_mag, lambda_grad=config.lambda_grad,
                            importance_normalization=config.importance_normalization, importance_mode="l2+kd_grad")
    table = measure_sensitivity(model, scoring, train_loader, lambda m: evaluate_accuracy(m, eval_loader)["accuracy"],
                                config.sparsities, config.gradient_batches)
    targets = recommend_targets(table, config.parameter_budget)
    table.update(model=str(folder), data=data.source, validation_examples=len(data.validation), recommendation=targets)
    root = results_root()
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / f"{config.output_name}.json", table)
    write_json(root / f"{config.output_name}_targets.json",
               {key: targets[key] for key in ("heads_per_layer", "ffn_width_per_layer", "parameter_budget")})
    plot_heatmap(table, root / f"{config.output_name}.png")
    print(f"Baseline validation accuracy {table['baseline_accuracy']:.4f} ({folder})")
    for kind, label in (("head", "heads"), ("ffn", "FFN")):
        for layer, row in enumerate(table["accuracy_drop_points"][kind]):
            cells = "  ".join(f"{100 * s:.0f}%: {drop:+.2f}" for s, drop in zip(table["sparsities"], row))
            print(f"  layer {layer} {label:<5} drop (points)  {cells}")
    print(f"Recommended for {100 * config.parameter_budget:.0f}% of the prunable parameters: heads {targets['heads_per_layer']}, "
          f"FFN widths {targets['ffn_width_per_layer']} (summed single-layer drops {targets['predicted_drop_points']:.2f} "
          f"points) -> {root / (config.output_name + '.json')}, {root / (config.output_name + '.png')}")


if __name__ == "__main__":
    run_script(main, DataConfig, SensitivityConfig)
