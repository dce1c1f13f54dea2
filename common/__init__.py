"""Shared code of the compression pipeline: configs, data, models, checkpoints, losses, pruning, quantization."""

import logging
import os

from .checkpoints import find_checkpoint, read_record, results_root
from .config import (
    DataConfig,
    PruningConfig,
    PTQConfig,
    QATKDConfig,
    ReportConfig,
    StudentConfig,
    TeacherConfig,
    parse_config,
)
from .data import load_splits
from .models import load_model, save_checkpoint
from .stages import STAGE_NAMES, STAGE_TABLE

__all__ = [
    "STAGE_NAMES",
    "STAGE_TABLE",
    "DataConfig",
    "PTQConfig",
    "PruningConfig",
    "QATKDConfig",
    "ReportConfig",
    "StudentConfig",
    "TeacherConfig",
    "find_checkpoint",
    "load_model",
    "load_splits",
    "parse_config",
    "read_record",
    "results_root",
    "save_checkpoint",
    "setup_logging",
]


def setup_logging() -> None:
    """INFO logs with time and module on the main process; warnings only on the others (torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
