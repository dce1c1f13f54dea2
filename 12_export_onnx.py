"""Stage 12: deployable ONNX models — fp32, ONNX Runtime int8 (dynamic and calibrated static), and 4-bit NF4.

Reads:  the newest results/pruned/ checkpoint (or --source_model_path: any full-precision checkpoint, teacher and
        student included), the newest results/qkd_4bit/ checkpoint (or --qkd_model_path) and the validation split.
Does:   1. exports the model to ONNX with its per-layer head counts and FFN widths baked in (dynamic batch and
           sequence axes; inputs input_ids, attention_mask and token_type_ids where the model has them; output
           logits) and checks ONNX Runtime against torch on every validation batch (max |difference| of the
           logits <= --max_abs_difference, else nothing is saved);
        2. optionally fuses the graph with ONNX Runtime's transformer optimizer (one Attention node per layer, with
           that layer's head count: the export writes each layer's head split as a constant), kept only if exact and
           faster in the interleaved benchmark; the dynamic int8 model is quantized from the graph kept, the static
           one always from the plain graph;
        3. quantizes it with onnxruntime.quantization: dynamic int8, and static int8 QDQ (per-channel weights)
           calibrated on validation batches of one fixed shape with each of MinMax, Percentile and Entropy, each
           once with every weight MatMul in int8 and once with the FFN output projections (fed by the GELU output)
           left in float; the candidate with the best validation accuracy is kept, all results are recorded;
        4. exports the QKD-4bit model with its trained NF4/FP4 codes and the word embeddings stored row-wise as the
           checkpoint stores them (int4 by default, int2 after stage 10 --embedding_quantization int2, with the
           frequent tokens' int4 rows of --embedding_int4_rows; --embedding_quantization), three ways: model.onnx
           runs the codes exactly in ONNX Runtime's MatMulBnb4 op
           (checked against the torch 4-bit model: validation accuracy within 0.1 point); model_nf4_int8.onnx
           decodes them once, when the session loads, into per-channel int8 weights for int8 matrix products
           (4-bit file size, int8 speed); model_int4_nbits.onnx re-quantizes them to int4 blocks of 32 for
           MatMulNBits with int8 compute (weights stay 4-bit in memory; embeddings in one GatherBlockQuantized).
           The other float weights of these files (position table, pooler) are stored in int8 rows
           (--int8_leftovers; the pooler in int4 rows with --leftover_matrix_bits 4); --max_positions keeps only
           the position rows sequences up to that length use.
        5. chooses each folder's deployment model by accuracy and speed: the fastest file in an interleaved benchmark
           (batch 32 x 64) among those within --deployment_tolerance validation points (0.5), or two standard errors
           of the paired difference if larger, of the folder's most accurate file (the smallest of those whose
           median latency lies within the fastest's interquartile range); the latencies and the reason are recorded.
Writes: results/onnx/<run_id>/       model.onnx, model_int8_dynamic.onnx, model_int8_static.onnx, config.json
                                     (id2label), tokenizer.json and the other tokenizer files, compression.json
        results/onnx_4bit/<run_id>/  model.onnx (MatMulBnb4), model_nf4_int8.onnx, model_int4_nbits.onnx, config.json,
                                     tokenizer, compression.json
        Both folders run with onnxruntime and the tokenizers library alone (see README, "Deploy").

Run as:
    python 12_export_onnx.py
    python 12_export_onnx.py --source_model_path results/teacher/<run_id> --export_4bit false
    python 12_export_onnx.py --calibration_methods minmax entropy --calibration_samples 256
    python 12_export_onnx.py --max_positions 64    # smaller 4-bit files that take up to 64 tokens (the default --max_length)
"""

