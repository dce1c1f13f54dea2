"""Stage 10: QKD-4bit, quantization-aware training of the pruned student with distillation.

Reads:  the newest results/pruned/ checkpoint (or --pruned_model_path), the teacher (--teacher 'teacher': the
        newest stage-1 checkpoint; 'pruned': the full-precision pruned model; or --teacher_model_path) and the
        same data split as stage 1.
Does:   trains full-precision master weights through NF4 fake quantization (bitsandbytes' codebook and
        per-block absmax, straight-through gradients) with
            total = alpha_ce*CE + alpha_kd*KL(teacher/T || student/T)*T^2 + alpha_hidden*MSE(hidden states)
                    (+ alpha_attention * attention-relation KD; the --beta_* flags of earlier versions still work),
        --learnable_scales trains each block's scale too (LSQ) and --keep_8bit_size_budget_mb (or --keep_8bit_layers N)
        keeps the Linears with the largest 4-bit error (measured before training) at 8 bits, trained through int8
        fake quantization; the word embeddings train through their row-wise storage (--embedding_quantization:
        int4 by default, int2 for ternary rows in half the bytes, --embedding_int4_rows N keeps the N most frequent
        tokens' rows at int4 among them);
        evaluates the fake-quantized model every epoch and keeps the best, exports it to real bitsandbytes
        4-bit weights, reloads the checkpoint and checks that its validation accuracy matches the
        fake-quantized one within --max_accuracy_gap points (a mismatch is an error; nothing is saved).
Writes: results/qkd_4bit/<run_id>/ with the 4-bit weights and compression.json.
        While training, per-epoch state in results/qkd_4bit/.inprogress-<run_id>/ for --resume.

Run as:
    python 10_qat_kd_4bit.py
    python 10_qat_kd_4bit.py --pruned_model_path results/pruned/<run_id> --num_epochs 2 --learning_rate 1e-5 --batch_size 16
    python 10_qat_kd_4bit.py --learnable_scales true --keep_8bit_size_budget_mb 6.0
    python 10_qat_kd_4bit.py --keep_8bit_layers 4      # the 4 Linears with the largest 4-bit error at 8 bits
    python 10_qat_kd_4bit.py --embedding_quantization int2   # ternary word-embedding rows (stage 12 keeps them)
    python 10_qat_kd_4bit.py --embedding_quantization int2 --embedding_int4_rows 1000   # frequent tokens' rows int4
    python 10_qat_kd_4bit.py --resume                  # continue an interrupted run after its last epoch
"""

import itertools

from common import DataConfig, QATKDConfig, stages
from common.data import build_loaders
from common.distillation import distillation_for
from common.evaluation import evaluate_accuracy
from common.lifecycle import run_script, start_stage
from common.models import (
    load_checkpoint_tokenizer,
    load_model,
    model_skeleton,
    resolve_stage_checkpoint,
)
from common.quantization import (
    check_mixed_precision,
    compress_embedding_state,
    layer_quantization_errors,
    plan_8bit_layers,
    prepare_fake_quantization,
    quantize_model_4bit,
    strip_fake_quantization,
)
from common.training import train
from common.vocabulary import most_frequent_tokens, teacher_token_ids

ERROR_BATCHES = 4  # validation batches of the per-layer quantization error


def resolve_teacher(config: QATKDConfig, label_names, pruned_folder, data_config):
    if config.teacher_model_path is None and config.teacher == "pruned":
        return pruned_folder
    # an explicit teacher may be any full-precision model with the task's labels
    allowed = stages.with_weights("full") if config.teacher_model_path else None
    return resolve_stage_checkpoint("teacher", config.teacher_model_path, label_names, data_config, allowed)[0]


