"""GPU check: every stage on the smoke profile on CUDA, the report's GPU rows, and the tests of the CUDA paths.

Reads:  nothing but the embedded default (or the data flags passed after the options).
Does:   without a CUDA device: says so and exits 0 having run nothing. With one: runs every stage of the run order
        with --profile smoke into a fresh folder (results/gpu_check/<run_id>/; the training stages use the GPU through
        accelerate, the report adds its GPU rows: torch fp32/fp16, bitsandbytes 4-bit, ONNX Runtime CUDA), then
        pytest on tests/test_gpu.py (logits on the GPU against the CPU for every kind of model), each step timed and
        stopped at --time_limit_s in total.
Writes: results/gpu_check/<run_id>/ (the stage folders and the report) and results/gpu_check/<run_id>/gpu_check.json:
        the device, each step's exit code and seconds, the report's GPU rows and note, and whether everything passed.

Run as:
    make gpu-check
    python scripts/gpu_check.py --time_limit_s 480
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from common import stages  # noqa: E402
from common.checkpoints import new_run_id, results_root, write_json  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402

GPU_TESTS = "tests/test_gpu.py"


def cuda_device() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_step(name: str, command: list[str], env: dict, deadline: float) -> dict:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return {"step": name, "returncode": None, "seconds": 0.0, "note": "not run: the time limit was reached"}
    print(f"==> {name}", flush=True)
    start = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=remaining)
        returncode, tail = completed.returncode, (completed.stdout + completed.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        returncode, tail = None, "stopped: the time limit was reached"
    seconds = time.monotonic() - start
    print(f"    {'passed' if returncode == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    return {"step": name, "returncode": returncode, "seconds": seconds, "output_tail": None if returncode == 0 else tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time_limit_s", type=float, default=480.0, help="Wall-clock limit of the whole check (seconds).")
    args, data_flags = parser.parse_known_args()
    if args.time_limit_s <= 0:
        parser.error(f"--time_limit_s {args.time_limit_s} must be positive, e.g. 480.")
    device = cuda_device()
    if device is None:
        import torch

        print(f"gpu-check: no GPU here (torch {torch.__version__} sees no CUDA device; CUDA build: "
              f"{torch.version.cuda or 'none'}). Nothing was run. Run it on a machine with an NVIDIA GPU.")
        return
    folder = results_root() / "gpu_check" / new_run_id()
    env = {**os.environ, "COMPRESSION_RESULTS_DIR": str(folder), "TOKENIZERS_PARALLELISM": "false"}
    deadline = time.monotonic() + args.time_limit_s
    steps = [run_step(script, [sys.executable, script, "--profile", "smoke", *data_flags], env, deadline)
             for script in stages.run_order()]
    steps.append(run_step(GPU_TESTS, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", GPU_TESTS], env, deadline))
    report_path = folder / "final_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    result = {
        "device": device,
        "steps": steps,
        "gpu_rows": [{key: row.get(key) for key in ("label", "runtime", "test_accuracy", "latency_ms_median",
                                                    "speedup_vs_gpu_reference")} for row in report.get("gpu_models", [])],
        "gpu_note": report.get("gpu"),
        "passed": all(step["returncode"] == 0 for step in steps),
    }
    write_json(folder / "gpu_check.json", result)
    for row in result["gpu_rows"]:
        print(f"    {row['label']:<60} {row['runtime']:<18} accuracy {100 * row['test_accuracy']:.2f}%  "
              f"{row['latency_ms_median']:.2f} ms")
    print(f"gpu-check on {device}: {'all passed' if result['passed'] else 'FAILED'} -> {folder / 'gpu_check.json'}")
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    run_tool(main)
