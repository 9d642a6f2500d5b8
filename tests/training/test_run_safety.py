"""Runs that would damage a --save folder or load the wrong model are refused in one line.

One run per --save folder: a second run (one process or a whole job) is refused naming
the holder's pid and host, a lock left by a killed run does not block, and a link
planted at the lock file is neither followed nor written through. A resume (or
--finetune) from a checkpoint of another architecture is refused naming the first
differing setting with both values and the flag that fixes it; run-only settings, the
parallel layout and the vocabulary's TP padding may change.
"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.dist_utils import run_distributed
from paratron.checkpoint import find_latest_valid, read_latest
from paratron.cli.train import main
from paratron.cli.args import parse_args
from paratron.options import ConfigError
from paratron.training.trainer import Trainer
from tests.helpers.training import BASE, PatternData

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-3 --micro-batch-size 2 --global-batch-size 4 "
         "--mock-data --vocab-size 100 --device cpu --num-workers 0 --eval-iters 0 "
         "--log-interval 1 --train-iters 2").split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}


def _refused(capsys, argv, *words):
    """Run `paratron train argv` here: exit 2 with one line holding every word."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("paratron train: error: "), err
    for word in words:
        assert word in err, (word, err)
    return err


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------ one run per --save
def test_a_second_run_on_a_busy_save_folder_is_refused_and_a_dead_runs_lock_is_not(
        tmp_path, capsys):
    save = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-m", "paratron", "train", *FLAGS, "--save", str(save),
         "--train-iters", "100000", "--save-interval", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        for line in holder.stdout:  # wait until the first run trains
            if " iteration " in line and "lm loss" in line or time.monotonic() > deadline:
                break
        before = _listing(save)
        _refused(capsys, FLAGS + ["--save", str(save)], f"--save {save}",
                 f"pid {holder.pid} on host {socket.gethostname()}")
        assert _listing(save) == before  # the refused run wrote nothing there
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock, its file left behind
        holder.communicate(timeout=60)
    assert (save / ".lock").is_file()
    assert main(FLAGS + ["--save", str(save)]) == 0, capsys.readouterr().err
    assert read_latest(save) == 2 and not (save / ".lock").exists()


@pytest.mark.parametrize("link", ["symlink", "dangling symlink", "hard link"])
def test_a_link_planted_at_the_lock_file_is_not_followed(tmp_path, capsys, link):
    save, victim = tmp_path / "ckpt", tmp_path / "victim.txt"
    save.mkdir()
    if link == "dangling symlink":
        (save / ".lock").symlink_to(victim)
    else:
        victim.write_text("keep me\n")
        getattr(os, "symlink" if link == "symlink" else "link")(victim, save / ".lock")
    _refused(capsys, FLAGS + ["--save", str(save)], str(save / ".lock"), "remove it")
    assert _listing(save) == [".lock"]  # nothing written into the folder
    if link == "dangling symlink":
        assert not victim.exists()
    else:
        assert victim.read_text() == "keep me\n"


