"""The index arithmetic behind Megatron-LM's GPT and blended datasets, in numpy.

These functions decide which tokens make up training sample `k`, with Megatron-LM's
`GPTDataset` / `BlendedDataset` / `helpers.cpp` results exactly (same arrays, same
dtypes) but without a C++ extension: the sample index is a cumulative sum and a binary
search instead of a token loop. Counts are of sequences (documents, or sentences):

* split: `--split 949,50,1` as fractions; split `i` of N sequences is
  `range(round(b_i * N), round(b_{i+1} * N))` for the cumulative fractions `b`;
* epochs: the smallest E with `E * tokens_in_split >= num_samples * S + 1`;
* document index: the split's ids tiled E times, shuffled with
  `numpy.random.RandomState(seed)`; a last epoch used under 80 % is shuffled separately,
  so it cannot crowd out whole ones;
* sample index: sample k is the `S + 1` tokens from token `k * S` of the concatenated
  documents (neighbours share one token), stored as (document position, offset);
* shuffle index: `arange(num_samples)` shuffled by the same generator afterwards.
"""

from __future__ import annotations

import math
import re

import numpy as np

from paratron.data.errors import DataError

#: Megatron's threshold below which the final epoch is shuffled on its own.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


# --------------------------------------------------------------------------- split


def parse_split(split: str) -> list[float]:
    """`"949,50,1"` -> normalised `[0.949, 0.05, 0.001]` (missing parts are 0)."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", split or "")]
    if not parts or len(parts) > 3:
        raise DataError(f"--split '{split}' must be one to three non-negative numbers, "
                        f"e.g. 949,50,1")
    parts += [0.0] * (3 - len(parts))
    total = float(np.sum(np.array(parts, dtype=np.float64)))
    if total <= 0:
        raise DataError(f"--split '{split}' has no positive part")
    return (np.array(parts, dtype=np.float64) / total).tolist()


def split_matrix(fractions: list[float]) -> list[tuple[float, float] | None]:
    """Cumulative bounds per split; `None` for a split with zero weight (Megatron's "book-ends")."""
    bounds = [0.0]
    for f in fractions:
        bounds.append(bounds[-1] + f)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_range(bounds: tuple[float, float], num_sequences: int) -> tuple[int, int]:
    """Sequence ids `[begin, end)` of a split (`round` as Python rounds, like Megatron)."""
    begin, end = (int(round(b * float(num_sequences))) for b in bounds)
    return begin, end


# --------------------------------------------------------------------------- epochs


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """Smallest E with `E * tokens_per_epoch >= num_samples * seq_length + 1` (1 when
    num_samples is None)."""
    if num_samples is None:
        return 1
    if tokens_per_epoch <= 0:
        raise DataError("the split has no tokens, so no sample can be drawn from it")
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def separate_last_epoch(tokens_per_epoch: int, seq_length: int, num_samples: int,
                        num_epochs: int) -> bool:
    """Whether the last epoch is shuffled apart from the others (used < 80 %)."""
    if num_epochs == 1:
        return False
    samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    samples_from_last = num_samples - samples_before_last
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    assert 0 <= samples_from_last <= samples_per_epoch + 1
    return samples_from_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)


# --------------------------------------------------------------------------- document index


def build_document_index(
    sequence_ids: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    """The split's sequence ids repeated `num_epochs` times and shuffled (int32)."""
    if separate_last and num_epochs > 1:
        first = build_document_index(sequence_ids, num_epochs - 1, rng, False)
        last = build_document_index(sequence_ids, 1, rng, False)
        return np.concatenate((first, last))
    index = np.tile(np.asarray(sequence_ids, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


# --------------------------------------------------------------------------- sample index


def build_sample_index(
    sequence_lengths: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
) -> np.ndarray:
    """Start of every sample as `(position in document_index, token offset)`; shape `[n + 1, 2]`.

    There are `n = (num_epochs * tokens_per_epoch - 1) // seq_length` samples;
    sample k spans from row k to row k + 1 inclusive of one extra token. Row
    k is where token `k * seq_length` of the concatenated document index
    lies. Row 0 is always `(0, 0)`, even when the first sequence is empty,
    exactly as Megatron's loop writes it.

    Vectorised: a running sum of the lengths along the document index and one
    `searchsorted` for all sample starts, instead of a loop over tokens. The
    dtype is int32 when every value fits, else int64 (as Megatron).
    """
    if seq_length < 1:
        raise DataError(f"--seq-length must be positive, got {seq_length}")
    total = num_epochs * tokens_per_epoch
    num_samples = (total - 1) // seq_length
    lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)
    # ends[j] = tokens in document_index[0..j] inclusive (an inclusive running sum).
    ends = np.cumsum(lengths)
    if int(ends[-1]) != total:
        raise ValueError(f"document index holds {int(ends[-1])} tokens, expected {total}")
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # Row k: the first position j whose inclusive end is beyond the start token,
    # i.e. the non-empty sequence that contains token k * S.
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[position] - lengths[position])
    longest = int(np.max(sequence_lengths)) if len(sequence_lengths) else 0
    largest = max(len(document_index), longest)
    dtype = np.int32 if largest <= np.iinfo(np.int32).max else np.int64
    index = np.empty((num_samples + 1, 2), dtype=dtype)
    index[:, 0] = position
    index[:, 1] = offset
    index[0] = 0
    return index


def build_shuffle_index(num_samples: int, total_size: int,
                        rng: np.random.RandomState) -> np.ndarray:
    """`arange(total_size)` shuffled as two blocks `[0, num_samples)` and
    `[num_samples, total_size)`."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    sequence_ids: np.ndarray,
    seq_length: int,
    num_samples: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document, sample and shuffle index of one split, exactly as Megatron-LM's
    GPTDataset builds them.

    `sequence_lengths` are the lengths of all sequences of the corpus,
    `sequence_ids` the ids in this split; `num_samples` None means one
    epoch's worth.
    """
    sequence_ids = np.asarray(sequence_ids, dtype=np.int32)
    tokens_per_epoch = int(np.sum(np.asarray(sequence_lengths)[sequence_ids], dtype=np.int64))
    if tokens_per_epoch < 2:
        raise DataError(
            f"the split has {tokens_per_epoch} tokens in {len(sequence_ids)} sequences; "
            "a sample needs at least 2 (use more data or change --split)"
        )
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = num_samples is not None and separate_last_epoch(tokens_per_epoch, seq_length,
                                                               num_samples, num_epochs)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(sequence_ids, num_epochs, rng, separate)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length, num_epochs,
                                      tokens_per_epoch)
    total = sample_index.shape[0] - 1
    if separate:
        before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        shuffle_index = build_shuffle_index(before_last, total, rng)
    else:
        shuffle_index = build_shuffle_index(total, total, rng)
    return document_index, sample_index, shuffle_index


