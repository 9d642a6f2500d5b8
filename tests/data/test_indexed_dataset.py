"""Megatron's .bin/.idx format: golden bytes, round trips, and clear errors for bad files."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from paratron.data.errors import DataError
from paratron.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, optimal_dtype, write_index

# The golden example: uint16 documents [10, 11, 12], [], [20, 21].
GOLDEN_IDX_HEX = (
    "4d4d494449445800 00 0100000000000000 08 0200000000000000 0400000000000000 03000000 02000000 "
    "0000000000000000 0600000000000000 0000000000000000 0100000000000000 0100000000000000 0200000000000000"
).replace(" ", "")


def write_golden(prefix: str) -> None:
    writer = IndexedDatasetWriter(prefix + ".bin", np.uint16)
    for doc in ([10, 11, 12], [], [20, 21]):
        writer.add_document(doc)
    writer.finalize(prefix + ".idx")


def test_golden_idx_is_byte_identical_and_reads_back(tmp_path):
    prefix = str(tmp_path / "golden")
    write_golden(prefix)
    idx = (tmp_path / "golden.idx").read_bytes()
    assert len(idx) == 90
    assert idx.hex() == GOLDEN_IDX_HEX
    assert (tmp_path / "golden.bin").read_bytes() == np.array([10, 11, 12, 20, 21], "<u2").tobytes()

    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == 2 and ds.num_documents == 3
    assert ds[0].tolist() == [10, 11, 12] and ds[1].tolist() == [20, 21]
    assert ds.get(0, offset=1, length=2).tolist() == [11, 12]
    assert ds.sequence_lengths.tolist() == [3, 2]
    assert ds.sequence_pointers.tolist() == [0, 6]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]
    assert [ds.document(d).tolist() for d in range(3)] == [[10, 11, 12], [], [20, 21]]


def test_batch_writer_equals_document_writer_and_sentences(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 70000, size=int(n)).tolist() for n in rng.integers(0, 4, size=3)] for _ in range(50)]
    # Document by document ...
    a = IndexedDatasetWriter(str(tmp_path / "a.bin"), np.int32)
    for sentences in docs:
        sentences = [s for s in sentences if s]
        a.add_document(sum(sentences, []), [len(s) for s in sentences])
    a.finalize(str(tmp_path / "a.idx"))
    # ... and all at once give the same bytes.
    b = IndexedDatasetWriter(str(tmp_path / "b.bin"), np.int32)
    sentences = [s for d in docs for s in d if s]
    b.add_batch(np.array(sum(sentences, []), dtype=np.int64), np.array([len(s) for s in sentences]),
                np.array([sum(1 for s in d if s) for d in docs]))
    b.finalize(str(tmp_path / "b.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "a"))
    assert ds.dtype == np.int32
    for d, doc in enumerate(docs):
        assert ds.document(d).tolist() == sum(doc, [])


def test_add_index_concatenates(tmp_path):
    write_golden(str(tmp_path / "g"))
    w = IndexedDatasetWriter(str(tmp_path / "cat.bin"), np.uint16)
    w.add_index(str(tmp_path / "g"))
    w.add_index(str(tmp_path / "g"))
    w.finalize(str(tmp_path / "cat.idx"))
    ds = IndexedDataset(str(tmp_path / "cat"))
    assert ds.document_indices.tolist() == [0, 1, 1, 2, 3, 3, 4]
    assert [ds[i].tolist() for i in range(4)] == [[10, 11, 12], [20, 21]] * 2


def test_reader_is_picklable(tmp_path):
    write_golden(str(tmp_path / "g"))
    ds = pickle.loads(pickle.dumps(IndexedDataset(str(tmp_path / "g"))))
    assert ds[1].tolist() == [20, 21]


def test_optimal_dtype_threshold():
    assert optimal_dtype(50257) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(151665) == np.int32


def _expect_error(prefix, fragment):
    with pytest.raises(DataError) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    return message


def test_missing_prefix(tmp_path):
    message = _expect_error(str(tmp_path / "nothing"), "no such file")
    assert "nothing" in message


def test_wrong_magic(tmp_path):
    prefix = str(tmp_path / "g")
    write_golden(prefix)
    data = bytearray((tmp_path / "g.idx").read_bytes())
    data[0:3] = b"XYZ"
    (tmp_path / "g.idx").write_bytes(bytes(data))
    assert "g.idx" in _expect_error(prefix, "bad magic")


def test_wrong_version(tmp_path):
    prefix = str(tmp_path / "g")
    write_golden(prefix)
    data = bytearray((tmp_path / "g.idx").read_bytes())
    data[9:17] = struct.pack("<Q", 2)
    (tmp_path / "g.idx").write_bytes(bytes(data))
    assert "g.idx" in _expect_error(prefix, "version 2")


def test_truncated_bin(tmp_path):
    prefix = str(tmp_path / "g")
    write_golden(prefix)
    (tmp_path / "g.bin").write_bytes((tmp_path / "g.bin").read_bytes()[:-1])
    assert "g.bin" in _expect_error(prefix, "truncated")


def test_truncated_idx(tmp_path):
    prefix = str(tmp_path / "g")
    write_golden(prefix)
    (tmp_path / "g.idx").write_bytes((tmp_path / "g.idx").read_bytes()[:-8])
    assert "g.idx" in _expect_error(prefix, "truncated")


def test_empty_dataset_round_trip(tmp_path):
    write_index(str(tmp_path / "e.idx"), np.uint16, [], [0])
    (tmp_path / "e.bin").write_bytes(b"")
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_documents == 0
