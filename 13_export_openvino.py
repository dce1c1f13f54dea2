"""Stage 13: OpenVINO deployment models: the pruned model as OpenVINO IR, NNCF int8, and the QKD model's 4-bit weights.

Reads:  the newest results/pruned/ checkpoint (or --source_model_path: any full-precision checkpoint, the teacher
        included), the newest results/qkd_4bit/ checkpoint (or --qkd_model_path) and the validation split.
Does:   1. exports the model to ONNX (per-layer heads and FFN widths baked in) and converts it to OpenVINO IR with fp32
           weights; OpenVINO's CPU plugin computes in bf16 where the CPU has it, and the precision it used is recorded;
        2. NNCF post-training int8 (transformer preset) calibrated on --calibration_samples validation rows, or with
           --int8_max_drop NNCF's accuracy-aware int8 (layers back to float until the validation drop is within it);
        3. the QKD model's dequantized 4-bit weights compressed again by NNCF to 4 bits (--weight_mode, default NF4
           with the QKD block size, which finds the trained codes again where a layer's width allows);
        4. evaluates every file on validation (and its logits against torch) and ships the fastest file within
           --deployment_tolerance validation points of the most accurate one (interleaved benchmark, batch 32 x 64).
Writes: results/openvino/<run_id>/ openvino_model.{xml,bin}, openvino_model_int8.{xml,bin}, openvino_model_4bit.{xml,bin},
        config.json (id2label), tokenizer.json and the other tokenizer files, compression.json, README.md.
        The folder runs with openvino and the tokenizers library alone (its README.md has the snippet).

Run as:
    python 13_export_openvino.py
    python 13_export_openvino.py --source_model_path results/teacher/<run_id> --export_4bit false   # the teacher, for comparison
    python 13_export_openvino.py --weight_mode int4_sym --calibration_samples 600
    python 13_export_openvino.py --int8_max_drop 0.3        # NNCF accuracy-aware int8 within 0.3 validation points
"""

import copy
import tempfile
from pathlib import Path

import numpy as np

from common import DataConfig
from common.config import OpenVinoExportConfig
from common.data import build_loaders, text_inputs
from common.evaluation import accuracy, predict
from common.exports import choose_by_speed, file_entry, four_bit_source, full_precision_source
from common.lifecycle import run_script, start_stage
from common.models import architecture_record, check_matches_data, count_parameters, load_checkpoint_tokenizer, load_model
from common.onnx_export import export_onnx, write_runtime_files
from common.onnx_runtime import calibration_batches, graph_feeds
from common.openvino_runtime import compress_weights_4bit, convert_onnx, quantize_int8, quantize_int8_with_accuracy_control
from common.quantization import dequantize_4bit_model
from common.runtime import ModelRuntime

PLAIN_FILE, INT8_FILE, FOUR_BIT_FILE = "openvino_model.xml", "openvino_model_int8.xml", "openvino_model_4bit.xml"


def main(data_config: DataConfig, config: OpenVinoExportConfig) -> None:
    run = start_stage("openvino", data_config, config)
    data = run.data
    source, source_record = full_precision_source(config)
    check_matches_data(source, source_record, data_config, data.label_names)
    four_bit = four_bit_source(config, data_config, data.label_names)  # refused now, before any conversion

    model = load_model(source)
    tokenizer = load_checkpoint_tokenizer(source)
    _, loader = build_loaders(data, tokenizer, data_config, config.eval_batch_size, config.eval_batch_size, seed=0)
    torch_logits, labels = predict(model, loader)
    torch_accuracy = accuracy(torch_logits, labels)

    with tempfile.TemporaryDirectory(prefix="openvino-export-") as scratch:
        scratch = Path(scratch)

        def write_files(folder: Path) -> dict:
            files: dict = {}
            correct: dict = {}
            found = {"files": files, "torch_validation_accuracy": torch_accuracy}
            names = export_onnx(model, tokenizer, scratch / "model.onnx", data_config.max_length)
            write_runtime_files(folder, tokenizer, model.config, data_config.max_length)
            convert_onnx(scratch / "model.onnx", folder / PLAIN_FILE)
            found["inputs"] = names

            def add(file_name: str, **fields) -> None:
                runtime = ModelRuntime(folder, file_name, verify=False)  # the folder is being written
                logits, _ = runtime.logits(loader)
                validation, precision = accuracy(logits, labels), runtime.graph.inference_precision
                correct[file_name] = logits.argmax(-1) == np.asarray(labels)
                difference = float(np.abs(logits - torch_logits).max())
                files[file_name] = file_entry(folder / file_name, validation, inference_precision=precision,
                                              max_abs_difference_vs_torch=difference, **fields)
                print(f"OpenVINO {file_name}: validation accuracy {validation:.4f} (torch {torch_accuracy:.4f}); computes in "
                      f"{precision}; max |OpenVINO - torch| logit difference {difference:.2e}")

            add(PLAIN_FILE, precision="fp32 weights")
            batches = calibration_batches(tokenizer, *text_inputs(data.validation), names, data_config.max_length,
                                          config.calibration_batch_size, config.calibration_samples)
            if config.int8_max_drop is None:
                quantization = quantize_int8(folder / PLAIN_FILE, folder / INT8_FILE, batches, len(batches))
            else:
                validation = [(graph_feeds(names, batch, PLAIN_FILE), batch["labels"].numpy()) for batch in loader]
                quantization = quantize_int8_with_accuracy_control(folder / PLAIN_FILE, folder / INT8_FILE, batches,
                                                                   len(batches), validation, config.int8_max_drop)
            add(INT8_FILE, precision="int8 (NNCF post-training" + (", accuracy-aware)" if config.int8_max_drop is not None
                                                                   else ")"), quantization=quantization)
            if four_bit is not None:
                qkd_folder, qkd_record = four_bit
                dequantized = dequantize_4bit_model(copy.deepcopy(load_model(qkd_folder)))
                export_onnx(dequantized, load_checkpoint_tokenizer(qkd_folder), scratch / "qkd.onnx", data_config.max_length)
                convert_onnx(scratch / "qkd.onnx", scratch / "qkd.xml")
                compression = compress_weights_4bit(scratch / "qkd.xml", folder / FOUR_BIT_FILE, config.weight_mode,
                                                    qkd_record["quantization"]["blocksize"])
                add(FOUR_BIT_FILE, precision=f"{config.weight_mode} weights (NNCF) of the QKD model",
                    quantization=compression, source=str(qkd_folder))
            found.update(choose_by_speed(folder, files, model.config.vocab_size, config, correct))
            found["metrics"] = {"validation": {"accuracy": files[found["deployment_model"]]["validation_accuracy"]},
                                "validation_torch": {"accuracy": torch_accuracy}}
            return found

        run.finish(
            write_files=write_files,
            parent=str(source), parent_stage=source_record.get("stage"),
            qkd_source=str(four_bit[0]) if four_bit else None,
            architecture=architecture_record(model), parameters=count_parameters(model),
            summary=lambda folder, record: f"OpenVINO folder -> {folder} (deployment model {record['deployment_model']}: "
                                           f"{record['deployment_choice']})",
        )


if __name__ == "__main__":
    run_script(main, DataConfig, OpenVinoExportConfig)
