"""Stage 2: build a smaller student from the teacher and distill it.

Reads:  the newest results/teacher/ checkpoint (or --teacher_model_path) and the same data split as stage 1.
        The student is built the DistilBERT way (teacher width, every other layer copied, embeddings and head
        copied; --student_num_layers, default half), from the teacher layers that matter most to its validation
        predictions (--student_layer_selection importance), or loaded with --student_model_name_or_path.
Writes: results/student/<run_id>/ with the best epoch by validation accuracy, compression.json, metrics.json.
        While training, per-epoch state in results/student/.inprogress-<run_id>/ for --resume.
Loss:   alpha_ce*CE + alpha_kd*KL(teacher/T || student/T)*T^2 + alpha_hidden*MSE(hidden states, layer map).

Run as:
    python 2_distill_student.py
    python 2_distill_student.py --student_num_layers 2 --alpha_hidden 0 --profile smoke
    python 2_distill_student.py --student_layer_selection importance   # keep the layers whose skipping costs most
    python 2_distill_student.py --resume                # continue an interrupted run after its last epoch
    torchrun --nproc_per_node 2 2_distill_student.py --profile smoke
"""

from common import DataConfig, StudentConfig
from common.data import build_loaders
from common.distillation import distillation_for, num_layers
from common.lifecycle import run_script, start_stage
from common.models import (
    build_student_from_teacher,
    count_parameters,
    load_checkpoint_tokenizer,
    load_model,
    load_pretrained_classifier,
    load_pretrained_config,
    load_tokenizer,
    resolve_stage_checkpoint,
)
from common.pruning import layer_skip_importance, most_important_layers
from common.training import train


def check_student_vocabulary(config: StudentConfig, teacher_tokenizer, data_config: DataConfig) -> None:
    """A pretrained student must read the teacher's token ids: checked from the tokenizers and config, before any weights load."""
    if config.student_model_name_or_path is None:
        return
    load_pretrained_config(config.student_model_name_or_path, data_config.max_length)
    if load_tokenizer(config.student_model_name_or_path).get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"student_model_name_or_path={config.student_model_name_or_path!r} uses another vocabulary than the teacher; "
            f"distillation feeds both the same token ids, so pick a student with the teacher's tokenizer."
        )


def make_student(teacher, config: StudentConfig, label_names, data_config: DataConfig, eval_loader):
    if config.student_model_name_or_path is None:
        layers = config.student_num_layers or max(1, num_layers(teacher) // 2)
        chosen, how = None, ""
        if config.student_layer_selection == "importance":
            scores = layer_skip_importance(teacher, eval_loader, config.layer_importance_batches)
            chosen = most_important_layers(scores, layers)
            how = f" (by importance: KL with each layer skipped {[round(score, 4) for score in scores]})"
        student, copied = build_student_from_teacher(teacher, layers, chosen)
        return student, f"{layers} layers copied from teacher layers {copied}{how}"
    student = load_pretrained_classifier(config.student_model_name_or_path, label_names, data_config.max_length)
    return student, f"pretrained {config.student_model_name_or_path}"


def main(data_config: DataConfig, config: StudentConfig) -> None:
    run = start_stage("student", data_config, config, training=True)
    data = run.data
    teacher_folder, _ = resolve_stage_checkpoint("teacher", config.teacher_model_path, data.label_names, data_config)
    tokenizer = load_checkpoint_tokenizer(teacher_folder)
    check_student_vocabulary(config, tokenizer, data_config)
    run.resume({"teacher": teacher_folder, "student": config.student_model_name_or_path or "layers of the teacher"})
    teacher = load_model(teacher_folder)
    train_loader, eval_loader = build_loaders(data, tokenizer, data_config, config.batch_size, config.eval_batch_size, config.seed)
    student, origin = make_student(teacher, config, data.label_names, data_config, eval_loader)
    teacher.to(run.accelerator.device)
    print(f"Student: {origin}; {count_parameters(student):,} parameters (teacher {count_parameters(teacher):,})")

    loss, compute_loss = distillation_for(config, student, teacher)
    result = train(student, train_loader, eval_loader, config, compute_loss, run.accelerator,
                   resume_dir=run.resume_dir, description="student", extras=loss.extras)

    student = run.trained_model(student, result)
    if student is None:  # stopped early (resume later) or not the main process
        return
    run.finish(
        student, tokenizer,
        parent=str(teacher_folder), origin=origin,
        metrics={"validation": result.best_metrics, "best_epoch": result.best_epoch},
        summary=lambda folder, record: f"Student: validation accuracy {result.best_metrics['accuracy']:.4f} "
                                       f"(epoch {result.best_epoch}) -> {folder}",
    )


if __name__ == "__main__":
    run_script(main, DataConfig, StudentConfig)
