"""Target-driven compression (``scripts/compress.py``): which stage-8 candidate keeps the target, and which file ships.

- ``retention_gate``: does a model keep ``target`` of the teacher's validation accuracy, allowing for the noise of the
  validation split? Per validation example ``d = correct(model) - target * correct(teacher)``; the mean of ``d`` is
  the model's accuracy minus the target accuracy, and its standard error is that of a paired difference (examples
  both get right or both get wrong add little). The gate passes when ``mean(d) - z * SE(d) >= 0``.
- ``compare_with_teacher``: the gate with the model's accuracy and its disagreements with the teacher (fixed and
  broken), for ``scripts/retention_check.py`` on any split.
- ``examples_to_pass``: the validation split size at which a failing model's point estimate would clear the margin.
- ``bisect_ladder``: the most compressed candidate of a ladder (ordered from least to most compressed) that passes,
  in about log2(n + 1) evaluations, assuming accuracy falls as compression grows; stops early when time runs out.
- ``bisect_sparsities``: ``bisect_ladder`` over sparsities; when every one fails and the unpruned model passed,
  it bisects on over shares below the least compressed one (``extension_ladder``) instead of refusing.
- ``retreat_order``: when the winner's QKD-4bit model misses the target, the other candidates that passed, in the
  order stage 10 falls back to them (the next best for the objective first).
- ``eight_bit_ladder``: how many Linears stay at 8 bits, from all of them down to one by halving, for a bisection
  (with ``bisect_ladder``) of the fewest that keep the target when 4 bits everywhere does not.
- ``expected_latency``: a latency-table prediction scaled by the measured/predicted ratio of the candidates timed so
  far; a candidate expected slower than the fastest passing one by more than a margin cannot win (not trained).
- ``qualifies``: a candidate can win when its torch model passes the gate and, where ``int8_copy_reason`` says the
  int8 copy counts (``--finish false``, or ``--optimize latency``), its ONNX Runtime int8 copy passes too.
- ``choose_file``: among files that pass the gate, the fastest or the smallest, within hard budgets; otherwise the
  error names the closest file.
- ``smallest_within_spread``: among files whose median latency the timing cannot tell from the fastest's, the
  smallest (``choose_file`` and the export stages' ``common.exports.choose_deployment``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, TypeVar

import numpy as np

T = TypeVar("T")


def retention_gate(correct, teacher_correct, target: float, z: float) -> dict:
    """The gate of one model (per-example bools on the validation split) against the teacher's."""
    model, teacher = np.asarray(correct, dtype=float), np.asarray(teacher_correct, dtype=float)
    if model.shape != teacher.shape or model.size < 2:
        raise ValueError(f"the gate needs both models' results on the same validation examples: {model.shape} vs {teacher.shape}.")
    difference = model - target * teacher
    standard_error = float(difference.std(ddof=1) / math.sqrt(difference.size))
    lower = float(difference.mean()) - z * standard_error
    teacher_accuracy = float(teacher.mean())
    return {
        "validation_accuracy": float(model.mean()),
        "retention": float(model.mean()) / teacher_accuracy if teacher_accuracy else float("nan"),
        "target_accuracy": target * teacher_accuracy,
        "margin_points": 100 * z * standard_error,
        "lower_bound_points": 100 * lower,
        "passes": lower >= 0,
    }


def compare_with_teacher(predictions, teacher_predictions, labels, target: float, z: float) -> dict:
    """One model against its teacher on one split: its accuracy, how often it labels an example differently (split
    into fixed and broken, ``metrics.agreement``), and the retention gate of compress.py on those examples."""
    from .metrics import agreement

    predictions, teacher_predictions, labels = (np.asarray(values) for values in (predictions, teacher_predictions, labels))
    gate = retention_gate(predictions == labels, teacher_predictions == labels, target, z)
    accuracy = gate.pop("validation_accuracy")  # the entry serves any split
    return {"accuracy": accuracy, "teacher_accuracy": float((teacher_predictions == labels).mean()), **gate,
            "agreement": agreement(predictions, teacher_predictions, labels)}


