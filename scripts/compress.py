"""Compression toward a target: keep a share of the teacher's accuracy, win latency or size, and let the search pick.

Reads:  the newest results/teacher/ and results/student/ checkpoints (run stages 1 and 2 first; stage 2 can distil on
        unlabelled text, --unlabeled_dataset), or with --student_model_path another student or the teacher's own folder
        (the search then prunes the teacher at full depth, no stage 2), and the data flags they were made with, which
        go to every stage run (--seed, --vocabulary_min_count and --hidden_sparsity go to every stage-8 candidate, --seed,
        --unlabeled_dataset and --max_unlabeled_samples to stage 10 too).
Does:   1. measures the teacher on the validation split (per example, for the paired noise of the gate), and gates the
           unpruned student as a reference; when even it misses the target and it was found by itself (no
           --student_model_path), stage 2 distils deeper students with its flags (--deeper_students: the depths between
           the student's and the teacher's, by bisection, in results/compress/<run_id>/students/; one that an earlier
           run distilled with the same command is reused, --reuse_students) and the candidates prune the shallowest
           that passes; when none does, the teacher at full depth (--teacher_fallback; false:
           the student anyway, with a warning before any training);
        2. searches the ladder --sparsities by bisection: each candidate is a stage-8 run removing that share of the
           heads and FFN neurons (results/compress/<run_id>/candidates/), judged on validation by the retention gate
           (common/search.py: its paired difference from --target_retention x the teacher must stay above 0 by
           --gate_z standard errors) and timed in ONNX Runtime dynamic int8 against the torch teacher (that int8 copy
           gated on validation too: --finish false delivers the copy of a candidate that passes both; with --finish
           false or --optimize latency, whose fast files are int8, a candidate passes only when both do; with
           --optimize size the torch gate alone decides); the most compressed candidate that passes wins
           (accuracy falls as the share grows, so about log2(n + 1) runs);
           when every share fails and the unpruned student passes, smaller shares below the ladder are bisected too
           (--extend_ladder) before the search refuses;
           With --drop_layers 0 1 ... each depth (whole student layers dropped first) gets its own bisection and the
           depths' winners compete on the objective (int8 speed-up against the teacher, or size). Before training a
           candidate, its int8 latency is predicted from the machine's latency table of layer shapes
           (common/latency_table.py, --latency_table); with --optimize latency one that cannot beat the fastest
           passing candidate by 10% is not trained;
        3. (--finish; common/finishing.py) copies the winner into results/pruned/ as its newest checkpoint, runs
           stage 10 (QKD-4bit) on it
           (with --optimize size first with ternary word-embedding rows, --size_embeddings, the most frequent tokens'
           rows at int4, --size_int4_rows, each count of that ladder in turn; int4 rows when those miss the gate);
           when that all-4-bit model fails the
           gate, stage 10 runs the same way on the next candidate that passed (--qkd_retreats; a smaller share, in
           results/compress/<run_id>/retreat/), which is published and exported instead when its QKD model passes;
           otherwise (--mixed_precision) reruns stage 10 on the winner with --keep_8bit_layers
           (largest 4-bit error first, by bisection over all, half, ... one) and publishes the fewest that pass (the
           fewest found so far when --time_budget_s stops it, and the record says so); then
           runs stages 12 (ONNX; with --optimize size its 4-bit files keep only the position rows of --max_length
           tokens) and 13 (OpenVINO) as they run alone, gates every file they wrote the same way, times
           those that pass round-robin at --latency_batch_size x --latency_seq_length, and delivers the fastest
           (--optimize latency; of the files whose median lies within the fastest's interquartile range, the
           smallest) or the smallest (--optimize size) within --max_latency_ms / --max_size_mb; the record
           also names the file the other objective would deliver (by_objective).
        4. (--resume results/compress/<run_id>) reuses every stage run of that earlier run whose command this run repeats
           exactly (its trace records each one with its flags and folders): a run that stopped continues where it
           stopped, and the same search finishes for another --optimize, target or gate without retraining; the gate
           and the timing are measured again.
Writes: results/latency_tables/<key>.json (once per machine and architecture), results/compress/<run_id>/students/
        layers-<n>/ (the deeper students, when distilled), results/compress/<run_id>/retreat/<candidate>/ (stage 10
        on the next passing candidate, --qkd_retreats), results/compress/<run_id>/search.json
        (written after every stage run, then at the end: target, gate, every candidate and file with its validation
        accuracy, retention, margin, size and latency, the winner and why, every stage run and its folders, wall
        time), search.md and search.png (the trace);
        the winner's compression.json gets the same record under "search". Refuses with the closest candidate or file
        when nothing keeps the target or fits the budgets. The search never reads the test split; afterwards
        scripts/compress_summary.py measures on test what each objective picked, over runs (seeds).

Run as:
    make compress
    python scripts/compress.py --target_retention 0.99 --optimize latency
    python scripts/compress.py --target_retention 0.98 --optimize size --max_size_mb 5 --sparsities 0.5 0.6 0.7 0.8
    python scripts/compress.py --time_budget_s 3600 --max_train_samples 1200 --pruning_epochs 2
    python scripts/compress.py --target_retention 0.98 --drop_layers 0 1 --sparsities 0.2 0.3 0.4
    python scripts/compress.py --hidden_sparsity 0.25 --sparsities 0.2 0.3 0.4   # every candidate a quarter narrower
    python scripts/compress.py --target_retention 0.98 --student_model_path results/teacher/<run> --max_train_samples 1200
    python scripts/compress.py --optimize size --resume results/compress/<the latency run>
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import parse_config, stages  # noqa: E402
from common.architecture import num_layers  # noqa: E402
from common.checkpoints import (  # noqa: E402
    RECORD_FILE,
    find_checkpoint,
    new_run_id,
    read_record,
    results_root,
    write_json,
)
from common.config import OBJECTIVES, CompressConfig, DataConfig  # noqa: E402
from common.data import load_splits  # noqa: E402
from common.evaluation import interleaved_latency  # noqa: E402
from common.experiments import dynamic_int8_copy  # noqa: E402
from common.finishing import (  # noqa: E402
    FINISHING_SCRIPTS,
    Finishing,
    ValidationGate,
    gate_files,
    publish_winner,
    resume_advice,
    validation_correct,
)
from common.latency_table import latency_table, predict_ms  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402
from common.models import count_parameters, model_skeleton  # noqa: E402
from common.pruning.hidden import hidden_width_to_keep  # noqa: E402
from common.runtime import ModelRuntime  # noqa: E402
from common.search import (  # noqa: E402
    bisect_sparsities,
    choose_file,
    depth_winner,
    examples_to_pass,
    expected_latency,
    int8_copy_reason,
    qualifies,
)
from common.search_trace import candidate_name, gate_word, plot_search, search_markdown, start_name  # noqa: E402
from common.stage_steps import StageSteps, earlier_steps  # noqa: E402
from common.student_depth import deeper_student_args, shallowest_passing_depth, why_not_deeper  # noqa: E402

PRUNING_SCRIPT = "8_pruning_with_finetuning.py"
STUDENT_SCRIPT = stages.script_for("student")
IN_PROGRESS = "in progress (if this run stopped, continue it with --resume and this folder)"


def export_flags(script: str, config: CompressConfig, data_config: DataConfig) -> list:
    """--optimize size: stage 12's 4-bit files keep only the position rows of --max_length tokens, the sequences the
    search measured them on (the shipped tokenizer truncates there), so no prediction changes, and store the pooler in
    int4 rows (the gate judges the files stage 12 writes)."""
    if config.optimize == "size" and script == FINISHING_SCRIPTS[1]:
        return ["--max_positions", data_config.max_length, "--leftover_matrix_bits", 4]
    return []


def training_flags(config: CompressConfig) -> list:
    """The flags every stage-8 candidate shares with stage 10: --seed and the unlabelled texts."""
    flags = [] if config.seed is None else ["--seed", config.seed]
    if config.unlabeled_dataset is not None:
        flags += ["--unlabeled_dataset", config.unlabeled_dataset]
    if config.max_unlabeled_samples is not None:
        flags += ["--max_unlabeled_samples", config.max_unlabeled_samples]
    return flags


def candidate_args(config: CompressConfig, forwarded: list, student: Path, teacher: Path, drop: int, sparsity: float) -> list:
    """Stage 8's flags for one candidate (without --output_dir): what --resume compares to reuse a trained one."""
    vocabulary = [] if config.vocabulary_min_count is None else ["--vocabulary_min_count", config.vocabulary_min_count]
    width = [] if config.hidden_sparsity is None else ["--hidden_sparsity", config.hidden_sparsity]
    epochs = ["--num_epochs", config.pruning_epochs] if config.pruning_epochs else []
    return [*forwarded, *training_flags(config), *vocabulary, "--student_model_path", student, "--teacher_model_path",
            teacher, "--head_final_sparsity", sparsity, "--ffn_final_sparsity", sparsity, "--final_sparsity", sparsity,
            "--drop_layers", drop, *width, *epochs]


