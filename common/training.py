"""The training loop shared by stages 1, 2, 8 and 10.

One loop, driven by ``accelerate`` (device placement, mixed precision, DDP under ``torchrun``): AdamW with
linear warm-up/decay, gradient clipping, a validation pass after every epoch, the best (or last) epoch kept,
and optional per-epoch resume state. What differs between stages is the loss and a few hooks (the pruner
accumulates importance after ``backward`` and re-applies its masks after each optimizer step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import TrainingConfig
from .evaluation import evaluate_accuracy

logger = logging.getLogger(__name__)

# LSQ's learned 4-bit block scales are step sizes, not weights: decay would shrink them towards clipping everything
NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "_layer_norm.weight", "lsq_scale")


class TrainingHooks(Protocol):
    """Called once per optimizer step (with gradient accumulation: after the last micro-batch's backward).

    Hooks that hold state (stage 8's pruner) may also define ``resume_state() -> (tensors, info)`` and
    ``load_resume_state(tensors, info)``; ``train`` then saves that state with every epoch's resume state."""

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
    stopped_early: bool = False  # stop_after_epochs ended the run before num_epochs; no checkpoint should be written


def make_accelerator(config: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # cpu=True is what makes accelerate set up gloo DDP under torchrun when there is no GPU.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=getattr(config, "gradient_accumulation_steps", 1),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def optimizer_steps_per_epoch(num_batches: int, num_processes: int, accumulation_steps: int) -> int:
    """Optimizer steps one epoch makes: each process sees its share of the batches, and every
    ``accumulation_steps`` of them (and the epoch's last, possibly shorter, group) make one step."""
    return math.ceil(math.ceil(num_batches / num_processes) / accumulation_steps)


def make_optimizer(model: torch.nn.Module, config: TrainingConfig, extras: tuple = ()) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    named = [*model.named_parameters(), *(item for extra in extras for item in extra.named_parameters())]
    for name, parameter in named:
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
    extras: tuple = (),
) -> TrainResult:
    """Train ``model`` and return the weights of the best (``keep='best'``) or last epoch on the CPU.

    ``compute_loss(model, batch)`` returns the loss and a dict of its parts. ``evaluate_model(model)`` returns
    validation metrics with an ``accuracy`` key (default: plain accuracy on ``eval_loader``). ``resume_dir``
    holds per-epoch state; when it already has some, training continues after its last finished epoch.
    ``extras`` are further modules the loss trains with the model (a hidden-state projector): optimized, their
    gradients averaged across processes, saved in the resume state, never in the returned weights.
    """
    import time

    from transformers import get_linear_schedule_with_warmup

    if keep not in ("best", "last"):
        raise ValueError(f"keep={keep!r} must be 'best' or 'last'.")
    for extra in extras:
        extra.to(accelerator.device)
    optimizer = make_optimizer(model, config, extras)
    accumulation = accelerator.gradient_accumulation_steps
    total_steps = optimizer_steps_per_epoch(len(train_loader), accelerator.num_processes, accumulation) * config.num_epochs
    # accelerate advances a prepared scheduler once per process at every optimizer step, so it is built in
    # those units; the learning rate still follows warm-up and decay over the optimizer steps
    scale = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps) * scale, total_steps * scale)

    state = _load_resume_state(resume_dir, model, optimizer, scheduler, hooks, extras)
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
    first_epoch = state.get("epochs_done", 0)
    if "rng" in state:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    stop_after = getattr(config, "stop_after_epochs", None)
    last_epoch = config.num_epochs if stop_after is None else min(config.num_epochs, first_epoch + stop_after)
    for epoch in range(first_epoch, last_epoch):
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
                accelerator.backward(loss)  # divided by the accumulation steps
                if accelerator.sync_gradients:  # the accumulated gradient is complete: one optimizer step
                    if hooks is not None:
                        hooks.after_backward(global_step)
                    _average_extra_gradients(extras, accelerator)
                    if config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()  # the prepared optimizer and scheduler skip the steps between syncs
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
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
                hooks, extras,
            )
    steps_run = max(1, global_step - state.get("global_step", 0))
    stopped_early = last_epoch < config.num_epochs
    if stopped_early:
        logger.info("%s stopped after epoch %d of %d (stop_after_epochs=%d); continue with --resume",
                    description, last_epoch, config.num_epochs, stop_after)
    return TrainResult(best_state, best_epoch, best_metrics, history, global_step, train_seconds / steps_run, stopped_early)


def _average_extra_gradients(extras: tuple, accelerator) -> None:
    """DDP averages the model's gradients; modules outside it need the same by hand."""
    if accelerator.num_processes == 1:
        return
    for extra in extras:
        for parameter in extra.parameters():
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def _extras_state(extras: tuple) -> dict:
    return {f"{index}.{name}": tensor.detach().to("cpu").contiguous()
            for index, extra in enumerate(extras) for name, tensor in extra.state_dict().items()}


