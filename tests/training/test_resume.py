"""Exact resume through the command line: 20 iterations straight equal 10, a `kill -9`
during iteration 14, and a resumed run to 20 — losses (full precision) and every saved
tensor (weights and optimizer state) bit-identical. Single process, DP2 with the
distributed optimizer, and PP2 (torchrun). Also: a crash in the middle of writing a
checkpoint, SIGTERM with --exit-signal-handler, and the load flags' meanings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from paratron.checkpoint import find_latest_valid, read_latest
from paratron.cli.args import parse_args
from paratron.options import ConfigError
from paratron.training.trainer import Trainer
from tests.helpers.training import BASE, PatternData

DRIVER = str(Path(__file__).parents[1] / "drivers" / "train_and_crash.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --vocab-size 64 --mock-data --device cpu "
         "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-decay-style cosine "
         "--lr-warmup-iters 2 --hidden-dropout 0.1 --attention-dropout 0.1 --log-interval 1 "
         "--eval-interval 5 --eval-iters 1 --train-iters 20 --num-workers 0 "
         "--save-interval 10").split()
LAYOUTS = {"single": (1, []),
           "dp2_distopt": (2, ["--use-distributed-optimizer"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2"])}


def _run(nproc, driver_args, flags, check=True, timeout=300):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable])
    proc = subprocess.run(launch + [DRIVER, *driver_args, "--", *flags], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(file):
    return dict(line.split() for line in Path(f"{file}.0").read_text().splitlines())


def _saved_tensors(path):
    meta = json.loads((Path(path) / "metadata.json").read_text())
    out = {}
    for name, entry in meta["tensors"].items():
        chunk = entry["chunks"][0]
        with safe_open(str(Path(path) / chunk["file"]), framework="pt") as fh:
            out[name] = fh.get_tensor(chunk["key"])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    flags = FLAGS + extra
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # The straight run saves in the background: the files must equal a plain save.
    _run(nproc, ["--losses", str(tmp_path / "a")], flags + ["--save", str(straight),
                                                             "--async-save"])
    killed = _run(nproc, ["--kill-at", "13", "--losses", str(tmp_path / "b")],
                  flags + ["--save", str(crashed)], check=False)
    assert killed.returncode != 0
    assert read_latest(crashed) == 10
    resumed = _run(nproc, ["--losses", str(tmp_path / "c")],
                   flags + ["--save", str(crashed), "--load", str(crashed)])
    assert "successfully loaded checkpoint" in resumed.stdout and "iteration 10" in resumed.stdout
    a, c = _losses(tmp_path / "a"), _losses(tmp_path / "c")
    assert sorted(map(int, c)) == list(range(11, 21))
    assert [c[str(i)] for i in range(11, 21)] == [a[str(i)] for i in range(11, 21)]
    want = _saved_tensors(find_latest_valid(straight)[1])
    got = _saved_tensors(find_latest_valid(crashed)[1])
    assert sorted(want) == sorted(got) and any(k.startswith("optim/") for k in want)
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_falls_back_to_the_previous(tmp_path):
    save = tmp_path / "ckpt"
    flags = FLAGS + ["--save", str(save), "--save-interval", "4", "--train-iters", "12"]
    crashed = _run(1, ["--crash-in-save-at", "8"], flags, check=False)
    assert crashed.returncode != 0
    assert read_latest(save) == 4 and (save / "iter_0000008.tmp").is_dir()
    resumed = _run(1, [], flags + ["--load", str(save)])
    assert ("the save of iteration 8" in resumed.stdout and "was interrupted" in resumed.stdout
            and "loading the previous checkpoint, iteration 4" in resumed.stdout)
    assert "successfully loaded checkpoint" in resumed.stdout
    assert read_latest(save) == 12 and not (save / "iter_0000008.tmp").exists()


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    save = tmp_path / "ckpt"
    flags = FLAGS + ["--save", str(save), "--save-interval", "2", "--train-iters", "4"]
    _run(1, [], flags)
    shard = save / "iter_0000004" / "model_optim_rank_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    resumed = _run(1, [], flags + ["--load", str(save), "--train-iters", "6"])
    assert "checkpoint 4 is incomplete or corrupt" in resumed.stdout or \
        "iter_0000004 is incomplete or corrupt" in resumed.stdout
    assert "at iteration 2" in resumed.stdout


def test_sigterm_with_exit_signal_handler_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    flags = FLAGS + ["--save", str(save), "--exit-signal-handler", "--train-iters", "100000",
                     "--save-interval", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "paratron", "train", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until training runs
        if " iteration " in line and "lm loss" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "received SIGTERM" in out
    iteration = read_latest(save)
    assert iteration is not None and iteration > 0
    assert f"exiting program at iteration {iteration}" in out
    assert find_latest_valid(save)[0] == iteration


def _trainer(*flags):
    cfg = parse_args(BASE + ["--train-iters", "4", "--global-batch-size", "4",
                             "--micro-batch-size", "2", *flags])
    data = PatternData(cfg.data.seq_length)
    return Trainer(cfg, (data, data, None), log=lambda line: None)


def test_load_flags_have_megatron_meanings(tmp_path):
    save = str(tmp_path / "ckpt")
    first = _trainer("--save", save)
    first.train()
    again = parse_args(["--config", str(tmp_path / "ckpt" / "run_config.yaml")])
    assert again.to_dict() == first.cfg.to_dict()  # run_config.yaml repeats the run
    weights = {n: p.detach().clone() for n, p in first.model.module.named_parameters()}

    def same_weights(trainer):
        return all(torch.equal(p, weights[n]) for n, p in trainer.model.module.named_parameters())

    resumed = _trainer("--load", save, "--train-iters", "6")
    assert resumed.state.iteration == 4 and resumed.state.consumed_train_samples == 16
    assert resumed.optimizer.steps == 4 and same_weights(resumed)
    finetune = _trainer("--load", save, "--finetune")
    assert finetune.state.iteration == 0 and finetune.optimizer.steps == 0
    assert same_weights(finetune) and not finetune.optimizer.optimizer.state
    no_optim = _trainer("--load", save, "--no-load-optim")
    assert no_optim.state.iteration == 4 and not no_optim.optimizer.optimizer.state
    fresh = _trainer("--load", str(tmp_path / "empty"))  # Megatron: start from scratch
    assert fresh.state.iteration == 0 and not same_weights(fresh)
    with pytest.raises(ConfigError, match="no checkpoint; --exit-on-missing-checkpoint"):
        _trainer("--load", str(tmp_path / "empty"), "--exit-on-missing-checkpoint")
    # --use-checkpoint-args: the architecture comes from the checkpoint.
    cfg = parse_args(["--num-layers", "5", "--hidden-size", "48", "--num-attention-heads",
                      "4", "--seq-length", "16", "--max-position-embeddings", "16",
                      "--vocab-size", "100", "--lr", "1e-3", "--train-iters", "6",
                      "--load", save, "--use-checkpoint-args"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (2, 32)


@pytest.mark.parametrize("divisible_by,rows", [(64, 128), (200, 200)])
def test_checkpoint_padded_for_another_tp_size_loads(tmp_path, divisible_by, rows):
    """Saved with 100 tokens padded to 144 rows (divisible by 48, as TP1 of 48 or a
    TP3 run of 16 pads); loaded where the padding gives 128 or 200 rows: token rows kept,
    extra rows cut or zero, optimizer state alike, and training goes on."""
    save = str(tmp_path / "ckpt")
    first = _trainer("--save", save, "--make-vocab-size-divisible-by", "48")
    first.train()
    saved = first.model.module.embedding.word_embeddings.weight.detach().clone()
    assert saved.shape[0] == 144
    resumed = _trainer("--load", save, "--train-iters", "6", "--make-vocab-size-divisible-by",
                       str(divisible_by))
    emb = resumed.model.module.embedding.word_embeddings.weight.detach()
    assert emb.shape[0] == rows
    keep = min(rows, 144)
    assert torch.equal(emb[:keep], saved[:keep]) and not emb[keep:].any()
    resumed.train()
    assert resumed.state.iteration == 6 and all(np.isfinite(resumed.state.losses))
