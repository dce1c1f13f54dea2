"""Classify texts with any checkpoint of the pipeline or any ONNX folder of stage 12.

Reads:  --model PATH (a results/<stage>/<run_id>/ checkpoint or a results/onnx*/<run_id>/ folder) and texts from
        the arguments, standard input (one per line) or --input_file (.csv/.tsv/.json/.jsonl/.txt, --text_column).
Writes: one line per text to standard output: the label, its probability and every label's probability, as a
        tab-separated table (default) or JSON lines (--format jsonl). Logs and the progress bar go to stderr.
Exits:  0 on success, 2 on bad input (a path that is not a checkpoint, an empty input, a missing column, an
        unreadable file), with a message saying what to pass instead.

Run as:
    python predict.py --model results/onnx/<run_id> "a gripping, funny film" "dull and far too long"
    cat reviews.txt | python predict.py --model results/pruned/<run_id> --format jsonl
    python predict.py --model results/qkd_4bit/<run_id> --input_file reviews.csv --text_column review
    python predict.py --model results/onnx/<run_id> --input_file pairs.csv --text_column premise --text_pair_column hypothesis
    python predict.py --model results/pruned/<run_id> --pair_separator '|||' "A man sleeps. ||| Nobody is asleep."
"""

import argparse
import sys

from common import setup_logging
from common.prediction import PredictionError, check_input_kind, classify, format_results, open_classifier, read_texts


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("texts", nargs="*", help="Texts to classify. Without them: --input_file, else standard input.")
    parser.add_argument("--model", required=True, help="Checkpoint folder (any stage) or ONNX folder of stage 12.")
    parser.add_argument("--onnx_file", default=None, help="Which .onnx file of an ONNX folder (default: its deployment model).")
    parser.add_argument("--input_file", default=None, help="A .csv, .tsv, .json, .jsonl or .txt file of texts.")
    parser.add_argument("--text_column", default=None, help="Column of --input_file holding the text (default: 'text').")
    parser.add_argument("--text_pair_column", default=None, help="Sentence-pair models: the column of --input_file with the second text.")
    parser.add_argument("--pair_separator", default=None,
                        help="Sentence-pair models: the string splitting each argument or input line into its two texts, e.g. '|||'.")
    parser.add_argument("--encoding", default="utf-8", help="Encoding of --input_file, e.g. latin-1 or cp1252.")
    parser.add_argument("--format", choices=("table", "jsonl"), default="table", help="Output format.")
    parser.add_argument("--batch_size", type=int, default=32, help="Texts per forward pass.")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads of ONNX Runtime.")
    arguments = parser.parse_args(argv)
    if arguments.batch_size <= 0:
        parser.error(f"--batch_size {arguments.batch_size} must be a positive integer.")
    return arguments


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    try:
        reads_stdin = not arguments.texts and not arguments.input_file and not sys.stdin.isatty()
        stdin = sys.stdin if reads_stdin else None
        texts = read_texts(arguments.texts, arguments.input_file, arguments.text_column, stdin, arguments.encoding,
                           arguments.text_pair_column, arguments.pair_separator)
        classifier = open_classifier(arguments.model, arguments.onnx_file, arguments.num_threads)
        check_input_kind(classifier, texts)
        print(f"Classifying {len(texts)} text(s) with the {classifier.description} in {classifier.folder}", file=sys.stderr)
        results = classify(classifier, texts, arguments.batch_size, progress=arguments.input_file is not None)
    except PredictionError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    print(format_results(results, arguments.format))
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
