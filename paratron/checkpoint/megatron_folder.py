"""A Megatron-LM save folder told apart from a Paratron one.

Megatron-LM lays out its `--save` folder as Paratron does (`latest_checkpointed_iteration.txt`
and `iter_<7-digit iteration>/`), and its `torch_dist` iterations hold a `metadata.json`
too, so a Megatron folder given to `--load` would read as a corrupt Paratron checkpoint.
The commands that load Paratron checkpoints ask `megatron_format` first and name the
conversion that reads the folder instead: `paratron convert --loader megatron`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from paratron.checkpoint.files import METADATA, checkpoint_dir, list_iterations, read_latest
from paratron.checkpoint.untrusted import UntrustedFileError, read_json

_NAMES = {"torch_dist": "torch_dist (distributed)", "torch": "torch (legacy)"}


def _iteration_format(folder: Path) -> str | None:
    """'torch_dist' or 'torch' when `folder` holds one Megatron-LM iteration, else None."""
    if not folder.is_dir():
        return None
    if (folder / ".metadata").is_file() or any(folder.glob("*.distcp")):
        return "torch_dist"
    if any(p.is_dir() for p in folder.glob("mp_rank_*")):
        return "torch"
    if (folder / METADATA).is_file():
        try:
            meta = read_json(folder / METADATA, max_bytes=1 << 16)
        except (UntrustedFileError, OSError, ValueError):
            return None
        if isinstance(meta, dict) and "sharded_backend" in meta:
            return "torch_dist"
    return None


def megatron_format(load_dir: str | os.PathLike) -> str | None:
    """'torch_dist' or 'torch' when `load_dir` is a Megatron-LM checkpoint (its save
    folder, or one iteration of it), else None. Only the iteration that
    latest_checkpointed_iteration.txt names (or "release"), else the newest, is looked at."""
    folder = Path(load_dir)
    candidates = [folder, folder / "release"]
    latest = read_latest(folder)
    if latest is not None:
        candidates.append(checkpoint_dir(folder, latest))
    candidates += [checkpoint_dir(folder, i) for i in list_iterations(folder)[:1]]
    return next((found for c in candidates if (found := _iteration_format(c))), None)


def megatron_load_problem(load_dir: str | os.PathLike, flag: str = "--load") -> str | None:
    """The one-line refusal for a Megatron-LM checkpoint given where a Paratron one is
    expected, with the command that converts it; None for any other folder."""
    found = megatron_format(load_dir)
    if found is None:
        return None
    source = shlex.quote(str(load_dir))
    return (f"{flag} {load_dir}: a Megatron-LM {_NAMES[found]} checkpoint, not a Paratron "
            f"one; convert it with `paratron convert --model-type GPT --loader megatron "
            f"--saver paratron --load-dir {source} --save-dir NEW_DIR` and give {flag} "
            f"NEW_DIR")
