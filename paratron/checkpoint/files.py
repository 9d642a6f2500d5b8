"""Checkpoint directories on disk and how a complete one is recognised.

Layout (Megatron-LM's):

    <save>/latest_checkpointed_iteration.txt    the newest complete iteration, "100"
    <save>/iter_0000100/metadata.json            written last inside the directory
    <save>/iter_0000100/model_optim_rank_00000.safetensors   tensors rank 0 wrote
    <save>/iter_0000100/rng_rank_00000.safetensors           rank 0's RNG states
    ...

A checkpoint is written under `iter_0000100.tmp/` and renamed to `iter_0000100/` only
once every rank's files and `metadata.json` are on disk; `latest_checkpointed_iteration.txt`
is replaced (write to a temporary name, then rename) after that. `metadata.json` lists
every file with its size and SHA-256, so a directory missing a file, with a truncated
file or with a file whose bytes changed is recognised as incomplete, and
`find_latest_valid` falls back to the newest checkpoint that is whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

FORMAT_VERSION = 1
METADATA = "metadata.json"
LATEST = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# Beside the iteration folders: the files the run's tokenizer was built from, and a
# small JSON naming the tokenizer type that reads them (conversion and generation use it).
TOKENIZER_DIR = "tokenizer"
TOKENIZER_INFO = "paratron_tokenizer.json"
RUN_CONFIG = "run_config.yaml"  # the run's settings as a --config file


def checkpoint_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    """`<save_dir>/iter_0000100` for iteration 100."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in `path` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text`: written to a temporary name, synced, renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def prepare_tmp_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    """An empty `iter_<7-digit iteration>.tmp/` (left-overs of an interrupted save are removed)."""
    tmp = temporary_dir(save_dir, iteration)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def temporary_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    final = checkpoint_dir(save_dir, iteration)
    return final.with_name(final.name + TMP_SUFFIX)


def finalize(save_dir: str | os.PathLike, iteration: int, metadata: dict) -> Path:
    """Write metadata.json into the temporary directory, rename it to its final name,
    then point `latest` at it. Returns the final directory."""
    tmp, final = temporary_dir(save_dir, iteration), checkpoint_dir(save_dir, iteration)
    write_atomic(tmp / METADATA, json.dumps(metadata, indent=1, sort_keys=True))
    old = None
    if final.exists():  # saving the same iteration again: the new one replaces it
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)
    write_atomic(Path(save_dir) / LATEST, f"{iteration}\n")
    return final


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of the checkpoint directory `path` (ValueError when unreadable)."""
    file = Path(path) / METADATA
    try:
        with open(file) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{file}: missing (the checkpoint was not completed)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: unreadable ({error})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    return meta


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint directory `path`; empty when it is whole.

    Checks metadata.json, then every listed file's presence and size, and with
    `checksums` its SHA-256."""
    path = Path(path)
    try:
        meta = read_metadata(path)
    except ValueError as error:
        return [str(error)]
    problems = []
    for name, info in sorted(meta["files"].items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != info["size"]:
            problems.append(f"{file}: {size} bytes, expected {info['size']}")
        elif checksums and file_digest(file) != info["sha256"]:
            problems.append(f"{file}: checksum mismatch")
    return problems


def read_latest(save_dir: str | os.PathLike) -> int | None:
    """The iteration `latest_checkpointed_iteration.txt` names, or None."""
    try:
        text = (Path(save_dir) / LATEST).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def list_iterations(save_dir: str | os.PathLike) -> list[int]:
    """Iterations with a finished-looking `iter_<7-digit iteration>/` directory, newest first."""
    try:
        entries = list(Path(save_dir).iterdir())
    except OSError:
        return []
    found = [int(m.group(1)) for e in entries
             if e.is_dir() and (m := _ITER_DIR.match(e.name))]
    return sorted(found, reverse=True)


def interrupted_saves(save_dir: str | os.PathLike) -> list[int]:
    """Iterations whose save was interrupted (a left-over `iter_<iteration>.tmp/`)."""
    try:
        entries = list(Path(save_dir).iterdir())
    except OSError:
        return []
    found = [int(m.group(1)) for e in entries if e.is_dir() and e.name.endswith(TMP_SUFFIX)
             and (m := _ITER_DIR.match(e.name.removesuffix(TMP_SUFFIX)))]
    return sorted(found)


def find_latest_valid(save_dir: str | os.PathLike, *, checksums: bool = True,
                      log: Callable[[str], None] = print) -> tuple[int, Path] | None:
    """(iteration, directory) of the newest whole checkpoint in `save_dir`, or None.

    Starts at the iteration `latest_checkpointed_iteration.txt` names; when that
    checkpoint is incomplete or corrupt (or `latest` is missing or unreadable) it says
    why through `log` and falls back to the newest older checkpoint that verifies.
    Temporary directories of interrupted saves are never candidates.
    """
    latest = read_latest(save_dir)
    candidates = list_iterations(save_dir)
    if latest is not None:
        candidates = [latest] + [i for i in candidates if i < latest]
    elif candidates:
        log(f"WARNING: {Path(save_dir) / LATEST} is missing or unreadable; "
            f"looking for the newest complete checkpoint in {save_dir}")
    rejected = []
    for iteration in candidates:
        path = checkpoint_dir(save_dir, iteration)
        problems = verify_checkpoint(path, checksums)
        if not problems:
            if rejected:
                log(f"WARNING: checkpoint {rejected[0][0]} is incomplete or corrupt "
                    f"({rejected[0][1]}); loading the previous complete checkpoint, "
                    f"iteration {iteration}, from {path}")
            return iteration, path
        rejected.append((path, "; ".join(problems[:3])
                         + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")))
    for path, why in rejected:
        log(f"WARNING: checkpoint {path} is incomplete or corrupt ({why})")
    return None
