"""Checkpoint directories on disk and how a complete one is recognised.

Layout (Megatron-LM's):

    <save>/latest_checkpointed_iteration.txt    the newest complete iteration, "100"
    <save>/iter_0000100/metadata.json            written last inside the directory
    <save>/iter_0000100/model_optim_rank_00000.safetensors   tensors rank 0 wrote
    <save>/iter_0000100/rng_rank_00000.safetensors           rank 0's RNG states

A checkpoint is written under `iter_0000100.tmp/`, renamed once every file and
`metadata.json` are on disk, and only then named by `latest_checkpointed_iteration.txt`.
`metadata.json` lists every file's size and SHA-256, so a missing, truncated or changed
file marks the checkpoint incomplete and `find_latest_valid` falls back to the newest
whole one. The folder may be hostile (`untrusted.py`): the metadata is parsed with limits
and checked field by field, every file it names must be a plain file inside the
checkpoint, safetensors headers must agree with the index, and writes never go through
a planted link.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from paratron.checkpoint import rng
from paratron.files import atomic_file, create_temporary, fsync_dir
from paratron.checkpoint.untrusted import (SAFETENSORS_DTYPES, UntrustedFileError, inside,
                                           read_json, regular_file, safetensors_header)

FORMAT_VERSION = 1
METADATA = "metadata.json"
LATEST = "latest_checkpointed_iteration.txt"
TMP_SUFFIX = ".tmp"
_ITER_DIR = re.compile(r"^iter_([0-9]{7,12})$")
_LATEST_TEXT = re.compile(r"^[0-9]{1,12}$")
MAX_ITERATION = 10 ** 12 - 1   # 12 digits: more iterations than any run will take
# The train state's counters, which a resumed run continues from
COUNTERS = ("iteration", "consumed_train_samples", "consumed_valid_samples",
            "skipped_iterations", "nan_iterations")
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, described in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))


def refuse_link(path: str | os.PathLike) -> None:
    """Refuse to write at `path` when it is a symbolic link (it may point anywhere)."""
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symbolic link; Paratron does not write through "
                              f"links: remove it")


def umask() -> int:
    """The process's umask, read without changing it: from /proc/self/status where Linux
    has it, else from the permissions a new file gets. (os.umask can only be read by
    setting it, which would race with a background save creating files meanwhile.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    fd, probe = create_temporary(Path(tempfile.gettempdir()) / "umask-probe")
    os.close(fd)
    try:
        return 0o666 & ~os.stat(probe).st_mode  # the bits a new file lacks
    finally:
        os.unlink(probe)


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file another library created (safetensors and mkstemp create theirs 0600)
    the permissions the umask gives any new file, so a colleague's account or an
    evaluation job under another user can read weights as it reads the logs. Opened
    without following a link, so a link put in the file's place changes nothing."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` through `paratron.files.atomic_file`; a link at `path`
    is refused, so the user learns someone put it there."""
    refuse_link(path)
    with atomic_file(path) as fh:
        fh.write(text.encode("utf-8"))


def copy_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy `source` to `target` the way `write_atomic` writes (never through a link)."""
    refuse_link(target)
    with atomic_file(target) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out)


def make_dir(path: str | os.PathLike) -> Path:
    """`path` as a directory Paratron may write into: created when missing, refused
    when it is a link."""
    path = Path(path)
    refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_tree(path: Path) -> None:
    """Remove Paratron's own directory `path`; a link there is refused, not followed."""
    refuse_link(path)
    if path.exists():
        shutil.rmtree(path)


def prepare_tmp_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    """An empty `iter_<7-digit iteration>.tmp/` (left-overs of an interrupted save are
    removed), created exclusively."""
    tmp = temporary_dir(save_dir, iteration)
    Path(save_dir).mkdir(parents=True, exist_ok=True)  # the user's folder (or link)
    _remove_tree(tmp)
    tmp.mkdir()
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
    refuse_link(final)
    if final.exists():  # saving the same iteration again: the new one replaces it
        old = final.with_name(final.name + ".old")
        _remove_tree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)
    write_atomic(Path(save_dir) / LATEST, f"{iteration}\n")
    return final


