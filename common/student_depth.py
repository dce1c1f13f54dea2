"""How deep the student must be (``scripts/compress.py --deeper_students``): when the student found by itself misses
the target unpruned, stage 2 runs again with that student's own flags and more of the teacher's layers, and the
search starts from the shallowest student that passes the gate.

- ``shallowest_passing_depth``: the fewest layers between the failing student's and the teacher's for which the gate
  passes, by bisection (about log2(teacher - student) stage-2 runs), assuming a deeper student keeps more.
- ``deeper_student_args``: stage 2's flags for one deeper student, rebuilt from the found student's recorded config:
  what it changed from stage 2's defaults, with ``--student_num_layers`` and the teacher replaced.
- ``why_not_deeper``: why no deeper student can be distilled from this one (None when one can).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from .config import DataConfig, StudentConfig
from .search import bisect_ladder

# flags that say where and how a run is kept, not what it trains; and the two this module sets itself
_NOT_REPEATED = {"output_dir", "overwrite_output_dir", "resume", "profile", "stop_after_epochs", "teacher_model_path",
                 "student_num_layers"}


def shallowest_passing_depth(student_layers: int, teacher_layers: int, passes: Callable[[int], bool],
                             out_of_time: Callable[[], bool] = lambda: False) -> Optional[int]:
    """The fewest layers in (``student_layers``, ``teacher_layers``) whose student passes (``passes(layers)``), by
    ``bisect_ladder`` over the depths from the deepest (least compressed) down: the student fails, and a deeper one
    keeps at least as much. Each depth is tried at most once, the shallower middle first (shallower students are
    cheaper to distil and what the search wants); ``out_of_time`` is asked before each try. None when none passes or
    none was tried in time."""
    depths = list(range(teacher_layers - 1, student_layers, -1))
    found = bisect_ladder(len(depths), lambda index: passes(depths[index]), out_of_time, compressed_middle_first=True)
    return None if found is None else depths[found]


def why_not_deeper(recorded_config: dict, student_layers: int, teacher_layers: int) -> Optional[str]:
    """Why stage 2 cannot make a deeper student from the one whose recorded config is ``recorded_config``."""
    if recorded_config.get("student_model_name_or_path") is not None:
        return (f"the student was loaded from --student_model_name_or_path "
                f"{recorded_config['student_model_name_or_path']}, not built from the teacher's layers")
    if student_layers + 1 >= teacher_layers:
        return f"the student already has {student_layers} of the teacher's {teacher_layers} layers"
    return None


def _flag_values(value) -> list[str]:
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


def deeper_student_args(recorded_config: dict, layers: int, teacher: Path) -> list[str]:
    """Stage 2's flags (data flags and --output_dir excluded: the caller forwards its own) for a student of ``layers``
    teacher layers built as the found student was: every stage-2 field its record changed from stage 2's defaults."""
    data_fields = {field.name for field in dataclasses.fields(DataConfig)}
    args: list[str] = []
    for field in dataclasses.fields(StudentConfig):
        if field.name in _NOT_REPEATED or field.name in data_fields or field.name not in recorded_config:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        value = recorded_config[field.name]
        if value is None or value == default:
            continue
        args += [f"--{field.name}", *_flag_values(value)]
    return [*args, "--student_num_layers", str(layers), "--teacher_model_path", str(teacher)]
