"""The dataset index cache: index arrays saved as `.npy` once, memory-mapped after.

Index arrays depend only on a JSON description of what built them (the corpus's
sequence lengths, the split, the seed, the sizes), and their files are named after the
MD5 of that description, as Megatron-LM names them, so changed inputs never reuse old
indices. Files are written whole or not at all (`paratron.files.atomic_file`): ranks
building the same cache at once cannot leave a partial file, and a file that cannot be
read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from paratron.files import atomic_file


def description_hash(description: dict) -> str:
    """The MD5 of `description`, the key of its cache files."""
    text = json.dumps(description, indent=4, sort_keys=True)
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def load_cached_arrays(paths: Sequence[str]) -> tuple[np.ndarray, ...] | None:
    """The cached `.npy` files memory-mapped, or None when one is missing or unreadable
    (then the caller rebuilds them).

    Each array is a plain ndarray over the mapping, not an `np.memmap`: the same shared
    pages, but indexing one element costs what it costs in memory (np.memmap's Python-level
    `__getitem__` made reading one sample's indices cost more than its tokens)."""
    if not all(os.path.isfile(p) for p in paths):
        return None
    try:
        return tuple(np.asarray(np.load(p, mmap_mode="r", allow_pickle=False)) for p in paths)
    except (OSError, ValueError, EOFError):
        return None


def save_cached_arrays(base: str, description: dict, paths: Sequence[str],
                       arrays: Sequence[np.ndarray]) -> None:
    """Write `<base>-description.txt` (for a person reading the folder) and each array to
    its path; an OSError (a read-only or full folder) is the caller's to explain."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with atomic_file(f"{base}-description.txt") as fh:
        fh.write(json.dumps(description, indent=4).encode("utf-8"))
    for path, array in zip(paths, arrays):
        with atomic_file(path) as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)