def previous_run(config: CompressConfig, teacher: Path, student: Path) -> tuple[dict, list[dict]]:
    """The trace of --resume and its stage runs, refused when it used another teacher or student (then nothing could
    match). Traces written before stage runs were recorded give their candidates' stage-8 commands rebuilt from their
    own config (those runs let stage 8 find the newest teacher, the one their trace names)."""
    folder = Path(config.resume).expanduser().resolve()
    try:
        record = json.loads((folder / "search.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--resume {folder}: its search.json is not valid JSON ({error}); start without --resume.") from error
    how = {"teacher": "compress.py uses the newest results/teacher/ run: resume where that teacher is the newest",
           "student": "pass its --student_model_path"}
    for role, used, now in (("teacher", record.get("teacher"), teacher), ("student", record.get("student"), student)):
        if used != str(now):
            raise ValueError(f"--resume {folder} searched with the {role} {used}, and this run would use {now}; none of "
                             f"its stage runs could be reused. To resume it, {how[role]}; or start without --resume.")
    if "steps" in record:
        return record, record["steps"]
    if not isinstance(record.get("config"), dict) or not isinstance(record.get("candidates"), list):
        raise ValueError(f"--resume {folder}: its search.json names no config and candidates, so compress.py cannot tell "
                         "what it ran; start without --resume.")
    fields = {field.name for field in dataclasses.fields(CompressConfig)}
    old = CompressConfig(**{key: value for key, value in record["config"].items() if key in fields})
    return record, [{"script": PRUNING_SCRIPT, "folders": [c["folder"]], "seconds": None,
                     "args": [str(arg) for arg in candidate_args(old, record.get("data_flags", []), student, teacher,
                                                                 c["drop_layers"], c["sparsity"])]}
                    for c in record["candidates"]]


def data_flags(argv: list[str]) -> list[str]:
    """The data flags of the command line (DataConfig's fields), passed on to every stage run as given."""
    names = {f"--{field.name}" for field in dataclasses.fields(DataConfig)} | {"--config"}
    forwarded, keep = [], False
    for token in argv:
        if token.startswith("--"):
            keep = token.split("=")[0] in names
        if keep:
            forwarded.append(token)
    return forwarded


def int8_latency(candidate: ModelRuntime, teacher: ModelRuntime, config: CompressConfig, gate_int8) -> dict:
    """ONNX Runtime dynamic int8 of a candidate (loaded in torch), timed round-robin with the torch teacher and gated
    by ``gate_int8`` (the file --finish false delivers is this one, so its own accuracy is what counts)."""
    with dynamic_int8_copy(candidate, config.latency_seq_length) as int8:
        int8_gate = gate_int8(int8)
        runners = {name: model.runner(model.batch(config.latency_batch_size, config.latency_seq_length))
                   for name, model in (("teacher", teacher), ("candidate", int8))}
        timing = interleaved_latency(runners, 2, config.latency_rounds, config.latency_batch_size, reference="teacher")
        size = int8.size_bytes / 1e6
    return {"int8_latency_ms": timing["candidate"]["latency_ms_median"],
            "int8_latency_iqr_ms": [timing["candidate"]["latency_ms_p25"], timing["candidate"]["latency_ms_p75"]],
            "int8_speedup_vs_teacher": timing["candidate"].get("speedup_vs_reference_median"),
            "teacher_latency_ms": timing["teacher"]["latency_ms_median"], "int8_size_mb": size, "int8_gate": int8_gate}


def main() -> None:
    argv = sys.argv[1:]
    data_config, config = parse_config(DataConfig, CompressConfig, args=argv)
    forwarded = data_flags(argv)
    teacher_folder = find_checkpoint("teacher")
    student_folder = find_checkpoint("student", config.student_model_path, stages.PRUNABLE_STAGES)
    student_layers, hidden_width = start_shape(student_folder, config)
    # --resume: refused before any work when it pruned another start; checked again if the gate settles another one
    checked_start = resumed_start(config, teacher_folder, student_folder) if config.resume else None
    previous, previous_steps = previous_run(config, teacher_folder, checked_start) if config.resume else ({}, [])
    started = time.time()
    data = load_splits(data_config)
    teacher = ModelRuntime(teacher_folder, spinning=False)
    teacher_correct = validation_correct(teacher, teacher_folder, data.validation, data_config.max_length)
    gate = ValidationGate(teacher_correct, data.validation, data_config.max_length, config.target_retention, config.gate_z)
    print(f"Teacher {teacher_folder}: validation accuracy {teacher_correct.mean():.4f}; target "
          f"{config.target_retention} of it = {config.target_retention * teacher_correct.mean():.4f}, gate z = {config.gate_z}")
    as_own_student = student_folder.resolve() == teacher_folder.resolve()  # the candidates prune the teacher
    if as_own_student:  # the teacher was measured just above
        student_gate = gate.entry(teacher, teacher_correct)
    else:
        student_gate = gate.of_folder(student_folder)
    print(start_line(as_own_student, student_folder, student_gate), flush=True)
    work = results_root() / "compress" / new_run_id()
    record = {"target_retention": config.target_retention, "optimize": config.optimize, "gate_z": config.gate_z,
              "budgets": {"max_latency_ms": config.max_latency_ms, "max_size_mb": config.max_size_mb},
              "teacher": str(teacher_folder), "student": str(student_folder), "seed": config.seed,
              "resumed_from": config.resume and str(Path(config.resume).expanduser().resolve()),
              "config": dataclasses.asdict(config), "data_flags": forwarded, "as_own_student": as_own_student}
    steps = StageSteps(previous_steps, on_step=lambda: write_progress(work, record, steps), trace_folder=work)

    def out_of_time() -> bool:
        return config.time_budget_s is not None and time.time() - started > config.time_budget_s

    record["deeper_students"] = deeper_students(
        config, steps, forwarded, work, student_folder, student_gate, as_own_student, teacher_folder,
        gate.of_folder, out_of_time)
    if record["deeper_students"] and record["deeper_students"]["chosen"]:
        chosen_student = record["deeper_students"]["chosen"]
        student_folder, student_gate = Path(chosen_student["folder"]), chosen_student
        student_layers, hidden_width = start_shape(student_folder, config)
        print(start_line(as_own_student, student_folder, student_gate), flush=True)
    fallback = teacher_fallback(config, student_folder, student_gate, as_own_student)
    if fallback:
        print(f"Start: {fallback['why']}.", flush=True)
        student_folder, as_own_student = teacher_folder, True
        student_layers, hidden_width = start_shape(student_folder, config)
        student_gate = gate.entry(teacher, teacher_correct)
        print(start_line(as_own_student, student_folder, student_gate), flush=True)
    if config.resume and student_folder != checked_start:  # refuses: that run's stage-8 runs pruned another start
        previous, _ = previous_run(config, teacher_folder, student_folder)
    record.update(student=str(student_folder), as_own_student=as_own_student, start_fallback=fallback)
    start, start_capitalized = start_name(as_own_student), start_name(as_own_student, capitalized=True)
    if not student_gate["passes"]:
        print(f"Note: {start} already misses the target by the gate. Pruned candidates seldom beat it, so "
              f"the search may find none; the gate's margin on {teacher_correct.size} validation examples is "
              f"{student_gate['margin_points']:.2f} points at --gate_z {config.gate_z}. "
              f"{split_size_hint(start_capitalized, student_gate, teacher_correct.size, config.gate_z)}"
              f"{teacher_hint(as_own_student, teacher_folder)}", flush=True)
    ladder = sorted(config.sparsities)
    copy_reason = int8_copy_reason(config.finish, config.optimize)  # None: the torch gate alone decides
    candidates: dict[tuple[int, float], dict] = {}  # (layers dropped, sparsity) -> its entry
    not_trained: dict[tuple[int, float], dict] = {}
    table = None
    if config.latency_table:
        table = latency_table(student_folder, config.latency_batch_size, config.latency_seq_length, config.latency_rounds,
                              hidden_width=hidden_width)
        how = "read from the cache" if table["cached"] else f"built in {table['build_seconds']} s"
        print(f"Latency table of layer shapes at residual width {table['key']['hidden']} ({how}): {table['path']}", flush=True)

    def predicted_ms(drop: int, sparsity: float) -> float:
        """The candidate's int8 latency from the table, its kept heads and neurons spread evenly over its layers."""
        layers = student_layers - drop
        heads = max(1.0, (1 - sparsity) * table["key"]["heads"])
        return predict_ms(table, [heads] * layers, [max(1.0, (1 - sparsity) * table["key"]["ffn"])] * layers)

    def cannot_win(drop: int, sparsity: float) -> bool:
        """--optimize latency: the candidate is predicted (scaled by the measured/predicted ratio so far) slower than the
        fastest passing candidate by more than 10%, so training it cannot change the winner."""
        passing = [c["int8_latency_ms"] for c in candidates.values() if c["qualifies"]]
        if table is None or config.optimize != "latency" or not passing:
            return False
        timed = [(c["int8_latency_ms"], c["predicted_int8_latency_ms"]) for c in candidates.values()]
        expected, scale = expected_latency(predicted_ms(drop, sparsity), timed)
        if expected <= 1.1 * min(passing):
            return False
        not_trained[(drop, sparsity)] = {"drop_layers": drop, "sparsity": sparsity, "predicted_int8_latency_ms": expected,
                                         "why": f"predicted {expected:.2f} ms (scaled by {scale:.2f}), slower than the "
                                                f"fastest passing candidate ({min(passing):.2f} ms) by more than 10%"}
        print(f"Not training sparsity {sparsity:.2f} with {drop} layer(s) dropped: {not_trained[(drop, sparsity)]['why']}",
              flush=True)
        return True

    def try_candidate(drop: int, sparsity: float) -> bool:
        if cannot_win(drop, sparsity):
            return True  # as far as winning goes it is settled: the bisection looks at more compressed candidates
        name = f"drop-{drop}-sparsity-{sparsity:.2f}" if drop else f"sparsity-{sparsity:.2f}"
        [folder] = steps.run(PRUNING_SCRIPT, *candidate_args(config, forwarded, student_folder, teacher_folder, drop, sparsity),
                             output_dir=work / "candidates" / name)
        model = ModelRuntime(folder, spinning=False)
        entry = {"drop_layers": drop, "sparsity": sparsity, "folder": str(folder),
                 "layers": num_layers(model.torch_model),
                 "parameters": count_parameters(model.torch_model),
                 **gate.of_model(model, folder),
                 **int8_latency(model, teacher, config, lambda int8: gate.of_model(int8, folder)),
                 "seconds_since_start": round(time.time() - started)}
        if table is not None:
            entry["predicted_int8_latency_ms"] = predicted_ms(drop, sparsity)
        entry["qualifies"] = qualifies(entry, copy_reason is not None)
        candidates[(drop, sparsity)] = entry
        print(f"Candidate {candidate_name(entry)}: validation {entry['validation_accuracy']:.4f} (retention "
              f"{entry['retention']:.4f}, margin {entry['margin_points']:.2f} points) -> "
              f"{'passes' if entry['passes'] else 'fails'} the gate; int8 {entry['int8_latency_ms']:.2f} ms, "
              f"{entry['int8_size_mb']:.2f} MB", flush=True)
        if entry["passes"] and not entry["qualifies"]:
            print(f"Its ONNX Runtime int8 copy fails the gate (retention {entry['int8_gate']['retention']:.4f}) and "
                  f"{copy_reason}: the search counts the candidate as failing and looks at less compressed shares.",
                  flush=True)
        return entry["qualifies"]

    cut_by_time: list[int] = []  # the depths whose bisection the budget stopped with candidates left to try

    def budget_spent(drop: int) -> bool:  # bisect_ladder asks only while candidates are left to try
        if out_of_time():
            cut_by_time.append(drop)
            return True
        return False

    depth_winners = []
    for drop in sorted(config.drop_layers):
        # below the ladder only from an unpruned start that passes: a smaller share keeps more of it
        extend = config.extend_ladder if drop == 0 and student_gate["passes"] else 0
        bisect_sparsities(ladder, lambda sparsity: try_candidate(drop, sparsity), lambda: budget_spent(drop), extend,
                          on_extend=lambda below: note_extension(record, drop, ladder, below, config.extend_ladder, start))
        winner = depth_winner(candidates, drop)
        if winner is not None:
            depth_winners.append(winner)
    tried = [candidates[key] for key in sorted(candidates)]
    record.update(student_gate=student_gate, teacher_validation_accuracy=float(teacher_correct.mean()),
                  validation_examples=int(teacher_correct.size), ladder=ladder, drop_layers=sorted(config.drop_layers),
                  candidates=tried, not_trained=[not_trained[key] for key in sorted(not_trained)],
                  latency_table=None if table is None else {key: table[key] for key in ("path", "cached", "build_seconds", "key")})
    budget_note = ""
    if cut_by_time:
        budget_note = time_budget_note(config, work, len(tried))
        record["time_budget_cut"] = {"drop_layers": cut_by_time, "candidates_trained": len(tried), "note": budget_note}
        print(budget_note, flush=True)
    below_ladder = record.get("ladder_extension", {}).get("sparsities", [])
    if not depth_winners:
        record.update(status="no candidate keeps the target", wall_time_s=round(time.time() - started))
        write_trace(work, record, steps)
        closest = max(tried, key=lambda entry: entry["retention"], default=None)
        hint = "" if closest is None else (f" The closest: {candidate_name(closest)}, retention "
                                           f"{closest['retention']:.4f} (lower bound {closest['lower_bound_points']:+.2f} points).")
        # the margin is the paired noise of a model against the teacher: the teacher as its own student has almost none
        margin_of = closest or student_gate
        hint += (f" {start_capitalized} keeps {student_gate['retention']:.4f} (lower bound "
                 f"{student_gate['lower_bound_points']:+.2f} points); the gate's margin is {margin_of['margin_points']:.2f} "
                 f"points at --gate_z {config.gate_z} on {teacher_correct.size} validation examples"
                 f"{' for the closest candidate' if closest else ''}.")
        if not margin_of["passes"]:
            hint += " " + split_size_hint("The closest" if closest else start_capitalized, margin_of, teacher_correct.size,
                                          config.gate_z)
        if not student_gate["passes"]:
            hint += teacher_hint(as_own_student, teacher_folder)
        if budget_note:
            hint += " " + budget_note
        depths = "" if config.drop_layers == [0] else f" (--drop_layers {sorted(config.drop_layers)})"
        below = f" nor of the smaller shares {below_ladder} tried below them (--extend_ladder)" if below_ladder else ""
        copies_failed = [candidate_name(c) for c in tried if c["passes"] and not c["qualifies"]]
        if copies_failed:
            hint += (f" {', '.join(copies_failed)} passed in torch, but not their ONNX Runtime int8 copies, which "
                     f"count because {copy_reason}; with --optimize size (and --finish true, the default) the torch "
                     f"model's gate alone decides.")
        raise ValueError(f"No stage-8 candidate of --sparsities {ladder}{depths}{below} keeps "
                         f"{config.target_retention} of the teacher's validation accuracy{' in the time budget' if cut_by_time else ''}."
                         f"{hint} Lower --target_retention or --gate_z, add smaller shares to --sparsities, or hold out "
                         f"a larger validation split (--validation_fraction, which means retraining stages 1 and 2). "
                         f"Trace: {work / 'search.json'}")
    if config.optimize == "latency":  # each candidate was timed against the teacher in its own rounds: compare ratios
        chosen = max(depth_winners, key=lambda entry: entry["int8_speedup_vs_teacher"])
        per_depth = "; ".join(f"{candidate_name(c)}: {c['int8_speedup_vs_teacher']:.2f}x the teacher" for c in depth_winners)
    else:
        chosen = min(depth_winners, key=lambda entry: entry["int8_size_mb"])
        per_depth = "; ".join(f"{candidate_name(c)}: {c['int8_size_mb']:.2f} MB" for c in depth_winners)
    summary = ", ".join(f"{candidate_name(c)} {gate_word(c)}" for c in tried)
    record["winner"] = {"sparsity": chosen["sparsity"], "drop_layers": chosen["drop_layers"], "name": candidate_name(chosen), "why": (
        f"of each depth's most compressed candidate that passes the gate"
        f"{f' with its int8 copy ({copy_reason})' if copy_reason else ''} ({per_depth}), the "
        f"{'fastest in ONNX Runtime int8' if config.optimize == 'latency' else 'smallest in ONNX Runtime int8'} (tried "
        f"{len(tried)} of {len(ladder) * len(config.drop_layers) + len(below_ladder)} by bisection: {summary})"
        f"{'. ' + budget_note if budget_note else ''}")}
    if not config.finish:
        delivered, reason = deliver(search_only_files(record["candidates"]), config, record, work, steps, started)
        record.update(status="search only (--finish false)", delivered=delivered, delivered_why=reason,
                      wall_time_s=round(time.time() - started))
        write_trace(work, record, steps)
        return
    published = publish_winner(chosen["folder"], previous)
    record.update(published=str(published), published_from=chosen["folder"])

    def qkd_flags(pruned: Path) -> list:
        return [*forwarded, *training_flags(config), "--pruned_model_path", pruned, "--teacher_model_path",
                teacher_folder, *(["--num_epochs", config.qkd_epochs] if config.qkd_epochs else [])]

    finishing = Finishing(steps, gate, config, work, out_of_time, qkd_flags, previous)
    published, qkd_folder = finishing.quantize_winner(record, tried, chosen, published)
    exported = []
    for script in FINISHING_SCRIPTS[1:]:
        exported += steps.run(script, *forwarded, "--source_model_path", published, "--qkd_model_path", qkd_folder,
                              *export_flags(script, config, data_config))
    folders_by_stage: dict[str, list[Path]] = {}
    for folder in [qkd_folder, *exported]:  # the QKD model runs in torch too
        folders_by_stage.setdefault(read_record(folder)["stage"], []).append(folder)
    files = gate_files(folders_by_stage, teacher, gate, config)
    record["files"] = files
    delivered, reason = deliver(files, config, record, work, steps, started)
    record.update(status="delivered", delivered=delivered, delivered_why=reason, wall_time_s=round(time.time() - started))
    write_trace(work, record, steps)
    compression = json.loads((published / RECORD_FILE).read_text())
    compression["search"] = {key: value for key, value in record.items() if key not in ("config", "steps")}
    write_json(published / RECORD_FILE, compression)


def start_shape(folder: Path, config: CompressConfig) -> tuple[int, int | None]:
    """The start's layer count and the residual width its candidates keep (--hidden_sparsity), refusing --drop_layers
    that would leave no layer; from the config and a weightless skeleton, before any work."""
    skeleton = model_skeleton(folder)
    layers = num_layers(skeleton)
    # stage 8 would refuse a width it cannot keep, after the teacher's evaluation here; the latency table times it
    hidden_width = hidden_width_to_keep(skeleton, config.hidden_sparsity) if config.hidden_sparsity else None
    if max(config.drop_layers) >= layers:
        raise ValueError(f"--drop_layers {max(config.drop_layers)} would leave none of the {layers} layers of the "
                         f"student {folder}; give values from 0 to {layers - 1}.")
    return layers, hidden_width


def resumed_start(config: CompressConfig, teacher: Path, student: Path) -> Path:
    """The start the --resume run's candidates pruned, as far as this run can tell before its gate: the teacher where
    that run pruned the teacher and this one may fall back to it (--teacher_fallback, no --student_model_path), the
    deeper student it distilled from this student where this run may do the same (--deeper_students), else the
    student. previous_run checks again once the start is settled."""
    try:
        trace = json.loads((Path(config.resume).expanduser() / "search.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return student  # previous_run says what is wrong with it
    if not isinstance(trace, dict) or config.student_model_path is not None:
        return student
    if config.teacher_fallback and trace.get("student") == str(teacher):
        return teacher
    deeper = trace.get("deeper_students")
    if (config.deeper_students and isinstance(deeper, dict) and deeper.get("found_student") == str(student)
            and isinstance(deeper.get("chosen"), dict) and trace.get("student") == deeper["chosen"].get("folder")):
        return Path(trace["student"])
    return student


def deeper_students(config: CompressConfig, steps: StageSteps, forwarded: list, work: Path, student: Path,
                    student_gate: dict, as_own_student: bool, teacher: Path, gate: Callable[[Path], dict],
                    out_of_time: Callable[[], bool]) -> dict | None:
    """--deeper_students: when the student found by itself (no --student_model_path) misses the target unpruned,
    stage 2 again with that student's flags and more teacher layers, by bisection over the depths between the two
    (common/student_depth.py), each gated like the student. Returns the record (``chosen``: the shallowest passing
    student's gate entry, or None), or None when it does not apply."""
    if student_gate["passes"] or as_own_student or config.student_model_path is not None or not config.deeper_students:
        return None
    recorded = read_record(student).get("config") or {}
    student_layers, teacher_layers = num_layers(model_skeleton(student)), num_layers(model_skeleton(teacher))
    entry = {"found_student": str(student), "found_gate": student_gate, "tried": [], "chosen": None}
    cannot = why_not_deeper(recorded, student_layers, teacher_layers)
    if cannot:
        entry["why"] = f"no deeper student: {cannot}"
        print(f"Start: {entry['why']}.", flush=True)
        return entry
    if config.reuse_students:  # the resumed run's own steps are offered already, and first
        resumed = Path(config.resume).expanduser() if config.resume else None
        steps.share(earlier_steps(work.parent, STUDENT_SCRIPT, exclude=resumed))
    print(f"Start: the student {student} ({student_layers} layers) misses the target by the gate, so stage 2 distils "
          f"deeper students with its flags (between {student_layers + 1} and {teacher_layers - 1} of the teacher's "
          f"{teacher_layers} layers, by bisection) before any pruning; --deeper_students false skips this.", flush=True)
    by_depth = {}

    def passes(layers: int) -> bool:
        [folder] = steps.run(STUDENT_SCRIPT, *forwarded, *deeper_student_args(recorded, layers, teacher),
                             output_dir=work / "students" / f"layers-{layers}")
        by_depth[layers] = {"layers": layers, **gate(folder)}
        entry["tried"].append(by_depth[layers])
        print(f"Deeper student, {layers} layers: {start_line(False, folder, by_depth[layers])}", flush=True)
        return by_depth[layers]["passes"]

    chosen = shallowest_passing_depth(student_layers, teacher_layers, passes, out_of_time)
    tried = ", ".join(f"{e['layers']} layers {'pass' if e['passes'] else 'fail'}" for e in entry["tried"])
    if chosen is None and not entry["tried"]:
        entry["why"] = f"--time_budget_s {config.time_budget_s:g} ran out before any deeper student was distilled"
    elif chosen is None:
        entry["why"] = f"no deeper student passes the gate ({tried}{'; then the time budget ran out' if out_of_time() else ''})"
    else:
        entry["chosen"] = by_depth[chosen]
        entry["why"] = f"the shallowest student that passes the gate has {chosen} layers ({tried})"
    print(f"Start: {entry['why']}.", flush=True)
    return entry


def teacher_fallback(config: CompressConfig, student: Path, student_gate: dict, as_own_student: bool) -> dict | None:
    """--teacher_fallback: when the student found by itself (no --student_model_path) misses the target unpruned, the
    record of the switch to the teacher as the start (the caller switches); None when the student stays."""
    if student_gate["passes"] or as_own_student or config.student_model_path is not None or not config.teacher_fallback:
        return None
    return {"student": str(student), "student_gate": student_gate, "why": (
        f"the student {student} misses the target by the gate (retention {student_gate['retention']:.4f}, lower bound "
        f"{student_gate['lower_bound_points']:+.2f} points) and a pruned copy seldom beats its unpruned start, so the "
        f"candidates prune the teacher itself at full depth (--teacher_fallback false: the student anyway)")}


def teacher_hint(as_own_student: bool, teacher: Path) -> str:
    """Where a student misses the target unpruned: the start that can pass (none when the teacher is the start)."""
    if as_own_student:
        return ""
    return (f" A pruned copy of the teacher disagrees with it less than a student does, so its margin is smaller: "
            f"--student_model_path {teacher} searches the teacher at full depth.")


def start_line(as_own_student: bool, folder: Path, gate: dict) -> str:
    return (f"{start_name(as_own_student, capitalized=True)} {folder}, for reference: validation retention {gate['retention']:.4f}, "
            f"{'passes' if gate['passes'] else 'fails'} the gate (lower bound {gate['lower_bound_points']:+.2f} points, "
            f"margin {gate['margin_points']:.2f})")


def split_size_hint(who: str, gate: dict, examples: int, z: float) -> str:
    """Whether a larger validation split (--validation_fraction) could make a failing model pass, and about how large."""
    needed = examples_to_pass(gate, examples)
    if needed is None:
        return f"{who}'s point estimate is below the target itself, so no larger validation split would pass it."
    return (f"{who} would pass at --gate_z {z} with about {needed:,} validation examples (this split has {examples:,}), "
            f"its accuracy and spread unchanged.")


def search_only_files(candidates: list[dict]) -> list[dict]:
    """What --finish false may deliver: the ONNX Runtime int8 copies of the candidates that pass the gate, each gated
    on its own validation accuracy as well. A failing candidate's copy is left out even when its own accuracy passes:
    that is quantization noise on a structure the gate refused, and the winner is the structure."""
    return [{"name": f"candidate {candidate_name(c)} (ONNX Runtime dynamic int8)", "folder": c["folder"],
             **{key: c["int8_gate"][key] for key in ("passes", "retention", "lower_bound_points")},
             "latency_ms": c["int8_latency_ms"], "size_mb": c["int8_size_mb"]} for c in candidates if c["passes"]]


def note_extension(record: dict, drop: int, ladder: list[float], below: list[float], halvings: int,
                   start: str) -> None:
    """Says (log and record) that every share of the ladder failed at this depth and the search goes on below it."""
    why = (f"every share of --sparsities {ladder} failed the gate while {start} passes it, so the search "
           f"bisects over smaller shares {below} (--extend_ladder {halvings})")
    record["ladder_extension"] = {"drop_layers": drop, "sparsities": below, "why": why}
    print(f"{why[0].upper()}{why[1:]}", flush=True)


def time_budget_note(config: CompressConfig, work: Path, trained: int) -> str:
    """What the record and the refusal say when --time_budget_s stopped the bisection before it settled."""
    return (f"--time_budget_s {config.time_budget_s:g} ran out after {trained} stage-8 candidate(s) with more of the "
            f"ladder left to try; {resume_advice(work)}.")


def deliver(files: list[dict], config: CompressConfig, record: dict, work: Path, steps: StageSteps,
            started: float) -> tuple[dict, str]:
    """The file chosen for --optimize; the record also names what the other objective would deliver from the same
    gated files (the search before them does not depend on the objective at one depth)."""
    record["by_objective"] = {}
    choices = {}
    for objective in OBJECTIVES:
        try:
            choices[objective] = choose_file(files, objective, config.max_latency_ms, config.max_size_mb)
        except ValueError as error:
            choices[objective] = error
        chosen = choices[objective]
        record["by_objective"][objective] = None if isinstance(chosen, ValueError) else {
            key: chosen[0][key] for key in ("name", "latency_ms", "size_mb", "retention") if key in chosen[0]}
    if isinstance(choices[config.optimize], ValueError):
        record.update(status="no file keeps the target within the budgets", wall_time_s=round(time.time() - started))
        write_trace(work, record, steps)
        raise choices[config.optimize]
    return choices[config.optimize]


def write_progress(work: Path, record: dict, steps: StageSteps) -> None:
    """The trace so far (its stage runs), written after each one so that a run that stops can be resumed."""
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "search.json", {**record, "status": IN_PROGRESS, "steps": steps.steps})


def write_trace(work: Path, record: dict, steps: StageSteps) -> None:
    work.mkdir(parents=True, exist_ok=True)
    record.update(steps=steps.steps, reused_steps=steps.reused)
    write_json(work / "search.json", record)
    (work / "search.md").write_text(search_markdown(record))
    plot_search(record, work / "search.png")
    print(search_markdown(record))
    print(f"Search record: {work / 'search.json'}")


if __name__ == "__main__":
    run_tool(main)