def examples_to_pass(gate: dict, examples: int) -> Optional[int]:
    """About how many validation examples a model with this gate entry (measured on ``examples``) would need to pass at
    the same z, its point estimate and per-example spread unchanged (the margin shrinks as 1/sqrt(n)): ``examples``
    or fewer when it passes already; None when its point estimate is below the target, which no split size fixes."""
    point = gate["lower_bound_points"] + gate["margin_points"]
    if gate["passes"]:
        return examples if point <= 0 else min(examples, math.ceil(examples * (gate["margin_points"] / point) ** 2))
    if point <= 0:
        return None
    return math.ceil(examples * (gate["margin_points"] / point) ** 2)


def bisect_ladder(count: int, passes: Callable[[int], bool], out_of_time: Callable[[], bool] = lambda: False,
                  compressed_middle_first: bool = False) -> Optional[int]:
    """The highest index of a ladder of ``count`` candidates for which ``passes`` holds, by bisection (``passes`` is
    called about log2(count + 1) times, each index at most once); None when none passes or none was tried in time.
    ``out_of_time`` is asked before each try only, so a True answer means the bisection stopped unsettled. Where the
    remaining range has two middles, the less compressed is tried first, or the more compressed with
    ``compressed_middle_first`` (cheaper tries, as shallower students are)."""
    passing, failing = -1, count  # every index <= passing passes, every index >= failing fails (as far as tried)
    while failing - passing > 1 and not out_of_time():
        middle = (passing + failing + compressed_middle_first) // 2
        if passes(middle):
            passing = middle
        else:
            failing = middle
    return passing if passing >= 0 else None


def extension_ladder(lowest: float, halvings: int) -> list[float]:
    """Up to ``2**halvings - 1`` evenly spaced sparsities in (0, ``lowest``), least compressed first, on a grid of 0.01
    (names print two decimals), which ``bisect_ladder`` settles in ``halvings`` tries: e.g. 0.3 and 2 -> [0.08, 0.15,
    0.23]."""
    count = 2**halvings
    shares = sorted({round(lowest * step / count + 1e-9, 2) for step in range(1, count)} - {0.0})
    shares = [share for share in shares if share < lowest]
    if not shares:
        raise ValueError(f"no share on a 0.01 grid lies between 0 and sparsity {lowest}.")
    return shares


def bisect_sparsities(ladder: list[float], passes: Callable[[float], bool], out_of_time: Callable[[], bool],
                      extend_halvings: int = 0, on_extend: Callable[[list[float]], None] = lambda shares: None,
                      ) -> tuple[Optional[float], list[float]]:
    """The most compressed sparsity of ``ladder`` (ascending) for which ``passes`` holds, by ``bisect_ladder``. When none
    does, with ``extend_halvings`` > 0 (the caller knows the unpruned model passes, so a smaller share can), the shares
    of ``extension_ladder`` below the ladder are bisected the same way (``out_of_time`` asked before each try, as
    ``bisect_ladder`` does; ``on_extend`` hears the shares first). Returns (that sparsity or None, the extension's
    sparsities, empty when it was not needed or not allowed)."""
    stopped = []  # the ladder's bisection ended on the time budget, not settled: nothing to extend

    def ladder_out_of_time() -> bool:
        if out_of_time():
            stopped.append(True)
        return bool(stopped)

    found = bisect_ladder(len(ladder), lambda index: passes(ladder[index]), ladder_out_of_time)
    if found is not None or extend_halvings < 1 or stopped:
        return (None if found is None else ladder[found]), []
    try:
        below = extension_ladder(ladder[0], extend_halvings)
    except ValueError:  # the ladder already starts at the grid's smallest share
        return None, []
    on_extend(below)
    found = bisect_ladder(len(below), lambda index: passes(below[index]), out_of_time)
    return (None if found is None else below[found]), below


