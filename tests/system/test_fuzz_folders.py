"""Fuzzing: hundreds of random, seeded mutations of a valid run's folder — its
checkpoint's `metadata.json`, `latest_checkpointed_iteration.txt`, a safetensors header
(with and without the checksums updated to match, as an attacker controlling the whole
folder would), the dataset's `.idx` and `.bin` — each resumed by `paratron train`
in-process. Every run must end with exit code 0, 1 or 2, never a Python traceback; a
failing one says why in one line; and nothing outside the mutated folder is written,
nor any file of the neighbouring folders read (audited through `sys.addaudithook`)."""

import contextlib
import io
import json
import os
import random
import shutil
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from paratron.checkpoint import files
from tests.helpers.file_audit import FileAudit
from paratron.cli.main import main

CASES = 240
TINY = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
        "--max-position-embeddings 8 --micro-batch-size 1 --global-batch-size 2 "
        "--lr 1e-3 --device cpu --num-workers 0 --eval-iters 0 --log-interval 1 "
        "--tokenizer-type NullTokenizer --vocab-size 32 --split 1,0,0").split()
JUNK = [-1, -5, 10 ** 30, 2 ** 63, "ten", "", None, [], {}, 1.5, float("inf"), True,
        "../honeypot/secret.txt", "/etc/hostname", "../../honeypot", "iter_0000001",
        "model_optim_rank_00000.safetensors", [[[[[]]]]], {"a": {"b": {}}}, "\u00b2", 0]


