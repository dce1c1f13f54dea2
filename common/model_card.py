"""A model card in every folder a stage writes: ``README.md`` in the Hugging Face model-card convention.

The YAML header carries the base model, the library that runs the folder and the measured metrics (``model-index``);
the body says what the model is, its parent and the compression applied, the numbers measured when the folder was
written (validation accuracy, size, parameters, batch-1 latency and the machine), the exact snippet that runs this
folder (ONNX Runtime with ``tokenizers`` and ``numpy`` alone, stock ``transformers``, or the project's loader) and its
limits. Every number comes from the folder's ``compression.json`` (``card_numbers``), so the card and the record
cannot disagree. ``measure_latency`` times the written model once, on the machine that wrote it.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Optional

from . import stages
from .checkpoints import CARD_FILE

logger = logging.getLogger(__name__)

EMBEDDED_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # what model_name_or_path='embedded' is
LATENCY_WARMUP, LATENCY_RUNS = 3, 10


def measure_latency(folder: Path, record: dict) -> Optional[dict]:
    """Median batch-1 latency of the folder's model (its deployment file for an ONNX folder) on one synthetic
    example of the stage's max_length, on this machine; None (with a log line) when it cannot run here."""
    import torch

    from .evaluation import cpu_info
    from .runtime import ModelRuntime

    onnx_file = record.get("deployment_model") if record.get("stage") in stages.export_stages() else None
    seq_length = int((record.get("config") or {}).get("max_length") or 64)
    try:
        model = ModelRuntime(folder, onnx_file, spinning=False)
        run = model.runner(model.batch(1, seq_length))
        for _ in range(LATENCY_WARMUP):
            run()
        timings = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            run()
            timings.append(time.perf_counter() - start)
    except Exception as error:  # a card without latency beats no checkpoint; the reason is logged and recorded
        logger.warning("Model card of %s: latency not measured (%s: %s)", folder, type(error).__name__, error)
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "median_ms": 1000 * statistics.median(timings),
        "batch_size": 1,
        "seq_length": seq_length,
        "runs": LATENCY_RUNS,
        "runtime": model.runtime,
        "file": onnx_file,
        "threads": torch.get_num_threads(),
        "cpu": cpu_info()["cpu_model"],
    }


def base_model(record: dict) -> Optional[str]:
    """The pretrained encoder at the root of the folder's lineage, followed through the parents' records."""
    seen = set()
    while record is not None:
        config = record.get("config") or {}
        source = config.get("model_name_or_path") if record.get("stage") == "teacher" else None
        if source:
            return EMBEDDED_BASE_MODEL if source == "embedded" else source
        parent = record.get("parent")
        if not parent or parent in seen:
            return parent
        seen.add(parent)
        parent_record = Path(parent) / "compression.json"
        if not parent_record.is_file():
            return parent
        record = json.loads(parent_record.read_text())
    return None


def weight_bytes(record: dict) -> Optional[int]:
    """Bytes of the weights a user ships: the safetensors files, or an ONNX folder's deployment file."""
    manifest = record.get("manifest") or {}
    if record.get("stage") in stages.export_stages():
        from .runtime import graph_files

        entries = [manifest.get(name) for name in graph_files(record.get("deployment_model") or "")]
        return sum(entry["bytes"] for entry in entries) if all(entries) else None
    sizes = [entry["bytes"] for name, entry in manifest.items() if name.endswith(".safetensors")]
    return sum(sizes) if sizes else None


def card_numbers(record: dict) -> dict:
    """The numbers a card shows, each read from the record."""
    validation = ((record.get("metrics") or {}).get("validation") or {}).get("accuracy")
    latency = record.get("card_latency") or {}
    return {
        "validation_accuracy": validation,
        "size_bytes": weight_bytes(record),
        "parameters": record.get("parameters"),
        "latency_ms_batch1": latency.get("median_ms"),
    }


