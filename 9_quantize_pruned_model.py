"""Stage 9: 4-bit post-training quantization (PTQ) of the pruned student, no training.

Reads:  the newest results/pruned/ checkpoint (or --pruned_model_path) and the validation split.
Does:   stores every encoder Linear in bitsandbytes NF4 (or FP4) with the given block size and double
        quantization; embeddings, LayerNorms, pooler and classifier stay full precision, except that the
        word embeddings are stored row-wise in int4 (--embedding_quantization int4|int8|int2|none; with int2,
        --embedding_int4_rows N keeps the rows of the N most frequent training tokens at int4). With
        --keep_8bit_size_budget_mb, the Linears with the largest 4-bit output error stay at 8 bits (int8 rows)
        as far as the size budget allows (mixed precision). Then reloads
        the written checkpoint through the project's loader and evaluates it on validation.
Writes: results/ptq_4bit/<run_id>/ with the 4-bit weights, compression.json (quantization record, validation
        accuracy of the reloaded model and its drop against the full-precision pruned model).

Run as:
    python 9_quantize_pruned_model.py
    python 9_quantize_pruned_model.py --quant_type fp4 --blocksize 128 --double_quant false
    python 9_quantize_pruned_model.py --keep_8bit_size_budget_mb 6.0      # mixed 8/4-bit within 6 MB
"""

import itertools

from common import DataConfig, PTQConfig
from common.data import build_loaders
from common.evaluation import evaluate_accuracy
from common.lifecycle import run_script, start_stage
from common.models import load_checkpoint_tokenizer, load_model, model_skeleton, resolve_stage_checkpoint
from common.quantization import (
    check_mixed_precision,
    compress_embedding_state,
    layer_quantization_errors,
    plan_8bit_layers,
    quantize_model_4bit,
)
from common.vocabulary import most_frequent_tokens

ERROR_BATCHES = 4  # validation batches of the per-layer quantization error


def main(data_config: DataConfig, config: PTQConfig) -> None:
    run = start_stage("ptq_4bit", data_config, config)
    data = run.data
    pruned_folder, pruned_record = resolve_stage_checkpoint("pruned", config.pruned_model_path, data.label_names, data_config)
    if config.keeps_8bit_layers:  # refused before any work
        check_mixed_precision(model_skeleton(pruned_folder), config)
    model = load_model(pruned_folder)
    tokenizer = load_checkpoint_tokenizer(pruned_folder)
    _, eval_loader = build_loaders(data, tokenizer, data_config, config.eval_batch_size, config.eval_batch_size, seed=0)

    full_precision = evaluate_accuracy(model, eval_loader)
    layer_errors = layer_quantization_errors(model, config, list(itertools.islice(eval_loader, ERROR_BATCHES)))
    eight_bit, mixed_precision = plan_8bit_layers(model, config, layer_errors)
    quantization = quantize_model_4bit(model, config, eight_bit=eight_bit)
    quantization["layer_errors"] = layer_errors
    quantization["mixed_precision"] = mixed_precision
    int4_rows = most_frequent_tokens(tokenizer, data, data_config.max_length, config.embedding_int4_rows)
    state, embedding = compress_embedding_state(model, dict(model.state_dict()), config.embedding_quantization, int4_rows)
    print(f"Quantized {len(quantization['modules'])} linear layers to {config.quant_type} (block {config.blocksize}, "
          f"double quant {config.double_quant}); at 8 bits: {quantization['modules_8bit'] or 'none'}; kept in full precision: "
          f"{quantization['kept_full_precision']}")

    def reload_and_evaluate(folder):
        reloaded = evaluate_accuracy(load_model(folder), eval_loader)
        return {
            "validation": reloaded,
            "validation_full_precision": full_precision,
            "accuracy_drop_points": 100 * (full_precision["accuracy"] - reloaded["accuracy"]),
        }

    run.finish(
        model, tokenizer,
        parent=str(pruned_folder), seed=pruned_record.get("seed"),
        quantization=quantization, embedding_quantization=embedding,
        state_dict=state, verify=reload_and_evaluate,
        summary=lambda folder, record: f"PTQ-4bit: validation accuracy {record['metrics']['validation']['accuracy']:.4f} "
                                       f"(full precision {full_precision['accuracy']:.4f}, drop "
                                       f"{record['metrics']['accuracy_drop_points']:.2f} points) -> {folder}",
    )


if __name__ == "__main__":
    run_script(main, DataConfig, PTQConfig)
