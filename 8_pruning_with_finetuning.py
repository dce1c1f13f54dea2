"""Stage 8: KGSP/MSP structured pruning of the student, fine-tuned with distillation from the teacher.

Reads:  the newest results/student/ checkpoint (or --student_model_path: a student, or the teacher's own folder to
        prune the teacher at full depth), the newest results/teacher/
        checkpoint (or --teacher_model_path) and the same data split as stage 1.
Does:   optionally drops whole encoder layers first (--drop_layers: those whose skipping changes the student's
        predictions least) and narrows the residual stream (--hidden_sparsity: the dimensions with the least Fisher
        information), then fine-tunes with alpha_ce*CE + alpha_kd*KL*T^2 (+ alpha_hidden*MSE) while a
        StructuralPruner raises the sparsity of attention heads and FFN neurons along a cubic schedule
        (importance_mode l2 / kd_grad / l2+kd_grad; uniform or multi-granularity), evaluates the masked model, then
        removes the pruned structures physically. Optionally prunes the vocabulary to the tokens of the training
        split first (--prune_vocabulary), so the fine-tuning sees the token ids the pruned model will be given.
Writes: results/pruned/<run_id>/ with the smaller model, its architecture record (heads and FFN width per
        layer) and a pruning summary (sparsity, parameters and validation accuracy before and after).
        While training, per-epoch state (weights, optimizer, RNG, the pruner's masks, importance window and
        history) in results/pruned/.inprogress-<run_id>/ for --resume.

Run as:
    python 8_pruning_with_finetuning.py
    python 8_pruning_with_finetuning.py --preset original    # the original: L2, uniform, global normalization, no attention KD
    python 8_pruning_with_finetuning.py --head_final_sparsity 0.5 --ffn_final_sparsity 0.6 --prune_vocabulary
    python 8_pruning_with_finetuning.py --resume            # continue an interrupted run after its last epoch
    python 8_pruning_with_finetuning.py --layer_targets results/sensitivity_targets.json   # after make sensitivity
    python 8_pruning_with_finetuning.py --ffn_round_to 16 --alpha_attention 1.0
    python 8_pruning_with_finetuning.py --drop_layers 1     # also remove the least important whole layer
    python 8_pruning_with_finetuning.py --hidden_sparsity 0.25   # and a quarter of the residual width (BERT-like)
"""

import json
from pathlib import Path
from typing import Optional

from common import DataConfig, PruningConfig, stages
from common.architecture import num_layers
from common.data import build_loaders, make_loader, tokenize_dataset
from common.distillation import distillation_for
from common.evaluation import evaluate_accuracy
from common.lifecycle import run_script, start_stage
from common.models import (
    count_parameters,
    load_checkpoint_tokenizer,
    load_model,
    model_skeleton,
    resolve_stage_checkpoint,
)
from common.pruning import (
    StructuralPruner,
    drop_layers,
    layer_skip_importance,
    layers_to_drop,
)
from common.pruning.hidden import dimensions_to_keep, hidden_importance, hidden_width_to_keep, prune_hidden
from common.training import optimizer_steps_per_epoch, train
from common.vocabulary import prune_vocabulary, teacher_token_ids, unsupported_reason


class PruningHooks:
    def __init__(self, pruner: StructuralPruner) -> None:
        self.pruner = pruner

    def after_backward(self, step: int) -> None:
        self.pruner.accumulate_importance_scores()

    def after_optimizer_step(self, step: int) -> None:
        self.pruner.step(step)

    def resume_state(self):
        return self.pruner.resume_state()

    def load_resume_state(self, tensors, info) -> None:
        self.pruner.load_resume_state(tensors, info)


def drop_least_important_layers(student, loader, config: PruningConfig, resume_dir: Optional[Path]) -> dict:
    """Remove the --drop_layers student layers whose skipping changes its predictions least; the choice is kept in
    the run's state folder, so --resume drops the same layers."""
    saved = resume_dir / "dropped_layers.json" if resume_dir is not None else None
    if saved is not None and saved.is_file():
        choice = json.loads(saved.read_text())
    else:
        scores = layer_skip_importance(student, loader, config.layer_importance_batches)
        choice = {"skip_kl": scores, "dropped": layers_to_drop(scores, config.drop_layers)}
        if saved is not None:
            saved.write_text(json.dumps(choice))
    choice["kept"] = drop_layers(student, choice["dropped"])
    print(f"Dropped student layers {choice['dropped']} (KL with each layer skipped "
          f"{[round(score, 4) for score in choice['skip_kl']]}); kept {choice['kept']}")
    return choice