# --------------------------------------------------------------------------- blending


def blend_sizes(weights: list[float], size: int, surplus: float = 0.005) -> list[int]:
    """Samples to build per dataset for a blend of `size` samples:
    `ceil(ceil(size * w) * (1 + surplus))`."""
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]


def build_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset and which of its samples fills each of `size` blended positions.

    Position s goes to the dataset with the largest `w_i * max(s, 1) - count_i`
    (the lowest index on ties), Megatron's greedy rule evaluated in double
    precision exactly as its C++ helper does, so the blend follows the weights
    as closely as possible at every prefix and matches Megatron position for
    position. Returns `(dataset_index int16, dataset_sample_index int64)`.
    """
    w = [float(x) for x in weights]
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    if size == 0:
        return dataset_index, sample_index
    if len(w) == 1:
        sample_index[:] = np.arange(size)
        return dataset_index, sample_index
    choices = _greedy_two(w[0], w[1], size) if len(w) == 2 else _greedy_loop(w, size)
    dataset_index[:] = choices
    # The sample drawn from dataset i is the number of earlier positions given to i.
    for i in range(len(w)):
        mask = choices == i
        sample_index[mask] = np.arange(int(np.count_nonzero(mask)))
    return dataset_index, sample_index


def _greedy_loop(w: list[float], size: int) -> np.ndarray:
    """The greedy rule, one position at a time (any number of datasets)."""
    counts = [0] * len(w)
    others = range(1, len(w))
    out = np.empty(size, dtype=np.int16)
    for s in range(size):
        x = float(max(s, 1))
        best, best_err = 0, w[0] * x - counts[0]
        for i in others:
            err = w[i] * x - counts[i]
            if err > best_err:
                best, best_err = i, err
        out[s] = best
        counts[best] += 1
    return out


def _greedy_two(w0: float, w1: float, size: int, block: int = 1 << 16) -> np.ndarray:
    """The greedy rule for two datasets, vectorised over blocks of positions.

    With two datasets the state before position t is just `c0`, dataset 0's
    count so far. In exact arithmetic the rule keeps `c0 - w0 * t` in
    `(-w0, 1 - w0]`, so `c0(t) = floor(w0 * t + 1 - w0)`. Floating point
    can break a near-tie the other way, which shifts the count by one for a
    step or two before the rule pulls it back. So: guess all counts of a
    block with the closed form, then repeat "re-decide every position from the
    guessed counts with the exact floating-point rule and rebuild the counts
    from those decisions" until nothing changes. Each round fixes at least
    the next position, and since deviations are only a step or two long the
    guesses settle after a few rounds; the fixed point is the sequential answer.
    """
    out = np.empty(size, dtype=np.int16)
    s, c0 = 0, 0
    while s < size:
        n = min(block, size - s)
        t = np.arange(s, s + n, dtype=np.int64)
        x = np.maximum(t, 1).astype(np.float64)
        w0x, w1x = w0 * x, w1 * x
        counts = np.clip(np.floor(w0x + 1.0 - w0).astype(np.int64), 0, t)
        counts[0] = c0
        settled = 0
        for _ in range(64):
            # C++: dataset 1 wins only when its error is strictly larger.
            choose0 = ~((w1x - (t - counts).astype(np.float64)) > (w0x - counts.astype(np.float64)))
            rebuilt = np.empty_like(counts)
            rebuilt[0] = c0
            rebuilt[1:] = counts[:-1] + choose0[:-1]
            differ = np.flatnonzero(rebuilt != counts)
            if len(differ) == 0:
                settled = n
                break
            settled = int(differ[0])  # counts[:settled] are exact, so are their decisions
            counts = rebuilt
        # choose0 belongs to the counts before the last rebuild; its first
        # `settled` entries were decided from exact counts.
        # (settled >= 1: the first count is always exact).
        out[s : s + settled] = np.where(choose0[:settled], 0, 1)
        c0 += int(np.count_nonzero(choose0[:settled]))
        s += settled
    return out


def build_exhaustive_blending_indices(sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Blend that takes exactly `sizes[i]` samples from dataset i (used for unweighted
    blends of whole datasets).

    Same greedy rule with weights `sizes / sum(sizes)`; a dataset leaves the
    competition once all its samples are used.
    """
    total = int(sum(sizes))
    weights = [n / float(total) for n in sizes]
    counts = [0] * len(sizes)
    active = [i for i, n in enumerate(sizes) if n > 0]
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    for s in range(total):
        x = max(float(s), 1.0)
        best, best_err = -1, -math.inf
        for i in active:
            err = weights[i] * x - counts[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[s] = best
        sample_index[s] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            active.remove(best)
    return dataset_index, sample_index