def _train_rank(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_a_refused_job_stops_on_every_rank_and_a_free_folder_trains(tmp_path):
    import fcntl

    save = tmp_path / "ckpt"
    save.mkdir()
    argv = FLAGS + ["--save", str(save), "--world-size", "2"]
    with open(save / ".lock", "w") as held:  # another run's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        (code0, err0), (code1, err1) = run_distributed(2, _train_rank, argv, timeout=90)
        assert time.monotonic() - start < 60  # no rank waits for a collective
    assert code0 == 2 and err0.count("\n") == 1 and f"--save {save}" in err0, err0
    assert code1 != 0 and "rank 0" in err1 and f"--save {save}" in err1, err1
    assert _listing(save) == [".lock"]
    # Free again: the job's ranks do not block one another on the lock.
    results = run_distributed(2, _train_rank, argv, timeout=90)
    assert [code for code, _ in results] == [0, 0], results
    assert read_latest(save) == 2 and not (save / ".lock").exists()


# ------------------------------------------------------------------ resume: same model
MOE = ("--num-experts 4 --moe-ffn-hidden-size 16 --moe-router-topk 2 --disable-bias-linear "
       "--moe-aux-loss-coeff 0.01").split()
ROPE = "--position-embedding-type rope --normalization RMSNorm --swiglu".split()
_SAVED: dict[str, Path] = {}


@pytest.fixture
def saved_run(tmp_path_factory):
    """A checkpoint (iteration 2) per architecture, trained once per test session."""
    def get(arch: str) -> Path:
        if arch not in _SAVED:
            save = tmp_path_factory.mktemp(f"saved-{arch}")
            extra = {"gpt": [], "moe": MOE, "rope": ROPE}[arch]
            assert main(FLAGS + extra + ["--save", str(save)]) == 0
            _SAVED[arch] = save
        return _SAVED[arch]
    return get


@pytest.mark.parametrize("arch,flags,words", [
    ("gpt", ["--num-layers", "3"], "num_layers is 2 there, 3 here; give --num-layers 2 or "
                                   "--use-checkpoint-args"),
    ("gpt", ["--finetune", "--num-layers", "3"], "num_layers is 2 there, 3 here"),
    ("gpt", ["--num-attention-heads", "8"], "num_attention_heads is 4 there, 8 here; give "
                                            "--num-attention-heads 4"),
    ("gpt", ["--normalization", "RMSNorm"], "normalization is LayerNorm there, RMSNorm here; "
                                            "give --normalization LayerNorm"),
    ("gpt", ["--position-embedding-type", "rope"],
     "position_embedding_type is learned_absolute there, rope here"),
    ("gpt", ["--norm-epsilon", "1e-6"], "norm_epsilon is 1e-05 there, 1e-06 here"),
    ("gpt", ["--no-bias-gelu-fusion"], "bias_gelu_fusion is True there, False here; give "
                                       "--openai-gelu or --use-checkpoint-args"),
    ("gpt", ["--disable-bias-linear"], "add_bias_linear is True there, False here; leave out "
                                       "--disable-bias-linear"),
    ("gpt", ["--untie-embeddings-and-output-weights"],
     "untie_embeddings_and_output_weights is False there, True here"),
    ("gpt", ["--vocab-size", "90"], "vocab_size is 100 there, 90 here; give --vocab-size 100"),
    ("rope", ROPE + ["--rotary-base", "500000"],
     "rotary_base is 10000.0 there, 500000.0 here; give --rotary-base 10000.0"),
    ("moe", MOE + ["--moe-router-topk", "3"], "moe_router_topk is 2 there, 3 here"),
    ("moe", MOE + ["--num-experts", "8"], "num_experts is 4 there, 8 here"),
])
def test_resume_refuses_a_checkpoint_of_another_model(saved_run, tmp_path, capsys, arch,
                                                      flags, words):
    load = saved_run(arch)
    out = tmp_path / "out"
    _refused(capsys, FLAGS + flags + ["--load", str(load), "--save", str(out),
                                      "--train-iters", "4"],
             f"--load {load}: iter_0000002 is a checkpoint of another model", words)
    assert not out.exists()  # a refused run leaves no --save folder behind


def _trainer(*flags, tokens=None):
    cfg = parse_args(BASE + ["--train-iters", "4", "--global-batch-size", "4",
                             "--micro-batch-size", "2", *flags])
    data = PatternData(cfg.data.seq_length)
    return Trainer(cfg, (data, data, None), tokenizer_vocab_size=tokens,
                   log=lambda line: None)


def test_run_settings_may_change_but_finetune_still_checks_the_model(tmp_path):
    save = str(tmp_path / "ckpt")
    _trainer("--save", save).train()
    run_only = ["--hidden-dropout", "0", "--attention-dropout", "0", "--init-method-std",
                "0.05", "--recompute-activations", "--no-cross-entropy-loss-fusion",
                "--make-vocab-size-divisible-by", "64"]
    assert _trainer("--load", save, *run_only).state.iteration == 4
    assert _trainer("--load", save, "--finetune", *run_only).state.iteration == 0
    cfg = parse_args(["--num-layers", "5", "--hidden-size", "48", "--num-attention-heads", "4",
                      "--seq-length", "16", "--lr", "1e-3", "--vocab-size", "100",
                      "--train-iters", "6", "--global-batch-size", "4", "--micro-batch-size",
                      "2", "--device", "cpu", "--load", save, "--use-checkpoint-args"])
    data = PatternData(16)
    taken = Trainer(cfg, (data, data, None), log=lambda line: None)
    assert taken.state.iteration == 4 and cfg.model.num_layers == 2
    with pytest.raises(ConfigError, match="num_layers is 2 there, 3 here; give --num-layers 2 "
                                          "or --use-checkpoint-args"):
        _trainer("--load", save, "--finetune", "--num-layers", "3")


def test_resume_refuses_a_tokenizer_with_more_tokens_than_the_checkpoint(tmp_path):
    """A tokenizer run's checkpoint records its padded rows only (100 tokens -> 128)."""
    save = str(tmp_path / "ckpt")
    no_size = [f for f in BASE if f not in ("--vocab-size", "100")]

    def trainer(tokens, *flags):
        cfg = parse_args(no_size + ["--train-iters", "4", "--global-batch-size", "4",
                                    "--micro-batch-size", "2", *flags])
        data = PatternData(cfg.data.seq_length)
        return Trainer(cfg, (data, data, None), tokenizer_vocab_size=tokens,
                       log=lambda line: None)

    trainer(100, "--save", save).train()
    assert trainer(110, "--load", save).state.iteration == 4  # fits the padded rows
    with pytest.raises(ConfigError, match="the checkpoint's vocabulary covers 128 tokens, "
                                          "this run's tokenizer has 200"):
        trainer(200, "--load", save)


def test_an_unusable_recorded_model_is_refused_in_one_line(saved_run, tmp_path, capsys):
    load = tmp_path / "ckpt"
    source = saved_run("gpt")
    for file in source.rglob("*"):
        target = load / file.relative_to(source)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    meta_file = find_latest_valid(load)[1] / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"] = ["not", "a", "model"]
    meta_file.write_text(json.dumps(meta))
    _refused(capsys, FLAGS + ["--load", str(load)], "metadata.json",
             "the recorded model configuration is unusable")
