"""Megatron-LM's indexed dataset: the `.bin` / `.idx` file pair, byte for byte.

Layout of `<prefix>.idx` (all integers little-endian):

    9 bytes   magic b"MMIDIDX\x00\x00"
    uint64    version, always 1
    uint8     dtype code of the tokens in the .bin (see DTYPE_CODES)
    uint64    S, the number of sequences
    uint64    D, the number of document-index entries (= documents + 1)
    int32[S]  length of each sequence, in tokens
    int64[S]  byte offset of each sequence in the .bin (the first is 0)
    int64[D]  document index: entry d+1 is the exclusive end sequence of document d

`<prefix>.bin` holds the token ids of all sequences back to back. A sequence is a
document, or a sentence with `--split-sentences`. Both files are memory-mapped, so
opening a corpus of any size costs O(1) memory and a job's ranks share the pages.
"""

from __future__ import annotations

import glob
import os
import socket
import struct
from typing import BinaryIO, Iterable, Sequence

import numpy as np

from paratron.data.errors import DataError
from paratron.files import EXCLUSIVE_FLAGS

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Offset of the int32 sequence lengths: magic + version + dtype code + the two counts.
HEADER_SIZE = 9 + 8 + 1 + 8 + 8

#: Megatron's numeric codes for the token dtype stored in the .idx header.
DTYPE_CODES: dict[int, type[np.number]] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
                                            5: np.int64, 6: np.float64, 7: np.float32,
                                            8: np.uint16}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def dtype_code(dtype) -> int:
    """Megatron's header code for a numpy dtype (uint16 -> 8, int32 -> 4, ...)."""
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise DataError(f"dtype {np.dtype(dtype)} cannot be stored in an indexed dataset") from None


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    """True when both `<prefix>.idx` and `<prefix>.bin` are files."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


# --------------------------------------------------------------------------- temporary files


def temporary_path(path: str) -> str:
    """Where `path` is written before it is complete: `<path>.tmp-<host>-<pid>`.

    The host and process id let a later run tell a leftover of a dead process
    (removed by `remove_stale_temporaries`) from the file of a run still
    going, even when several machines share the folder.
    """
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine is running (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def _process_is_gone(pid: int) -> bool:
    # This run's own pid: temporaries are cleaned before this run creates any, so such a
    # file was left by an earlier process that had the same id.
    return pid == os.getpid() or not process_alive(pid)


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporaries of `path` that runs on this host left when they died.

    A run killed with SIGKILL (or a machine that lost power) cannot clean up
    after itself; the next run writing the same output does it. Only files of
    processes that no longer exist are touched: another run writing the same
    prefix at the same time keeps its files. Also recognises the older
    `<path>.tmp-<pid>` form. Returns the paths removed.
    """
    host = socket.gethostname()
    removed = []
    for candidate in glob.glob(glob.escape(path) + ".tmp-*"):
        owner, _, pid = candidate[len(path) + len(".tmp-"):].rpartition("-")
        if not pid.isdigit() or owner not in ("", host) or not _process_is_gone(int(pid)):
            continue
        try:
            os.unlink(candidate)
        except FileNotFoundError:
            continue
        removed.append(candidate)
    return removed


def create_exclusive(path: str) -> BinaryIO:
    """Open a new file for writing; fails if anything (a file, a planted link) is already there."""
    return os.fdopen(os.open(path, EXCLUSIVE_FLAGS, 0o666), "wb")


def write_error(path: str, exc: OSError) -> DataError:
    """One line for an OS error while writing `path` (full disk, read-only folder, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, FileExistsError):
        reason += "; another run may be writing the same output"
    return DataError(f"{path}: cannot write ({reason})")


# --------------------------------------------------------------------------- writing


def sequence_pointers(sequence_lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of every sequence in the .bin: an exclusive running sum of lengths."""
    pointers = np.zeros(len(sequence_lengths), dtype=np.int64)
    if len(sequence_lengths) > 1:
        np.cumsum(np.asarray(sequence_lengths[:-1], dtype=np.int64) * itemsize, out=pointers[1:])
    return pointers


