"""Blending several datasets into one stream, as Megatron-LM's BlendedDataset does.

Position s of the blend draws from the dataset that is furthest behind its
share (largest `w_i * max(s, 1) - drawn_i`), so every prefix of the stream
follows the weights as closely as possible; within a dataset, samples are
taken in order 0, 1, 2, ... (each dataset is already shuffled). The two index
arrays are cached next to the GPT indices when a cache folder is given.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from paratron.data.errors import DataError
from paratron.data.index_cache import description_hash, load_cached_arrays, save_cached_arrays
from paratron.data.indices import build_blending_indices, build_exhaustive_blending_indices
from paratron.data.sampler import fetch_batch


def normalize(weights: Sequence[float]) -> list[float]:
    """`weights` scaled to sum to 1, in float64 as Megatron computes them."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


class BlendedDataset(torch.utils.data.Dataset):
    """A weighted mixture of datasets of the same split.

    `weights` are normalised when `size` is given (Megatron normalises
    them here even if the caller already did, and so must we to draw the
    same positions). With `size=None` the weights must be whole numbers and
    exactly `weights[i]` samples are drawn from dataset i.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int | None,
        split_name: str,
        cache_path: str | None = None,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset")
        if len(datasets) >= 32767:
            raise DataError(f"cannot blend {len(datasets)} datasets (at most 32766)")
        if any(w <= 0 for w in weights):
            raise DataError(f"blend weights must be positive, got {list(weights)}")
        if size is not None:
            weights = normalize(weights)
        self.datasets = list(datasets)
        self.weights = list(weights)
        self.size = size
        self.split_name = split_name
        self.description = {
            "class": "BlendedDataset",
            "datasets": [getattr(d, "description", repr(d)) for d in self.datasets],
            "split": split_name,
            "weights": self.weights,
            "size": size,
        }
        self.description_hash = description_hash(self.description)
        self.dataset_index, self.dataset_sample_index = self._indices(cache_path)

    def _indices(self, cache_path: str | None):
        if cache_path:
            name = f"{self.description_hash}-BlendedDataset-{self.split_name}"
            base = os.path.join(cache_path, name)
            paths = [f"{base}-dataset_index.npy", f"{base}-dataset_sample_index.npy"]
            cached = load_cached_arrays(paths)
            if cached is not None and self._indices_fit(*cached):
                return cached
        if self.size is not None:
            dataset_index, sample_index = build_blending_indices(self.weights, self.size)
        else:
            sizes = [int(w) for w in self.weights]
            dataset_index, sample_index = build_exhaustive_blending_indices(sizes)
        counts = np.bincount(dataset_index, minlength=len(self.datasets))
        for i, (needed, ds) in enumerate(zip(counts, self.datasets)):
            if needed > len(ds):
                raise DataError(
                    f"the {self.split_name} blend needs {needed} samples from dataset {i} "
                    f"but it has only {len(ds)}"
                )
        if cache_path:
            try:
                save_cached_arrays(base, self.description, paths, (dataset_index, sample_index))
            except OSError as exc:
                raise DataError(f"cannot write blend index cache in {cache_path} "
                                f"({exc.strerror})") from None
        return dataset_index, sample_index

    def _indices_fit(self, dataset_index: np.ndarray, sample_index: np.ndarray) -> bool:
        """Whether cached blend indices are usable: right shape, pointing at existing samples."""
        if (dataset_index.ndim != 1 or dataset_index.shape != sample_index.shape
                or not len(dataset_index)):
            return False
        if self.size is not None and len(dataset_index) != self.size:
            return False
        if int(dataset_index.min()) < 0 or int(dataset_index.max()) >= len(self.datasets):
            return False
        return int(sample_index.min()) >= 0

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The `seq_length + 1` token ids of blended sample `idx`."""
        d = int(self.dataset_index[idx])
        return self.datasets[d].sample_tokens(int(self.dataset_sample_index[idx]))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        sample["dataset_id"] = torch.tensor(d, dtype=torch.int64)
        return sample

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole micro-batch: each blended dataset reads its samples of it at once, and
        the rows are put back in the batch's order."""
        chosen = self.dataset_index[list(indices)]
        rows = self.dataset_sample_index[list(indices)]
        batch: dict[str, torch.Tensor] = {}
        for d in np.unique(chosen).tolist():
            where = torch.from_numpy(np.flatnonzero(chosen == d))
            part = fetch_batch(self.datasets[d], rows[where.numpy()].tolist())
            for key, value in part.items():
                if key not in batch:
                    batch[key] = value.new_empty((len(chosen), *value.shape[1:]))
                batch[key][where] = value
        batch["dataset_id"] = torch.from_numpy(chosen.astype(np.int64))
        return batch
