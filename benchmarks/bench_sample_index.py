"""Time Megatron-style GPT index building (document, sample and shuffle index) for 10^9 tokens.

    python benchmarks/bench_sample_index.py [--tokens 1e9] [--seq-length 2048] [--mean-doc 600]

Synthetic corpus: document lengths drawn from a log-normal distribution
(mean about --mean-doc tokens, 1 to 100k), enough documents for --tokens tokens
in one epoch; then the indices for one epoch's worth of samples, exactly as
the training data path builds them. Prints the time of each part and the total.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from paratron.data.indices import build_document_index, build_sample_index, build_shuffle_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--mean-doc", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sigma = 1.0
    mu = np.log(args.mean_doc) - sigma**2 / 2
    n_docs = int(args.tokens / args.mean_doc * 1.05)
    sizes = np.clip(rng.lognormal(mu, sigma, size=n_docs), 1, 100_000).astype(np.int32)
    cut = int(np.searchsorted(np.cumsum(sizes, dtype=np.int64), int(args.tokens))) + 1
    sizes = sizes[:cut]
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // args.seq_length
    print(f"corpus: {len(sizes):,} documents, {tokens:,} tokens; seq_length {args.seq_length}, "
          f"{num_samples:,} samples (one epoch)")

    state = np.random.RandomState(args.seed)
    t0 = time.perf_counter()
    document_index = build_document_index(np.arange(len(sizes), dtype=np.int32), 1, state, False)
    t1 = time.perf_counter()
    sample_index = build_sample_index(sizes, document_index, args.seq_length, 1, tokens)
    t2 = time.perf_counter()
    shuffle_index = build_shuffle_index(len(sample_index) - 1, len(sample_index) - 1, state)
    t3 = time.perf_counter()
    assert len(shuffle_index) == num_samples
    print(f"document index {t1 - t0:6.2f} s")
    print(f"sample index   {t2 - t1:6.2f} s")
    print(f"shuffle index  {t3 - t2:6.2f} s")
    print(f"total          {t3 - t0:6.2f} s for {tokens / 1e9:.2f}e9 tokens")


if __name__ == "__main__":
    main()
