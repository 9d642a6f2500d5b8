"""Replacing a file so that readers see it whole or not at all, never through a link.

Every file Paratron replaces (checkpoint metadata, the dataset index cache, the
performance summary) is written the same way: under a new random name beside its
target, created exclusively (O_EXCL | O_NOFOLLOW, so neither an existing file nor a
link someone planted is opened) with the permissions the umask gives any new file,
synced, then renamed over the target. This module imports nothing from Paratron, so
`data/`, `checkpoint/` and `training/` all use it without pointing an import upward.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

# A new file only: never an existing one, never through a link planted at its name.
EXCLUSIVE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                   | getattr(os, "O_CLOEXEC", 0))


def create_temporary(target: Path) -> tuple[int, Path]:
    """(fd, path) of a new file beside `target` under a random name, created exclusively
    with the umask's permissions (mkstemp's 0600 would hide it from a colleague's
    account)."""
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(path, EXCLUSIVE_FLAGS, 0o666), path
        except FileExistsError:
            continue


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


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without an exception:
    synced, renamed over `path`, the rename synced. On an exception the temporary file
    is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(path.parent)
