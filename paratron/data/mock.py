"""Mock pretraining data (`--mock-data`), the same corpus Megatron-LM generates.

The corpus has 100,000 documents whose lengths are drawn once from
`numpy.random.default_rng(0)` between 1 and 4095 tokens; document d is
`1, 2, ..., L_d - 1` (modulo the vocabulary size) followed by the eod token.
It is sampled through the ordinary `paratron.data.gpt_dataset.GPTDataset`
with Megatron's fixed `1,1,1` split, so `--mock-data` gives the same
samples here as in Megatron-LM for the same `--seed` and `--seq-length`:
a sample depends only on (seed, sequence length, sample index) — and on the
number of samples requested once that exceeds one pass over the ~68 M tokens
of a split. Nothing is read from disk, and "next token = this token + 1"
inside documents makes the loss fall quickly, which is handy for smoke tests.
"""

from __future__ import annotations

import numpy as np


class MockCorpus:
    """A synthetic corpus with the low-level interface of an IndexedDataset."""

    seed = 0
    size = 100_000
    max_sequence_length = 4096

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        rng = np.random.default_rng(seed=self.seed)
        self.sequence_lengths = rng.integers(low=1, high=self.max_sequence_length, size=self.size,
                                             dtype=np.int32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of document `idx`: position p holds
        `(p + 1) % vocab_size`, the last position the eod."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        positions = np.arange(offset, min(offset + length, size), dtype=np.int64)
        tokens = (positions + 1) % self.vocab_size
        tokens[positions == size - 1] = self.eod
        return tokens

    def describe(self) -> dict:
        return {"mock": True, "vocab_size": self.vocab_size, "eod": self.eod, "size": self.size}