def _argv(folder: Path) -> list[str]:
    return ["train", *TINY, "--data-path", str(folder / "data" / "text"),
            "--data-cache-path", str(folder / "cache"), "--load", str(folder / "save"),
            "--save", str(folder / "save"), "--train-iters", "3", "--save-interval", "100"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A dataset and a run with checkpoints at iterations 1 and 2."""
    from paratron.data.indexed_dataset import IndexedDatasetWriter
    root = tmp_path_factory.mktemp("fuzz") / "pristine"
    (root / "data").mkdir(parents=True)
    writer = IndexedDatasetWriter(str(root / "data" / "text.bin"), np.int32)
    gen = np.random.default_rng(0)
    for _ in range(40):
        writer.add_document(gen.integers(1, 31, size=int(gen.integers(3, 20))).tolist() + [0])
    writer.finalize(str(root / "data" / "text.idx"))
    code, out, err = _run(["train", *TINY, "--data-path", str(root / "data" / "text"),
                           "--data-cache-path", str(root / "cache"), "--save",
                           str(root / "save"), "--train-iters", "2", "--save-interval", "1"])
    assert code == 0, out[-2000:] + err[-2000:]
    return root


def _run(argv):
    """(exit code, stdout, stderr) of `paratron <argv>` in this process; an exception
    escaping `main` is what a user would see as a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - the failure under test
            err.write("Traceback (most recent call last):\n" + traceback.format_exc())
            code = "traceback"
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------ mutations
def _random_path(value, rng):
    """A (container, key) somewhere inside parsed JSON, chosen by a random walk."""
    parent, key = None, None
    while isinstance(value, (dict, list)) and value and (parent is None or rng.random() < 0.7):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        parent, key = value, rng.choice(keys)
        value = value[key]
    return parent, key


def _flip_bytes(data: bytes, rng, start=0, end=None) -> bytes:
    data = bytearray(data)
    end = len(data) if end is None else min(end, len(data))
    for _ in range(rng.randint(1, 4)):
        if end > start:
            data[rng.randrange(start, end)] = rng.randrange(256)
    return bytes(data)


def mutate_metadata(folder: Path, rng) -> None:
    file = folder / "save" / f"iter_{rng.choice([1, 2, 2, 2]):07d}" / "metadata.json"
    text = file.read_text()
    if rng.random() < 0.25:
        file.write_bytes(_flip_bytes(text.encode(), rng))
        return f"{file.parent.name}/metadata.json: bytes flipped"
    meta = json.loads(text)
    parent, key = _random_path(meta, rng)
    if parent is None:
        meta = what = rng.choice(JUNK)
    elif rng.random() < 0.2 and isinstance(parent, dict):
        del parent[key]
        what = f"{key!r} deleted"
    else:
        parent[key] = rng.choice(JUNK)
        what = f"{key!r} = {parent[key]!r}"
    file.write_text(json.dumps(meta))
    return f"{file.parent.name}/metadata.json: {what}"


def mutate_latest(folder: Path, rng) -> None:
    file = folder / "save" / files.LATEST
    choice = rng.random()
    if choice < 0.3:
        file.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 12))))
    elif choice < 0.6:
        file.write_text(str(rng.choice(JUNK)))
    else:
        file.write_text(str(rng.choice([0, 1, 2, 3, 7, -1, 10 ** 13, 10 ** 5000 // 10 ** 4990])))
    return f"latest = {file.read_bytes()[:40]!r}"


def mutate_header(folder: Path, rng) -> None:
    checkpoint = folder / "save" / f"iter_{rng.choice([1, 2, 2, 2]):07d}"
    name = rng.choice(["model_optim_rank_00000.safetensors", "rng_rank_00000.safetensors"])
    file = checkpoint / name
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    choice = rng.random()
    what = "header bytes flipped"
    if choice < 0.3:
        data = _flip_bytes(data, rng, 0, 8 + length)
    elif choice < 0.45:
        what = "header length changed"
        data = struct.pack("<Q", rng.choice([0, 1, length - 1, length + 1, 2 ** 62,
                                             len(data)])) + data[8:]
    else:  # a well-formed header that lies
        header = json.loads(data[8:8 + length])
        key = rng.choice([k for k in header if k != "__metadata__"])
        entry = header[key]
        what = rng.choice(["dtype", "shape", "data_offsets", "duplicate"])
        if what == "dtype":
            entry["dtype"] = rng.choice(["I32", "F16", "BF16", "U8", "F64", "I64"])
        elif what == "shape":
            entry["shape"] = rng.choice([[], [1], entry["shape"][::-1], [2 ** 40, 2 ** 40]])
        elif what == "data_offsets":
            entry["data_offsets"] = [rng.randrange(0, 4096), rng.randrange(0, 1 << 40)]
        text = json.dumps(header)
        what = f"{key}: {what} lies"
        if what.endswith("duplicate lies"):
            text = text[:-1] + ", " + json.dumps({key: entry})[1:]
        text = text.encode()
        text += b" " * (-len(text) % 8)
        data = struct.pack("<Q", len(text)) + text + data[8 + length:]
    file.write_bytes(data)
    if rng.random() < 0.5:  # the attacker also rewrites the size and checksum
        meta_file = checkpoint / "metadata.json"
        meta = json.loads(meta_file.read_text())
        meta["files"][name] = {"size": len(data), "sha256": files.file_digest(file)}
        meta_file.write_text(json.dumps(meta))
        what += ", checksum updated"
    return f"{checkpoint.name}/{name}: {what}"


def mutate_idx(folder: Path, rng) -> None:
    idx, bin_ = folder / "data" / "text.idx", folder / "data" / "text.bin"
    data = idx.read_bytes()
    choice = rng.random()
    if choice < 0.3:
        idx.write_bytes(_flip_bytes(data, rng, 0, 34))
        return ".idx header bytes flipped"
    if choice < 0.6:
        idx.write_bytes(_flip_bytes(data, rng, 34))
        return ".idx lengths/pointers/documents bytes flipped"
    if choice < 0.7:
        idx.write_bytes(data[:rng.randrange(len(data))])
        return ".idx truncated"
    if choice < 0.85:
        tokens = np.fromfile(bin_, dtype=np.int32)
        tokens[rng.randrange(len(tokens))] = value = rng.choice([32, 1000, 2 ** 31 - 1, -1])
        tokens.tofile(bin_)
        return f".bin token id {value}"
    with open(bin_, "r+b") as fh:
        fh.truncate(rng.randrange(os.path.getsize(bin_)))
    return ".bin truncated"


MUTATIONS = [mutate_metadata, mutate_latest, mutate_header, mutate_idx]


def test_random_mutations_of_a_run_folder_never_give_a_traceback(pristine, tmp_path):
    honeypot = pristine.parent / "honeypot"
    honeypot.mkdir(exist_ok=True)
    (honeypot / "secret.txt").write_text("secret\n")
    code, out, err = _run(_argv(_copy(pristine, tmp_path / "warm")))  # imports done
    assert code == 0, err
    audit, rng, codes = FileAudit(), random.Random(20261204), {}
    sys.dont_write_bytecode, started = True, time.perf_counter()
    try:
        for case in range(CASES):
            mutate = MUTATIONS[case % len(MUTATIONS)]
            folder = _copy(pristine, tmp_path / f"case{case:03d}")
            what = mutate(folder, rng)
            with audit:
                code, out, err = _run(_argv(folder))
            label = f"case {case} ({what})"
            assert code in (0, 1, 2), f"{label}: exit {code}\n{err[-3000:]}"
            assert "Traceback" not in err, f"{label}:\n{err[-3000:]}"
            if code != 0:
                assert len(err.strip().splitlines()) == 1, f"{label}: {err}"
            else:
                assert "iteration        3/       3" in out, f"{label}: {out[-2000:]}"
            inside = str(folder.resolve())
            outside_writes = [p for p in audit.writes if not p.startswith(inside)]
            assert not outside_writes, f"{label}: wrote {outside_writes}"
            neighbours = [p for p in audit.reads if p.startswith(str(tmp_path.parent))
                          and not p.startswith(inside)]
            assert not neighbours, f"{label}: read {neighbours}"
            codes[code] = codes.get(code, 0) + 1
            shutil.rmtree(folder)
    finally:
        sys.dont_write_bytecode = False
    elapsed = time.perf_counter() - started
    assert (honeypot / "secret.txt").read_text() == "secret\n"
    print(f"{CASES} mutations in {elapsed:.1f} s; exit codes {codes}")
    assert codes.get(0) and len(codes) > 1, codes  # both fallbacks and refusals were met


def _copy(pristine: Path, folder: Path) -> Path:
    shutil.copytree(pristine, folder, symlinks=True)
    return folder
