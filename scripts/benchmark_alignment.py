"""Latency of aligned vs unaligned FFN widths at (nearly) equal parameter count: the measurement behind the
default of ``ffn_round_to``.

Reads:  nothing; builds MiniLM-shaped (hidden 384) 3-layer classifiers with random weights, pruned to the per-layer
        head counts and FFN widths of a stage-8 run (default: the embedded default run's [8, 8, 2] heads and
        [1334, 467, 43] neurons), and the same widths rounded to multiples of 8, 16 and 64 (nearest multiple, so the
        totals stay within a few neurons).
Does:   times each in torch fp32 and in ONNX Runtime dynamic int8 (or, with --device cuda, in torch fp16 on the GPU,
        synchronized after every call), round-robin in one process (the report's interleaved harness), on one batch
        of --batch_size x --seq_length tokens.
Writes: results/alignment_benchmark.json (results/alignment_benchmark_cuda.json with --device cuda) and prints a
        table (median ms [IQR], speed-up vs unaligned per round).

Run as:
    python scripts/benchmark_alignment.py
    python scripts/benchmark_alignment.py --ffn_widths 1536,1536,1536 --heads 12,12,12 --rounds 50
    python scripts/benchmark_alignment.py --device cuda --batch_size 256 --seq_length 128
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.architecture import apply_architecture  # noqa: E402
from common.checkpoints import results_root, write_json  # noqa: E402
from common.evaluation import interleaved_latency  # noqa: E402
from common.lifecycle import run_tool  # noqa: E402


def rounded(widths: list[int], multiple: int) -> list[int]:
    return [max(multiple, int(round(width / multiple)) * multiple) for width in widths]


def build(heads: list[int], widths: list[int], vocab_size: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=384, num_hidden_layers=len(heads), num_attention_heads=12,
                        intermediate_size=1536, num_labels=2)
    model = BertForSequenceClassification(config)
    apply_architecture(model, {"model_type": "bert", "num_layers": len(heads), "heads_per_layer": heads,
                               "ffn_width_per_layer": widths})
    return model.eval()


def cuda_runner(model, batch: dict):
    """GPU kernels run asynchronously: synchronizing after each call makes the wall clock measure the forward."""
    model = model.half().cuda()
    on_gpu = {name: value.cuda() for name, value in batch.items()}

    def run():
        model(**on_gpu)
        torch.cuda.synchronize()

    return run


def positive_integers(parser, option: str, text: str) -> list[int]:
    values = [value.strip() for value in text.split(",")]
    if not all(value.isdigit() and int(value) > 0 for value in values):
        parser.error(f"--{option} {text!r} must be positive integers separated by commas, e.g. --{option} 8,8,2.")
    return [int(value) for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default="8,8,2", help="Kept heads per layer.")
    parser.add_argument("--ffn_widths", default="1334,467,43", help="Unaligned FFN widths per layer.")
    parser.add_argument("--multiples", default="8,16,64", help="Alignments to compare.")
    parser.add_argument("--vocab_size", type=int, default=13646, help="Word-embedding rows (the pruned vocabulary).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: torch fp32 and ONNX Runtime int8; cuda: torch fp16 on the first GPU.")
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu.")
    heads, unaligned, multiples = (positive_integers(parser, option, getattr(arguments, option))
                                   for option in ("heads", "ffn_widths", "multiples"))
    if len(heads) != len(unaligned):
        parser.error(f"--heads {arguments.heads} and --ffn_widths {arguments.ffn_widths} must name the same number of layers.")
    torch.set_num_threads(arguments.num_threads)
    variants = {"unaligned": unaligned}
    for multiple in multiples:
        variants[f"round_to {multiple}"] = rounded(unaligned, multiple)

    from common.onnx_export import export_onnx
    from common.onnx_runtime import OnnxClassifier, quantize_dynamic_int8

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, arguments.vocab_size, (arguments.batch_size, arguments.seq_length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": torch.zeros_like(input_ids)}
    numpy_batch = {name: value.numpy() for name, value in batch.items()}

    class Tokenizer:  # export_onnx only needs a sample encoding with these names
        model_input_names = ["input_ids", "attention_mask", "token_type_ids"]

        def __call__(self, texts, **kwargs):
            return {name: value[: len(texts), :16] for name, value in batch.items()}

    runners, parameters = {}, {}
    runtimes = ("torch cuda fp16",) if arguments.device == "cuda" else ("torch fp32", "ORT int8")
    with tempfile.TemporaryDirectory() as scratch:
        for name, widths in variants.items():
            model = build(heads, widths, arguments.vocab_size)
            parameters[name] = sum(p.numel() for p in model.parameters())
            if arguments.device == "cuda":
                runners[f"{name}, torch cuda fp16"] = cuda_runner(model, batch)
                continue
            runners[f"{name}, torch fp32"] = lambda model=model: model(**batch)
            fp32 = Path(scratch) / f"{name.replace(' ', '_')}.onnx"
            export_onnx(model, Tokenizer(), fp32, arguments.seq_length)
            int8 = fp32.with_name(fp32.stem + "_int8.onnx")
            quantize_dynamic_int8(fp32, int8)
            session = OnnxClassifier(int8, arguments.num_threads, spinning=False)
            runners[f"{name}, ORT int8"] = lambda session=session: session.logits(numpy_batch)
        with torch.no_grad():
            timings = interleaved_latency(runners, arguments.warmup, arguments.rounds, arguments.batch_size)

    results = {"settings": vars(arguments), "variants": {}}
    print(f"{'variant':<32} {'FFN widths':<20} {'parameters':>11} {'median ms [IQR]':>22} {'x vs unaligned [IQR]':>22}")
    for runtime in runtimes:
        base = timings[f"unaligned, {runtime}"]["latency_ms_per_round"]
        for name, widths in variants.items():
            timing = timings[f"{name}, {runtime}"]
            ratios = sorted(b / t for b, t in zip(base, timing["latency_ms_per_round"]))
            quartile = len(ratios) // 4
            speedup = (ratios[len(ratios) // 2], ratios[quartile], ratios[-quartile - 1])
            results["variants"][f"{name}, {runtime}"] = {"ffn_widths": widths, "parameters": parameters[name],
                                                         "speedup_vs_unaligned": speedup, **{k: v for k, v in timing.items() if k != "latency_ms_per_round"}}
            print(f"{name + ', ' + runtime:<32} {str(widths):<20} {parameters[name]:>11,} "
                  f"{timing['latency_ms_median']:>9.2f} [{timing['latency_ms_p25']:.2f}-{timing['latency_ms_p75']:.2f}] "
                  f"{speedup[0]:>9.3f} [{speedup[1]:.3f}-{speedup[2]:.3f}]")
    target = results_root() / ("alignment_benchmark_cuda.json" if arguments.device == "cuda" else "alignment_benchmark.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, results)
    print(f"-> {target}")


if __name__ == "__main__":
    run_tool(main)
