"""What dropping rare tokens from the vocabulary costs and saves (stage 8's --vocabulary_min_count, measured after the
fact on one checkpoint, so no fine-tuning is repeated).

Reads:  a full-precision checkpoint (--model_path; default: the newest results/pruned/ run) and the data flags (the
        same as every stage's).
Does:   for each --min_counts value, prunes a copy of the checkpoint's vocabulary to the tokens seen at least that
        often in the training split, as stage 8 does after its fine-tuning (1 keeps every token the training split
        uses; on a checkpoint stage 8 already pruned that is the checkpoint itself), and evaluates it in torch fp32
        on validation and test. Counts the word-embedding table's bytes in fp32 and as the 4-bit row codes stages 10
        and 12 store (half a byte per entry and a float32 scale per row).
Writes: results/vocabulary_benchmark.json and a table on stdout: kept tokens, rare tokens dropped, token coverage,
        validation and test accuracy, and the table's bytes.

Run as:
    python scripts/benchmark_vocabulary.py
    python scripts/benchmark_vocabulary.py --model_path results/pruned/<run_id> --min_counts 1 2 3 5
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import parse_config  # noqa: E402
from common.config import DataConfig, VocabularyBenchmarkConfig  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402


def main() -> None:
    data_config, config = parse_config(DataConfig, VocabularyBenchmarkConfig)
    from common.architecture import word_embeddings
    from common.checkpoints import find_checkpoint, results_root, write_json
    from common.data import load_splits, make_loader, tokenize_dataset
    from common.evaluation import evaluate_accuracy
    from common.models import load_checkpoint_tokenizer, load_model
    from common.vocabulary import prune_vocabulary

    folder = Path(config.model_path) if config.model_path else find_checkpoint("pruned")
    model, tokenizer = load_model(folder), load_checkpoint_tokenizer(folder)
    data = load_splits(data_config)
    print(f"Checkpoint {folder}: {word_embeddings(model).num_embeddings:,} word embeddings", flush=True)
    rows = []
    for min_count in config.min_counts:
        pruned, pruned_tokenizer, summary = prune_vocabulary(copy.deepcopy(model), tokenizer, data, data_config.max_length,
                                                             min_count=min_count)
        table = word_embeddings(pruned)
        accuracy = {split: evaluate_accuracy(pruned, make_loader(tokenize_dataset(dataset, pruned_tokenizer, data_config.max_length),
                                                                 pruned_tokenizer, config.eval_batch_size, shuffle=False))["accuracy"]
                    for split, dataset in (("validation", data.validation), ("test", data.test))}
        rows.append({"min_count": min_count, "kept_tokens": table.num_embeddings, "rare_tokens_dropped": summary["rare_tokens_dropped"],
                     "coverage": summary["coverage"], "validation_accuracy": accuracy["validation"], "test_accuracy": accuracy["test"],
                     "table_bytes_fp32": table.num_embeddings * table.embedding_dim * 4,
                     "table_bytes_4bit_rows": table.num_embeddings * ((table.embedding_dim + 1) // 2 + 4)})
    lines = ["| Min count | Kept tokens | Rare dropped | Coverage (val / test) | Validation acc. | Test acc. | Table fp32 MB | Table 4-bit MB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['min_count']} | {row['kept_tokens']:,} | {row['rare_tokens_dropped']:,} | "
                     f"{row['coverage']['validation']:.4f} / {row['coverage']['test']:.4f} | {row['validation_accuracy']:.4f} | "
                     f"{row['test_accuracy']:.4f} | {row['table_bytes_fp32'] / 1e6:.2f} | {row['table_bytes_4bit_rows'] / 1e6:.2f} |")
    print("\n".join(lines))
    path = results_root() / "vocabulary_benchmark.json"
    write_json(path, {"checkpoint": str(folder), "rows": rows})
    print(f"Written {path}")


if __name__ == "__main__":
    run_tool(main)
