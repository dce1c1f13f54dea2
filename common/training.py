"""The training loop shared by stages 1, 2, 8 and 10.

One loop, driven by ``accelerate`` (device placement, mixed precision, DDP under ``torchrun``): AdamW with
linear warm-up/decay, gradient clipping, a validation pass after every epoch, the best (or last) epoch kept,
and optional per-epoch resume state. What differs between stages is the loss and a few hooks (the pruner
accumulates importance after ``backward`` and re-applies its masks after each optimizer step).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoints import Stopwatch
from .config import TrainingConfig, config_to_dict, log_config
from .data import TextClassificationData, load_splits
from .evaluation import evaluate_accuracy

logger = logging.getLogger(__name__)

NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "_layer_norm.weight")


class TrainingHooks(Protocol):
    def after_backward(self, step: int) -> None: ...

    def after_optimizer_step(self, step: int) -> None: ...


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    best_metrics: dict
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds_per_step: float = 0.0


@dataclass
class StageRun:
    """What every training stage sets up first: the accelerator, the data split and a wall clock."""

    accelerator: Any
    data: TextClassificationData
    stopwatch: Stopwatch

    def record(self, data_config, config: TrainingConfig, result: "TrainResult", **fields) -> dict:
        """The ``compression.json`` fields every training stage writes, plus the stage's own ``fields``."""
        return {
            "config": config_to_dict(data_config, config),
            "label_names": self.data.label_names,
            "seed": config.seed,
            "history": result.history,
            "seconds_per_step": result.seconds_per_step,
            "wall_time_s": self.stopwatch.seconds,
            "num_processes": self.accelerator.num_processes,
            **fields,
        }


def start_stage(data_config, config: TrainingConfig) -> StageRun:
    """Accelerator, logged config, seed and the data split, in the order every training script needs them."""
    from accelerate.utils import set_seed

    stopwatch = Stopwatch()
    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        log_config(data_config, config)
    set_seed(config.seed)
    return StageRun(accelerator, load_splits(data_config), stopwatch)


def make_accelerator(config: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # cpu=True is what makes accelerate set up gloo DDP under torchrun when there is no GPU.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if any(marker in name for marker in NO_DECAY_MARKERS) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _cpu_state(model: torch.nn.Module) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def train(
    model: torch.nn.Module,
    train_loader,
    eval_loader,
    config: TrainingConfig,
    compute_loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    accelerator,
    *,
    hooks: Optional[TrainingHooks] = None,
    keep: str = "best",
    resume_dir: Optional[Path] = None,
    description: str = "train",
    evaluate_model: Optional[Callable[[torch.nn.Module], dict]] = None,
) -> TrainResult:
    """Train ``model`` and return the weights of the best (``keep='best'``) or last epoch on the CPU.

    ``compute_loss(model, batch)`` returns the loss and a dict of its parts. ``evaluate_model(model)`` returns
    validation metrics with an ``accuracy`` key (default: plain accuracy on ``eval_loader``). ``resume_dir``
    holds per-epoch state; when it already has some, training continues after its last finished epoch.
    """
    import time

    from transformers import get_linear_schedule_with_warmup

    if keep not in ("best", "last"):
        raise ValueError(f"keep={keep!r} must be 'best' or 'last'.")
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total_steps = steps_per_epoch * config.num_epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    state = _load_resume_state(resume_dir, model, optimizer, scheduler)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    evaluate_model = evaluate_model or (lambda m: evaluate_accuracy(m, eval_loader, accelerator))

    best_state = state.pop("best_state", None)
    history = state.get("history", [])
    best_metrics = state.get("best_metrics", {})
    best_epoch = state.get("best_epoch", -1)
    global_step = state.get("global_step", 0)
    train_seconds = 0.0
    for epoch in range(state.get("epochs_done", 0), config.num_epochs):
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        progress = tqdm(
            train_loader, desc=f"{description} epoch {epoch + 1}/{config.num_epochs}", disable=not accelerator.is_main_process
        )
        running = 0.0
        epoch_start = time.perf_counter()
        for batch_index, batch in enumerate(progress):
            with accelerator.accumulate(model):
                loss, parts = compute_loss(model, batch)
                accelerator.backward(loss)
                if hooks is not None:
                    hooks.after_backward(global_step)
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            global_step += 1
            if hooks is not None:
                hooks.after_optimizer_step(global_step)
            running += float(loss.detach())
            progress.set_postfix(loss=f"{running / (batch_index + 1):.4f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        train_seconds += time.perf_counter() - epoch_start
        metrics = evaluate_model(model)
        record = {"epoch": epoch + 1, "train_loss": running / max(1, len(train_loader)), **{f"validation_{k}": v for k, v in metrics.items()}}
        history.append(record)
        improved = best_epoch < 0 or keep == "last" or metrics["accuracy"] > best_metrics.get("accuracy", -1.0)
        if improved:
            best_state, best_metrics, best_epoch = _cpu_state(unwrapped), metrics, epoch + 1
        logger.info(
            "%s epoch %d: train loss %.4f, validation accuracy %.4f%s",
            description, epoch + 1, record["train_loss"], metrics["accuracy"], " (kept)" if improved else "",
        )
        if resume_dir is not None:
            _save_resume_state(
                resume_dir, accelerator, unwrapped, optimizer, scheduler, best_state,
                {"epochs_done": epoch + 1, "global_step": global_step, "history": history,
                 "best_metrics": best_metrics, "best_epoch": best_epoch},
            )
    steps_run = max(1, global_step - state.get("global_step", 0))
    return TrainResult(best_state, best_epoch, best_metrics, history, global_step, train_seconds / steps_run)


# -- resume state ---------------------------------------------------------------------------------------


def _save_resume_state(folder: Path, accelerator, model, optimizer, scheduler, best_state: dict, trainer_state: dict) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial = folder / "partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in _cpu_state(model).items()}, str(partial / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in best_state.items()}, str(partial / "best.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        for item in partial.iterdir():  # replace the previous epoch's files only once all new ones exist
            item.replace(folder / item.name)
        partial.rmdir()
    accelerator.wait_for_everyone()


def _load_resume_state(folder: Optional[Path], model, optimizer, scheduler) -> dict:
    if folder is None or not (folder / "trainer_state.json").is_file():
        return {}
    state = json.loads((folder / "trainer_state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    # weights_only=True: only tensors and plain containers are unpickled, never arbitrary objects.
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(optimizer_state["optimizer"])
    scheduler.load_state_dict(optimizer_state["scheduler"])
    state["best_state"] = load_file(str(folder / "best.safetensors"))
    logger.info("Resuming from %s after epoch %d (step %d)", folder, state["epochs_done"], state["global_step"])
    return state
