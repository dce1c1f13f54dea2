"""The one stage table: every stage of the pipeline, named once.

Each row says which script writes the stage, the folder it writes under the results root (the stage's name),
the stages it reads by default, how its folder runs (``torch`` checkpoint, ``onnxruntime`` or ``openvino`` files), what
its weights are (``full``, ``4bit``, ``int8``, ``onnx`` or ``openvino``) and the rows it contributes to the final report. The
checkpoint finder, the report, the Makefile (``python3 common/stages.py`` prints the run order), the scripts'
help texts and the tests read this table; a new stage or a new report row is one entry here.

This module imports nothing from the project (and nothing heavy), so the Makefile can run it with any Python 3.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

REPORT_SCRIPT = "7_evaluate_and_generate_report.py"  # runs last: it reads every stage

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRUNABLE_STAGES = ("student", "teacher")  # stage 8 prunes a student, or the teacher itself at full depth
WEIGHT_KINDS = ("full", "4bit", "int8", "onnx", "openvino")


@dataclass(frozen=True)
class ReportRow:
    """One row of the final report: a label and, for a folder of ONNX files, the file it runs."""

    label: str
    file: str | None = None  # None: the torch checkpoint itself


@dataclass(frozen=True)
class Stage:
    name: str  # also the folder under the results root
    script: str
    reads: tuple[str, ...]  # the stages whose newest checkpoints it reads by default
    runtime: str  # how its folder runs: "torch" (the project's loader), "onnxruntime" (.onnx) or "openvino" (IR .xml/.bin)
    weights: str  # "full" precision, bitsandbytes "4bit", torch "int8", or "onnx"/"openvino" files
    rows: tuple[ReportRow, ...]
    description: str


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("teacher", "1_train_teacher.py", (), "torch", "full",
          (ReportRow("Teacher (FP32)"),), "the fine-tuned teacher classifier"),
    Stage("student", "2_distill_student.py", ("teacher",), "torch", "full",
          (ReportRow("Student (FP32)"),), "a shallower student distilled from the teacher"),
    Stage("pruned", "8_pruning_with_finetuning.py", ("student", "teacher"), "torch", "full",
          (ReportRow("Pruned Student (FP32)"),), "the student with heads, FFN neurons and vocabulary removed"),
    Stage("ptq_4bit", "9_quantize_pruned_model.py", ("pruned",), "torch", "4bit",
          (ReportRow("Pruned + Quantized Student (PTQ)"),), "the pruned student in bitsandbytes 4-bit, no training"),
    Stage("qkd_4bit", "10_qat_kd_4bit.py", ("pruned", "teacher"), "torch", "4bit",
          (ReportRow("Pruned + QKD-4bit (QAT)"),), "the pruned student trained through 4-bit with distillation"),
    Stage("int8", "11_export_int8.py", ("qkd_4bit", "pruned"), "torch", "int8",
          (ReportRow("Int8 CPU deployment (torch)"),), "torch dynamic int8 of the better of qkd_4bit and pruned"),
    Stage("onnx", "12_export_onnx.py", ("pruned",), "onnxruntime", "onnx",
          (ReportRow("Pruned, ONNX Runtime FP32", "model.onnx"),
           ReportRow("Pruned, ONNX Runtime int8 dynamic", "model_int8_dynamic.onnx"),
           ReportRow("Pruned, ONNX Runtime int8 static", "model_int8_static.onnx")),
          "the pruned model in ONNX: fp32 and ONNX Runtime int8 (dynamic, static)"),
    Stage("onnx_4bit", "12_export_onnx.py", ("qkd_4bit",), "onnxruntime", "onnx",
          (ReportRow("QKD-4bit, ONNX Runtime NF4 (MatMulBnb4)", "model.onnx"),
           ReportRow("QKD-4bit, ONNX Runtime NF4 codes, int8 compute", "model_nf4_int8.onnx"),
           ReportRow("QKD-4bit, ONNX Runtime int4 MatMulNBits, int8 compute", "model_int4_nbits.onnx")),
          "the QKD-4bit model's NF4 codes in ONNX"),
    Stage("openvino", "13_export_openvino.py", ("pruned", "qkd_4bit"), "openvino", "openvino",
          (ReportRow("Pruned, OpenVINO", "openvino_model.xml"),
           ReportRow("Pruned, OpenVINO + NNCF int8", "openvino_model_int8.xml"),
           ReportRow("QKD-4bit, OpenVINO NNCF 4-bit weights", "openvino_model_4bit.xml")),
          "the pruned model in OpenVINO IR: as is, NNCF int8, and the QKD model's 4-bit weights"),
)

_BY_NAME = {stage.name: stage for stage in STAGE_TABLE}
STAGE_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get(name: str) -> Stage:
    if name not in _BY_NAME:
        raise ValueError(f"stage={name!r} is unknown; known stages: {', '.join(STAGE_NAMES)}.")
    return _BY_NAME[name]


def script_for(name: str) -> str:
    return get(name).script


def rerun_hint(name: object) -> str:
    """How to make a stage folder again: 're-run <its script>', or 're-run its stage' for an unknown stage name."""
    return f"re-run {_BY_NAME[name].script}" if name in _BY_NAME else "re-run its stage"


def with_weights(*kinds: str) -> tuple[str, ...]:
    """Names of the stages whose weights are of the given kinds, in run order (e.g. ``with_weights("full")``)."""
    unknown = set(kinds) - set(WEIGHT_KINDS)
    if unknown:
        raise ValueError(f"weight kinds {sorted(unknown)} are unknown; known: {', '.join(WEIGHT_KINDS)}.")
    return tuple(stage.name for stage in STAGE_TABLE if stage.weights in kinds)


def onnx_stages() -> tuple[str, ...]:
    return tuple(stage.name for stage in STAGE_TABLE if stage.runtime == "onnxruntime")


def stages_of(script: str) -> tuple[str, ...]:
    """The stages whose folders ``script`` writes."""
    return tuple(stage.name for stage in STAGE_TABLE if stage.script == script)


def export_stages() -> tuple[str, ...]:
    """Stages whose folders hold graphs for a runtime (ONNX Runtime, OpenVINO) rather than a torch checkpoint."""
    return tuple(stage.name for stage in STAGE_TABLE if stage.runtime != "torch")


def run_order() -> tuple[str, ...]:
    """The scripts in the order a full pipeline runs them: each stage's script once, then the report."""
    scripts: list[str] = []
    for stage in STAGE_TABLE:
        if stage.script not in scripts:
            scripts.append(stage.script)
    return (*scripts, REPORT_SCRIPT)


def describe() -> str:
    """A plain-text table of the stages, for ``--help`` texts and ``python3 common/stages.py --table``."""
    lines = []
    for stage in STAGE_TABLE:
        reads = ", ".join(stage.reads) or "a pretrained encoder"
        lines.append(f"{stage.name:<10} {stage.script:<31} reads {reads}: {stage.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe() if "--table" in sys.argv[1:] else " ".join(run_order()))
