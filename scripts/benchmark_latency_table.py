"""How well the per-machine latency table predicts real pruned checkpoints (the table scripts/compress.py uses).

Reads:  the newest results/student/ checkpoint (the table's architecture) and the pruned checkpoints given with
        --checkpoints (default: every finished results/pruned/ run).
Does:   loads or builds the latency table (common/latency_table.py, cached in results/latency_tables/); exports each
        checkpoint to ONNX, quantizes it to dynamic int8 and times all of them round-robin with the first in one
        process (--rounds rounds, --batch_size x --seq_length, 2 threads); predicts each from the table at its residual
        width (a checkpoint narrowed by --hidden_sparsity has its own) twice: from its real per-layer shapes, and from
        its total kept heads and neurons spread evenly (what compress.py knows before training a candidate).
Writes: results/latency_table_check.json and a table on stdout: measured, both predictions and their ratios.

Run as:
    python scripts/benchmark_latency_table.py
    python scripts/benchmark_latency_table.py --checkpoints results/pruned/<run_a> results/compress/<id>/candidates/<c>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common.checkpoints import find_checkpoint, list_checkpoints, read_record, results_root, write_json  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="*", default=None, help="Pruned checkpoint folders (default: every results/pruned/ run).")
    parser.add_argument("--rounds", type=int, default=20, help="Timed rounds of the interleaved benchmark.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_length", type=int, default=64)
    args = parser.parse_args()
    if min(args.rounds, args.batch_size, args.seq_length) < 1:
        parser.error("--rounds, --batch_size and --seq_length must be positive.")
    student = find_checkpoint("student")
    folders = [Path(path) for path in args.checkpoints] if args.checkpoints else list_checkpoints("pruned")
    missing = [str(folder) for folder in folders if not (folder / "compression.json").is_file()]
    if missing or not folders:
        parser.error(f"no finished checkpoint in {missing or 'results/pruned/'}; run stage 8 or scripts/compress.py first.")

    from common.exports import compare_speed
    from common.latency_table import latency_table, predict_ms
    from common.models import load_checkpoint_tokenizer, load_model
    from common.onnx_export import export_onnx, write_runtime_files
    from common.onnx_runtime import quantize_dynamic_int8

    tables: dict[int, dict] = {}

    def table_at(width: int) -> dict:
        if width not in tables:
            tables[width] = latency_table(student, args.batch_size, args.seq_length, hidden_width=width)
        return tables[width]

    rows, paths = {}, {}
    with tempfile.TemporaryDirectory(prefix="latency-table-check-") as scratch:
        for folder in folders:
            label = f"{folder.parent.name}/{folder.name}"
            target = Path(scratch) / label.replace("/", "-")
            target.mkdir()
            model, tokenizer = load_model(folder), load_checkpoint_tokenizer(folder)
            export_onnx(model, tokenizer, target / "model.onnx", args.seq_length)
            write_runtime_files(target, tokenizer, model.config, args.seq_length)
            quantize_dynamic_int8(target / "model.onnx", target / "int8.onnx")
            paths[label] = target / "int8.onnx"
            architecture = read_record(folder)["architecture"]
            heads, widths = architecture["heads_per_layer"], architecture["ffn_width_per_layer"]
            layers, width = len(heads), model.config.hidden_size
            table = table_at(width)
            rows[label] = {"folder": str(folder), "hidden_width": width, "table": table["path"],
                           "heads_per_layer": heads, "ffn_width_per_layer": widths,
                           "predicted_ms_real_shapes": predict_ms(table, heads, widths),
                           "predicted_ms_even_shapes": predict_ms(table, [sum(heads) / layers] * layers, [sum(widths) / layers] * layers)}
        vocab_size = min(read_record(folder)["architecture"]["vocab_size"] for folder in folders)
        speed = compare_speed(paths, vocab_size, 2, args.batch_size, args.seq_length, args.rounds)
    for label, row in rows.items():
        row["measured_ms"] = speed[label]["latency_ms_median"]
        row["measured_iqr_ms"] = [speed[label]["latency_ms_p25"], speed[label]["latency_ms_p75"]]
        row["measured_over_real_shapes"] = row["measured_ms"] / row["predicted_ms_real_shapes"]
        row["measured_over_even_shapes"] = row["measured_ms"] / row["predicted_ms_even_shapes"]
    result = {"tables": {width: {key: table[key] for key in ("path", "cached", "build_seconds", "key", "base_ms")}
                         for width, table in tables.items()},
              "settings": vars(args), "checkpoints": rows}
    write_json(results_root() / "latency_table_check.json", result)
    for width, table in tables.items():
        how = "read from the cache" if table["cached"] else f"built in {table['build_seconds']} s"
        print(f"Latency table at residual width {width}: {table['path']} ({how})")
    print("| Checkpoint | Heads per layer | FFN width per layer | Measured ms [IQR] | Predicted (real shapes) | Predicted (even) |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['heads_per_layer']} | {row['ffn_width_per_layer']} | {row['measured_ms']:.2f} "
              f"[{row['measured_iqr_ms'][0]:.2f}–{row['measured_iqr_ms'][1]:.2f}] | {row['predicted_ms_real_shapes']:.2f} "
              f"(×{row['measured_over_real_shapes']:.2f}) | {row['predicted_ms_even_shapes']:.2f} (×{row['measured_over_even_shapes']:.2f}) |")
    print(f"-> {results_root() / 'latency_table_check.json'}")


if __name__ == "__main__":
    run_tool(main)