def narrow_hidden_width(student, loader, config: PruningConfig, resume_dir: Optional[Path]) -> dict:
    """Remove the --hidden_sparsity share of the residual dimensions with the least Fisher information; the choice
    is kept in the run's state folder, so --resume removes the same dimensions."""
    saved = resume_dir / "hidden_dimensions.json" if resume_dir is not None else None
    width = student.config.hidden_size
    if saved is not None and saved.is_file():
        kept = json.loads(saved.read_text())["kept"]
    else:
        scores = hidden_importance(student, loader, config.layer_importance_batches)
        kept = dimensions_to_keep(scores, hidden_width_to_keep(student, config.hidden_sparsity))
        if saved is not None:
            saved.write_text(json.dumps({"kept": kept}))
    prune_hidden(student, kept)
    print(f"Hidden width {width} -> {len(kept)} (the dimensions with the least Fisher information removed)")
    return {"width_before": width, "width_after": len(kept)}


def prune_vocabulary_first(student, tokenizer, teacher_folder, run, config: PruningConfig):
    """Slice the student's vocabulary to the training split's tokens before it is fine-tuned, so that the recovery
    trains on the ids (with --vocabulary_min_count > 1, the new segmentation) the pruned model will be given and the
    accuracy after the physical pruning is the masked model's. Returns (student, tokenizer, summary, the
    student-id -> teacher-id table the teacher reads the renumbered ids through)."""
    data, max_length = run.data, run.data_config.max_length
    if unsupported_reason(tokenizer) is not None:  # prune_vocabulary says why it keeps the whole table
        student, tokenizer, summary = prune_vocabulary(student, tokenizer, data, max_length)
        return student, tokenizer, summary, None
    # the accuracy with the pruned vocabulary is stage 8's "before" accuracy, measured next on its validation loader
    validation = tokenize_dataset(data.validation, tokenizer, max_length)
    full = evaluate_accuracy(student, make_loader(validation, tokenizer, config.eval_batch_size, shuffle=False))["accuracy"]
    student, tokenizer, summary = prune_vocabulary(student, tokenizer, data, max_length, config.vocabulary_extra_tokens,
                                                   config.vocabulary_min_count)
    summary["validation_accuracy_full_vocabulary"] = full
    token_map = teacher_token_ids(tokenizer, load_checkpoint_tokenizer(teacher_folder), summary.get("kept_token_ids"),
                                  str(teacher_folder))
    return student, tokenizer, summary, token_map