# -- resume state ---------------------------------------------------------------------------------------

RUN_FILE = "run.json"  # what the interrupted run trained on; a resume must match it
NOT_COMPARED_ON_RESUME = ("resume", "stop_after_epochs", "output_dir", "overwrite_output_dir")


def run_description(data_config, config, label_names, inputs: dict) -> dict:
    """What decides a training run's result: data split, labels, input checkpoints and every training setting."""
    from .models import data_identity

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_COMPARED_ON_RESUME}
    data = {**data_identity(dataclasses.asdict(data_config)), "max_length": data_config.max_length,
            "max_train_samples": data_config.max_train_samples, "max_eval_samples": data_config.max_eval_samples}
    description = {"data": data, "label_names": list(label_names), "inputs": {k: str(v) for k, v in inputs.items()},
                   "settings": settings}
    return json.loads(json.dumps(description))  # the form it has when read back


def choose_resume_dir(stage: str, data_config, config, accelerator, label_names, inputs: dict) -> Path:
    """The interrupted run of ``stage`` to continue (``config.resume``; checked against this run's data, labels,
    inputs and settings before anything is loaded), or a new per-epoch state folder."""
    from accelerate.utils import broadcast_object_list

    from .checkpoints import RESUME_PREFIX, find_resume_dir, new_resume_dir, stage_dir

    description = run_description(data_config, config, label_names, inputs)
    if config.resume:
        folder = find_resume_dir(stage)
        if folder is None:
            raise FileNotFoundError(
                f"--resume was given but {stage_dir(stage)} holds no interrupted run ({RESUME_PREFIX}* folder with "
                f"trainer_state.json). Start a new run without --resume."
            )
        saved = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else None
        if saved is not None and saved != description:
            differing = _differences(saved, description)
            raise ValueError(
                f"--resume: the interrupted run in {folder} trained with other settings than this one: "
                + "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in differing.items())
                + ". Resume with the same data, inputs and settings, or start a new run without --resume."
            )
        return folder
    created = [str(new_resume_dir(stage)) if accelerator.is_main_process else None]
    broadcast_object_list(created)  # every process writes to the folder the main process made
    folder = Path(created[0])
    if accelerator.is_main_process:
        (folder / RUN_FILE).write_text(json.dumps(description, indent=2))
    return folder


def _differences(then: dict, now: dict, prefix: str = "") -> dict:
    differing = {}
    for key in sorted(set(then) | set(now)):
        old, new = then.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differing.update(_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            differing[f"{prefix}{key}"] = (old, new)
    return differing


def _save_resume_state(folder: Path, accelerator, model, optimizer, scheduler, best_state: dict, trainer_state: dict,
                       hooks=None, extras: tuple = ()) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial = folder / "partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in _cpu_state(model).items()}, str(partial / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in best_state.items()}, str(partial / "best.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
        # the RNG draws dropout masks; restoring it makes a resumed run continue exactly where it stopped
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(partial / "rng.safetensors"))
        if extras:
            save_file(_extras_state(extras), str(partial / "extras.safetensors"))
        if hooks is not None and hasattr(hooks, "resume_state"):
            tensors, info = hooks.resume_state()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial / "hooks.safetensors"))
            trainer_state = {**trainer_state, "hooks": info}
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        # replace the previous epoch's files only once all new ones exist; trainer_state.json goes last, so a
        # crash in between leaves the previous epoch's complete state or this one's
        items = sorted(partial.iterdir(), key=lambda item: item.name == "trainer_state.json")
        for item in items:
            item.replace(folder / item.name)
        partial.rmdir()
    accelerator.wait_for_everyone()


def _load_resume_state(folder: Optional[Path], model, optimizer, scheduler, hooks=None, extras: tuple = ()) -> dict:
    if folder is None or not (folder / "trainer_state.json").is_file():
        return {}
    state = json.loads((folder / "trainer_state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    # weights_only=True: only tensors and plain containers are unpickled, never arbitrary objects.
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(optimizer_state["optimizer"])
    scheduler.load_state_dict(optimizer_state["scheduler"])
    state["best_state"] = load_file(str(folder / "best.safetensors"))
    if extras:
        saved = load_file(str(folder / "extras.safetensors"))
        for index, extra in enumerate(extras):
            extra.load_state_dict({name.split(".", 1)[1]: value for name, value in saved.items() if name.split(".", 1)[0] == str(index)})
    if (folder / "rng.safetensors").is_file():
        state["rng"] = load_file(str(folder / "rng.safetensors"))  # restored right before the next epoch
    if hooks is not None and hasattr(hooks, "load_resume_state") and "hooks" in state:
        hooks.load_resume_state(load_file(str(folder / "hooks.safetensors")), state["hooks"])
    logger.info("Resuming from %s after epoch %d (step %d)", folder, state["epochs_done"], state["global_step"])
    return state
