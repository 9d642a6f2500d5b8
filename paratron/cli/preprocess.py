"""`paratron preprocess`: Megatron-LM's `tools/preprocess_data.py`, same flags, same files.

    python -m paratron.cli.preprocess --input corpus.jsonl --output-prefix out/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --append-eod --workers 4

writes `out/corpus_text_document.bin/.idx`. Inputs may also be gzipped JSONL, a glob,
plain text or an Alpaca-style JSON list. `--partitions` and `--keep-sequential-samples`
are accepted for compatibility (documents always keep their order; `--workers` alone sets
the parallelism). `--split-sentences` uses NLTK's punkt when installed, else punctuation.
"""

from __future__ import annotations

import argparse
import sys

from paratron.data.errors import DataError
from paratron.data.preprocess import Terminated, preprocess_data
from paratron.data.readers import MAX_LINE_LENGTH
from paratron.data.tokenizer import PATCH_TOKENIZER_TYPES, TOKENIZER_TYPES


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's tokenizer flags (shared with ``inspect-data``)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", type=str, default=None,
                       help=f"one of {', '.join(TOKENIZER_TYPES)}")
    group.add_argument("--patch-tokenizer-type", type=str, default=None,
                       help="Pai-Megatron-Patch tokenizer name (e.g. Qwen2Tokenizer, DeepSeekV2Tokenizer, "
                            "LLama3Tokenizer): a Hugging Face folder given by --tokenizer-model or --load")
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 merges.txt")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece .model file or Hugging Face tokenizer folder")
    group.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for NullTokenizer")
    group.add_argument("--load", type=str, default=None,
                       help="checkpoint folder; holds the tokenizer for --patch-tokenizer-type")
    group.add_argument("--vocab-extra-ids", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def tokenizer_kwargs(args: argparse.Namespace) -> dict:
    """``build_tokenizer`` arguments from parsed tokenizer flags."""
    tokenizer_type = args.tokenizer_type
    model = args.tokenizer_model
    if tokenizer_type is None and args.patch_tokenizer_type:
        tokenizer_type = args.patch_tokenizer_type
        if args.patch_tokenizer_type not in PATCH_TOKENIZER_TYPES:
            raise DataError(f"unknown --patch-tokenizer-type {args.patch_tokenizer_type}")
        if model is None and tokenizer_type != "GPT2BPETokenizer":
            model = args.load
    if tokenizer_type is None:
        raise DataError("give --tokenizer-type (or --patch-tokenizer-type)")
    return dict(tokenizer_type=tokenizer_type, vocab_file=args.vocab_file,
                merge_file=args.merge_file, tokenizer_model=model, vocab_size=args.vocab_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paratron preprocess",
        description="Tokenize JSONL / JSON / text into Megatron .bin/.idx files.")
    add_tokenizer_args(parser)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", type=str, required=True,
                       help="JSONL (optionally .gz), JSON list, or text file; a glob or comma-separated list")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each record")
    group.add_argument("--split-sentences", action="store_true", help="one sequence per sentence")
    group.add_argument("--keep-newlines", action="store_true", help="keep newlines between split sentences")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip bad lines (malformed JSON, a null or missing text, a line over "
                            "--max-line-length) and report how many, instead of stopping")
    group.add_argument("--max-line-length", type=int, default=MAX_LINE_LENGTH,
                       help="longest input line accepted, in characters (default %(default)s = 32 Mi); "
                            "longer lines are bad lines, read in pieces and never held in memory")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true", help="append the eod token to every document")
    group.add_argument("--lang", type=str, default="english", help="language for NLTK sentence splitting")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", type=str, required=True, help="path of the outputs, without suffix")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--partitions", type=int, default=1, help="accepted for compatibility")
    group.add_argument("--keep-sequential-samples", action="store_true", help="accepted: order is always kept")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    group.add_argument("--no-progress-bar", action="store_true",
                       help="print progress lines instead of a bar even on a terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run preprocessing; bad input exits non-zero with one line on stderr (``SystemExit``)."""
    args = build_parser().parse_args(argv)
    try:
        if args.partitions < 1:
            raise DataError(f"--partitions must be at least 1, got {args.partitions}")
        passed = ("input", "output_prefix", "json_keys", "append_eod", "split_sentences",
                  "keep_newlines", "lang", "workers", "log_interval", "skip_bad_lines",
                  "max_line_length")
        preprocess_data(**{name: getattr(args, name) for name in passed},
                        progress=False if args.no_progress_bar else None,
                        **tokenizer_kwargs(args))
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; no output written") from None
    except Terminated:
        raise SystemExit("terminated (SIGTERM); no output written") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
