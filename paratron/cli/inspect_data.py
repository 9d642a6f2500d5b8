"""``paratron inspect-data``: print the token ids the model will read, sample by sample.

    python -m paratron.cli.inspect_data --data-path out/c4_text_document --split 98,2,0 \\
        --seq-length 1024 --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --train-iters 100 --global-batch-size 8 --show 3 --decode

Takes the training command's data flags, builds the same datasets the trainer
builds (same sample counts, so the same epochs and shuffles), and prints the
``tokens`` of the first ``--show`` samples of ``--split-name`` in training
order, one JSON list per line on stdout; with ``--decode`` each list is
followed by a line holding the decoded text as a JSON string. A summary goes
to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from paratron.cli.preprocess import add_tokenizer_args, tokenizer_kwargs
from paratron.data.errors import DataError
from paratron.data.gpt_dataset import build_train_valid_test_datasets, get_train_valid_test_num_samples
from paratron.data.tokenizer import NullTokenizer, build_tokenizer

SPLITS = ("train", "valid", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paratron inspect-data",
                                     description="Print the token ids of the first samples of a split.")
    add_tokenizer_args(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None, help="prefix, or weight-prefix pairs")
    g.add_argument("--data-path-config", type=str, default=None, help="YAML blend description")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--split", type=str, default=None, help="e.g. 949,50,1 (default 969,30,1)")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--data-cache-path", type=str, default=None)
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--sft", action="store_true", help="SFT data (Alpaca / chat JSON)")
    g.add_argument("--dataset", type=str, default=None, help="JSON-SFT means --sft")
    g.add_argument("--max-padding-length", type=int, default=None)
    g.add_argument("--sequence-packing", action="store_true")
    g = parser.add_argument_group("sample counts")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g = parser.add_argument_group("output")
    g.add_argument("--split-name", choices=SPLITS, default="train")
    g.add_argument("--show", type=int, default=5, help="number of samples to print")
    g.add_argument("--start", type=int, default=0, help="first sample to print")
    g.add_argument("--decode", action="store_true", help="also print each sample as text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tokenizer_type is None and args.patch_tokenizer_type is None and args.mock_data:
            tokenizer = NullTokenizer(args.vocab_size - 1) if args.vocab_size else None
            if tokenizer is None:
                raise DataError("--mock-data without a tokenizer needs --vocab-size")
        else:
            tokenizer = build_tokenizer(**tokenizer_kwargs(args))
        if args.train_iters is None and args.train_samples is None:
            train_iters = (args.start + args.show + args.global_batch_size - 1) // args.global_batch_size
        else:
            train_iters = args.train_iters
        counts = get_train_valid_test_num_samples(args.global_batch_size, train_iters, args.train_samples,
                                                  args.eval_interval, args.eval_iters)
        if args.sft or args.dataset == "JSON-SFT":
            from paratron.data.sft import build_sft_datasets

            datasets = build_sft_datasets(
                args.data_path, args.split, args.seq_length, args.seed, counts, tokenizer,
                max_padding_length=args.max_padding_length, sequence_packing=args.sequence_packing,
                train_data_path=args.train_data_path, valid_data_path=args.valid_data_path,
                test_data_path=args.test_data_path)
        else:
            datasets = build_train_valid_test_datasets(
                args.data_path, args.split, args.seq_length, args.seed, counts, tokenizer,
                cache_path=args.data_cache_path, mock=args.mock_data, eod_mask_loss=args.eod_mask_loss,
                reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
                data_path_config=args.data_path_config, train_data_path=args.train_data_path,
                valid_data_path=args.valid_data_path, test_data_path=args.test_data_path)
        index = SPLITS.index(args.split_name)
        dataset = datasets[index]
        if dataset is None:
            raise DataError(f"the {args.split_name} split is empty with these arguments (see --split)")
        sizes = ", ".join(f"{n} {len(d) if d is not None else 0}" for n, d in zip(SPLITS, datasets))
        print(f"samples needed (train, valid, test): {counts}; built: {sizes}", file=sys.stderr)
        end = min(len(dataset), args.start + args.show)
        for k in range(args.start, end):
            tokens = dataset[k]["tokens"].tolist()
            print(json.dumps(tokens))
            if args.decode:
                print(json.dumps(tokenizer.decode(tokens), ensure_ascii=False))
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    except BrokenPipeError:  # e.g. piped into head
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