def main(data_config: DataConfig, config: QATKDConfig) -> None:
    run = start_stage("qkd_4bit", data_config, config, training=True)
    data = run.data
    pruned_folder, pruned_record = resolve_stage_checkpoint("pruned", config.pruned_model_path, data.label_names, data_config)
    teacher_folder = resolve_teacher(config, data.label_names, pruned_folder, data_config)
    # refused before any model loads: a teacher with an unrelated vocabulary, a budget below the all-4-bit size
    tokenizer = load_checkpoint_tokenizer(pruned_folder)
    kept = ((pruned_record.get("pruning") or {}).get("vocabulary") or {}).get("kept_token_ids")
    token_map = teacher_token_ids(tokenizer, load_checkpoint_tokenizer(teacher_folder), kept, str(teacher_folder))
    if config.keeps_8bit_layers:
        check_mixed_precision(model_skeleton(pruned_folder), config)
    run.resume({"pruned": pruned_folder, "teacher": teacher_folder})
    student, teacher = load_model(pruned_folder), load_model(teacher_folder)
    teacher.to(run.accelerator.device)
    train_loader, eval_loader = build_loaders(data, tokenizer, data_config, config.batch_size, config.eval_batch_size, config.seed)

    full_precision = evaluate_accuracy(student, eval_loader)
    error_batches = list(itertools.islice(eval_loader, ERROR_BATCHES))
    eight_bit, mixed_precision = [], None
    if config.keeps_8bit_layers:  # decided before training through them
        eight_bit, mixed_precision = plan_8bit_layers(student, config, layer_quantization_errors(student, config, error_batches))
    int4_rows = most_frequent_tokens(tokenizer, data, data_config.max_length, config.embedding_int4_rows)
    fake_quantized = prepare_fake_quantization(student, config, eight_bit, int4_rows)
    before_training = evaluate_accuracy(student, eval_loader)
    print(f"Fake-quantizing {len(fake_quantized)} linear layers ({config.quant_type}{', learned block scales (LSQ)' if config.learnable_scales else ''}"
          f"{f'; {len(eight_bit)} at 8 bits' if eight_bit else ''}); validation accuracy: full precision "
          f"{full_precision['accuracy']:.4f}, 4-bit before training {before_training['accuracy']:.4f}")

    loss, compute_loss = distillation_for(config, student, teacher, token_map)
    result = train(student, train_loader, eval_loader, config, compute_loss, run.accelerator,
                   resume_dir=run.resume_dir, description="qkd", extras=loss.extras)

    student = run.trained_model(student, result)
    if student is None:  # stopped early (resume later) or not the main process
        return
    student = student.to("cpu")
    learned_scales = strip_fake_quantization(student)
    layer_errors = layer_quantization_errors(student, config, error_batches, scales=learned_scales)
    quantization = quantize_model_4bit(student, config, eight_bit=eight_bit, learned_scales=learned_scales)
    quantization["layer_errors"] = layer_errors
    quantization["mixed_precision"] = mixed_precision
    state, embedding = compress_embedding_state(student, dict(student.state_dict()), config.embedding_quantization, int4_rows)

    def reload_and_check(folder):
        reloaded = evaluate_accuracy(load_model(folder), eval_loader)
        gap = 100 * abs(reloaded["accuracy"] - result.best_metrics["accuracy"])
        if gap > config.max_accuracy_gap:
            raise RuntimeError(
                f"The exported 4-bit model reaches {reloaded['accuracy']:.4f} validation accuracy but the fake-quantized "
                f"one reached {result.best_metrics['accuracy']:.4f}: a {gap:.2f}-point gap, above max_accuracy_gap="
                f"{config.max_accuracy_gap}. Fake and real quantization disagree (check quant_type/blocksize/double_quant "
                f"and embedding_quantization); nothing was saved."
            )
        return {
            "validation": reloaded,
            "validation_fake_quantized": result.best_metrics,
            "validation_full_precision_start": full_precision,
            "validation_4bit_before_training": before_training,
            "fake_vs_real_gap_points": gap,
            "best_epoch": result.best_epoch,
        }

    run.finish(
        student, tokenizer,
        parent=str(pruned_folder), teacher=str(teacher_folder),
        quantization=quantization, embedding_quantization=embedding,
        state_dict=state, verify=reload_and_check,
        summary=lambda folder, record: f"QKD-4bit: validation accuracy {record['metrics']['validation']['accuracy']:.4f} "
                                       f"(fake-quantized {result.best_metrics['accuracy']:.4f}, epoch {result.best_epoch}) -> {folder}",
    )


if __name__ == "__main__":
    run_script(main, DataConfig, QATKDConfig)