def main(data_config: DataConfig, config: PruningConfig) -> None:
    run = start_stage("pruned", data_config, config, training=True)
    accelerator, data = run.accelerator, run.data
    teacher_folder, _ = resolve_stage_checkpoint("teacher", config.teacher_model_path, data.label_names, data_config)
    student_folder, _ = resolve_stage_checkpoint("student", config.student_model_path, data.label_names, data_config,
                                                 allowed_stages=stages.PRUNABLE_STAGES)
    skeleton = model_skeleton(student_folder)  # targets the student cannot meet: refused before any work
    drop_layers(skeleton, layers_to_drop([0.0] * num_layers(skeleton), config.drop_layers))
    if config.hidden_sparsity:
        hidden_width_to_keep(skeleton, config.hidden_sparsity)
    StructuralPruner(skeleton, config)
    run.resume({"student": student_folder, "teacher": teacher_folder})
    teacher, student = load_model(teacher_folder), load_model(student_folder)
    teacher.to(accelerator.device)
    tokenizer = load_checkpoint_tokenizer(student_folder)
    vocabulary, token_map = None, None
    if config.prune_vocabulary:  # before fine-tuning, so that the recovery trains on the tokens the model will see
        student, tokenizer, vocabulary, token_map = prune_vocabulary_first(student, tokenizer, teacher_folder, run, config)
    train_loader, eval_loader = build_loaders(data, tokenizer, data_config, config.batch_size, config.eval_batch_size, config.seed)

    parameters_before = count_parameters(student)
    accuracy_before = evaluate_accuracy(student, eval_loader)["accuracy"]
    if vocabulary is not None and "validation_accuracy_full_vocabulary" in vocabulary:
        vocabulary["validation_accuracy_pruned_vocabulary"] = accuracy_before
        print(f"Vocabulary pruned before fine-tuning: {vocabulary['original_vocab_size']} -> "
              f"{vocabulary['kept_vocab_size']} tokens; validation accuracy {vocabulary['validation_accuracy_full_vocabulary']:.4f} -> "
              f"{accuracy_before:.4f} before the recovery")
    def shrink_first(shrink, seed_offset: int, what: str, key: str) -> dict:
        # its own shuffled loader over the training rows, so scoring leaves the training order as it was
        scoring_loader = make_loader(train_loader.dataset, tokenizer, config.batch_size, shuffle=True, seed=config.seed + seed_offset)
        summary = shrink(student, scoring_loader, config, run.resume_dir)
        summary[key] = evaluate_accuracy(student, eval_loader)["accuracy"]
        print(f"Validation accuracy with {what}, before fine-tuning: {summary[key]:.4f}")
        return summary

    layers, hidden = None, None
    if config.drop_layers:
        layers = shrink_first(drop_least_important_layers, 1, "the layers dropped", "validation_accuracy_after_drop")
    if config.hidden_sparsity:
        hidden = shrink_first(narrow_hidden_width, 2, "the narrower width", "validation_accuracy_after_narrowing")
    pruner = StructuralPruner(student, config)
    total_steps = optimizer_steps_per_epoch(len(train_loader), accelerator.num_processes, config.gradient_accumulation_steps) * config.num_epochs
    pruner.set_schedule(total_steps)
    print(f"Pruning {len(pruner.head_groups)} head groups and {len(pruner.ffn_groups)} FFN groups; "
          f"student validation accuracy before: {accuracy_before:.4f}")

    loss, compute_loss = distillation_for(config, student, teacher, token_map)
    result = train(
        student, train_loader, eval_loader, config, compute_loss, accelerator,
        hooks=PruningHooks(pruner), keep="last", resume_dir=run.resume_dir, description="prune", extras=loss.extras,
    )

    student = run.trained_model(student, result)
    if student is None:  # stopped early (resume later) or not the main process
        return
    pruner.finalize()
    pruner.apply_masks()
    masked_metrics = evaluate_accuracy(student, eval_loader)
    summary = pruner.summary()
    architecture = pruner.prune_physically()
    pruned_metrics = evaluate_accuracy(student, eval_loader)
    parameters_after = count_parameters(student)
    summary.update(
        parameters_before=parameters_before,
        parameters_after=parameters_after,
        validation_accuracy_before=accuracy_before,
        validation_accuracy_masked=masked_metrics["accuracy"],
        validation_accuracy_after=pruned_metrics["accuracy"],
        kept_heads=architecture["kept_heads"],
        layers=layers,
        hidden=hidden,
        vocabulary=vocabulary,
    )
    run.finish(
        student, tokenizer,
        parent=str(student_folder), teacher=str(teacher_folder),
        pruning=summary, pruning_history=pruner.history,
        metrics={"validation": pruned_metrics, "validation_before": {"accuracy": accuracy_before}},
        summary=lambda folder, record: (
            f"Pruned: {'' if layers is None else 'student layers %s kept, ' % layers['kept']}"
            f"{'' if hidden is None else 'hidden width %d, ' % hidden['width_after']}heads per layer {summary['kept_heads_per_layer']}, FFN width per layer {summary['ffn_width_per_layer']}, "
            f"head sparsity {summary['head_sparsity']:.3f}, FFN sparsity {summary['ffn_sparsity']:.3f}; "
            f"parameters {parameters_before:,} -> {parameters_after:,}; validation accuracy {accuracy_before:.4f} -> "
            f"{pruned_metrics['accuracy']:.4f} (masked {masked_metrics['accuracy']:.4f}) -> {folder}"),
    )


if __name__ == "__main__":
    run_script(main, DataConfig, PruningConfig)
