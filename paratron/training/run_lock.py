"""One run per `--save` folder: an advisory lock on `<save>/.lock`, held for the run.

Two runs writing one folder interleave checkpoints of different models under one
`latest_checkpointed_iteration.txt`, and neither can be resumed exactly. So global rank 0
takes an exclusive `flock` on `<save>/.lock` before anything is written there (it works
across machines on a shared file system), writes its pid and host into it, and tells
every rank the outcome in one broadcast; a second run is refused in one line naming the
holder. The kernel drops the lock however the holder exits, kill -9 included. The file is
opened without following links and must be a plain file with one name, so a planted link
cannot make the run write elsewhere; it is removed on release.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import weakref
from pathlib import Path

import torch.distributed as dist

from paratron.options import ConfigError
from paratron.parallel.launch import explain_failure

LOCK_FILE = ".lock"
_ATTEMPTS = 5  # a holder removing its lock file as we open it: try the new file


class SaveFolderLock:
    """An exclusive lock on one `--save` folder; `release()` (or exiting) frees it."""

    def __init__(self, folder: Path, fd: int, created_folder: bool):
        self.folder, self.path, self._created = folder, folder / LOCK_FILE, created_folder
        self._fd: int | None = fd
        # Dropped without release() (a trainer never trained): close the descriptor,
        # which frees the lock, when the object goes.
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def acquire(cls, save_dir: str | os.PathLike) -> "SaveFolderLock":
        """Lock `save_dir` (created when missing) or raise a one-line ConfigError; a
        refused run leaves no folder of its own behind."""
        folder = Path(save_dir)
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return cls(folder, _locked_file(folder / LOCK_FILE, save_dir), created)
        except OSError as error:
            refusal = ConfigError(f"--save {save_dir}: cannot lock {folder / LOCK_FILE} "
                                  f"({error.strerror or error}); give a --save folder this "
                                  f"user can write")
        except ConfigError as error:
            refusal = error
        if created:
            _remove_empty(folder)
        raise refusal

    def release(self) -> None:
        """Remove the lock file (when it is still ours), then unlock by closing it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # the lock itself goes with the descriptor
        self._closer()
        if self._created:
            _remove_empty(self.folder)


def hold_save_folder(save_dir: str | None, pg) -> SaveFolderLock | None:
    """Rank 0 locks `save_dir`; every rank raises the same ConfigError when it cannot.

    Collective over the whole job when it has several processes (one broadcast of the
    refusal, or of None). Rank 0 records its failure in the rendezvous store before the
    others learn of it, so their report names rank 0 as the cause
    (`paratron.parallel.launch.explain_failure`)."""
    if save_dir is None:
        return None
    lock, refusal = None, None
    if pg.rank == 0:
        try:
            lock = SaveFolderLock.acquire(save_dir)
        except ConfigError as error:
            refusal = str(error)
            if pg.world_size > 1:  # recorded before the others fail: they name rank 0
                explain_failure(0, error)
    if pg.world_size > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise ConfigError(refusal)
    return lock


def _locked_file(path: Path, save_dir) -> int:
    """A descriptor of the lock file at `path`, locked, with this process written in."""
    for _ in range(_ATTEMPTS):
        fd = _open_lock_file(path, save_dir)
        try:
            if _lock(fd, path, save_dir):
                _write_holder(fd)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise ConfigError(f"--save {save_dir}: its lock file {path} keeps being replaced; is "
                      f"another run starting there?")


def _open_lock_file(path: Path, save_dir) -> int:
    """The lock file, opened (created when missing) without following a link, or a
    ConfigError when something other than a plain file with one name is there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if os.path.islink(path):
            raise ConfigError(f"--save {save_dir}: {path} is a symbolic link; Paratron does "
                              f"not lock through links: remove it") from None
        raise error
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "has other names (hard links)" if stat.S_ISREG(info.st_mode) else \
            "is not a plain file"
        raise ConfigError(f"--save {save_dir}: {path} {what}; Paratron only locks a plain "
                          f"file of its own: remove it")
    return fd


def _lock(fd: int, path: Path, save_dir) -> bool:
    """Take the lock on `fd`: True when it is held on the file now at `path`, False when
    that file was replaced meanwhile (try again), a ConfigError naming the holder when
    another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"--save {save_dir}: another run is writing to this folder "
                          f"({_read_holder(fd)}, lock {path}); wait for it to end or give "
                          f"another --save folder") from None
    return _same_file(fd, path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)


def _read_holder(fd: int) -> str:
    """The holder as the lock file names it ("pid 123 on host node7"), or a vaguer
    phrase while it is being written or when it holds something else."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        host = "".join(c for c in str(holder["host"])[:255] if c.isprintable())
        return f"pid {int(holder['pid'])} on host {host}"
    except (OSError, ValueError, TypeError, KeyError):
        return "the holder wrote no pid"


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
