"""What ``scripts/compress.py`` does after its search (``--finish``), and the validation gate every model it judges
goes through.

- ``ValidationGate``: the retention gate (``search.retention_gate``) of a model on the validation split against the
  teacher's per-example results (``validation_correct``).
- ``Finishing``: the search's winner quantized under the same gate. ``quantize_winner`` runs stage 10 on the published
  winner (``train_qkd``: with ``--optimize size`` ternary word-embedding rows first, int4 rows when those miss); when
  its QKD-4bit model misses the target, the next candidates that passed (``retreat``, ``--qkd_retreats``), then the
  fewest Linears at 8 bits on the winner (``search_8bit_layers``, ``--mixed_precision``).
- ``gate_files``: every file the export stages wrote, gated, and the passing ones timed round-robin with the teacher.
- ``publish_winner`` and ``publish_copy``: a run's checkpoint copied as the newest checkpoint of a stage in results/,
  which the export stages then find by themselves.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .checkpoints import is_complete, new_run_id, read_record, stage_dir
from .config import CompressConfig
from .evaluation import interleaved_latency
from .experiments import split_loader
from .runtime import ModelRuntime
from .search import bisect_ladder, eight_bit_ladder, retention_gate, retreat_order
from .search_trace import candidate_name
from .stage_steps import StageSteps

FINISHING_SCRIPTS = ("10_qat_kd_4bit.py", "12_export_onnx.py", "13_export_openvino.py")


def validation_correct(model: ModelRuntime, folder: Path, validation, max_length: int):
    """Per validation example: does ``model`` (tokenized as the checkpoint in ``folder``) get it right?"""
    logits, labels = model.logits(split_loader(folder, validation, max_length))
    return logits.argmax(-1) == labels


@dataclass
class ValidationGate:
    """The retention gate of compress.py on the validation split, against the teacher's per-example results."""

    teacher_correct: Any
    validation: Any
    max_length: int
    target: float
    z: float

    def of_correct(self, correct) -> dict:
        return retention_gate(correct, self.teacher_correct, self.target, self.z)

    def of_model(self, model: ModelRuntime, folder: Path) -> dict:
        """The gate of a loaded model, tokenized as the checkpoint in ``folder``."""
        return self.of_correct(validation_correct(model, folder, self.validation, self.max_length))

    def entry(self, model: ModelRuntime, correct) -> dict:
        """The gate's record entry of a loaded model whose validation results are ``correct``."""
        return {"folder": str(model.folder), "size_mb": model.size_bytes / 1e6, **self.of_correct(correct)}

    def of_folder(self, folder: Path, model: Optional[ModelRuntime] = None) -> dict:
        """The gate's record entry of a checkpoint folder (``model``: one of its files, loaded already)."""
        model = model or ModelRuntime(folder, spinning=False)
        return self.entry(model, validation_correct(model, folder, self.validation, self.max_length))


def _ternary_rows(entry: dict) -> str:
    """``int2 rows (the 3000 most frequent tokens' at int4)``: a ternary try of ``Finishing.train_qkd``."""
    count = entry.get("int4_rows")
    return f"{entry['rows']} rows" + (f" (the {count} most frequent tokens' at int4)" if count else "")


def _ternary_misses(tried: list[dict]) -> str:
    return "; ".join(f"{_ternary_rows(entry)} missed the target (retention {entry['retention']:.4f})" for entry in tried)


def resume_advice(work: Path) -> str:
    """How to continue a search that --time_budget_s stopped, reusing the stage runs it finished."""
    return f"to go on without retraining those: --resume {work} with a larger --time_budget_s"


def publish_copy(folder: str | Path, stage: str) -> Path:
    """A copy of a checkpoint folder the run wrote as the newest checkpoint of ``stage`` in results/."""
    published = stage_dir(stage) / new_run_id()
    shutil.copytree(folder, published)
    return published


def publish_winner(winner: str, previous: dict, role: str = "the winner") -> Path:
    """The winner copied as the newest results/pruned/ checkpoint, or the resumed run's copy of the same candidate
    (published as its winner, or by --qkd_retreats after it)."""
    for entry in (previous, (previous.get("retreat") or {}).get("winner") or {}):  # both {published, published_from}
        if entry.get("published") and entry.get("published_from") == winner and is_complete(Path(entry["published"])):
            print(f"Reusing {entry['published']}: the resumed run published the same candidate", flush=True)
            return Path(entry["published"])
    published = publish_copy(winner, "pruned")
    print(f"Published {role} as {published}", flush=True)
    return published


