"""The stage runs of one ``scripts/compress.py`` run, each recorded with its command and the checkpoint folders it
wrote, so that a later run given ``--resume`` reuses a run whose command matches instead of running it again: a search
that stopped (a crash, a full disk, a killed job) continues where it stopped, and the same search finishes for the
other objective or target without retraining its candidates. ``earlier_steps`` offers one script's runs of every
earlier compress.py run as well (``--reuse_students``: a deeper student distilled with the same command)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import stages
from .checkpoints import is_complete, list_checkpoints
from .experiments import run_script


def step_key(script: str, args: Iterable) -> str:
    """What makes two stage runs the same: the script and its flags (paths included), the output folder excluded."""
    return json.dumps([script, *map(str, args)])


def earlier_steps(compress_root: Path, script: str, exclude: Optional[Path] = None) -> list[dict]:
    """The runs of ``script`` that the compress.py runs under ``compress_root`` (but ``exclude``) ran themselves, newest
    run first, each with ``origin`` naming its run. A trace that cannot be read is passed over: it is another run's,
    perhaps being written right now, and only costs that reuse."""
    found = []
    for trace in sorted(compress_root.glob("*/search.json"), reverse=True):
        if exclude is not None and trace.parent.resolve() == Path(exclude).resolve():
            continue
        try:
            steps = json.loads(trace.read_text()).get("steps") or []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        found += [{**step, "origin": f"the compress run {trace.parent}"} for step in steps
                  if isinstance(step, dict) and step.get("script") == script and not step.get("reused")
                  and isinstance(step.get("args"), list) and isinstance(step.get("folders"), list)]
    return found


class StageSteps:
    """Runs stage scripts, or reuses a previous run's step with the same command whose folders are all complete
    checkpoints. ``previous_steps`` are the resumed run's, tried first; ``share`` offers other runs' steps after them
    (from ``earlier_steps``). ``steps`` is the record of this run (each: script, args, folders, seconds, reused, and
    ``origin`` when another run wrote its folders); ``on_step`` is called after each one (compress.py writes its trace
    to ``trace_folder`` then, so a run that stops can be resumed, and a stage that fails says how)."""

    def __init__(self, previous_steps: Iterable[dict] = (), on_step: Optional[Callable[[], None]] = None,
                 trace_folder: Optional[Path] = None):
        self.steps: list[dict] = []
        self._previous: dict[str, list[dict]] = {}
        self.share(previous_steps)
        self._on_step = on_step
        self._trace_folder = trace_folder

    def share(self, steps: Iterable[dict]) -> None:
        """Offer ``steps`` for reuse, each after those offered before it with the same command."""
        for step in steps:
            self._previous.setdefault(step_key(step["script"], step["args"]), []).append(step)

    @property
    def reused(self) -> int:
        return sum(step["reused"] for step in self.steps)

    def run(self, script: str, *args, output_dir: Optional[Path] = None) -> list[Path]:
        """Run ``script`` with ``args`` (and ``--output_dir``), unless a previous step ran the same command; returns the
        checkpoint folders the step wrote: ``output_dir``, or the new complete checkpoints of the script's stages."""
        args = [str(arg) for arg in args]
        previous = next((step for step in self._previous.get(step_key(script, args), [])
                         if step["folders"] and all(is_complete(Path(f)) for f in step["folders"])), None)
        if previous is not None:
            print(f"Reusing {', '.join(previous['folders'])}: {previous.get('origin', 'the resumed run')} ran {script} "
                  f"with the same flags", flush=True)
            step = {**previous, "reused": True}
        else:
            started = time.time()
            # a script told where to write needs no before/after comparison of its stages' folders
            written = () if output_dir is not None else stages.stages_of(script)
            before = {stage: set(list_checkpoints(stage)) for stage in written}
            try:
                run_script(script, *args, *(["--output_dir", output_dir] if output_dir is not None else []), stream=True)
            except RuntimeError as error:
                if not self.steps or self._trace_folder is None:
                    raise
                raise RuntimeError(f"{error} The {len(self.steps)} stage run(s) before it are recorded in "
                                   f"{self._trace_folder / 'search.json'}: fix the cause, then run the same command "
                                   f"with --resume {self._trace_folder} to continue from there.") from error
            if output_dir is not None:
                folders = [str(output_dir)]
            else:
                folders = [str(folder) for stage in written for folder in sorted(set(list_checkpoints(stage)) - before[stage])]
            step = {"script": script, "args": args, "folders": folders, "seconds": round(time.time() - started),
                    "reused": False}
        self.steps.append(step)
        if self._on_step is not None:
            self._on_step()
        return [Path(folder) for folder in step["folders"]]
