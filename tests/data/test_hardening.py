"""The data path off the happy path: corrupt or stale files, hostile input lines, failed
writes and killed runs give one line (file, line or document, cause) and leave nothing
behind — never a traceback, never silently wrong samples.

All inputs are crafted inside the test's folder; no real data is needed.
"""

from __future__ import annotations

import builtins
import errno
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from paratron.cli.inspect_data import main as inspect_data
from paratron.cli.preprocess import main as preprocess
from paratron.data.errors import DataError
from paratron.data.gpt_dataset import build_train_valid_test_datasets
from paratron.data.indexed_dataset import HEADER_SIZE, IndexedDataset, IndexedDatasetWriter
from paratron.data.tokenizer import NullTokenizer

NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]


def write_corpus(prefix: str, documents: list[list[int]], dtype=np.uint16) -> None:
    """A .bin/.idx pair written directly (no vocabulary check), as another tool might."""
    writer = IndexedDatasetWriter(prefix + ".bin", dtype)
    for doc in documents:
        writer.add_document(doc)
    writer.finalize(prefix + ".idx")


def leftovers(folder) -> list[str]:
    """Outputs and temporaries in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".bin", ".idx")) or ".tmp" in p.name)


def preprocess_fails(argv: list[str]) -> str:
    """Run ``paratron preprocess`` in-process expecting failure; its one-line message."""
    with pytest.raises(SystemExit) as info:
        preprocess(argv)
    message = str(info.value.code)
    assert info.value.code not in (0, None) and "\n" not in message.strip()
    return message


def one_error_line(stderr: str) -> str:
    """The single line a failed command printed; no traceback around it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "paratron", *args]


def sample_tokens(dataset) -> list[list[int]]:
    return [dataset[k]["tokens"].tolist() for k in range(len(dataset))]


# --------------------------------------------------------------------------- 6: the index cache


