"""One run lifecycle for every stage script: parse config -> start -> work -> finish.

``start_stage`` logs the config, seeds, builds the accelerator (training stages) and loads the data split;
``StageRun.resume`` picks or creates the per-epoch state folder once the inputs are known; ``trained_model``
hands back the kept epoch's weights on the main process (or ends a run stopped early); ``finish`` builds the
checkpoint record, writes the folder (``checkpoints.write_checkpoint``), prints the stage's one-line summary,
removes the finished run's resume state and ends the accelerator. Every stage's ``compression.json`` is built by
``StageRun.record``, here and nowhere else.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import checkpoints
from .config import config_to_dict, log_config, parse_config
from .data import TextClassificationData, load_splits, load_unlabeled, with_unlabeled

logger = logging.getLogger(__name__)

# failures the project raises itself on bad input (ValueError includes checkpoints.IntegrityError)
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)
_NEW_RESUME_DIRS: list[Path] = []  # per-epoch state folders this process created (not ones it resumed)


@dataclass
class StageRun:
    """What a stage knows from its start to its finish."""

    stage: str
    data_config: Any
    config: Any
    data: TextClassificationData
    stopwatch: checkpoints.Stopwatch
    accelerator: Any = None  # training stages only
    resume_dir: Optional[Path] = None
    result: Any = None  # the TrainResult, once training ran

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def resume(self, inputs: dict) -> Path:
        """The interrupted run to continue (``--resume``, checked against this run's data, inputs and settings) or a
        new per-epoch state folder; call once the input checkpoints are known, before any model loads."""
        from .training import choose_resume_dir

        self.resume_dir = choose_resume_dir(self.stage, self.data_config, self.config, self.accelerator,
                                            self.data.label_names, inputs)
        if not self.config.resume:
            _NEW_RESUME_DIRS.append(self.resume_dir)
        return self.resume_dir

    def trained_model(self, model, result):
        """The trained model with its kept epoch's weights, on the main process. None when this process has nothing
        to save: the run stopped early on purpose (its resume state is kept) or this is another process; the
        accelerator is ended then, so the script just returns."""
        self.accelerator.wait_for_everyone()
        self.result = result
        if result.stopped_early or not self.accelerator.is_main_process:
            self.accelerator.end_training()
            return None
        model = self.accelerator.unwrap_model(model)
        model.load_state_dict(result.best_state)
        return model

    def record(self, **fields) -> dict:
        """The ``compression.json`` fields every stage writes, then the stage's own ``fields`` (which win)."""
        record = {
            "config": config_to_dict(self.data_config, self.config),
            "label_names": self.data.label_names,
            "seed": getattr(self.config, "seed", None),
            "wall_time_s": self.stopwatch.seconds,
        }
        if self.result is not None:
            record.update(history=self.result.history, seconds_per_step=self.result.seconds_per_step,
                          num_processes=self.accelerator.num_processes)
        return {**record, **fields}

    def finish(
        self,
        model=None,
        tokenizer=None,
        *,
        summary: Callable[[Path, dict], str],
        write_files: Optional[Callable[[Path], Optional[dict]]] = None,
        state_dict: Optional[dict] = None,
        verify: Optional[Callable[[Path], dict]] = None,
        stage: Optional[str] = None,
        use_output_dir: bool = True,
        end: bool = True,
        **fields,
    ) -> Path:
        """Save the stage's folder, print ``summary(folder, record)``, and (with ``end``) clean up.

        A torch ``model`` (with its ``tokenizer``) is saved with ``models.save_checkpoint``; otherwise
        ``write_files(folder)`` writes the folder's files (ONNX exports). ``stage`` names another stage folder the
        same script writes (stage 12's onnx_4bit); ``use_output_dir=False`` ignores ``--output_dir`` for it."""
        from .models import save_checkpoint

        stage = stage or self.stage
        record = self.record(**fields)
        output_dir = self.config.output_dir if use_output_dir else None
        overwrite = self.config.overwrite_output_dir if use_output_dir else False
        if model is not None:
            folder = save_checkpoint(stage, model, tokenizer, record, output_dir=output_dir, overwrite=overwrite,
                                     state_dict=state_dict, verify=verify)
        elif write_files is not None:
            folder = checkpoints.write_checkpoint(stage, record, write_files, output_dir=output_dir, overwrite=overwrite,
                                                  verify=verify)
        else:
            raise TypeError("finish() needs a model to save or a write_files function.")
        print(summary(folder, checkpoints.read_record(folder)))
        if end:
            self.end()
        return folder

    def end(self) -> None:
        """Remove a finished run's per-epoch state (the checkpoint now holds the result) and end the accelerator.
        No barrier: other processes may have returned already."""
        if self.resume_dir is not None and self.is_main_process:
            shutil.rmtree(self.resume_dir, ignore_errors=True)
        if self.accelerator is not None:
            self.accelerator.end_training()


def start_stage(stage: str, data_config, config, *, training: bool = False) -> StageRun:
    """Log the config, seed, make the accelerator (``training``) and load the data split, in that order."""
    from .training import make_accelerator

    stopwatch = checkpoints.Stopwatch()
    checkpoints.stage_dir(stage)  # an unknown stage is an error before any work
    accelerator = make_accelerator(config) if training else None
    if accelerator is None or accelerator.is_main_process:
        log_config(data_config, config)
    if training:
        from accelerate.utils import set_seed

        set_seed(config.seed)
    data = load_splits(data_config)
    if getattr(config, "unlabeled_dataset", None):
        data = with_unlabeled(data, load_unlabeled(config.unlabeled_dataset, data, data_config, config.max_unlabeled_samples))
    return StageRun(stage, data_config, config, data, stopwatch, accelerator)


def _remove_unfilled_resume_dirs() -> None:
    """A run refused before its first epoch leaves no state folder behind (one with an epoch's state is kept for
    --resume)."""
    for folder in _NEW_RESUME_DIRS:
        if folder.is_dir() and not (folder / "trainer_state.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.parent.rmdir()  # the stage folder too, when this left it empty
            except OSError:
                pass


def _raised_by_project(error: BaseException) -> bool:
    """True when the innermost frame of the error is the project's own code (a refusal of bad input), not a library's."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return False
    filename = Path(traceback.tb_frame.f_code.co_filename).resolve()
    return checkpoints.PROJECT_ROOT in filename.parents and "site-packages" not in filename.parts


def run_script(main: Callable, *config_types: type) -> None:
    """The ``__main__`` of every stage script: logging, ``parse_config(*config_types)``, ``main(*configs)``, with the
    error convention of ``run_tool``."""
    run_tool(lambda: main(*parse_config(*config_types)))


def run_tool(call: Callable[[], None]) -> None:
    """Run a command-line tool's ``call`` after setting up logging.

    An expected failure (the project's own refusal of a bad value, path, checkpoint or combination) prints one
    paragraph, ``<script>: error: <what, the value, the fix>``, and exits with code 2, without a traceback; a failure
    inside a library or any other error keeps its traceback (exit code 1). Either way a per-epoch state folder this run
    created and never filled is removed, so a refused run leaves nothing behind."""
    from . import setup_logging

    setup_logging()
    try:
        call()
    except BaseException as error:
        _remove_unfilled_resume_dirs()
        if isinstance(error, EXPECTED_ERRORS) and _raised_by_project(error):
            print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
