"""Batch sampling from ``consumed_samples``, Megatron-LM's ``MegatronPretrainingSampler``.

The dataset is read in order from ``consumed_samples``. Every group of
``micro_batch_size * data_parallel_size`` consecutive samples is one
micro-batch step of the whole job, and data-parallel rank r takes the r-th
slice of ``micro_batch_size`` samples of it. A global batch is therefore always
the samples ``[consumed, consumed + global_batch_size)``, whatever the
data-parallel size — only who holds which sample changes — and a resumed run
continues at exactly the next sample. Ranks and sizes are plain numbers; this
module knows nothing of process groups.
"""

from __future__ import annotations

from typing import Iterator

import torch


class MegatronPretrainingSampler:
    """Yields this rank's micro-batches (lists of sample indices) from ``consumed_samples`` on."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to consume: {total_samples}")
        if consumed_samples >= total_samples:
            raise ValueError(f"all {total_samples} samples already consumed ({consumed_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        begin = self.data_parallel_rank * self.micro_batch_size
        end = begin + self.micro_batch_size
        start = self.consumed_samples
        while start + self.step <= self.total_samples:
            yield list(range(start + begin, start + end))
            start += self.step
        if not self.drop_last and start < self.total_samples:
            # The last, partial group: this rank's slice of what remains (maybe empty).
            last = list(range(start, self.total_samples))[begin:end]
            if last:
                yield last


def build_pretraining_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader | None:
    """A DataLoader over ``dataset`` that yields this rank's micro-batches (``--num-workers`` workers).

    Returns None for a missing or empty dataset (e.g. a split with zero weight).
    """
    if dataset is None or len(dataset) == 0:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
