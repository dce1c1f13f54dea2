"""Classify texts with any checkpoint of the pipeline or any ONNX folder of stage 12 (``predict.py``).

``open_classifier`` decides from the folder's ``compression.json`` how to run it: an ONNX folder runs its
deployment model (or the ``.onnx`` file asked for) in ONNX Runtime; any other checkpoint is rebuilt by the
project's loader (pruned, 4-bit, int8). Texts come from arguments, standard input (one per line) or a
CSV/JSON/JSONL file column; a sentence-pair model takes (text, pair) tuples: two file columns, or one argument or
line split at ``pair_separator``. Every bad input raises ``PredictionError`` with what was wrong and how to fix it;
the command turns it into a message and exit code 2.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from . import stages
from .checkpoints import RECORD_FILE

logger = logging.getLogger(__name__)

FILE_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".txt")


class PredictionError(Exception):
    """A user error of the predict command: bad path, file, column or empty input."""


@dataclass
class Classifier:
    folder: Path
    description: str
    tokenizer: object
    id2label: dict[int, str]
    max_length: int
    runtime: object  # a runtime.ModelRuntime: the torch checkpoint or the ONNX file
    pair_column: Optional[str] = None  # the training data's second text column, for a sentence-pair model

    @property
    def is_pair(self) -> bool:
        return self.pair_column is not None

    def logits(self, texts: list) -> np.ndarray:
        from .data import encode

        singles = [text[0] if isinstance(text, tuple) else text for text in texts]
        pairs = [text[1] for text in texts] if texts and isinstance(texts[0], tuple) else None
        options = dict(padding=True, truncation=True, max_length=self.max_length)
        return self.runtime.logits_for(dict(encode(self.tokenizer, singles, pairs, return_tensors="np", **options)))


def open_classifier(path: str | Path, onnx_file: Optional[str] = None, num_threads: Optional[int] = None) -> Classifier:
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PredictionError(f"--model {path}: no such folder. Pass a checkpoint folder such as results/pruned/<run_id> "
                              f"or an ONNX folder such as results/onnx/<run_id>.")
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        raise PredictionError(f"--model {path} has no {RECORD_FILE}, so it is not a finished checkpoint or ONNX folder of "
                              f"this pipeline (an interrupted run, or another tool's folder).")
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PredictionError(f"{record_path} is not valid JSON ({error}); the folder is damaged. Re-run its stage.") from error
    stage = record.get("stage", "?")
    from .checkpoints import IntegrityError, verify_files
    from .models import tokenizer_files

    try:  # the folder is used exactly as its stage wrote it: no tokenizer rebuilt from whatever files remain
        verify_files(folder, [*tokenizer_files(record), "config.json"], record)
    except IntegrityError as error:
        raise PredictionError(str(error)) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise PredictionError(f"Could not read the tokenizer or config.json in {folder}: {error}") from error
    id2label = {int(key): value for key, value in (config.get("id2label") or {}).items()}
    max_length = int((record.get("config") or {}).get("max_length") or min(512, tokenizer.model_max_length))
    pair_column = (record.get("config") or {}).get("text_pair_column")
    from .runtime import ModelRuntime, open_onnx_file

    if stage in stages.export_stages() or onnx_file is not None:
        chosen = onnx_file or record.get("deployment_model") or "model.onnx"
        try:  # a file the stage wrote is verified; one the user names is checked against the folder's inputs/labels
            runtime = open_onnx_file(folder, chosen, num_threads=num_threads)
        except (FileNotFoundError, ValueError) as error:
            raise PredictionError(f"{error} (--onnx_file chooses the file)") from error
        return Classifier(folder, f"{stage} ONNX model {chosen} (ONNX Runtime)", tokenizer, id2label, max_length,
                          runtime, pair_column)
    try:
        runtime = ModelRuntime(folder)
    except (OSError, ValueError, RuntimeError) as error:
        raise PredictionError(f"Could not load the {stage} checkpoint {folder}: {error}") from error
    return Classifier(folder, f"{stage} checkpoint (torch)", tokenizer, id2label, max_length, runtime, pair_column)


def check_input_kind(classifier: Classifier, texts: list) -> None:
    """A sentence-pair model needs pairs and a single-text model single texts; say how to give the right kind."""
    given_pairs = bool(texts) and isinstance(texts[0], tuple)
    if classifier.is_pair and not given_pairs:
        raise PredictionError(
            f"{classifier.folder} classifies sentence pairs (trained with text_pair_column={classifier.pair_column!r}), "
            f"but single texts were given. Pass --text_pair_column with --input_file, or --pair_separator (e.g. "
            f"--pair_separator '|||') and texts written as 'first ||| second'."
        )
    if given_pairs and not classifier.is_pair:
        raise PredictionError(f"{classifier.folder} classifies single texts, but pairs were given; drop "
                              f"--text_pair_column / --pair_separator.")


def read_texts(texts: Iterable[str], input_file: Optional[str], text_column: Optional[str], stdin=None,
               encoding: str = "utf-8", text_pair_column: Optional[str] = None, pair_separator: Optional[str] = None) -> list:
    """Texts from the arguments, else from ``input_file`` (its ``text_column``), else from ``stdin`` lines. With
    ``text_pair_column`` (files) or ``pair_separator`` (arguments, lines) each item is a (text, pair) tuple."""
    texts = list(texts)
    if texts and input_file:
        raise PredictionError("Give texts as arguments or --input_file, not both.")
    if text_pair_column and not input_file:
        raise PredictionError("--text_pair_column names a column of --input_file; for arguments or standard input use "
                              "--pair_separator.")
    if pair_separator is not None and not pair_separator:
        raise PredictionError("--pair_separator '' is empty; pass the string between the two texts, e.g. '|||'.")
    if input_file:
        texts = _texts_from_file(Path(input_file), text_column, text_pair_column, encoding)
        source = input_file
    elif not texts and stdin is not None:
        texts = [line.rstrip("\n") for line in stdin]
        source = "standard input"
    else:
        source = "the arguments"
    if pair_separator is not None and not input_file:
        split = []
        for text in texts:
            if text.strip() and pair_separator not in text:
                raise PredictionError(f"{text!r} has no {pair_separator!r}; write each pair as 'first {pair_separator} second'.")
            first, _, second = text.partition(pair_separator)
            split.append((first.strip(), second.strip()))
        texts = split
    if texts and isinstance(texts[0], tuple):
        kept = [pair for pair in texts if all(part and part.strip() for part in pair)]
    else:
        kept = [text for text in texts if text and text.strip()]
    if not kept:
        raise PredictionError(f"No text to classify in {source}: pass texts as arguments, pipe them one per line, or "
                              f"use --input_file with --text_column.")
    if len(kept) < len(texts):
        logger.warning("Skipped %d empty text(s) of %s", len(texts) - len(kept), source)
    return kept


def _texts_from_file(path: Path, column: Optional[str], pair_column: Optional[str], encoding: str) -> list:
    """The ``column`` texts of a file, or (text, pair) tuples with ``pair_column``; the file is read once."""
    if not path.is_file():
        raise PredictionError(f"--input_file {path}: no such file.")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise PredictionError(f"--input_file {path} has suffix {suffix!r}; supported: {', '.join(FILE_FORMATS)}.")
    try:
        content = path.read_text(encoding=encoding)
    except UnicodeDecodeError as error:
        raise PredictionError(f"--input_file {path} is not valid {encoding} ({error}). Pass its encoding, e.g. "
                              f"--encoding latin-1 or --encoding cp1252.") from error
    except OSError as error:
        raise PredictionError(f"--input_file {path} cannot be read: {error}") from error
    if suffix == ".txt":
        if pair_column:
            raise PredictionError(f"--input_file {path} is a .txt file (one text per line, no columns), so it has no "
                                  f"--text_pair_column {pair_column!r}; use --pair_separator, or a CSV/JSON file.")
        return content.splitlines()
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(content.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        columns = list(rows[0].keys()) if rows else next(csv.reader(content.splitlines()[:1]), [])
    else:
        try:
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in content.splitlines() if line.strip()]
            else:
                loaded = json.loads(content)
                rows = loaded if isinstance(loaded, list) else [loaded]
        except json.JSONDecodeError as error:
            raise PredictionError(f"--input_file {path} is not valid JSON: {error}") from error
        if not all(isinstance(row, dict) for row in rows):
            raise PredictionError(f"--input_file {path} must hold JSON objects (one per line for .jsonl).")
        columns = sorted({key for row in rows for key in row})
    texts = _column_texts(rows, columns, column or ("text" if "text" in columns else None), "--text_column", path)
    if pair_column is None:
        return texts
    return list(zip(texts, _column_texts(rows, columns, pair_column, "--text_pair_column", path)))


def _column_texts(rows: list[dict], columns: list[str], column: Optional[str], option: str, path: Path) -> list[str]:
    if column is None or column not in columns:
        raise PredictionError(f"{option} {column!r} is not a column of {path}; its columns are {columns}. "
                              f"Pass {option} with one of them.")
    return [str(row.get(column) or "") for row in rows]


def length_buckets(texts: list, batch_size: int) -> list[list[int]]:
    """Batches of text indices, texts of similar length together, so that padding each batch to its longest text
    (dynamic padding) pads little: short texts do not pay for long ones."""
    def length(text):
        return sum(map(len, text)) if isinstance(text, tuple) else len(text)

    order = sorted(range(len(texts)), key=lambda index: length(texts[index]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def classify(classifier: Classifier, texts: list[str], batch_size: int = 32, progress: bool = False) -> list[dict]:
    """One result per text, in the input order: the predicted label, its probability and every label's probability.
    Texts are batched by length and each batch is padded only to its longest text."""
    from tqdm.auto import tqdm

    results: list[Optional[dict]] = [None] * len(texts)
    for indices in tqdm(length_buckets(texts, batch_size), desc="Classifying", unit="batch", disable=not progress):
        batch = [texts[index] for index in indices]
        logits = classifier.logits(batch)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        for index, text, row in zip(indices, batch, probabilities):
            best = int(row.argmax())
            results[index] = {
                **({"text": text[0], "text_pair": text[1]} if isinstance(text, tuple) else {"text": text}),
                "label": classifier.id2label.get(best, str(best)),
                "probability": float(row[best]),
                "probabilities": {classifier.id2label.get(i, str(i)): float(p) for i, p in enumerate(row)},
            }
    return results


def format_results(results: list[dict], output_format: str) -> str:
    if output_format == "jsonl":
        return "\n".join(json.dumps(result, ensure_ascii=False) for result in results)
    labels = list(results[0]["probabilities"]) if results else []
    header = ["label", "probability", *(f"p({name})" for name in labels), "text"]
    lines = ["\t".join(header)]
    for result in results:
        text = result["text"] + (f" ||| {result['text_pair']}" if "text_pair" in result else "")
        text = text if len(text) <= 80 else text[:77] + "..."
        lines.append("\t".join([result["label"], f"{result['probability']:.4f}",
                                *(f"{result['probabilities'][name]:.4f}" for name in labels), text]))
    return "\n".join(lines)