def write_index(path: str, dtype, sequence_lengths: Sequence[int] | np.ndarray,
                document_indices: Sequence[int] | np.ndarray, exclusive: bool = False) -> None:
    """Write a complete .idx file for the given sequence lengths and document index.

    `exclusive` creates the file with `create_exclusive` (for
    temporary names, which must never already exist).
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    with create_exclusive(path) if exclusive else open(path, "wb") as f:
        f.write(INDEX_MAGIC + struct.pack("<QBQQ", INDEX_VERSION, dtype_code(dtype),
                                          len(lengths), len(docs)))
        f.write(lengths.astype("<i4", copy=False).tobytes(order="C"))
        f.write(sequence_pointers(lengths, np.dtype(dtype).itemsize).astype("<i8").tobytes())
        f.write(docs.astype("<i8", copy=False).tobytes(order="C"))


class IndexedDatasetWriter:
    """Append documents to a `.bin` file and write the matching `.idx` at the end.

    The writer keeps only the per-sequence lengths in memory (4 bytes each);
    token ids go straight to disk. `add_document` takes one document;
    `add_batch` takes many at once as flat arrays, which is what the
    preprocessing workers produce and avoids per-document Python work.

    `exclusive` creates both files with `create_exclusive`, as
    temporary names must be. An OS error while writing (a full disk, a
    read-only folder) is raised as a `DataError` naming the file.
    """

    def __init__(self, bin_file: str, dtype=np.int32, exclusive: bool = False) -> None:
        self.bin_file = bin_file
        self.dtype = np.dtype(dtype)
        self.exclusive = exclusive
        try:
            self._file = create_exclusive(bin_file) if exclusive else open(bin_file, "wb")
        except OSError as exc:
            raise write_error(bin_file, exc) from None
        self._lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._num_sequences = 0

    def add_document(self, token_ids: Iterable[int],
                     sequence_lengths: Sequence[int] | None = None) -> None:
        """Add one document. `sequence_lengths` splits it into sentences; default: one sequence.

        An empty document (no tokens) adds no sequence, and its document-index
        entry repeats the previous one, as Megatron's writer does.
        """
        ids = np.asarray(token_ids, dtype=self.dtype)
        if sequence_lengths is None:
            sequence_lengths = [ids.size] if ids.size else []
        lengths = np.asarray(sequence_lengths, dtype=np.int32)
        if int(lengths.sum()) != ids.size:
            raise ValueError(f"sentence lengths sum to {int(lengths.sum())}, "
                             f"document has {ids.size} tokens")
        self._write(ids.tobytes(order="C"))
        self._lengths.append(lengths)
        self._num_sequences += len(lengths)
        self._doc_ends.append(np.array([self._num_sequences], dtype=np.int64))

    def add_batch(self, flat_ids: np.ndarray, sequence_lengths: np.ndarray,
                  sequences_per_document: np.ndarray) -> None:
        """Add many documents at once.

        `flat_ids` are all their tokens back to back, `sequence_lengths` the
        length of every sequence (no zeros), `sequences_per_document` how many
        sequences each document has (0 for an empty document).
        """
        flat_ids = np.asarray(flat_ids)
        if flat_ids.dtype != self.dtype:
            flat_ids = flat_ids.astype(self.dtype)
        self._write(flat_ids.tobytes(order="C"))
        lengths = np.asarray(sequence_lengths, dtype=np.int32)
        self._lengths.append(lengths)
        ends = self._num_sequences + np.cumsum(np.asarray(sequences_per_document, dtype=np.int64))
        self._doc_ends.append(ends)
        self._num_sequences += len(lengths)

    def add_index(self, prefix: str) -> None:
        """Append a whole existing indexed dataset (its documents keep their boundaries)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{idx_path(prefix)}: tokens are {other.dtype}, expected {self.dtype}")
        self._lengths.append(np.array(other.sequence_lengths, dtype=np.int32))
        ends = np.array(other.document_indices[1:], dtype=np.int64)
        self._doc_ends.append(self._num_sequences + ends)
        self._num_sequences += len(other)
        with open(bin_path(prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._write(chunk)

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise write_error(self.bin_file, exc) from None

    def finalize(self, idx_file: str) -> None:
        """Close the .bin and write the .idx."""
        try:
            self._file.close()
        except OSError as exc:  # the last buffered bytes reach the disk here
            raise write_error(self.bin_file, exc) from None
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        try:
            write_index(idx_file, self.dtype, lengths, np.concatenate(self._doc_ends),
                        self.exclusive)
        except OSError as exc:
            raise write_error(idx_file, exc) from None

    def close(self) -> None:
        """Close the .bin without writing an index (used when aborting; a failing flush is
        ignored)."""
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass


# --------------------------------------------------------------------------- reading


#: Entries checked at a time when validating an index: bounded temporary memory on any
#: corpus, and chunks small enough to stay in the CPU cache (measured fastest).
_CHUNK = 1 << 16


def _first_bad_sequence(lengths: np.ndarray, pointers: np.ndarray, itemsize: int,
                        bin_size: int) -> int | None:
    """The first sequence whose length or pointer is impossible, or None when all are sound.

    Sound means: length >= 0; the pointer a multiple of the token size, at or
    after the end of the previous sequence (so pointers are non-negative and
    increasing and sequences do not overlap); the sequence ends inside the
    .bin. Vectorised over chunks: 10^8 sequences take under a second.
    """
    previous_end = 0
    for lo in range(0, len(lengths), _CHUNK):
        length = lengths[lo : lo + _CHUNK].astype(np.int64)
        start = pointers[lo : lo + _CHUNK].astype(np.int64)
        # Clipping keeps the sum from overflowing; the clipped cases are flagged below.
        end = np.clip(start, 0, bin_size) + np.maximum(length, 0) * itemsize
        before = np.concatenate(([previous_end], end[:-1]))
        bad = (length < 0) | (start < before) | (start > bin_size) | ((start & (itemsize - 1)) != 0)
        bad |= end > bin_size
        if bad.any():
            return lo + int(np.argmax(bad))
        previous_end = int(end[-1])
    return None


def _first_bad_document(document_indices: np.ndarray, num_sequences: int) -> int | None:
    """The first document-index entry that is below its predecessor or beyond the last sequence."""
    previous = 0
    for lo in range(0, len(document_indices), _CHUNK):
        entries = document_indices[lo : lo + _CHUNK].astype(np.int64)
        before = np.concatenate(([previous], entries[:-1]))
        bad = (entries < before) | (entries > num_sequences)
        if bad.any():
            return lo + int(np.argmax(bad))
        previous = int(entries[-1])
    return None


class IndexedDataset:
    """Read-only view of a Megatron `.bin/.idx` pair, memory-mapped.

    `ds[i]` is sequence `i` as a numpy array (a view into the mapped file) and
    `ds.get(i, offset, length)` a slice of it; `sequence_lengths`, `sequence_pointers`
    and `document_indices` are the .idx arrays. The constructor raises `DataError` naming
    the file for anything that would read outside the `.bin` or crash later (bad magic,
    version or dtype, counts that do not fit the file, bad lengths, pointers or document
    index); token ids are checked by the GPT dataset as it reads them.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        prefix = self.prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file (data prefix '{prefix}' needs "
                                f"{prefix}.bin and {prefix}.idx)")
        try:
            self._read_header(ipath)
            self._map_index(ipath)
            bin_size = os.path.getsize(bpath)
            self._validate(ipath, bpath, bin_size)
            # numpy cannot map an empty file; an empty dataset needs no mapping anyway.
            self._bin_map = (np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size
                             else np.zeros(0, np.uint8))
            # Every token of the file as one array (sequence pointers are checked to be
            # multiples of the token size): a slice of it is the cheapest read there is.
            self._itemsize = self.dtype.itemsize
            self._tokens = np.frombuffer(self._bin_map, dtype=self.dtype,
                                         count=bin_size // self._itemsize)
        except OSError as exc:
            raise DataError(f"{exc.filename or prefix}: cannot read "
                            f"({exc.strerror or exc})") from None

    def _read_header(self, ipath: str) -> None:
        idx_size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < 9 or header[:9] != INDEX_MAGIC:
            raise DataError(f"{ipath}: not a Megatron indexed dataset index "
                            f"(bad magic {header[:9]!r})")
        if len(header) < HEADER_SIZE:
            raise DataError(f"{ipath}: truncated header ({idx_size} bytes)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise DataError(f"{ipath}: unsupported index version {version} "
                            f"(expected {INDEX_VERSION})")
        code = header[17]
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count, self.document_count = struct.unpack("<QQ", header[18:34])
        needed = HEADER_SIZE + self.sequence_count * (4 + 8) + self.document_count * 8
        announced = (f"header announces {self.sequence_count} sequences and "
                     f"{self.document_count} document entries = {needed} bytes")
        if idx_size < needed:
            raise DataError(f"{ipath}: truncated index ({idx_size} bytes, {announced})")
        # Megatron's multimodal datasets append one int8 mode per sequence; nothing else may follow.
        if idx_size not in (needed, needed + self.sequence_count):
            raise DataError(f"{ipath}: corrupt index ({idx_size} bytes, but the {announced})")
        if self.document_count < 1:
            raise DataError(f"{ipath}: document index is empty")

    def _map_index(self, ipath: str) -> None:
        n = self.sequence_count
        self._idx_map = np.memmap(ipath, mode="r", dtype=np.uint8)
        buf = self._idx_map
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n,
                                               offset=HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=self.document_count,
                                              offset=HEADER_SIZE + 12 * n)

    def _validate(self, ipath: str, bpath: str, bin_size: int) -> None:
        n, docs = self.sequence_count, self.document_indices
        if int(docs[-1]) != n or int(docs[0]) != 0:
            raise DataError(f"{ipath}: inconsistent index (document index runs from "
                            f"{int(docs[0])} to {int(docs[-1])}, but there are {n} sequences)")
        bad = _first_bad_document(docs, n)
        if bad is not None:
            raise DataError(f"{ipath}: corrupt document index (entry {bad} is {int(docs[bad])}, "
                            f"after {int(docs[bad - 1])}; entries must grow from 0 to {n})")
        bad = _first_bad_sequence(self.sequence_lengths, self.sequence_pointers,
                                  self.dtype.itemsize, bin_size)
        if bad is not None:
            raise DataError(self._sequence_problem(bad, ipath, bpath, bin_size))

    def _sequence_problem(self, i: int, ipath: str, bpath: str, bin_size: int) -> str:
        """One line on why sequence `i` failed `_first_bad_sequence`."""
        length, start = int(self.sequence_lengths[i]), int(self.sequence_pointers[i])
        size = self.dtype.itemsize
        where = f"{ipath}: corrupt index: sequence {i}"
        if length < 0:
            return f"{where} has a negative length ({length})"
        if start < 0 or start > bin_size:
            return f"{where} starts at byte {start}, outside {bpath} ({bin_size} bytes)"
        if start % size:
            return (f"{where} starts at byte {start}, not a multiple of the token size "
                    f"({size} bytes)")
        if start + length * size > bin_size:
            return (f"{bpath}: truncated data file ({bin_size} bytes, but sequence {i} of {ipath} "
                    f"ends at byte {start + length * size})")
        previous = int(self.sequence_pointers[i - 1]) + int(self.sequence_lengths[i - 1]) * size
        return (f"{where} starts at byte {start}, inside sequence {i - 1} "
                f"(which ends at byte {previous})")

    # Pickling (DataLoader workers started with spawn) reopens the files by name.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return self.sequence_count

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    @property
    def num_tokens(self) -> int:
        return int(np.sum(self.sequence_lengths, dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(int(i))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `i` (to its end when length is None)."""
        if not 0 <= i < self.sequence_count:
            raise IndexError(f"sequence {i} out of range for {self.prefix} "
                             f"({self.sequence_count} sequences)")
        start = self.sequence_pointers[i] // self._itemsize + offset
        stop = start - offset + self.sequence_lengths[i] if length is None else start + length
        return self._tokens[start:stop]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document `d` (its sequences joined)."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first])
        count = int(np.sum(self.sequence_lengths[first:last], dtype=np.int64))
        itemsize, tail = self.dtype.itemsize, last - 1
        end = int(self.sequence_pointers[tail]) + int(self.sequence_lengths[tail]) * itemsize
        if end - start != count * itemsize:  # gaps between its sequences (Megatron writes none)
            return np.concatenate([self.get(i) for i in range(first, last)])
        return np.frombuffer(self._bin_map, dtype=self.dtype, count=count, offset=start)