def _compression_lines(record: dict) -> list[str]:
    lines = []
    architecture = record.get("architecture") or {}
    pruning = record.get("pruning") or {}
    if record.get("origin"):
        lines.append(f"student: {record['origin']}, distilled from the teacher")
    if pruning:
        lines.append(f"structured pruning (KGSP/MSP): head sparsity {pruning.get('head_sparsity', 0):.3f}, FFN sparsity "
                     f"{pruning.get('ffn_sparsity', 0):.3f}")
    if architecture.get("heads_per_layer") and (pruning or record.get("stage") not in ("teacher", "student")):
        lines.append(f"attention heads per layer {architecture['heads_per_layer']}, FFN width per layer "
                     f"{architecture.get('ffn_width_per_layer')}")
    vocabulary = pruning.get("vocabulary") or {}
    if vocabulary.get("kept_vocab_size"):
        rare = (f" (tokens seen fewer than {vocabulary['min_count']} times dropped)"
                if vocabulary.get("min_count", 1) > 1 else "")
        lines.append(f"vocabulary pruned to the training split's tokens{rare}: {vocabulary['kept_vocab_size']:,} kept")
    quantization = record.get("quantization") or {}
    if quantization.get("method"):
        details = ", ".join(f"{key} {quantization[key]}" for key in ("quant_type", "blocksize", "double_quant") if key in quantization)
        lines.append(f"quantization: {quantization['method']}{f' ({details})' if details else ''}")
    embedding = record.get("embedding_quantization") or {}
    if embedding.get("method") not in (None, "none"):
        frequent = (f" (the {embedding['int4_rows']:,} most frequent training tokens' rows in int4)"
                    if embedding.get("int4_rows") else "")
        lines.append(f"word embeddings stored row-wise in {embedding['method']}{frequent}")
    for name, entry in (record.get("files") or {}).items():
        if isinstance(entry, dict) and entry.get("precision"):
            accuracy = entry.get("validation_accuracy")
            lines.append(f"`{name}`: {entry['precision']}"
                         + (f", validation accuracy {100 * accuracy:.2f}%" if accuracy is not None else ""))
    return lines or ["none: full-precision fine-tuning of the base model"]


def _limits(record: dict) -> list[str]:
    stage = record.get("stage")
    config = record.get("config") or {}
    limits = [f"Trained and validated on {config.get('dataset', 'its dataset')!s} only; accuracy on other text differs. "
              f"Inputs are truncated to {config.get('max_length', '?')} tokens."]
    if ((record.get("pruning") or {}).get("vocabulary") or {}).get("kept_vocab_size"):
        limits.append("The vocabulary is pruned to the training corpus: words it never saw become the unknown token.")
    if stage in stages.STAGE_NAMES and stages.get(stage).runtime == "openvino":
        precisions = sorted({entry.get("inference_precision") for entry in (record.get("files") or {}).values()
                             if isinstance(entry, dict) and entry.get("inference_precision")})
        limits.append(f"OpenVINO's CPU plugin computed in {', '.join(precisions) or 'its default precision'} here; on a CPU "
                      f"without AVX-512 BF16/AMX it computes in f32, so logits differ slightly between machines.")
    method = (record.get("quantization") or {}).get("method")
    if method == "bitsandbytes_4bit":
        limits.append("The 4-bit weights load only through this project's loader (`common.load_model`), or as ONNX "
                      "(stage 12); bitsandbytes' CPU kernel computes in bf16.")
    elif method and "int8" in method and stage not in stages.export_stages():
        limits.append("torch dynamic int8: CPU only, loaded through this project's loader (`common.load_model`).")
    return limits


def _snippet(record: dict) -> str:
    stage = record.get("stage")
    if stage in stages.export_stages() and (record.get("deployment_model") or "").endswith(".xml"):
        model_file = record["deployment_model"]
        return f'''Needs only `openvino`, `tokenizers` and `numpy`; run it inside this folder (or set `folder`):

```python
import json
import numpy as np
import openvino as ov
from tokenizers import Tokenizer

folder = "."
model = ov.Core().compile_model(f"{{folder}}/{model_file}", "CPU")
tokenizer = Tokenizer.from_file(f"{{folder}}/tokenizer.json")  # pads and truncates as in training
id2label = json.load(open(f"{{folder}}/config.json"))["id2label"]

encodings = tokenizer.encode_batch(["a gripping, funny film", "dull and far too long"])
columns = {{"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}}
feeds = {{port.get_any_name(): np.array([getattr(e, columns[port.get_any_name()]) for e in encodings], dtype=np.int64)
         for port in model.inputs}}
logits = model(feeds)[model.output("logits")]
for row in logits:
    print(id2label[str(row.argmax())], float(np.exp(row - row.max()).max() / np.exp(row - row.max()).sum()))
```
'''
    if stage in stages.export_stages():
        model_file = record.get("deployment_model") or "model.onnx"
        return f'''Needs only `onnxruntime`, `tokenizers` and `numpy`; run it inside this folder (or set `folder`):

```python
import json
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder = "."
session = ort.InferenceSession(f"{{folder}}/{model_file}", providers=["CPUExecutionProvider"])
tokenizer = Tokenizer.from_file(f"{{folder}}/tokenizer.json")  # pads and truncates as in training
id2label = json.load(open(f"{{folder}}/config.json"))["id2label"]

encodings = tokenizer.encode_batch(["a gripping, funny film", "dull and far too long"])
columns = {{"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}}
feeds = {{i.name: np.array([getattr(e, columns[i.name]) for e in encodings], dtype=np.int64) for i in session.get_inputs()}}
logits = session.run(["logits"], feeds)[0]
for row in logits:
    print(id2label[str(row.argmax())], float(np.exp(row - row.max()).max() / np.exp(row - row.max()).sum()))
```
'''
    if not record.get("quantization") and not record.get("embedding_quantization"):
        remote = record.get("stock_transformers_loader")
        note = ("`trust_remote_code=True` runs the small `modeling_pruned.py` in this folder, which rebuilds each "
                "layer's head count and FFN width; read it first (it imports only torch and transformers).\n\n") if remote else ""
        return f'''Stock `transformers` (no project code):

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

folder = "."
model = AutoModelForSequenceClassification.from_pretrained(folder{", trust_remote_code=True" if remote else ""}).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
inputs = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, truncation=True, return_tensors="pt")
inputs = {{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}}
if model.config.model_type == "distilbert":
    inputs.pop("token_type_ids", None)
with torch.no_grad():
    print([model.config.id2label[int(i)] for i in model(**inputs).logits.argmax(-1)])
```

{note}'''
    return '''With this project (its loader rebuilds the quantized layers from `compression.json`):

```python
from common import load_model
from transformers import AutoTokenizer

model = load_model("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
'''