def int8_copy_reason(finish: bool, optimize: str) -> Optional[str]:
    """Why a candidate's ONNX Runtime int8 copy must pass the gate too for the candidate to win, or None when the
    torch model's gate alone decides (``--finish`` with ``--optimize size``, whose files are the QKD model's 4-bit
    ones). With ``--finish false`` the search delivers that copy. With ``--optimize latency`` the fast files are
    int8, and a winner whose int8 copy fails tends to leave only float files, slower than a less compressed
    candidate's int8 file (ALGORITHM_ENHANCEMENTS.md, seed 3 of the teacher as its own student at z = 1)."""
    if not finish:
        return "--finish false delivers that copy"
    if optimize == "latency":
        return "--optimize latency needs a winner whose int8 files keep the target"
    return None


def qualifies(entry: dict, copy_must_pass: bool) -> bool:
    """Whether a trained candidate can win: its torch model passes the gate and, where ``int8_copy_reason`` says so
    (``copy_must_pass``), its ONNX Runtime int8 copy passes too. A candidate whose copy fails then counts as failing
    for the bisection, which looks at less compressed shares whose copy may pass."""
    return bool(entry["passes"] and (not copy_must_pass or entry["int8_gate"]["passes"]))


def depth_winner(candidates: dict[tuple[int, float], dict], drop: int) -> Optional[dict]:
    """The most compressed trained candidate with ``drop`` layers dropped that qualifies (``qualifies``, stored as
    the entry's ``qualifies``); ``candidates`` maps (drop, sparsity) to a trained candidate's entry. A more
    compressed sparsity that the latency search skipped as unable to win counts as passing for the bisection but was
    never trained, so it cannot be the winner."""
    passing = [index for (depth, index), entry in candidates.items() if depth == drop and entry["qualifies"]]
    return candidates[(drop, max(passing))] if passing else None


def retreat_order(candidates: list[dict], winner: dict, optimize: str) -> list[dict]:
    """The trained candidates other than ``winner`` that qualify, best first for ``optimize``: the smallest ONNX Runtime
    int8 copy ('size') or the largest int8 speed-up against the teacher ('latency'), the other measure breaking ties.
    At one depth the next best is the next smaller share, which stands further above the target."""
    others = [entry for entry in candidates if entry["qualifies"] and entry["folder"] != winner["folder"]]

    def speedup(entry: dict) -> float:  # None where the timing gave no ratio: last among equals
        return entry.get("int8_speedup_vs_teacher") or 0.0

    if optimize == "latency":
        return sorted(others, key=lambda entry: (-speedup(entry), entry["int8_size_mb"]))
    return sorted(others, key=lambda entry: (entry["int8_size_mb"], -speedup(entry)))


def eight_bit_ladder(linears: int) -> list[int]:
    """Counts of 8-bit Linears from least to most compressed (all of them, then halving down to 1), the order
    ``bisect_ladder`` expects: e.g. 12 -> [12, 6, 3, 1]."""
    if linears < 1:
        raise ValueError(f"a model with {linears} quantizable Linears has nothing to keep at 8 bits.")
    counts, count = [], linears
    while count >= 1:
        counts.append(count)
        count //= 2
    return counts


def expected_latency(predicted_ms: float, timed: list[tuple[float, float]]) -> tuple[float, float]:
    """``predicted_ms`` scaled by the median measured/predicted ratio of ``timed`` ((measured, predicted) pairs of the
    candidates timed so far; 1 when there are none): (expected ms, scale)."""
    scale = float(np.median([measured / predicted for measured, predicted in timed])) if timed else 1.0
    return scale * predicted_ms, scale


