"""Stage 11: an int8 CPU deployment model (torch dynamic quantization) of the best compressed model.

Reads:  the newest results/qkd_4bit/ and results/pruned/ checkpoints (or --source_model_path). From QKD it
        takes the trained full-precision master weights' 4-bit values (dequantized), from pruned the weights
        as they are; with --source auto the one with the higher validation accuracy wins.
Does:   dynamic int8 quantization of every encoder Linear (per output channel; activations quantized on the
        fly), the classifier kept in fp32. Saved as plain safetensors tensors (int8 codes, scales, zero points)
        because save_pretrained cannot store torch's packed int8 parameters; reloaded through the project's
        loader and evaluated on validation before it is moved into place.
Writes: results/int8/<run_id>/ with compression.json (method torch_dynamic_int8).

Run as:
    python 11_export_int8.py
    python 11_export_int8.py --source pruned
"""

import logging

from common import DataConfig, stages
from common.checkpoints import find_checkpoint, read_record
from common.config import Int8Config
from common.data import build_loaders
from common.evaluation import evaluate_accuracy
from common.lifecycle import run_script, start_stage
from common.models import check_matches_data, load_checkpoint_tokenizer, load_model
from common.quantization import (
    compress_embedding_state,
    dequantize_4bit_model,
    int8_state_dict,
    quantize_model_int8,
)

SOURCE_STAGES = tuple(dict.fromkeys((*stages.get("int8").reads, *stages.with_weights("full", "4bit"))))


logger = logging.getLogger("11_export_int8")


def choose_source(config: Int8Config):
    if config.source_model_path is not None:
        folder = find_checkpoint("pruned", config.source_model_path, allowed_stages=SOURCE_STAGES)
        stage = read_record(folder)["stage"]
        if stage not in ("qkd_4bit", "pruned"):
            logger.warning("Converting a %s checkpoint (not the pruned student): the int8 model and its report row stand "
                           "for that %s model, as its record says.", stage, stage)
        return folder
    candidates = []
    for stage in (stages.get("int8").reads if config.source == "auto" else (config.source,)):
        try:
            folder = find_checkpoint(stage)
        except FileNotFoundError:
            if config.source != "auto":
                raise
            continue
        validation = (read_record(folder).get("metrics") or {}).get("validation") or {}
        candidates.append((validation.get("accuracy", -1.0), folder))
    if not candidates:
        raise FileNotFoundError("No qkd_4bit or pruned checkpoint found; run 8_pruning_with_finetuning.py first.")
    return max(candidates)[1]


def main(data_config: DataConfig, config: Int8Config) -> None:
    run = start_stage("int8", data_config, config)
    data = run.data
    source = choose_source(config)
    source_record = read_record(source)
    check_matches_data(source, source_record, data_config, data.label_names)
    model = dequantize_4bit_model(load_model(source))
    tokenizer = load_checkpoint_tokenizer(source)
    _, eval_loader = build_loaders(data, tokenizer, data_config, config.eval_batch_size, config.eval_batch_size, seed=0)
    model, quantization = quantize_model_int8(model)
    state, embedding = compress_embedding_state(model, int8_state_dict(model), config.embedding_quantization)

    def reload_and_evaluate(folder):
        return {"validation": evaluate_accuracy(load_model(folder), eval_loader), "source_validation": (source_record.get("metrics") or {}).get("validation")}

    source_accuracy = ((source_record.get("metrics") or {}).get("validation") or {}).get("accuracy")
    run.finish(
        model, tokenizer,
        parent=str(source), parent_stage=source_record.get("stage"),
        label_names=source_record.get("label_names"), seed=source_record.get("seed"),
        quantization=quantization, embedding_quantization=embedding,
        state_dict=state, verify=reload_and_evaluate,
        summary=lambda folder, record: f"Int8: validation accuracy {record['metrics']['validation']['accuracy']:.4f} "
                                       f"(source {source.name}: {'unknown' if source_accuracy is None else f'{source_accuracy:.4f}'}) -> {folder}",
    )


if __name__ == "__main__":
    run_script(main, DataConfig, Int8Config)