@dataclass
class Finishing:
    """Stage 10 under the gate, for one compress.py run: its stage runs (reused on --resume), the run's folder, the
    time budget, the stage-10 flags of a pruned checkpoint, and the resumed run's record (``{}`` when none)."""

    steps: StageSteps
    gate: ValidationGate
    config: CompressConfig
    work: Path
    out_of_time: Callable[[], bool]
    qkd_flags: Callable[[Path], list]
    previous: dict

    def train_qkd(self, flags: list, output_root: Optional[Path] = None) -> dict:
        """Stage 10 on a pruned checkpoint (its runs in results/qkd_4bit/, or in ``output_root``). With --optimize size
        it first trains ternary word-embedding rows (--size_embeddings int2; the --size_int4_rows most frequent tokens'
        rows at int4, each count of that ladder in turn while the model misses the gate) and keeps the first model that
        passes; when none does (or --time_budget_s runs out between counts), stage 10 runs again with int4 rows.
        Returns the rows chosen, the stage-10 flags that give them, the checkpoint kept (which the 8-bit search and
        stages 12 and 13 read), its gate and why."""
        config, quantize = self.config, FINISHING_SCRIPTS[0]
        runs = output_root or stage_dir("qkd_4bit")
        result = {"method": "int4", "flags": [], "why": "int4 rows (stage 10's default)"}
        if config.optimize == "size" and config.size_embeddings == "int4":
            result["why"] += " (--size_embeddings int4)"
        elif config.optimize == "size":
            tried, counts, budget = [], config.size_int4_rows, []
            for count in counts:  # size_embeddings is int2 here: its int4 rows are what the ladder varies
                if tried and self.out_of_time():
                    budget = [f"--time_budget_s ran out before the int4-row counts {counts[len(tried):]} "
                              f"({resume_advice(self.work)})"]
                    print(f"{budget[0]}; stage 10 again with int4 rows", flush=True)
                    break
                ternary_flags = ["--embedding_quantization", config.size_embeddings]
                if count:
                    ternary_flags += ["--embedding_int4_rows", count]
                [folder] = self.steps.run(quantize, *flags, *ternary_flags, output_dir=runs / new_run_id())
                tried.append({**self.gate.of_folder(folder), "rows": config.size_embeddings, "int4_rows": count})
                outcome = f"QKD-4bit with {_ternary_rows(tried[-1])}: retention {tried[-1]['retention']:.4f}"
                if tried[-1]["passes"]:
                    print(f"{outcome}, passes the gate", flush=True)
                    earlier = f"; before, {_ternary_misses(tried[:-1])}" if len(tried) > 1 else ""
                    return {"method": config.size_embeddings, "flags": ternary_flags, "tried": tried,
                            "folder": str(folder), "gate": tried[-1],
                            "why": f"{_ternary_rows(tried[-1])} keep the target (retention "
                                   f"{tried[-1]['retention']:.4f}){earlier}"}
                following = f"{counts[len(tried)]} int4 rows among them" if len(tried) < len(counts) else "int4 rows"
                print(f"{outcome}, fails the gate; stage 10 again with {following}", flush=True)
            result.update(tried=tried, why="; ".join([_ternary_misses(tried), *budget, "int4 rows"]))
        [folder] = self.steps.run(quantize, *flags, output_dir=runs / new_run_id())
        return {**result, "folder": str(folder), "gate": self.gate.of_folder(folder)}

    def retreat(self, others: list[dict]) -> dict:
        """--qkd_retreats: the winner's QKD-4bit model missed the target, so stage 10 runs the same way (``train_qkd``)
        on the next candidates that passed (``others``, best first; its runs in results/compress/<run_id>/retreat/),
        until one's QKD model passes the gate, --qkd_retreats are spent or --time_budget_s runs out. The one that
        passes (``chosen``) is published (the candidate as the newest results/pruned/ checkpoint, its QKD model as the
        newest results/qkd_4bit/ one) for stages 12 and 13; when none does, results/ holds the winner's as before."""
        config = self.config
        result: dict = {"tried": []}
        for candidate in others[:config.qkd_retreats]:
            name = candidate_name(candidate)
            if self.out_of_time():
                result["why"] = (f"--time_budget_s ran out before stage 10 on {name}, the next candidate that passed "
                                 f"({resume_advice(self.work)})")
                break
            print(f"Stage 10 on {name} instead (--qkd_retreats), the next candidate that passed the gate", flush=True)
            runs = self.work / "retreat" / Path(candidate["folder"]).name
            embeddings = self.train_qkd(self.qkd_flags(Path(candidate["folder"])), output_root=runs)
            result["tried"].append({"name": name, "folder": candidate["folder"], "embeddings": embeddings})
            if embeddings["gate"]["passes"]:
                published = publish_winner(candidate["folder"], self.previous, role=name)
                qkd_copy = publish_copy(embeddings["folder"], "qkd_4bit")
                result.update(chosen={**result["tried"][-1], "published": str(published), "qkd_published": str(qkd_copy)},
                              why=f"the winner's QKD-4bit model missed the target and {name}'s keeps it with every "
                                  f"Linear in 4 bits (retention {embeddings['gate']['retention']:.4f}), so stages 12 "
                                  f"and 13 export {name}")
                print(f"QKD-4bit of {name} passes the gate (retention {embeddings['gate']['retention']:.4f}): "
                      f"published as {published} and {qkd_copy} for stages 12 and 13", flush=True)
                return result
        if "why" not in result:
            misses = ", ".join(f"{entry['name']} {entry['embeddings']['gate']['retention']:.4f}" for entry in result["tried"])
            result["why"] = (f"no other candidate's QKD-4bit model keeps the target (retention {misses}; "
                             f"--qkd_retreats {config.qkd_retreats})")
        result["why"] += ("; the 8-bit search (--mixed_precision) runs on the winner" if config.mixed_precision else
                          "; stages 12 and 13 export the winner's all-4-bit model")
        print(f"Retreat: {result['why']}", flush=True)
        return result

    def quantize_winner(self, record: dict, tried: list[dict], chosen: dict, published: Path) -> tuple[Path, Path]:
        """Stage 10 on the published winner; when its QKD model misses the target, on the next candidates that passed
        (--qkd_retreats), then the 8-bit search on the winner (--mixed_precision). Records each step (``embeddings``,
        ``retreat``, ``mixed_precision``) and returns the pruned checkpoint and QKD model stages 12 and 13 export."""
        record["embeddings"] = self.train_qkd(self.qkd_flags(published))
        qkd_folder = Path(record["embeddings"]["folder"])
        others = retreat_order(tried, chosen, self.config.optimize)
        if not record["embeddings"]["gate"]["passes"] and self.config.qkd_retreats and others:
            record["retreat"] = self.retreat(others)
            record["retreat"]["winner"] = {"published": str(published), "published_from": chosen["folder"]}
            retreated = record["retreat"].get("chosen")
            if retreated:  # its QKD model passes with every Linear in 4 bits: no 8-bit search
                record.update(published=retreated["published"], published_from=retreated["folder"])
                return Path(retreated["published"]), Path(retreated["qkd_published"])
        if self.config.mixed_precision:
            record["mixed_precision"] = self.search_8bit_layers([*self.qkd_flags(published), *record["embeddings"]["flags"]],
                                                                qkd_folder, all_4bit_gate=record["embeddings"]["gate"])
            qkd_folder = Path(record["mixed_precision"].get("published", qkd_folder))
        return published, qkd_folder

    def search_8bit_layers(self, flags: list, all_4bit: Path, all_4bit_gate: Optional[dict] = None) -> dict:
        """Bits under the gate: when the QKD model ``all_4bit`` (every Linear in 4 bits; its gate entry
        ``all_4bit_gate`` when measured already) misses the target, the fewest Linears kept at 8 bits (largest 4-bit
        output error first) that meet it, by stage 10 with --keep_8bit_layers over ``eight_bit_ladder``. The winner is
        published as a new qkd_4bit checkpoint, which stages 12 and 13 then export."""
        result = {"all_4bit": all_4bit_gate or self.gate.of_folder(all_4bit)}
        if result["all_4bit"]["passes"]:
            result["why"] = "4 bits everywhere keeps the target; no Linear needs 8 bits"
            print(f"QKD-4bit with every Linear in 4 bits passes the gate (retention {result['all_4bit']['retention']:.4f})",
                  flush=True)
            return result
        ladder = eight_bit_ladder(len(read_record(all_4bit)["quantization"]["modules"]))
        print(f"QKD-4bit with every Linear in 4 bits fails the gate (retention {result['all_4bit']['retention']:.4f}); "
              f"searching the 8-bit Linear counts {ladder}", flush=True)
        tried: dict[int, dict] = {}

        def passes(index: int) -> bool:
            [folder] = self.steps.run(FINISHING_SCRIPTS[0], *flags, "--keep_8bit_layers", ladder[index],
                                      output_dir=self.work / "mixed" / f"8bit-{ladder[index]}")
            tried[index] = {"layers_8bit": ladder[index], **self.gate.of_folder(folder)}
            print(f"{ladder[index]} Linear(s) at 8 bits: retention {tried[index]['retention']:.4f}, "
                  f"{'passes' if tried[index]['passes'] else 'fails'}", flush=True)
            return tried[index]["passes"]

        index = bisect_ladder(len(ladder), passes, self.out_of_time)
        result["tried"] = [tried[i] for i in sorted(tried)]
        # counts after the last passing one (or from the ladder's first) up to the first that failed were never tried:
        # the bisection stopped on the time budget before it settled
        passing = -1 if index is None else index
        untried = [ladder[i] for i in itertools.takewhile(lambda i: i not in tried, range(passing + 1, len(ladder)))]
        if index is None:
            counts = [entry["layers_8bit"] for entry in result["tried"]]
            why = (f"no count of 8-bit Linears tried ({counts}) keeps the target" if not untried else
                   f"--time_budget_s ran out with {len(counts)} of the 8-bit Linear counts {ladder} tried ({counts}, "
                   f"none passing; {resume_advice(self.work)})")
            result["why"] = f"{why}; stages 12 and 13 export the all-4-bit model and the gate judges their files"
            return result
        published = publish_copy(tried[index]["folder"], "qkd_4bit")
        tried_summary = ", ".join(f"{entry['layers_8bit']} {'pass' if entry['passes'] else 'fail'}" for entry in result["tried"])
        settled = not untried
        fewest = ("the fewest Linears at 8 bits that keep the target" if settled else
                  f"the fewest Linears at 8 bits found to keep the target before --time_budget_s ran out (counts "
                  f"{untried} not tried; {resume_advice(self.work)})")
        result.update(chosen=ladder[index], published=str(published), settled=settled,
                      why=f"{fewest}, largest 4-bit output error first (tried {tried_summary})")
        print(f"Published the QKD model with {ladder[index]} Linear(s) at 8 bits as {published}", flush=True)
        return result


