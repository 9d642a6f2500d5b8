"""What every conversion shares: a model as a stream of logical tensors, a layer at a time.

A loader turns its files into a `StreamedModel`: the TransformerConfig, the real
vocabulary rows and a function yielding the logical tensors (`model/<name>`,
`buffer/<name>`, as in a Paratron checkpoint) one group at a time: the embedding, each
layer, the final norm and output layer. A saver writes the groups, so at most one
layer's tensors are in memory whatever the model's size. The names and shapes a config
implies come from a `GPTModel` built on the meta device.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError

from paratron.checkpoint.state import VOCAB_ROWS, resize_rows
from paratron.model.config import TransformerConfig
from paratron.data.indexed_dataset import process_alive
from paratron.convert.errors import ConversionError
from paratron.convert.tokenizer_files import TokenizerFiles
from paratron.model.gpt import GPTModel

Group = dict[str, torch.Tensor]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass
class ModelLayout:
    """The logical tensors of a model (built on the meta device), grouped for streaming."""

    groups: list[list[str]]          # Paratron names, one list per group
    params: dict[str, torch.nn.Parameter]  # meta parameters (with their sharding attributes)
    buffers: dict[str, torch.Tensor]  # persistent buffers

    def shape(self, name: str) -> torch.Size:
        t = self.params.get(name)
        return (t if t is not None else self.buffers[name]).shape

    def key(self, name: str) -> str:
        """The checkpoint key of a Paratron tensor name."""
        return f"model/{name}" if name in self.params else f"buffer/{name}"


def group_index(name: str, num_layers: int) -> int:
    """0 for the embedding, 1 + i for layer i, num_layers + 1 for the rest."""
    match = _LAYER.match(name)
    if match:
        return 1 + int(match.group(1))
    return 0 if name.startswith("embedding.") else num_layers + 1


def model_layout(config: TransformerConfig) -> ModelLayout:
    """The logical tensors of the single-process model `config` describes."""
    with torch.device("meta"):
        model = GPTModel(config)
    params = dict(model.named_parameters())
    buffers = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in params}
    groups: list[list[str]] = [[] for _ in range(config.num_layers + 2)]
    for name in list(params) + list(buffers):
        groups[group_index(name, config.num_layers)].append(name)
    return ModelLayout([g for g in groups if g], params, buffers)


@dataclass
class StreamedModel:
    """A model read from some checkpoint format, handed to a saver group by group.

    config.padded_vocab_size is the number of rows the stored embedding has;
    vocab_size the leading rows that are real tokens (the rest is padding)."""

    config: TransformerConfig
    vocab_size: int
    groups: Callable[[], Iterator[Group]]
    num_groups: int
    source: str                       # what was read, for messages
    model_type: str | None = None     # the Hugging Face model_type, when known
    tokenizer: TokenizerFiles | None = None  # tokenizer files that belong to the model
    saved_config: dict | None = None   # a Paratron run config the checkpoint carried
    notes: list[str] = field(default_factory=list)
    optimizer: object | None = None    # a Megatron run's optimizer state (OptimizerCarry)


def resize_vocab(group: Group, rows: int) -> Group:
    """Pad (with zero rows) or trim the embedding and output layer to `rows` rows."""
    out = dict(group)
    for name in VOCAB_ROWS:
        key = f"model/{name}"
        if key in out:
            out[key] = resize_rows(out[key], rows)
    return out


def cast(group: Group, dtype: torch.dtype | None) -> Group:
    """Floating-point tensors in `dtype` (None: as stored)."""
    if dtype is None:
        return group
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in group.items()}


def progress(total: int, what: str):
    """A progress bar on stderr (shown on a terminal only, so logs stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="group", file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)


# The temporary folder beside --save-dir; the host keeps a run on another machine that
# shares the folder from taking this one's for a dead process's.
STAGING = ".{name}.converting-{host}-{pid}"
# Errors that mean the destination cannot take the files, whichever file was written.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_new_folder(save_dir: str | os.PathLike, flag: str = "--save-dir") -> Path:
    """`save_dir` as a path where a conversion may write: absent or an empty folder.
    Checked before the source is read, so a refusal comes before any note about it."""
    target = Path(save_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConversionError(f"{flag} {target}: already exists and is not empty; choose a "
                              f"new folder or remove it")
    return target


@contextmanager
def staged_output(save_dir: str | os.PathLike, flag: str = "--save-dir") -> Iterator[Path]:
    """A temporary folder next to `save_dir`, renamed to it when the block succeeds and
    removed when it fails, so `save_dir` is either complete or absent.

    The folder is created exclusively (an existing one, or a link planted at its name,
    is never reused or followed); folders that runs killed outright left behind are
    removed first. A destination that cannot be written (read-only, full) is one line.
    """
    target = check_new_folder(save_dir, flag)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"{flag} {target}: cannot create its parent ({exc.strerror})"
                              ) from None
    remove_stale_stages(parent, target.name)
    tmp = parent / STAGING.format(name=target.name, host=socket.gethostname(), pid=os.getpid())
    try:
        tmp.mkdir()
    except FileExistsError:
        raise ConversionError(f"{flag} {target}: {tmp} already exists (left by an earlier "
                              f"run with this process id, or put there); remove it") from None
    except OSError as exc:
        raise ConversionError(f"{flag} {target}: cannot create {tmp.name} in {parent} "
                              f"({exc.strerror})") from None
    try:
        yield tmp
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _write_failure(exc, tmp)
        if cause is None:
            raise
        raise ConversionError(f"{flag} {target}: cannot write the converted files ({cause}); "
                              f"nothing was kept") from None


def _write_failure(exc: BaseException, tmp: Path) -> str | None:
    """Why writing into `tmp` failed, when `exc` says that it did; None for any other
    error (a source that cannot be read is its loader's to explain)."""
    if isinstance(exc, OSError):
        name = exc.filename and Path(os.fsdecode(exc.filename))
        if exc.errno in _WRITE_ERRNOS or (name and tmp in (name, *name.parents)):
            return exc.strerror or str(exc)
        return None
    if isinstance(exc, SafetensorError) and "serializ" in str(exc):  # safetensors' writes
        return re.sub(r" \(os error \d+\)$", "", str(exc).rsplit(": ", 1)[-1])
    return None


def remove_stale_stages(parent: Path, name: str) -> None:
    """Remove the temporary folders of `name` whose process is gone (killed before its
    cleanup ran). A live process's folder, and anything that is not a plain folder (a
    link put there), are left alone."""
    prefix = STAGING.format(name=name, host=socket.gethostname(), pid="")
    for entry in parent.glob(glob.escape(prefix) + "*"):
        pid = entry.name[len(prefix):]
        if (pid.isdigit() and int(pid) > 0 and int(pid) != os.getpid()
                and not process_alive(int(pid)) and entry.is_dir() and not entry.is_symlink()):
            shutil.rmtree(entry, ignore_errors=True)

