"""`paratron convert` leaves nothing behind: SIGTERM mid-conversion removes the temporary
folder and exits with one line; a rerun removes the temporary folders of runs that were
killed outright (never a live run's); the temporary folder is created exclusively, never
through a link planted at its name; a destination that cannot be written (full,
read-only) is one line naming it and the cause, with nothing left there."""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from paratron.cli.convert import main as convert  # noqa: E402

TINY_LLAMA = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
HF_TO_PARATRON = ["--model-type", "GPT", "--loader", "hf", "--saver", "paratron"]
PARATRON_TO_HF = ["--model-type", "GPT", "--loader", "paratron", "--saver", "hf"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A tiny Llama as a Hugging Face folder (`hf`) and as a Paratron checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    cfg = transformers.AutoConfig.for_model("llama", **TINY_LLAMA)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "hf")
    assert convert([*HF_TO_PARATRON, "--load-dir", str(root / "hf"),
                    "--save-dir", str(root / "paratron")]) == 0
    return root


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratron convert: "), err
    return lines[0]


def _only(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# Runs `paratron convert` with the Paratron saver stalled after its first group, so the
# test can stop it half-way: "writing" on stdout says the temporary folder has content.
_STALLED = """
import sys, time
from paratron.cli.convert import main
from paratron.convert import paratron_io
resize, calls = paratron_io.resize_vocab, []
def stalled(*args):
    calls.append(1)
    if len(calls) == 2:
        print("writing", flush=True)
        time.sleep(120)
    return resize(*args)
paratron_io.resize_vocab = stalled
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_removes_the_temporary_folder(sources, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _STALLED, *HF_TO_PARATRON, "--load-dir",
                             str(sources / "hf"), "--save-dir", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n", proc.stderr.read()
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.converting-")]
        assert len(staged) == 1 and any(staged[0].rglob("*.safetensors")), staged
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in _one_line(err)
    _only(tmp_path)


def test_a_rerun_removes_only_the_folders_of_dead_processes(sources, tmp_path):
    dead = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    for proc in dead:
        proc.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead[0].pid, alive.pid):
            left = tmp_path / f".out.converting-{HOST}-{pid}"
            left.mkdir()
            (left / "model_part_00000.safetensors").write_bytes(b"partial")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        link = tmp_path / f".out.converting-{HOST}-{dead[1].pid}"  # a link is never removed
        link.symlink_to(elsewhere)
        assert convert([*HF_TO_PARATRON, "--load-dir", str(sources / "hf"),
                        "--save-dir", str(tmp_path / "out")]) == 0
        _only(tmp_path, "out", "elsewhere", f".out.converting-{HOST}-{alive.pid}", link.name)
    finally:
        alive.kill()
        alive.wait()


def test_a_link_planted_at_the_temporary_name_is_not_followed(sources, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the converter's")
    planted = tmp_path / f".out.converting-{HOST}-{os.getpid()}"
    planted.symlink_to(elsewhere)
    code = convert([*HF_TO_PARATRON, "--load-dir", str(sources / "hf"),
                    "--save-dir", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and str(planted) in line and "already exists" in line, line
    assert planted.is_symlink() and sorted(os.listdir(elsewhere)) == ["keep.txt"]
    _only(tmp_path, "elsewhere", planted.name)


def _limit_file_size():
    # Every file larger than 30 kB fails to write (EFBIG), as on a full disk; the
    # checkpoint's tensor files and the Hugging Face shard are larger, its JSON is not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))


@pytest.mark.parametrize("flags,source", [(HF_TO_PARATRON, "hf"),
                                          (PARATRON_TO_HF, "paratron")])
def test_a_full_destination_is_one_line_and_leaves_nothing(sources, tmp_path, flags, source):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "paratron", "convert", *flags, "--load-dir",
                           str(sources / source), "--save-dir", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_file_size)
    line = _one_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert f"--save-dir {out}: cannot write" in line and "File too large" in line, line
    _only(tmp_path)


def test_a_read_only_destination_is_one_line_and_leaves_nothing(sources, tmp_path, capsys,
                                                                monkeypatch):
    # A read-only folder refuses new entries; as root (where modes do not bind) the
    # refusal is made by mkdir itself, as a read-only mount would.
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mkdir = Path.mkdir

    def refuse(path, *args, **kwargs):
        if path.parent == read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code = convert([*HF_TO_PARATRON, "--load-dir", str(sources / "hf"),
                    "--save-dir", str(read_only / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"--save-dir {read_only / 'out'}" in line, line
    assert "Read-only file system" in line, line
    _only(read_only)