def _preprocess_ids(tmp_path, lines: list[str]) -> str:
    (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")
    preprocess(["--input", str(tmp_path / "ids.txt"), "--output-prefix", str(tmp_path / "ids"),
                "--append-eod", "--log-interval", "0", *NULL_TOKENIZER])
    return str(tmp_path / "ids_text_document")


def _gpt_train_split(prefix: str, cache) -> object:
    return build_train_valid_test_datasets([prefix], "1,0,0", 8, 3, (40, 0, 0), NullTokenizer(100),
                                           cache_path=str(cache))[0]


def test_preprocess_again_into_the_same_prefix_rebuilds_the_sample_index(tmp_path):
    """Item 6: same document count, same file sizes, other lengths: the cached indices are not reused."""
    short_first = [" ".join(["1"] * (2 + d % 7)) for d in range(30)]
    prefix = _preprocess_ids(tmp_path, short_first)
    _gpt_train_split(prefix, tmp_path / "cache")
    long_first = [" ".join(["2"] * (8 - d % 7)) for d in range(30)]
    assert _preprocess_ids(tmp_path, long_first) == prefix
    reused = _gpt_train_split(prefix, tmp_path / "cache")
    fresh = _gpt_train_split(prefix, tmp_path / "fresh-cache")
    assert sample_tokens(reused) == sample_tokens(fresh)


def test_damaged_cache_file_is_rebuilt(tmp_path):
    """Item 6: a truncated .npy in the cache (a crash, a full disk) is rebuilt, not a traceback."""
    prefix = _preprocess_ids(tmp_path, [" ".join(["3"] * (1 + d % 5)) for d in range(30)])
    expected = sample_tokens(_gpt_train_split(prefix, tmp_path / "cache"))
    for path in (tmp_path / "cache").glob("*-sample_index.npy"):
        path.write_bytes(path.read_bytes()[:20])
    assert sample_tokens(_gpt_train_split(prefix, tmp_path / "cache")) == expected


# --------------------------------------------------------------------------- 7: .idx against .bin


def _golden(tmp_path) -> tuple[str, int]:
    """Six documents of 5..10 uint16 tokens; returns (prefix, number of sequences)."""
    prefix = str(tmp_path / "g")
    write_corpus(prefix, [list(range(1, 5 + d)) for d in range(6)])
    return prefix, 6


def _patch(path: str, offset: int, fmt: str, value: int) -> None:
    data = bytearray(open(path, "rb").read())
    struct.pack_into(fmt, data, offset, value)
    open(path, "wb").write(bytes(data))


def _length_at(i: int) -> int:
    return HEADER_SIZE + 4 * i


def _pointer_at(n: int, i: int) -> int:
    return HEADER_SIZE + 4 * n + 8 * i


def _document_at(n: int, j: int) -> int:
    return HEADER_SIZE + 12 * n + 8 * j


def _mutate(kind: str, prefix: str, n: int) -> None:
    idx = prefix + ".idx"
    pointers = IndexedDataset(prefix).sequence_pointers.copy()
    if kind == "negative length":
        _patch(idx, _length_at(1), "<i", -3)
    elif kind == "pointer outside the bin":
        _patch(idx, _pointer_at(n, 2), "<q", 10**9)
    elif kind == "negative pointer":
        _patch(idx, _pointer_at(n, 2), "<q", -2)
    elif kind == "pointers overlap":
        _patch(idx, _pointer_at(n, 3), "<q", int(pointers[1]))
    elif kind == "misaligned pointer":
        _patch(idx, _pointer_at(n, 2), "<q", int(pointers[2]) + 1)
    elif kind == "document index decreasing":
        _patch(idx, _document_at(n, 2), "<q", 5)
    elif kind == "bytes after the document index":
        with open(idx, "ab") as f:
            f.write(b"\x00" * 5)


MUTATIONS = ["negative length", "pointer outside the bin", "negative pointer", "pointers overlap",
             "misaligned pointer", "document index decreasing", "bytes after the document index"]


@pytest.mark.parametrize("kind", MUTATIONS)
def test_corrupt_index_is_refused_when_opened(tmp_path, kind):
    """Item 7: every pointer and length is checked against the .bin when the pair is opened."""
    prefix, n = _golden(tmp_path)
    _mutate(kind, prefix, n)
    with pytest.raises(DataError) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert "g.idx" in message and "\n" not in message


def test_inspect_data_on_a_corrupt_index_is_one_line(tmp_path):
    """Item 7: `paratron inspect-data` on a pointer past the .bin: one line, not numpy's ValueError."""
    prefix, n = _golden(tmp_path)
    _mutate("pointer outside the bin", prefix, n)
    with pytest.raises(SystemExit) as info:
        inspect_data(["--data-path", prefix, "--split", "1,0,0", "--seq-length", "4", *NULL_TOKENIZER,
                      "--data-cache-path", str(tmp_path / "cache"), "--show", "20"])
    assert "g.idx" in str(info.value.code) and "\n" not in str(info.value.code)


def test_token_id_beyond_the_vocabulary_names_file_and_document(tmp_path):
    """Item 7: a corpus tokenized with a bigger vocabulary stops naming the .bin and the document."""
    prefix = str(tmp_path / "big")
    documents = [[1, 2, 3, 4, 5, 6] for _ in range(8)]
    documents[5][2] = 500
    write_corpus(prefix, documents)
    dataset = build_train_valid_test_datasets([prefix], "1,0,0", 4, 1, (None, 0, 0), NullTokenizer(100),
                                              cache_path=str(tmp_path / "cache"))[0]
    with pytest.raises(DataError) as info:
        sample_tokens(dataset)
    message = str(info.value)
    assert "big.bin: document 5" in message and "token id 500" in message and "101" in message


def test_token_id_beyond_the_vocabulary_in_a_dataloader_worker_is_one_line(tmp_path):
    """Item 7: the same error raised inside a DataLoader worker of `paratron train` reaches the
    user as one line (exit 2), not torch's re-raised worker traceback or an embedding IndexError."""
    prefix = str(tmp_path / "big")
    write_corpus(prefix, [[1, 2, 3, 700, 5, 6, 7, 8, 9, 10] for _ in range(20)])
    flags = ("--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
             "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 2 "
             "--lr 1e-3 --device cpu --num-workers 1 --eval-iters 0 --split 1,0,0 "
             "--tokenizer-type NullTokenizer --vocab-size 100").split()
    proc = subprocess.run(cli("train", *flags, "--data-path", prefix, "--data-cache-path", str(tmp_path / "c")),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "big.bin: document" in line and "token id 700" in line


def test_indexed_sft_data_with_a_token_beyond_the_vocabulary(tmp_path):
    """Item 7, SFT form: indexed conversations from a bigger vocabulary name the file and conversation."""
    from paratron.data.sft import build_sft_datasets, write_sft_indexed

    conversations = [(np.array([1, 2, 3, 4 + c]), np.array([0, 0, 1, 1])) for c in range(6)]
    conversations[4] = (np.array([1, 2, 300, 4]), np.array([0, 0, 1, 1]))
    ids_prefix, _ = write_sft_indexed(conversations, str(tmp_path / "sft"), 1000)
    with pytest.raises(DataError) as info:
        build_sft_datasets([ids_prefix], "1,0,0", 8, 1, (6, 0, 0), NullTokenizer(100))
    message = str(info.value)
    assert "sft_input_ids_document.bin: conversation 4" in message and "token id 300" in message


def test_null_text_is_a_bad_line(tmp_path, capsys):
    """Item 7: {"text": null} names its line, and --skip-bad-lines counts it; it is not an empty document."""
    data = tmp_path / "n.jsonl"
    data.write_text('{"text": "1 2"}\n{"text": null}\n{"text": "3 4"}\n')
    argv = ["--input", str(data), "--output-prefix", str(tmp_path / "o"), *NULL_TOKENIZER]
    message = preprocess_fails(argv)
    assert f"{data}:2" in message and "null" in message
    assert leftovers(tmp_path) == []
    preprocess([*argv, "--skip-bad-lines"])
    assert IndexedDataset(str(tmp_path / "o_text_document")).num_documents == 2
    assert "Skipped 1 bad lines" in capsys.readouterr().err


# --------------------------------------------------------------------------- 9: a runaway line


def test_200_megabyte_line_is_refused_in_seconds_without_gigabytes(tmp_path):
    """Item 9: one 200 MB JSON line: one line naming file:line and the flag, in seconds, < 1 GB."""
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as f:
        f.write('{"text": "1 2"}\n{"text": "')
        chunk = "7 " * (1 << 19)
        for _ in range(200):
            f.write(chunk)
        f.write('"}\n')
    stderr = tmp_path / "stderr.txt"

    def limit_memory():  # the old code builds a list of 100 million ints: stop it at 3 GB
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    start = time.time()
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cli("preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "o"),
                                    *NULL_TOKENIZER), stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=limit_memory)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            proc.kill()
    seconds = time.time() - start
    line = one_error_line(stderr.read_text())
    assert os.waitstatus_to_exitcode(status) != 0
    assert f"{data}:2" in line and "--max-line-length" in line
    assert seconds < 60 and usage.ru_maxrss * 1024 < 1 << 30, (seconds, usage.ru_maxrss)
    assert leftovers(tmp_path) == []


def test_max_line_length_flag_and_skipping_long_lines(tmp_path, capsys):
    """Item 9: --max-line-length sets the limit; an overlong line counts under --skip-bad-lines."""
    data = tmp_path / "t.txt"
    data.write_text("1 2 3\n" + "4 " * 100 + "\n5 6\n")
    argv = ["--input", str(data), "--output-prefix", str(tmp_path / "o"), "--max-line-length", "50",
            *NULL_TOKENIZER]
    message = preprocess_fails(argv)
    assert f"{data}:2" in message and "50" in message
    preprocess([*argv, "--skip-bad-lines"])
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [ds.document(d).tolist() for d in range(ds.num_documents)] == [[1, 2, 3], [5, 6]]
    assert "Skipped 1 bad lines" in capsys.readouterr().err


# --------------------------------------------------------------------------- 10: OS errors and kills


def _ids_file(tmp_path, documents: int, name: str = "ids.txt"):
    path = tmp_path / name
    line = " ".join(str(i % 90) for i in range(24)) + "\n"
    path.write_text(line * documents)
    return path


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    """Item 10: a read-only output folder: one line naming the path and the cause."""
    data = _ids_file(tmp_path, 10)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        message = preprocess_fails(["--input", str(data), "--output-prefix", str(out / "o"), *NULL_TOKENIZER])
    finally:
        out.chmod(0o755)
    assert str(out) in message and "Permission denied" in message
    assert leftovers(out) == []


def test_output_folder_that_refuses_new_files(tmp_path, monkeypatch):
    """Item 10: the read-only case for root (who writes through chmod): creating files in the
    output folder fails as on a read-only mount; one line naming the path and the cause."""
    data = _ids_file(tmp_path, 10)
    out = tmp_path / "out"
    out.mkdir()
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        if os.path.dirname(os.path.abspath(path)) == str(out):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wxa"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    message = preprocess_fails(["--input", str(data), "--output-prefix", str(out / "o"), *NULL_TOKENIZER])
    monkeypatch.undo()
    assert str(out / "o_text_document") in message and "Read-only file system" in message
    assert leftovers(out) == []


def test_write_failing_mid_run_is_one_line_and_leaves_nothing(tmp_path):
    """Item 10: the disk fills up while preprocessing (here: RLIMIT_FSIZE, a real failing write)."""
    data = _ids_file(tmp_path, 40_000)  # ~2 MB of tokens, over the 1 MB file limit
    out = tmp_path / "out"
    out.mkdir()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run(cli("preprocess", "--input", str(data), "--output-prefix", str(out / "o"),
                              "--log-interval", "0", *NULL_TOKENIZER),
                          capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert str(out / "o_text_document.bin") in line and "File too large" in line
    assert leftovers(out) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_preprocess_removes_the_temporaries(tmp_path, workers):
    """Item 10: SIGTERM mid-run: one line, exit non-zero, no output and no .tmp files left."""
    data = _ids_file(tmp_path, 600_000)  # about 2 s of tokenizing after the temporaries appear
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(cli("preprocess", "--input", str(data), "--output-prefix", str(out / "o"),
                                "--workers", str(workers), "--log-interval", "0", *NULL_TOKENIZER),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(".tmp-" in name for name in os.listdir(out)):
        assert proc.poll() is None and time.time() < deadline, "no temporary file appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "terminated" in one_error_line(stderr)
    assert leftovers(out) == []


def test_rerun_removes_temporaries_of_dead_processes(tmp_path):
    """Item 10: a run killed with SIGKILL leaves .tmp files; the next run into the prefix removes
    those of dead processes (old and new naming) and keeps those of a live one."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    base = tmp_path / "o_text_document"
    host = socket.gethostname()
    stale = [f"{base}.bin.tmp-{dead.pid}", f"{base}.idx.tmp-{dead.pid}", f"{base}.bin.tmp-{host}-{dead.pid}"]
    kept = [f"{base}.bin.tmp-{host}-{live}", f"{base}.bin.tmp-elsewhere-{dead.pid}"]
    for path in stale + kept:
        open(path, "wb").close()
    preprocess(["--input", str(_ids_file(tmp_path, 5)), "--output-prefix", str(tmp_path / "o"),
                "--log-interval", "0", *NULL_TOKENIZER])
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.exists(p) for p in kept)
    assert IndexedDataset(str(base)).num_documents == 5