def gate_files(new_folders: dict, teacher: ModelRuntime, gate: ValidationGate, config: CompressConfig) -> list[dict]:
    """Every model file the finishing stages wrote, gated on validation, then the passing ones timed round-robin."""
    entries, models = [], {}
    for stage, folders in new_folders.items():
        for folder in folders:
            record = read_record(folder)
            names = list(record.get("files", {})) or [None]
            for name in names:
                model = ModelRuntime(folder, name, spinning=False, num_threads=2)
                label = f"{stage}/{folder.name}/{name}" if name else f"{stage}/{folder.name}"
                entry = gate.of_folder(folder, model)
                entries.append({"name": label, "stage": stage, "file": name, **entry})
                if entry["passes"]:
                    models[label] = model
    runners = {"teacher": teacher.runner(teacher.batch(config.latency_batch_size, config.latency_seq_length))}
    runners.update({label: model.runner(model.batch(config.latency_batch_size, config.latency_seq_length))
                    for label, model in models.items()})
    timing = interleaved_latency(runners, 2, config.latency_rounds, config.latency_batch_size, reference="teacher")
    for entry in entries:
        measured = timing.get(entry["name"])
        entry["latency_ms"] = measured["latency_ms_median"] if measured else None  # a file that fails is not timed
        entry["latency_iqr_ms"] = [measured["latency_ms_p25"], measured["latency_ms_p75"]] if measured else None
        entry["speedup_vs_teacher"] = measured.get("speedup_vs_reference_median") if measured else None
    return entries
