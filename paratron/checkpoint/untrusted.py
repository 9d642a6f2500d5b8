"""Reading a folder that may be hostile: paths, JSON and safetensors headers.

A checkpoint, dataset or Hugging Face folder is data, and data can lie. What it names must
stay inside it (no `../x`, no `/etc/x`), what it holds must be plain files (a FIFO would
block the reader forever), its JSON small and shallow enough to parse safely, and a
safetensors header must describe exactly the bytes behind it: the library silently keeps
the last of two tensors with one name, and the dtype must match the index's. Each check
raises `UntrustedFileError`, a one-line `ValueError` naming the file, so every caller's
handling of bad input turns it into a message, never a traceback.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path, PurePosixPath

MAX_JSON_BYTES = 1 << 30        # a metadata.json of a trillion-parameter run is ~100 MB
MAX_JSON_DEPTH = 64             # Paratron's own files nest fewer than ten levels
MAX_HEADER_BYTES = 100 << 20    # the safetensors format's own limit

# safetensors dtype names -> torch dtype names (as `str(torch.float32)` without "torch.")
SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
               "I64": 8, "U64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"}


class UntrustedFileError(ValueError):
    """A file or a name read from a file that Paratron refuses, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))


def plain_name(name, where: str) -> str:
    """`name` when it is a relative path with no `..` part (a string read from a file)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UntrustedFileError(f"{where}: {name!r} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts:
        raise UntrustedFileError(f"{where}: {name!r} points outside its folder; a folder may "
                                 f"only name files inside itself")
    return name


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def inside(folder: str | os.PathLike, name, where: str) -> Path:
    """`folder/name` for a `name` read from `where`, refused unless it resolves inside
    `folder`. A link inside a Hugging Face cache snapshot may point into that model's
    `blobs/` folder, as the cache lays them out."""
    folder = Path(folder)
    path = folder / plain_name(name, where)
    root, real = folder.resolve(), path.resolve()
    if _within(real, root):
        return path
    if root.parent.name == "snapshots" and _within(real, root.parent.parent / "blobs"):
        return path
    raise UntrustedFileError(f"{where}: {name!r} resolves to {real}, outside {folder}; a "
                             f"folder may only name files inside itself")


def regular_file(path: str | os.PathLike) -> Path:
    """`path` when it is a regular file (a FIFO or device would block or lie)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise UntrustedFileError(f"{path}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UntrustedFileError(f"{path}: not a regular file")
    return Path(path)


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, walked iteratively (no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
    return deepest


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise UntrustedFileError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json(text: str | bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH):
    """JSON from an untrusted file: no duplicate keys, nesting at most `max_depth`."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise UntrustedFileError(f"{where}: JSON nested too deep") from None
    except UntrustedFileError as error:
        raise UntrustedFileError(f"{where}: {error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise UntrustedFileError(f"{where}: not valid JSON ({error})") from None
    if _depth(value, max_depth) > max_depth:
        raise UntrustedFileError(f"{where}: JSON nested deeper than {max_depth} levels")
    return value


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """Parse the JSON file `path` with the limits of `parse_json` and a size limit."""
    regular_file(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as error:
        raise UntrustedFileError(f"{path}: cannot be read ({error.strerror})") from None
    if len(data) > max_bytes:
        raise UntrustedFileError(f"{path}: larger than {max_bytes} bytes")
    return parse_json(data, str(path), max_depth=max_depth)


def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (torch dtype name, shape)} of a safetensors file, after checking
    that the header is bounded, has no duplicate names, and that every tensor's bytes
    lie inside the file without overlapping another's."""
    regular_file(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise UntrustedFileError(f"{path}: not a safetensors file (shorter than 8 "
                                         f"bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise UntrustedFileError(f"{path}: safetensors header of {length} bytes in a "
                                         f"file of {size} bytes")
            text = fh.read(length)
    except OSError as error:
        raise UntrustedFileError(f"{path}: cannot be read ({error.strerror})") from None
    header = parse_json(text, str(path), max_depth=4)
    if not isinstance(header, dict):
        raise UntrustedFileError(f"{path}: safetensors header is not a JSON object")
    data_bytes, spans, out = size - 8 - length, [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_entry(path, name, entry, data_bytes, spans)
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        if begin < end:
            raise UntrustedFileError(f"{path}: tensors overlap in the safetensors data")
    return out


def _tensor_entry(path, name: str, entry, data_bytes: int, spans: list) -> tuple[str, list]:
    """(torch dtype name, shape) of one header entry whose offsets fit the data."""
    bad = f"{path}: tensor {name!r} has an invalid safetensors header entry"
    if not isinstance(entry, dict):
        raise UntrustedFileError(bad)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise UntrustedFileError(f"{path}: tensor {name!r} has dtype {dtype!r}, which "
                                 f"Paratron does not read")
    if (not isinstance(shape, list) or len(shape) > 8 or not all(
            type(d) is int and 0 <= d < 1 << 48 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)):
        raise UntrustedFileError(bad)
    numel = 1
    for d in shape:
        numel *= d
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes or end - begin != numel * _ITEM_BYTES[dtype]:
        raise UntrustedFileError(f"{path}: tensor {name!r} has offsets {offsets} that do not "
                                 f"match its shape {shape} inside the file's "
                                 f"{data_bytes} data bytes")
    spans.append((begin, end))
    return SAFETENSORS_DTYPES[dtype], shape
