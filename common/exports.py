"""What the export stages (12: ONNX, 13: OpenVINO) share: their sources checked before any export, evaluating a
written graph file, and choosing a folder's deployment file by accuracy and measured speed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from . import stages
from .architecture import position_limit
from .checkpoints import find_checkpoint, list_checkpoints, read_record, stage_dir
from .evaluation import accuracy, interleaved_latency
from .metrics import paired_difference_se
from .models import check_matches_data
from .runtime import ModelRuntime, graph_files
from .search import smallest_within_spread

logger = logging.getLogger(__name__)


def full_precision_source(config):
    folder = find_checkpoint("pruned", config.source_model_path, allowed_stages=stages.with_weights("full"))
    record = read_record(folder)
    if record.get("quantization") or record.get("embedding_quantization"):
        raise ValueError(
            f"--source_model_path {folder} is a {record.get('stage')} checkpoint with quantized weights; the export "
            f"starts from full precision. Pass a teacher, student or pruned checkpoint (the 4-bit model is exported "
            f"from --qkd_model_path)."
        )
    return folder, record


def evaluate_file(path: Path, loader) -> tuple[float, np.ndarray, np.ndarray]:
    """Validation accuracy, logits and per-example correctness of one file of a folder being written."""
    logits, labels = ModelRuntime(path.parent, path.name, verify=False).logits(loader)  # the folder is being written
    return accuracy(logits, labels), logits, logits.argmax(-1) == np.asarray(labels)


def file_entry(path: Path, validation_accuracy: float, **fields) -> dict:
    size = sum((path.parent / name).stat().st_size for name in graph_files(path.name))  # an IR: .xml and .bin
    return {"size_bytes": size, "validation_accuracy": validation_accuracy, **fields}


def compare_speed(paths: dict[str, Path], vocab_size: int, num_threads, batch_size=32, seq_length=64, rounds=20) -> dict:
    models = {label: ModelRuntime(path.parent, path.name, num_threads=num_threads, spinning=False, vocab_size=vocab_size,
                                  verify=False)
              for label, path in paths.items()}
    runners = {label: model.runner(model.batch(batch_size, seq_length)) for label, model in models.items()}
    return interleaved_latency(runners, warmup=3, rounds=rounds, batch_size=batch_size, reference=next(iter(paths)))


def choose_deployment(candidates: dict[str, dict], tolerance_points: float,
                      correct: Optional[dict[str, np.ndarray]] = None) -> tuple[str, str]:
    """The file a folder ships: among ``candidates`` ({file: {"validation_accuracy", "latency_ms_median"}, optionally
    "latency_ms_p75" and "size_bytes"}) whose validation accuracy is at most ``tolerance_points`` below the best one's
    (within the noise of the validation split), the fastest; on equal latency the earlier candidate. With ``correct``
    ({file: per-example bools on the validation split}) a file's band is the larger of ``tolerance_points`` and two
    standard errors of its paired difference from the best file (files that flip many borderline examples both ways
    differ by noise, not quality). Sizes are exact and latencies noisy, so when other eligible files' median latency
    lies within the fastest's 75th percentile (same interleaved rounds), the smallest of them ships, as compress.py
    delivers. Returns (file, the reason in words)."""
    best_name = max(candidates, key=lambda name: candidates[name]["validation_accuracy"])
    best = candidates[best_name]["validation_accuracy"]
    bands = {name: tolerance_points for name in candidates}
    if correct:
        for name in candidates:
            if name != best_name and name in correct and best_name in correct:
                noise = 2 * 100 * paired_difference_se(correct[name], correct[best_name])
                bands[name] = max(tolerance_points, noise)
                candidates[name]["paired_noise_points"] = round(noise, 3)
    eligible = [name for name, entry in candidates.items()
                if 100 * (best - entry["validation_accuracy"]) <= bands[name] + 1e-9]
    chosen = min(eligible, key=lambda name: (candidates[name]["latency_ms_median"], list(candidates).index(name)))
    ranked, fastest = "fastest", chosen
    sized = [name for name in eligible if "size_bytes" in candidates[name]]
    spread_end = candidates[fastest].get("latency_ms_p75") if fastest in sized else None
    chosen, tied = smallest_within_spread(fastest, sized, spread_end,
                                          median=lambda name: candidates[name]["latency_ms_median"],
                                          size=lambda name: candidates[name]["size_bytes"])
    if chosen != fastest:
        ranked = (f"smallest ({candidates[chosen]['size_bytes'] / 1e6:.2f} MB) of the {tied} files whose median "
                  f"latency lies within the fastest's interquartile range ({fastest}: "
                  f"{candidates[fastest]['latency_ms_median']:.1f} ms, IQR up to {spread_end:.1f} ms, "
                  f"{candidates[fastest]['size_bytes'] / 1e6:.2f} MB), among the files")
    others = ", ".join(f"{name} {100 * entry['validation_accuracy']:.2f}% / {entry['latency_ms_median']:.1f} ms"
                       for name, entry in candidates.items() if name != chosen)
    band = (f"max({tolerance_points}, 2 paired standard errors) = {bands[chosen]:.2f}" if correct and chosen != best_name
            else f"{tolerance_points}") + " validation points"
    reason = (f"{ranked} within {band} of the most accurate "
              f"({100 * best:.2f}%): {chosen} {100 * candidates[chosen]['validation_accuracy']:.2f}% / "
              f"{candidates[chosen]['latency_ms_median']:.1f} ms (others: {others or 'none'})")
    return chosen, reason


def choose_by_speed(folder: Path, files: dict, vocab_size: int, config, correct: Optional[dict] = None) -> dict:
    """The folder's deployment model: the fastest file (interleaved benchmark, batch 32 x 64) whose validation accuracy
    is within --deployment_tolerance points, or two paired standard errors (``correct``: {file: per-example bools}),
    of the folder's most accurate file, or the smallest of those the timing cannot rank (``choose_deployment``).
    Latencies go into ``files``."""
    speed = compare_speed({name: folder / name for name in files}, vocab_size, config.num_threads)
    for name, entry in files.items():
        entry.update(latency_ms_median=speed[name]["latency_ms_median"], latency_ms_p25=speed[name]["latency_ms_p25"],
                     latency_ms_p75=speed[name]["latency_ms_p75"])
    chosen, reason = choose_deployment(files, config.deployment_tolerance, correct)
    print(f"Deployment model: {reason}")
    return {"deployment_model": chosen, "deployment_choice": reason}


def four_bit_source(config, data_config, label_names) -> Optional[tuple[Path, dict]]:
    """The 4-bit checkpoint whose codes go into the export's 4-bit file, checked before any export; None when no 4-bit
    file is to be written."""
    if not config.export_4bit:
        return None
    if config.qkd_model_path is None and not list_checkpoints("qkd_4bit"):
        logger.warning("No qkd_4bit checkpoint in %s, so no 4-bit model is written; run 10_qat_kd_4bit.py first "
                       "or pass --export_4bit false.", stage_dir("qkd_4bit"))
        return None
    source = find_checkpoint("qkd_4bit", config.qkd_model_path, allowed_stages=stages.with_weights("4bit"))
    source_record = read_record(source)
    quantization = source_record.get("quantization") or {}
    if quantization.get("method") != "bitsandbytes_4bit":
        raise ValueError(
            f"--qkd_model_path {source} is a {source_record.get('stage')} checkpoint without bitsandbytes 4-bit weights "
            f"(quantization method {quantization.get('method')!r}); pass a qkd_4bit or ptq_4bit checkpoint."
        )
    check_matches_data(source, source_record, data_config, label_names)
    max_positions = getattr(config, "max_positions", None)  # stage 12's field; stage 13 shares this function
    if max_positions is not None:
        limit = position_limit(json.loads((source / "config.json").read_text()))
        if not data_config.max_length <= max_positions <= (limit or max_positions):
            raise ValueError(
                f"max_positions={max_positions} must lie between --max_length ({data_config.max_length}: the "
                f"sequences the files are checked and used on) and the {limit} tokens the model's position table "
                f"holds; e.g. --max_positions {data_config.max_length}."
            )
    return source, source_record