def render(record: dict, folder: Path) -> str:  # ``folder``: where the folder lands (it is written under a temporary name)
    """The card's text, every number taken from ``record`` (the folder's ``compression.json``)."""
    import yaml

    stage = record.get("stage", "?")
    numbers = card_numbers(record)
    config = record.get("config") or {}
    runtime = stages.get(stage).runtime if stage in stages.STAGE_NAMES else "torch"
    metrics = []
    if numbers["validation_accuracy"] is not None:
        metrics.append({"type": "accuracy", "value": numbers["validation_accuracy"], "name": "validation accuracy"})
    header = {
        "base_model": base_model(record),
        "library_name": {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime, "transformers"),
        "pipeline_tag": "text-classification",
        "tags": ["text-classification", "model-compression", stage],
        "model-index": [{
            "name": f"{stage}/{folder.name}",
            "results": [{
                "task": {"type": "text-classification"},
                "dataset": {"name": str(config.get("dataset", "unknown")), "type": str(config.get("dataset", "unknown")),
                            "split": "validation"},
                "metrics": metrics,
            }],
        }],
        "compression": {"stage": stage, "parent": record.get("parent"), **numbers},
    }
    try:
        description = stages.get(stage).description
    except (KeyError, ValueError):
        description = stage
    latency = record.get("card_latency") or {}
    measured = []
    if numbers["validation_accuracy"] is not None:
        measured.append(f"validation accuracy: {100 * numbers['validation_accuracy']:.2f}%")
    if numbers["size_bytes"] is not None:
        measured.append(f"weights on disk: {numbers['size_bytes'] / 1e6:.2f} MB ({numbers['size_bytes']:,} bytes)")
    if numbers["parameters"] is not None:
        measured.append(f"parameters: {numbers['parameters']:,}")
    if numbers["latency_ms_batch1"] is not None:
        measured.append(f"latency: {numbers['latency_ms_batch1']:.2f} ms median, batch 1 x {latency['seq_length']} tokens, "
                        f"{latency['runtime']}, {latency['threads']} threads on {latency['cpu']} "
                        f"({latency['runs']} runs after {LATENCY_WARMUP} warm-up runs, when the folder was written)")
    elif latency.get("error"):
        measured.append(f"latency: not measured ({latency['error']})")
    labels = record.get("label_names")
    text = "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n"
    text += f"# {stage}: {description}\n\n"
    text += (f"A text classifier{f' with labels {labels}' if labels else ''}, written by the compression pipeline's "
             f"`{stages.script_for(stage) if stage in stages.STAGE_NAMES else stage}` stage.\n\n")
    text += f"- Base model: {header['base_model'] or 'unknown'}\n- Parent: `{record.get('parent') or 'none'}`\n"
    text += "- Compression applied:\n" + "".join(f"  - {line}\n" for line in _compression_lines(record))
    text += "\n## Measured\n\n" + "".join(f"- {line}\n" for line in measured or ["nothing recorded"])
    text += "\nFull numbers: `compression.json` (the card is written from it) and the pipeline's `results/final_report.md`.\n"
    text += "\n## How to run it\n\n" + _snippet(record)
    text += f"\nOr with the project: `python predict.py --model {folder} \"a gripping, funny film\"`.\n"
    text += "\n## Limits\n\n" + "".join(f"- {line}\n" for line in _limits(record))
    return text


def write_model_card(folder: Path, record: dict, final_folder: Optional[Path] = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(render(record, Path(final_folder or folder)))
    return path


def read_header(path: Path) -> dict:
    """The YAML header of a card."""
    import yaml

    text = Path(path).read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no YAML header.")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])