def read_tokenizer_info(folder: str | os.PathLike) -> dict | None:
    """`<save>/tokenizer/paratron_tokenizer.json` with its file names made paths inside
    `folder` ({"tokenizer_type", "vocab_file", "merge_file", "tokenizer_model"}; "." as
    the tokenizer model is the folder itself), or None when the folder has none."""
    folder = Path(folder)
    file = folder / TOKENIZER_INFO
    if not file.exists():
        return None
    info = read_json(file, max_bytes=1 << 20)
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    out = {"tokenizer_type": info.get("tokenizer_type")}
    if out["tokenizer_type"] is not None and not isinstance(out["tokenizer_type"], str):
        raise CheckpointError(f"{file}: 'tokenizer_type' is not a name")
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        name = info.get(key)
        out[key] = (None if not name else folder if name == "." and key == "tokenizer_model"
                    else inside(folder, name, str(file)))
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of the checkpoint directory `path`, checked field by field
    (a ValueError naming the file when it is missing, unreadable or malformed)."""
    file = Path(path) / METADATA
    if not file.exists():
        raise CheckpointError(f"{file}: missing (the checkpoint was not completed)")
    meta = read_json(file)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{file}: format version {version!r}, expected "
                              f"{FORMAT_VERSION}")
    check_metadata(meta, str(file))
    return meta


def _count(value, limit: int = 1 << 62) -> bool:
    return type(value) is int and 0 <= value <= limit


def _finite(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_metadata(meta: dict, where: str) -> None:
    """Refuse metadata whose fields do not have the types and ranges Paratron writes,
    so nothing later meets a list where it expects a dict or an iteration of 10^30."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}: {what}")

    need(_count(meta.get("iteration"), MAX_ITERATION), "'iteration' is not an iteration "
         f"number (0 to {MAX_ITERATION})")
    listed = meta.get("files")
    need(isinstance(listed, dict), "'files' is not an object of file names")
    for name, info in listed.items():
        need("/" not in name and "\\" not in name and name not in ("", ".", ".."),
             f"file name {name!r} is not a plain file name")
        need(isinstance(info, dict) and _count(info.get("size"))
             and isinstance(info.get("sha256"), str)
             and re.fullmatch("[0-9a-f]{64}", info["sha256"]) is not None,
             f"the entry of {name!r} in 'files' needs a size and a SHA-256")
    tensors = meta.get("tensors")
    need(isinstance(tensors, dict), "'tensors' is not an object")
    for key, entry in tensors.items():
        need(isinstance(entry, dict) and isinstance(entry.get("shape"), list)
             and len(entry["shape"]) <= 8 and all(_count(d, 1 << 48) for d in entry["shape"])
             and entry.get("dtype") in SAFETENSORS_DTYPES.values()
             and isinstance(entry.get("chunks"), list) and entry["chunks"],
             f"tensor {key!r} needs a shape, a dtype and chunks")
        for chunk in entry["chunks"]:
            need(isinstance(chunk, dict) and chunk.get("file") in listed
                 and isinstance(chunk.get("key"), str)
                 and isinstance(chunk.get("offsets"), list)
                 and len(chunk["offsets"]) == len(entry["shape"])
                 and all(_count(o, 1 << 48) for o in chunk["offsets"])
                 and isinstance(chunk.get("shape", []), list)
                 and len(chunk_shape(entry, chunk)) == len(entry["shape"])
                 and all(_count(n, 1 << 48) for n in chunk_shape(entry, chunk)),
                 f"a chunk of tensor {key!r} does not name a listed file, a key, offsets "
                 f"and a shape")
            need(all(o + n <= d for o, n, d in zip(chunk["offsets"], chunk_shape(entry, chunk),
                                                  entry["shape"])),
                 f"a chunk of tensor {key!r} reaches past its shape {entry['shape']}")
        spans = sorted(chunk_span(entry, c) or (-1, -1) for c in entry["chunks"])
        need(spans[0][0] == 0 and spans[-1][1] == math.prod(entry["shape"])
             and all(a[1] == b[0] for a, b in zip(spans, spans[1:])),
             f"the chunks of tensor {key!r} are not runs of its elements that cover each "
             f"element once")
    state = meta.get("train_state")
    need(isinstance(state, dict) and all(_count(state[k]) for k in COUNTERS if k in state)
         and all(v is None or type(v) in (str, int, float, bool) for v in state.values()),
         f"'train_state' must hold plain values, and counts for {', '.join(COUNTERS)}")
    need(state.get("iteration", meta["iteration"]) == meta["iteration"],
         "'train_state' and 'iteration' disagree")
    need(meta.get("config") is None or isinstance(meta["config"], dict),
         "'config' is not an object")
    need(isinstance(meta.get("layout"), dict), "'layout' is not an object")
    need(type(meta.get("rng_saved")) is bool, "'rng_saved' is not true or false")
    opt = meta.get("optimizer")
    need(opt is None or (
        isinstance(opt, dict) and isinstance(opt.get("kind"), str) and _count(opt.get("steps"))
        and (opt.get("step_count") is None or _finite(opt["step_count"]))
        and isinstance(opt.get("state_keys"), list)
        and all(isinstance(k, str) for k in opt["state_keys"])
        and isinstance(opt.get("loss_scaler"), dict)
        and all(_finite(v) for v in opt["loss_scaler"].values())),
        "'optimizer' needs a kind, steps, state keys and a loss scaler of finite numbers")


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint directory `path`; empty when it is whole.

    Checks metadata.json, then every listed file's presence, kind (a plain file inside
    the directory) and size, its safetensors header against the index, and with
    `checksums` its SHA-256."""
    path = Path(path)
    try:
        meta = read_metadata(path)
        expected = _expected_headers(meta)
    except ValueError as error:
        return [str(error)]
    m = _ITER_DIR.match(path.name)
    if m and int(m.group(1)) != meta["iteration"]:
        return [f"{path / METADATA}: iteration {meta['iteration']} in the folder of "
                f"iteration {int(m.group(1))}"]
    problems = []
    for name, info in sorted(meta["files"].items()):
        try:
            file = inside(path, name, str(path / METADATA))
            if not file.exists():
                problems.append(f"{file}: missing")
                continue
            regular_file(file)
        except UntrustedFileError as error:
            problems.append(str(error))
            continue
        size = file.stat().st_size
        if size != info["size"]:
            problems.append(f"{file}: {size} bytes, expected {info['size']}")
            continue
        try:
            header = check_header(file, expected.get(name, {}))
        except ValueError as error:
            problems.append(str(error))
            continue
        if name.startswith("rng_rank_") and (why := rng.header_problem(header)):
            problems.append(f"{file}: {why}")
            continue
        if checksums and file_digest(file) != info["sha256"]:
            problems.append(f"{file}: checksum mismatch")
    return problems


def chunk_shape(entry: dict, chunk: dict) -> list[int]:
    """The shape of one chunk of a tensor's index entry (a chunk without one is the whole
    tensor, as the converter and earlier saves write it)."""
    return chunk.get("shape", entry["shape"])


def chunk_span(entry: dict, chunk: dict) -> tuple[int, int] | None:
    """The elements [begin, end) of the flattened tensor that a chunk holds, or None when
    they are not consecutive (Paratron writes only runs: see `state.flat_blocks`)."""
    shape, offsets, sizes = entry["shape"], chunk["offsets"], chunk_shape(entry, chunk)
    first = next((i for i, n in enumerate(sizes) if n != 1), len(sizes))
    if any(offsets[i] or sizes[i] != shape[i] for i in range(first + 1, len(shape))):
        return None
    begin = sum(o * math.prod(shape[i + 1:]) for i, o in enumerate(offsets))
    return begin, begin + math.prod(sizes)


def _expected_headers(meta: dict) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """{file: {key: (dtype, shape)}} that the index says each file holds."""
    out: dict[str, dict] = {}
    for entry in meta["tensors"].values():
        for chunk in entry["chunks"]:
            out.setdefault(chunk["file"], {})[chunk["key"]] = (entry["dtype"],
                                                               chunk_shape(entry, chunk))
    return out


def check_header(file: Path, expected: dict[str, tuple[str, list[int]]]) -> dict:
    """The safetensors header of `file`, refused unless it holds every tensor of
    `expected` with that dtype and shape."""
    header = safetensors_header(file)
    for key, (dtype, shape) in expected.items():
        found = header.get(key)
        if found is None:
            raise CheckpointError(f"{file}: lacks tensor {key}, which the index places there")
        if found != (dtype, shape):
            raise CheckpointError(f"{file}: tensor {key} is {found[0]} {found[1]}, the index "
                                  f"says {dtype} {shape}")
    return header


def read_latest(save_dir: str | os.PathLike) -> int | None:
    """The iteration `latest_checkpointed_iteration.txt` names, or None."""
    try:
        with open(regular_file(Path(save_dir) / LATEST), "rb") as fh:
            text = fh.read(64).decode("ascii").strip()
    except (OSError, ValueError):
        return None
    return int(text) if _LATEST_TEXT.match(text) else None


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
        try:  # a link to a folder elsewhere is not a checkpoint of this folder
            inside(save_dir, path.name, str(Path(save_dir) / LATEST))
            problems = verify_checkpoint(path, checksums)
        except UntrustedFileError as error:
            problems = [str(error)]
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
