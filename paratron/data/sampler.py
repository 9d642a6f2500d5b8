"""Batch sampling from `consumed_samples`, Megatron-LM's `MegatronPretrainingSampler`.

Every `micro_batch_size * data_parallel_size` consecutive samples from `consumed_samples`
are one micro-batch step of the job, rank r taking the r-th slice: a global batch is
always samples `[consumed, consumed + global_batch_size)` whatever the DP size, and a
resumed run continues at exactly the next sample. Validation reads with `wrap_around`
(past the last sample it starts again), since a resumed run's validation split, built for
its own settings, can be smaller than what earlier evaluations consumed; with unchanged
settings it never wraps.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import default_collate


def _check_sampler_args(total_samples: int, micro_batch_size: int, data_parallel_rank: int,
                        data_parallel_size: int) -> None:
    """The arguments both samplers share, refused in one line when they cannot work."""
    if total_samples <= 0:
        raise ValueError(f"no samples to consume: {total_samples}")
    if micro_batch_size <= 0 or data_parallel_size <= 0:
        raise ValueError("micro_batch_size and data_parallel_size must be positive")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank {data_parallel_rank} not in "
                         f"[0, {data_parallel_size})")


class MegatronPretrainingSampler:
    """Yields this rank's micro-batches (lists of sample indices) from `consumed_samples` on."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
        wrap_around: bool = False,
    ) -> None:
        _check_sampler_args(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if wrap_around:
            consumed_samples %= total_samples
        elif consumed_samples >= total_samples:
            raise ValueError(f"all {total_samples} samples already consumed ({consumed_samples})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size
        self.drop_last = drop_last
        self.wrap_around = wrap_around

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        begin = self.data_parallel_rank * self.micro_batch_size
        end = begin + self.micro_batch_size
        start = self.consumed_samples
        if self.wrap_around:
            yield from self._wrapping(start + begin, start + end)
            return
        while start + self.step <= self.total_samples:
            yield list(range(start + begin, start + end))
            start += self.step
        if not self.drop_last and start < self.total_samples:
            # The last, partial group: this rank's slice of what remains (maybe empty).
            last = list(range(start, self.total_samples))[begin:end]
            if last:
                yield last

    def _wrapping(self, begin: int, end: int) -> Iterator[list[int]]:
        """Endless: this rank's slices, sample indices taken modulo the dataset."""
        while True:
            yield [i % self.total_samples for i in range(begin, end)]
            begin, end = begin + self.step, end + self.step


class MegatronPretrainingRandomSampler:
    """`--dataloader-type cyclic`: Megatron's random sampler, epoch after epoch without end.

    Each epoch is a `torch.randperm` seeded with the epoch number; the epoch
    and the position in it follow from `consumed_samples`, so resuming
    continues exactly. With `data_sharding` (Megatron's default) every
    data-parallel rank shuffles its own contiguous bucket of the dataset, so,
    as in Megatron, the samples *do* depend on the data-parallel size; without
    it one permutation is dealt round-robin over the ranks. Only the
    `single` sampler above gives layout-independent batches.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        data_sharding: bool = True,
    ) -> None:
        _check_sampler_args(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.data_sharding = data_sharding
        self.step = micro_batch_size * data_parallel_size
        if total_samples < self.step:
            raise ValueError(f"{total_samples} samples cannot fill one micro-batch on every rank "
                             f"({self.step})")

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield from self._one_epoch()

    def _one_epoch(self) -> Iterator[list[int]]:
        active = self.total_samples - self.total_samples % self.step
        epoch = self.consumed_samples // active
        in_epoch = self.consumed_samples % active
        if in_epoch % self.step:
            raise ValueError(f"consumed_samples {self.consumed_samples} is not a multiple of "
                             f"{self.step}")
        g = torch.Generator()
        g.manual_seed(epoch)
        if self.data_sharding:
            bucket = (self.total_samples // self.step) * self.micro_batch_size
            start = self.data_parallel_rank * bucket
            order = torch.randperm(bucket, generator=g).tolist()
            indices = [start + x for x in order[in_epoch // self.data_parallel_size :]]
        else:
            full = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            order = torch.randperm(full, generator=g).tolist()[in_epoch:]
            indices = order[self.data_parallel_rank :: self.data_parallel_size]
        for i in range(0, len(indices) - self.micro_batch_size + 1, self.micro_batch_size):
            self.consumed_samples += self.step
            yield indices[i : i + self.micro_batch_size]


def _fetched_whole(batch: dict) -> dict:
    """The collate step for a dataset whose `__getitems__` already returns the batch."""
    return batch


def fetch_batch(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """The micro-batch of `indices`: the dataset's own whole-batch read (`__getitems__`)
    when it has one, else its samples stacked as torch's DataLoader stacks them."""
    whole = getattr(dataset, "__getitems__", None)
    return whole(indices) if whole else default_collate([dataset[i] for i in indices])


class InProcessLoader:
    """`--num-workers 0`: each micro-batch read whole in this process as the step asks
    for it, pinned for a CUDA copy when asked, without torch DataLoader's per-batch
    machinery (which costs as much as reading a batch of pretraining tokens)."""

    def __init__(self, dataset, batch_sampler, pin_memory: bool = False) -> None:
        self.dataset, self.batch_sampler, self.pin_memory = dataset, batch_sampler, pin_memory

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.batch_sampler:
            batch = fetch_batch(self.dataset, indices)
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch


def build_pretraining_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int | None = None,
    dataloader_type: str = "single",
    data_sharding: bool = True,
    wrap_around: bool = False,
    pin_memory: bool = False,
):
    """An iterable over `dataset` that yields this rank's micro-batches.

    `dataloader_type` is Megatron's `--dataloader-type`: `single` (one
    ordered pass, `MegatronPretrainingSampler`) or `cyclic`
    (`MegatronPretrainingRandomSampler`, endless); `wrap_around` makes
    `single` endless too, for validation (see the module docstring). Returns None for a
    missing or empty dataset (e.g. a split with zero weight). `pin_memory` (for a CUDA
    run) yields page-locked batches, which copy to the GPU without blocking the host.

    `num_workers` is `--num-workers`: None (the default) and 0 read in this process
    (`InProcessLoader`), which measured faster than worker processes for memory-mapped
    tokens (`benchmarks/bench_data.py`); N > 0 starts N torch DataLoader workers, as in
    Megatron, each reading whole micro-batches from its own mapping of the files.
    """
    if dataset is None or len(dataset) == 0:
        return None
    shared = dict(total_samples=len(dataset), consumed_samples=consumed_samples,
                  micro_batch_size=micro_batch_size, data_parallel_rank=data_parallel_rank,
                  data_parallel_size=data_parallel_size)
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(**shared, wrap_around=wrap_around)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(**shared, data_sharding=data_sharding)
    else:
        raise ValueError(f"unknown dataloader type {dataloader_type!r} (single or cyclic)")
    if not num_workers:
        return InProcessLoader(dataset, sampler, pin_memory)
    # A generator of its own: each new iterator draws a base seed for its workers, and
    # drawing it from torch's global generator would shift dropout's random stream
    # depending on when the iterator happens to be created (a resumed run creates its
    # validation iterator at another iteration than the uninterrupted run did).
    generator = torch.Generator().manual_seed(consumed_samples)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_fetched_whole if hasattr(dataset, "__getitems__") else None,
        pin_memory=pin_memory,
        persistent_workers=True,
        generator=generator,
    )
