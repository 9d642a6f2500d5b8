"""Batches per second of Paratron's data loader beside slicing the token memmap directly.

    python benchmarks/bench_data.py [--batches 2000] [--micro-batch 4] [--seq-length 1024]
                                    [--tokens 25e6] [--repeats 3] [--json-out FILE]

Builds a synthetic corpus once in a temporary folder (`--tokens` GPT-2-sized ids as
uint16, document lengths log-normal around 450 tokens: 50 MB for the default) and
synthetic SFT conversations (prompt and response ids, 40 to 1,200 tokens), then times
`--batches` micro-batches of `--micro-batch` x `--seq-length` tokens four ways:

- **raw memmap**: for each sample one slice of `seq + 1` tokens of the `.bin` memmap at
  a random start (samples are shuffled), stacked and made int64 tensors `tokens` and
  `labels`: the least a loader of shuffled samples must do, without documents, masks or
  positions.
- **paratron pretraining**: `GPTDataset` (Megatron's document, sample and shuffle
  indices; `--split 100,0,0`) through the trainer's `build_pretraining_data_loader`, with
  Paratron's default (`--num-workers` unset: read in the training process) and with
  Megatron's default of 2 worker processes.
- **paratron SFT packed**: `SFTDataset` with `--sequence-packing`, the same loader.

Rows are interleaved (raw, then each Paratron loader, `--repeats` times) and the median is
reported; each loader's first batch (worker start-up, index building) is untimed. The
ratio column is batches/s over the raw memmap's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from paratron.data.config import DataConfig
from paratron.data.gpt_dataset import build_train_valid_test_datasets
from paratron.data.indexed_dataset import IndexedDatasetWriter
from paratron.data.sampler import build_pretraining_data_loader
from paratron.data.sft import SFTDataset
from paratron.data.tokenizer import NullTokenizer

MEGATRON_DEFAULT_WORKERS = 2
VOCAB = 50257  # GPT-2's, so ids are stored as uint16 as for a real GPT-2 corpus


def make_corpus(prefix: str, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(450) - 0.5, 1.0, size=tokens // 300), 1, 50_000)
    lengths = lengths.astype(np.int32)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), tokens)) + 1]
    writer = IndexedDatasetWriter(prefix + ".bin", dtype=np.uint16)
    ids = rng.integers(0, VOCAB - 1, size=int(lengths.sum()), dtype=np.uint16)
    ids[np.cumsum(lengths) - 1] = VOCAB - 1  # each document ends with the eod id
    writer.add_batch(ids, lengths, np.ones(len(lengths), dtype=np.int64))
    writer.finalize(prefix + ".idx")


def make_conversations(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt, response = rng.integers(20, 600, size=2)
        ids = rng.integers(0, VOCAB - 1, size=prompt + response).astype(np.int32)
        mask = np.concatenate([np.zeros(prompt, np.int8), np.ones(response, np.int8)])
        out.append((ids, mask))
    return out


def time_raw(path: str, batches: int, micro: int, seq: int) -> float:
    tokens = np.memmap(path, mode="r", dtype=np.uint16)
    starts = np.random.default_rng(0).integers(0, len(tokens) - seq - 1, size=(batches, micro))
    start = time.perf_counter()
    for row in starts.tolist():
        text = np.stack([tokens[s : s + seq + 1] for s in row])
        batch = {"tokens": torch.from_numpy(text[:, :-1].astype(np.int64)),
                 "labels": torch.from_numpy(text[:, 1:].astype(np.int64))}
    elapsed = time.perf_counter() - start
    assert batch["tokens"].shape == (micro, seq)
    return elapsed


def time_loader(dataset, batches: int, micro: int, workers: int) -> float:
    loader = build_pretraining_data_loader(dataset, 0, micro, 0, 1, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not the steady state
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["tokens"].shape[0] == micro
    del iterator, loader
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--tokens", type=float, default=25e6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    micro, seq, n = args.micro_batch, args.seq_length, args.batches
    default_workers = DataConfig().num_workers
    samples = (n + 1) * micro

    with tempfile.TemporaryDirectory() as folder:
        prefix = os.path.join(folder, "corpus")
        make_corpus(prefix, int(args.tokens))
        train, _, _ = build_train_valid_test_datasets(
            [prefix], "100,0,0", seq, 1234, [samples, 0, 0], tokenizer=NullTokenizer(VOCAB - 1),
            cache_path=os.path.join(folder, "cache"))
        sft = SFTDataset(make_conversations(4000), seq, pad=VOCAB - 1, num_samples=samples,
                         sequence_packing=True)
        rows = {"raw memmap": lambda: time_raw(prefix + ".bin", n, micro, seq)}
        for name, dataset in (("pretraining", train), ("SFT packed", sft)):
            for workers in (default_workers, MEGATRON_DEFAULT_WORKERS):
                label = (f"paratron {name}, 0 workers (default)" if workers is None
                         else f"paratron {name}, {workers} workers (Megatron's default)")
                rows[label] = (lambda d=dataset, w=workers: time_loader(d, n, micro, w))
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, run in rows.items():
                times[name].append(run())

    raw = statistics.median(times["raw memmap"])
    print(f"{n} micro-batches of {micro} x {seq} tokens, median of {args.repeats} interleaved "
          f"runs, torch threads {torch.get_num_threads()}")
    print(f"{'loader':<56}{'seconds':>9}{'batches/s':>12}{'vs raw':>9}")
    record = {"batches": n, "micro_batch": micro, "seq_length": seq, "repeats": args.repeats,
              "default_workers": default_workers, "rows": {}}
    for name, values in times.items():
        median = statistics.median(values)
        record["rows"][name] = {"seconds": values, "batches_per_s": n / median,
                                "vs_raw": raw / median}
        print(f"{name:<56}{median:>9.3f}{n / median:>12,.0f}{raw / median:>8.2f}x")
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