def choose_file(files: list[dict], optimize: str, max_latency_ms: Optional[float] = None,
                max_size_mb: Optional[float] = None) -> tuple[dict, str]:
    """The delivered file among ``files`` ({"name", "passes", "latency_ms", "size_mb", ...}): of those that pass the gate
    and the budgets, the fastest (``optimize='latency'``) or the smallest ('size'), the other measure breaking ties.
    Raises ValueError naming the closest file when none fits."""
    keep = [entry for entry in files if entry["passes"]]
    if not keep:
        best = max(files, key=lambda entry: entry["retention"], default=None)
        closest = "" if best is None else (f" The closest: {best['name']}, retention {best['retention']:.4f} "
                                           f"(its lower bound {best['lower_bound_points']:+.2f} points from the target).")
        raise ValueError(f"No file keeps the target retention on validation.{closest} Lower --target_retention, or "
                         "add less compressed candidates to --sparsities.")
    fits = [entry for entry in keep if (max_latency_ms is None or entry["latency_ms"] <= max_latency_ms)
            and (max_size_mb is None or entry["size_mb"] <= max_size_mb)]
    if not fits:
        def excess(entry):
            over = 0.0
            if max_latency_ms is not None:
                over += max(0.0, entry["latency_ms"] / max_latency_ms - 1)
            if max_size_mb is not None:
                over += max(0.0, entry["size_mb"] / max_size_mb - 1)
            return over

        closest = min(keep, key=excess)
        budgets = ", ".join(part for part in (f"--max_latency_ms {max_latency_ms}" if max_latency_ms else "",
                                              f"--max_size_mb {max_size_mb}" if max_size_mb else "") if part)
        raise ValueError(
            f"No file that keeps the target meets {budgets}. The closest: {closest['name']} at "
            f"{closest['latency_ms']:.2f} ms and {closest['size_mb']:.2f} MB (retention {closest['retention']:.4f}). "
            "Raise the budget, lower --target_retention, or add more compressed candidates to --sparsities."
        )
    primary, secondary = ("latency_ms", "size_mb") if optimize == "latency" else ("size_mb", "latency_ms")
    chosen = min(fits, key=lambda entry: (entry[primary], entry[secondary]))
    ranked = f"the {'fastest' if optimize == 'latency' else 'smallest'} of the {len(fits)} file(s)"
    spread = chosen.get("latency_iqr_ms") if optimize == "latency" else None
    fastest = chosen
    chosen, tied = smallest_within_spread(fastest, fits, spread[1] if spread else None,
                                          median=lambda entry: entry["latency_ms"], size=lambda entry: entry["size_mb"])
    if chosen is not fastest:
        ranked = (f"the smallest of the {tied} file(s) whose median latency lies within the fastest's "
                  f"interquartile range ({fastest['name']}: {fastest['latency_ms']:.2f} ms, IQR up to "
                  f"{spread[1]:.2f}, {fastest['size_mb']:.2f} MB), of the {len(fits)}")
    reason = (f"{ranked} that keep the target on validation"
              f"{' within the budgets' if len(fits) < len(keep) or max_latency_ms or max_size_mb else ''}: "
              f"{chosen['name']} ({chosen['latency_ms']:.2f} ms, {chosen['size_mb']:.2f} MB, retention {chosen['retention']:.4f})")
    return chosen, reason


def smallest_within_spread(fastest: T, entries: list[T], spread_end: Optional[float], median: Callable[[T], float],
                           size: Callable[[T], float]) -> tuple[T, int]:
    """Sizes are exact, latencies noisy: of ``entries`` whose median latency is at most ``spread_end`` (the fastest's
    75th percentile, from the same interleaved rounds) the timing cannot rank them, so the smallest (then the faster)
    ships. Returns (that entry, how many were tied); (``fastest``, 1) when its spread was not recorded."""
    if spread_end is None:
        return fastest, 1
    tied = [entry for entry in entries if median(entry) <= spread_end]
    return min(tied, key=lambda entry: (size(entry), median(entry))), len(tied)