import copy
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from common import DataConfig
from common.architecture import truncate_positions
from common.config import OnnxExportConfig
from common.data import build_loaders, text_inputs
from common.evaluation import accuracy, predict
from common.exports import (
    choose_by_speed,
    compare_speed,
    evaluate_file,
    file_entry,
    four_bit_source,
    full_precision_source,
)
from common.lifecycle import run_script, start_stage
from common.models import (
    architecture_record,
    check_matches_data,
    count_parameters,
    load_checkpoint_tokenizer,
    load_model,
)
from common.onnx_export import compact_names, export_onnx, ffn_output_matmuls, save_onnx, write_runtime_files
from common.onnx_quantized import use_bnb4_codes
from common.onnx_rows import compress_leftovers, quantize_word_embeddings
from common.onnx_runtime import (
    SATURATION_NOTE,
    calibrated_ranges,
    calibration_batches,
    int8_weight_bits,
    matmul_names,
    optimize_graph,
    preprocess_for_static,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from common.quantization import (
    EMBEDDING_BITS,
    dequantize_4bit_model,
    dequantized_linear_weights,
    stored_int4_row_ids,
)

logger = logging.getLogger("12_export_onnx")
STATIC_FILE, DYNAMIC_FILE, FP32_FILE = "model_int8_static.onnx", "model_int8_dynamic.onnx", "model.onnx"
NF4_INT8_FILE = "model_nf4_int8.onnx"  # 4-bit codes on disk, decoded to int8 when ONNX Runtime loads the graph
INT4_NBITS_FILE = "model_int4_nbits.onnx"  # int4 blocks re-quantized from the codes, MatMulNBits with int8 compute
FOUR_BIT_FILES = (  # file, compute (onnx_quantized.use_bnb4_codes), what it holds, ONNX Runtime's embedding op
    (FP32_FILE, "bnb4", "NF4/FP4 codes, MatMulBnb4 (exact)", False),
    (NF4_INT8_FILE, "int8", "NF4/FP4 codes, int8 compute after load", False),
    (INT4_NBITS_FILE, "nbits", "int4 blocks of 32 re-quantized from the codes, MatMulNBits int8 compute", True),
)


def export_int8_bundle(run, source: Path, source_record: dict, scratch: Path) -> Path:
    data_config, config, data = run.data_config, run.config, run.data
    model = load_model(source)
    tokenizer = load_checkpoint_tokenizer(source)
    _, loader = build_loaders(data, tokenizer, data_config, config.eval_batch_size, config.eval_batch_size, seed=0)
    torch_logits, labels = predict(model, loader)

    def write_files(folder: Path) -> dict:
        files, correct = {}, {}
        names = export_onnx(model, tokenizer, folder / FP32_FILE, data_config.max_length)
        write_runtime_files(folder, tokenizer, model.config, data_config.max_length)
        fp32_accuracy, fp32_logits, correct[FP32_FILE] = evaluate_file(folder / FP32_FILE, loader)
        difference = float(np.abs(fp32_logits - torch_logits).max())
        print(f"ONNX fp32: validation accuracy {fp32_accuracy:.4f} (torch {accuracy(torch_logits, labels):.4f}); "
              f"max |ORT - torch| logit difference {difference:.2e}")
        if difference > config.max_abs_difference:
            raise RuntimeError(
                f"ONNX Runtime's logits differ from torch's by up to {difference:.2e}, above max_abs_difference="
                f"{config.max_abs_difference}; the export is wrong, nothing was saved."
            )
        found = {"inputs": names, "max_abs_difference_vs_torch": difference,
                 "torch_validation_accuracy": accuracy(torch_logits, labels), "files": files}
        files[FP32_FILE] = file_entry(folder / FP32_FILE, fp32_accuracy, precision="fp32")

        quantize_from = folder / FP32_FILE
        if config.optimize_graph:
            quantize_from, found["graph_optimization"] = optimized_if_faster(folder / FP32_FILE, scratch, model, loader, fp32_logits, config)

        dynamic = quantize_dynamic_int8(quantize_from, folder / DYNAMIC_FILE)
        dynamic_accuracy, _, correct[DYNAMIC_FILE] = evaluate_file(folder / DYNAMIC_FILE, loader)
        files[DYNAMIC_FILE] = file_entry(folder / DYNAMIC_FILE, dynamic_accuracy, precision="int8 dynamic",
                                         quantized_from=quantize_from.name, weights=dynamic["weights"],
                                         int8_weight_bits=7 if dynamic["reduce_range"] else 8)
        print(f"ONNX Runtime dynamic int8: validation accuracy {dynamic_accuracy:.4f}")

        # static QDQ starts from the plain graph: its per-MatMul choices (FFN outputs in float) need the unfused MatMuls
        prepared = scratch / "preprocessed.onnx"
        preprocess_for_static(folder / FP32_FILE, prepared)
        batches = calibration_batches(tokenizer, *text_inputs(data.validation), names, data_config.max_length,
                                      config.calibration_batch_size, config.calibration_samples)
        ffn_outputs = ffn_output_matmuls(model)
        missing = sorted(set(ffn_outputs) - set(matmul_names(prepared)))
        if missing:
            raise RuntimeError(f"The exported graph has no MatMul nodes {missing}; cannot choose which to keep in float.")
        calibrations = {}
        for method in config.calibration_methods:
            ranges = None if method == "minmax" else calibrated_ranges(prepared, batches, method, config.percentile, scratch)
            for variant, keep_float in (("", ()), ("+ffn_out_float", ffn_outputs)):
                name = method + variant
                target = scratch / f"static_{name}.onnx"
                details = quantize_static_int8(prepared, target, batches, method, config.percentile, keep_float, scratch, ranges)
                static_accuracy, _, static_correct = evaluate_file(target, loader)
                calibrations[name] = {**details, "validation_accuracy": static_accuracy}
                correct.setdefault("static", {})[name] = static_correct
                print(f"ONNX Runtime static int8 ({method} calibration, {'FFN output projections in float' if keep_float else 'every weight MatMul in int8'}): "
                      f"validation accuracy {static_accuracy:.4f}")
        order = list(calibrations)  # on a tie the earlier (more quantized) candidate wins
        best = max(order, key=lambda name: (calibrations[name]["validation_accuracy"], -order.index(name)))
        shutil.copyfile(scratch / f"static_{best}.onnx", folder / STATIC_FILE)
        files[STATIC_FILE] = file_entry(folder / STATIC_FILE, calibrations[best]["validation_accuracy"],
                                        precision="int8 static QDQ", calibration=best, quantized_from=FP32_FILE,
                                        int8_weight_bits=7 if calibrations[best]["reduce_range"] else 8)
        found["calibrations"] = calibrations
        correct[STATIC_FILE] = correct.pop("static")[best]
        found.update(choose_by_speed(folder, files, model.config.vocab_size, config, correct))
        found["metrics"] = {"validation": {"accuracy": files[found["deployment_model"]]["validation_accuracy"]},
                            "validation_fp32": {"accuracy": fp32_accuracy}}
        return found

    return run.finish(
        write_files=write_files, end=False,
        parent=str(source), parent_stage=source_record.get("stage"),
        architecture=architecture_record(model), parameters=count_parameters(model),
        summary=lambda folder, record: f"ONNX folder -> {folder} (deployment model {record['deployment_model']}, "
                                       f"calibration kept: {record['files'][STATIC_FILE]['calibration']})",
    )


def optimized_if_faster(plain: Path, scratch: Path, model, loader, fp32_logits, config) -> tuple[Path, dict]:
    """ONNX Runtime's transformer optimizer, kept only when it is exact and measurably faster."""
    optimized = scratch / "optimized.onnx"
    fusions = optimize_graph(plain, optimized)
    _, logits, _ = evaluate_file(optimized, loader)
    difference = float(np.abs(logits - fp32_logits).max())
    speed = compare_speed({"plain": plain, "optimized": optimized}, model.config.vocab_size, config.num_threads)
    speedup = speed["optimized"]["speedup_vs_reference_median"]
    keep = difference <= config.max_abs_difference and speedup > 1.0
    print(f"Graph optimization: fusions {fusions}, max difference {difference:.2e}, fp32 speed-up {speedup:.2f}x "
          f"(IQR {speed['optimized']['speedup_vs_reference_p25']:.2f}-{speed['optimized']['speedup_vs_reference_p75']:.2f}) "
          f"-> {'int8 models are quantized from the optimized graph' if keep else 'not used'}")
    return (optimized if keep else plain), {"fusions": fusions, "max_abs_difference": difference, "used": keep,
                                            "fp32_speedup_median": speedup, "benchmark": speed}


def export_4bit_bundle(run, source: Path, source_record: dict, scratch: Path) -> Path:
    data_config, config, data = run.data_config, run.config, run.data
    quantization = source_record["quantization"]
    quantized = load_model(source)
    tokenizer = load_checkpoint_tokenizer(source)
    _, loader = build_loaders(data, tokenizer, data_config, config.eval_batch_size, config.eval_batch_size, seed=0)
    torch_logits, labels = predict(quantized, loader)
    exported = dequantized_linear_weights(quantized)
    plain = dequantize_4bit_model(copy.deepcopy(quantized))
    positions = None if config.max_positions is None else truncate_positions(plain, config.max_positions)
    if positions is not None:
        print(f"Position table cut to the {positions['rows_kept']} of {positions['rows_before']} rows that sequences of "
              f"up to {config.max_positions} tokens use (--max_positions)")
    names = export_onnx(plain, tokenizer, scratch / "dequantized.onnx", data_config.max_length)
    stored_embeddings = (source_record.get("embedding_quantization") or {}).get("method", "none")
    embedding_method = config.embedding_quantization
    if embedding_method == "auto":
        embedding_method = "int4" if stored_embeddings == "none" else stored_embeddings
    exact_embeddings = embedding_method in ("none", stored_embeddings)
    # int4 rows among ternary ones travel with the table they belong to
    int4_rows = stored_int4_row_ids(source, source_record) if embedding_method == stored_embeddings else None
    torch_accuracy = accuracy(torch_logits, labels)
    onnx_quantization = {"method": "bitsandbytes_codes_in_onnx", "quant_type": quantization["quant_type"],
                         "blocksize": quantization["blocksize"], "codes": "the checkpoint's own"}

    def write_files(folder: Path) -> dict:
        files, correct = {}, {}
        found = {"quantization": onnx_quantization, "files": files}
        write_runtime_files(folder, tokenizer, plain.config, data_config.max_length)
        bits = int8_weight_bits()  # the graphs below are built with the range the record states
        int8_decode = {"weights": "decoded to int8 per channel" + (f", {SATURATION_NOTE}" if bits == 7 else ""),
                       "int8_weight_bits": bits}
        for file_name, compute, precision, contrib_embeddings in FOUR_BIT_FILES:
            graph = onnx.load(str(scratch / "dequantized.onnx"))
            onnx_quantization["modules"] = use_bnb4_codes(graph, quantized, exported, compute, int8_weight_bits=bits)
            embeddings = None
            if embedding_method != "none":
                embeddings = quantize_word_embeddings(
                    graph, plain.get_input_embeddings().weight, EMBEDDING_BITS[embedding_method],
                    contrib_op=contrib_embeddings, int4_rows=int4_rows)
                found.setdefault("embedding_quantization", embeddings)
            if compute == "bnb4" and exact_embeddings:  # the exact file, checked before anything else is rounded
                save_onnx(graph, scratch / "exact_4bit.onnx")
                exact_accuracy, _, _ = evaluate_file(scratch / "exact_4bit.onnx", loader)
                gap = 100 * abs(exact_accuracy - torch_accuracy)
                if gap > 0.1:
                    raise RuntimeError(
                        f"The 4-bit ONNX model validates at {exact_accuracy:.4f} but the torch 4-bit model at "
                        f"{torch_accuracy:.4f} ({gap:.2f} points apart, more than 0.1); the codes were not carried over "
                        "faithfully. Nothing was saved."
                    )
            leftovers = (compress_leftovers(graph, matrix_bits=config.leftover_matrix_bits) if config.int8_leftovers
                         else {"int8_rows": [], "int4_rows": []})
            names_saved_bytes = compact_names(graph) if config.compact_names else 0
            save_onnx(graph, folder / file_name)
            file_accuracy, logits, correct[file_name] = evaluate_file(folder / file_name, loader)
            difference = float(np.abs(logits - torch_logits).max())
            print(f"ONNX 4-bit {file_name} ({precision}; embeddings {embedding_method}; int8 rows of "
                  f"{len(leftovers['int8_rows'])} other weights, int4 rows of {len(leftovers['int4_rows'])}): validation accuracy {file_accuracy:.4f} vs torch 4-bit "
                  f"{torch_accuracy:.4f}; max logit difference {difference:.2e}")
            files[file_name] = file_entry(folder / file_name, file_accuracy, precision=precision,
                                          max_abs_difference_vs_torch_4bit=difference, embedding_quantization=embeddings,
                                          int8_leftovers=leftovers["int8_rows"],
                                          int4_leftovers=leftovers["int4_rows"], compact_names_saved_bytes=names_saved_bytes,
                                          **(int8_decode if compute == "int8" else {}))
        found.update(choose_by_speed(folder, files, plain.config.vocab_size, config, correct))
        found["metrics"] = {"validation": {"accuracy": files[found["deployment_model"]]["validation_accuracy"]},
                            "validation_torch_4bit": {"accuracy": torch_accuracy}}
        return found

    return run.finish(
        write_files=write_files, stage="onnx_4bit", use_output_dir=False, end=False,
        parent=str(source), parent_stage=source_record.get("stage"), inputs=names,
        architecture=architecture_record(plain), parameters=count_parameters(quantized), position_table=positions,
        summary=lambda folder, record: f"ONNX 4-bit folder -> {folder} (deployment model {record['deployment_model']})",
    )


def main(data_config: DataConfig, config: OnnxExportConfig) -> None:
    run = start_stage("onnx", data_config, config)
    source, source_record = full_precision_source(config)
    check_matches_data(source, source_record, data_config, run.data.label_names)
    four_bit = four_bit_source(config, data_config, run.data.label_names)  # refused now, before the int8 export runs
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as scratch:
        export_int8_bundle(run, source, source_record, Path(scratch))
        if four_bit is not None:
            export_4bit_bundle(run, *four_bit, Path(scratch))
    run.end()
    print(f"Stage 12 finished in {run.stopwatch.seconds:.0f} s")


if __name__ == "__main__":
    run_script(main, DataConfig, OnnxExportConfig)
