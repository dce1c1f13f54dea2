"""The one module that knows where checkpoints live.

Layout: ``<results root>/<stage>/<run_id>/`` with ``run_id`` sorting by time. The results root is
``results/`` beside the scripts, or ``$COMPRESSION_RESULTS_DIR`` when set. A checkpoint is complete when its
``compression.json`` exists; it is written under a hidden temporary name and renamed into place only when
complete, so a crashed run never leaves a folder that a later stage would pick up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import stages

logger = logging.getLogger(__name__)

RESULTS_ENV_VAR = "COMPRESSION_RESULTS_DIR"
RECORD_FILE = "compression.json"
METRICS_FILE = "metrics.json"
TEMP_PREFIX = ".tmp-"
RESUME_PREFIX = ".inprogress-"

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def results_root() -> Path:
    configured = os.environ.get(RESULTS_ENV_VAR)
    return Path(configured).expanduser().resolve() if configured else PROJECT_ROOT / "results"


def stage_dir(stage: str) -> Path:
    return results_root() / stages.get(stage).name


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / RECORD_FILE).is_file()


def list_checkpoints(stage: str) -> list[Path]:
    """Complete checkpoints of a stage, oldest first; temporary and interrupted folders are ignored."""
    folder = stage_dir(stage)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_complete(p))


def find_checkpoint(stage: str, explicit_path: Optional[str | Path] = None, allowed_stages: Optional[tuple] = None) -> Path:
    """The explicit path if given (a complete checkpoint of ``stage``, or of one of ``allowed_stages``), else the
    newest complete one of ``stage``."""
    if explicit_path is not None:
        path = Path(explicit_path).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {path} does not exist; pass the folder of a finished {stage} run.")
        if not (path / RECORD_FILE).is_file():
            raise FileNotFoundError(
                f"{path} has no {RECORD_FILE}, so it is not a complete checkpoint of this project "
                f"(an interrupted run, or a folder written by another tool). Re-run {stages.script_for(stage)}."
            )
        found = read_record(path).get("stage")
        allowed = allowed_stages or (stage,)
        if found not in allowed:
            raise ValueError(
                f"{path} is a {found!r} checkpoint, but a {' or '.join(map(repr, allowed))} checkpoint is needed here. "
                f"Pass the folder of a {stages.script_for(stage if stage in allowed else allowed[0])} run."
            )
        logger.info("Using %s checkpoint %s (given explicitly)", found, path)
        return path
    candidates = list_checkpoints(stage)
    if not candidates:
        raise FileNotFoundError(
            f"No complete {stage} checkpoint in {stage_dir(stage)}. Run `python {stages.script_for(stage)}` first, "
            f"or pass the checkpoint folder explicitly."
        )
    chosen = candidates[-1]
    logger.info("Using the newest %s checkpoint %s (found %d complete)", stage, chosen, len(candidates))
    return chosen


def read_record(path: str | Path) -> dict:
    record_path = Path(path) / RECORD_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} does not exist; {path} is not a complete checkpoint.")
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{record_path} is not valid JSON ({error}); the checkpoint is damaged. Re-run its stage.") from error
    if not isinstance(record, dict):
        raise ValueError(f"{record_path} does not hold a JSON object; the checkpoint is damaged. Re-run its stage.")
    return record


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


# Files a stage writes into a checkpoint folder; a folder holding anything else is not ours to replace.
CHECKPOINT_FILES = {
    RECORD_FILE, METRICS_FILE, "config.json", "model.safetensors", "modeling_pruned.py", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
    "sentencepiece.bpe.model", "spm.model", "generation_config.json", "chat_template.jinja",
}


def _replaceable_checkpoint(path: Path) -> Optional[str]:
    """None when ``path`` is exactly one checkpoint of this project (safe to replace), else why it is not."""
    if path == results_root() or path in {results_root() / name for name in stages.STAGE_NAMES}:
        return "it is the results folder or one of its stage folders, which hold other runs"
    if not (path / RECORD_FILE).is_file():
        return f"it has no {RECORD_FILE}, so it is not a checkpoint this project wrote"
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                     if p.is_dir() or not (p.name in CHECKPOINT_FILES or p.suffix == ".onnx"))
    if foreign:
        return f"it holds {foreign[:5]}, which no stage writes (other runs' folders or your own files)"
    return None


def check_output_dir(output_dir: Optional[str], overwrite: bool) -> None:
    """Refuse, before any work, an ``--output_dir`` whose contents a finished run would destroy.

    Overwriting replaces exactly one earlier checkpoint folder; a folder holding other checkpoints, stage folders
    or files the project did not write is never replaced, whatever ``overwrite`` says."""
    if output_dir is None:
        return
    path = Path(output_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir={output_dir!r} is a file, not a folder; choose a new folder name.")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"output_dir={output_dir!r} exists and is not empty. Pass --overwrite_output_dir to replace the checkpoint "
            f"in it, or choose a new folder."
        )
    reason = _replaceable_checkpoint(path)
    if reason is not None:
        raise ValueError(
            f"output_dir={output_dir!r} will not be replaced: {reason}. --overwrite_output_dir replaces one earlier "
            f"checkpoint folder only; pass a new folder (e.g. {path / 'my-run'}) instead."
        )


@dataclass
class PendingCheckpoint:
    path: Path  # the temporary folder to write into
    final: Path  # where it lands once the ``with`` block succeeds


@contextmanager
def checkpoint_writer(stage: str, output_dir: Optional[str] = None, overwrite: bool = False) -> Iterator[PendingCheckpoint]:
    """Yield a temporary folder to write a checkpoint into; rename it into place when the block succeeds.

    The block must write ``compression.json``; without it the checkpoint is rejected. On an exception the
    temporary folder is removed and nothing is left where the next stage looks.
    """
    if output_dir is not None:
        final = Path(output_dir).expanduser().resolve()
        check_output_dir(output_dir, overwrite)
    else:
        final = stage_dir(stage) / new_run_id()
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f"{TEMP_PREFIX}{final.name}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        yield PendingCheckpoint(path=temporary, final=final)
        if not (temporary / RECORD_FILE).is_file():
            raise RuntimeError(f"Checkpoint writer for {stage} finished without writing {RECORD_FILE}.")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("Saved %s checkpoint to %s", stage, final)


def flat_metrics(record: dict) -> dict:
    """The ``metrics.json`` of a record: its metrics flattened to dotted keys, plus each recorded file's validation
    accuracy (the files of an ONNX folder)."""
    flat = _flatten(record.get("metrics") or {})
    for name, entry in (record.get("files") or {}).items():
        if isinstance(entry, dict) and "validation_accuracy" in entry:
            flat[f"{name}.validation_accuracy"] = entry["validation_accuracy"]
    return flat


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def write_checkpoint(
    stage: str,
    record: dict,
    write_files: Callable[[Path], Optional[dict]],
    *,
    output_dir: Optional[str] = None,
    overwrite: bool = False,
    verify: Optional[Callable[[Path], dict]] = None,
) -> Path:
    """Write one stage folder atomically: ``write_files(folder)`` writes the weights (or ONNX files) and returns
    record fields it learnt; then ``compression.json`` and ``metrics.json``. ``verify(folder)`` runs on the written
    folder before it is moved into place (e.g. reload and evaluate); it may raise to reject it, and the metrics it
    returns are added to ``record["metrics"]``. Returns the final folder."""
    record = {"stage": stage, **record}
    record.setdefault("versions", package_versions())
    with checkpoint_writer(stage, output_dir, overwrite) as pending:
        record.update(write_files(pending.path) or {})
        record[MANIFEST_KEY] = file_manifest(pending.path)
        write_json(pending.path / RECORD_FILE, record)
        if verify is not None:
            record["metrics"] = {**record.get("metrics", {}), **verify(pending.path)}
        from .model_card import measure_latency, write_model_card

        record["card_latency"] = measure_latency(pending.path, record)
        write_json(pending.path / RECORD_FILE, record)
        write_json(pending.path / METRICS_FILE, flat_metrics(record))
        write_model_card(pending.path, record, pending.final)
    return pending.final


# -- integrity: what a stage wrote, checked by whoever loads it ---------------------------------------------

CARD_FILE = "README.md"  # the model card, written from compression.json after it (model_card.py)
MANIFEST_KEY = "manifest"  # in compression.json: {file name: {"bytes": size, "sha256": hex digest}}
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256: each file is hashed once per process
_UNVERIFIABLE: set[str] = set()


class IntegrityError(ValueError):
    """A file of a stage folder is missing, truncated or altered against the folder's manifest."""


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def file_manifest(folder: Path) -> dict:
    """Size and SHA-256 of every file a stage wrote into ``folder`` (its record and metrics summary aside)."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(folder.iterdir()) if path.is_file() and path.name not in (RECORD_FILE, METRICS_FILE, CARD_FILE)}


def verify_files(folder: str | Path, names=None, record: Optional[dict] = None) -> None:
    """Check the files ``names`` of a stage folder (default: all the manifest lists) against its manifest before
    they are used: sizes first, then SHA-256 (cached per process). A folder written before manifests existed is
    used with one log line saying it cannot be verified."""
    folder = Path(folder)
    record = read_record(folder) if record is None else record
    manifest = record.get(MANIFEST_KEY)
    if manifest is None:
        if str(folder) not in _UNVERIFIABLE:
            _UNVERIFIABLE.add(str(folder))
            logger.warning("%s has no integrity manifest (written by an earlier version): its files cannot be verified.", folder)
        return
    rerun = stages.rerun_hint(record.get("stage"))
    for name in (manifest if names is None else names):
        entry = manifest.get(name)
        path = folder / name
        if entry is None:
            if path.exists():
                raise IntegrityError(f"{path} is not among the files its stage wrote (compression.json '{MANIFEST_KEY}'), "
                                     f"so it cannot be trusted; remove it, or {rerun}.")
            raise IntegrityError(f"{folder} has no {name} and its stage did not write one; pass a folder that has it.")
        if not path.is_file():
            raise IntegrityError(f"{path} is missing: its stage wrote {entry['bytes']:,} bytes there. Copy the folder "
                                 f"again in full, or {rerun}.")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(f"{path} has {size:,} bytes but its stage wrote {entry['bytes']:,}: it is truncated or "
                                 f"altered. Copy the folder again, or {rerun}.")
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise IntegrityError(f"{path} is not the file its stage wrote (SHA-256 {digest[:16]}... instead of "
                                 f"{entry['sha256'][:16]}...): it was altered. Copy the folder again, or {rerun}.")


# -- resume state of interrupted training runs ---------------------------------------------------------

def new_resume_dir(stage: str) -> Path:
    path = stage_dir(stage) / f"{RESUME_PREFIX}{new_run_id()}"
    path.mkdir(parents=True)
    return path


def find_resume_dir(stage: str) -> Optional[Path]:
    folder = stage_dir(stage)
    if not folder.is_dir():
        return None
    candidates = sorted(p for p in folder.iterdir() if p.name.startswith(RESUME_PREFIX) and (p / "trainer_state.json").is_file())
    return candidates[-1] if candidates else None


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def package_versions() -> dict:
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "accelerate", "bitsandbytes", "evaluate", "safetensors", "onnx",
                 "onnxruntime", "tokenizers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
