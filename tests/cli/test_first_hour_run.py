"""A new user's first runs: a resume with other evaluation settings, an evaluation that
fails after training, fp16 on a CPU, a refused layout under torchrun, a refusal before
the settings block, a rerun of a finished run, and a resume that changes --train-iters.
Tiny mock-data models, in this process except for the torchrun launch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paratron.checkpoint import files
from paratron.cli.args import parse_args
from paratron.config import format_config
from paratron.data.errors import DataError
from paratron.data.indexed_dataset import IndexedDatasetWriter
from paratron.training.pretrain import pretrain
from paratron.training.trainer import Trainer

FLAGS = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
         "--max-position-embeddings 8 --vocab-size 32 --mock-data --device cpu "
         "--micro-batch-size 1 --global-batch-size 2 --lr 1e-3 --num-workers 0 "
         "--log-interval 1").split()
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def _train(*flags: str) -> list[str]:
    """Run `pretrain` on the tiny model with `flags` added; the lines it logged."""
    lines: list[str] = []
    pretrain(parse_args(FLAGS + list(flags)), log=lines.append)
    return lines


def _flags(**values) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _small_corpus(tmp_path) -> list[str]:
    """20 documents of 17 tokens, a quarter of them the validation split (about 10
    samples of 8 tokens per epoch); the flags that train on them."""
    prefix = str(tmp_path / "corpus_text_document")
    writer = IndexedDatasetWriter(prefix + ".bin", np.uint16)
    for doc in range(20):
        writer.add_document([(doc + i) % 31 for i in range(17)])
    writer.finalize(prefix + ".idx")
    return [x for x in FLAGS if x != "--mock-data"] + [
        "--tokenizer-type", "NullTokenizer", "--data-path", prefix, "--split", "3,1,0",
        "--data-cache-path", str(tmp_path / "cache")]


def test_resume_with_fewer_evaluation_samples_evaluates_and_saves(tmp_path):
    """Issue 21 item 1: the first run consumes 12 validation samples (evaluations at 2
    and 4, 3 batches of 2); the resumed run's validation split is built for its own 6
    (one epoch of the split, fewer than 12), so it reads on around the split instead of
    refusing, and its last iteration is saved."""
    data, save = _small_corpus(tmp_path), tmp_path / "run"
    common = data + _flags(save=save, eval_interval=2, save_interval=100)
    pretrain(parse_args(common + _flags(train_iters=4, eval_iters=3)), log=lambda x: None)
    assert files.read_metadata(files.checkpoint_dir(save, 4))["train_state"][
        "consumed_valid_samples"] == 12
    lines: list[str] = []
    pretrain(parse_args(common + _flags(load=save, train_iters=5, eval_iters=1)),
             log=lines.append)
    _train(*common, *_flags(train_iters=4, eval_iters=3))
    lines = _train(*common, *_flags(load=save, train_iters=5, eval_iters=1))
    assert any("validation loss at iteration 5 on validation set" in x for x in lines), lines
    assert files.read_latest(save) == 5


@pytest.mark.parametrize("fails_at", ["final", "interval"])
def test_failing_evaluation_costs_no_checkpoint(tmp_path, monkeypatch, fails_at):
    """Issue 21 item 1: the checkpoint due at an iteration (the last one, or a
    --save-interval one that is also an --eval-interval one) is written before that
    iteration's evaluation, so an evaluation that fails loses no training."""
    def broken(self, iterator):
        raise DataError("validation data unreadable")
    monkeypatch.setattr(Trainer, "evaluate", broken)
    save = tmp_path / "run"
    every = {"final": _flags(eval_interval=100, save_interval=100),
             "interval": _flags(eval_interval=2, save_interval=2)}[fails_at]
    with pytest.raises(DataError, match="unreadable"):
        _train(*every, *_flags(save=save, train_iters=3, eval_iters=1))
    assert files.read_latest(save) == (3 if fails_at == "final" else 2)


def test_fp16_on_cpu_warns_once_and_the_first_iteration_is_reported():
    """Issue 21 item 3: --fp16 on a CPU says once what it costs and points to --bf16;
    the first iteration gets a line although --log-interval does not fall on it."""
    lines = _train("--fp16", *_flags(train_iters=2, eval_iters=0, log_interval=10))
    warnings = [x for x in lines if "--fp16 on a CPU" in x]
    assert len(warnings) == 1 and "--bf16" in warnings[0]
    first = [x for x in lines if "first iteration done" in x]
    assert len(first) == 1 and "iteration 1/2" in first[0], lines
    assert "next log line at iteration 10" in first[0]


def test_refused_layout_under_torchrun_is_said_once_with_the_world_size():
    """Issue 21 item 10: every rank refuses TP 4 on 2 processes, rank 0 says so."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "paratron", "train", *FLAGS, "--train-iters", "2",
         "--tensor-model-parallel-size", "4"],
        capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    said = [x for x in (proc.stdout + proc.stderr).splitlines()
            if x.startswith("paratron train: error:")]
    assert len(said) == 1, proc.stderr
    assert "(4): this launch has 2 processes" in said[0]


def test_refusal_comes_before_the_settings_block(tmp_path):
    """Issue 21 item 10: a data path that does not exist is refused before the
    'arguments' block is printed."""
    lines: list[str] = []
    flags = [x for x in FLAGS if x != "--mock-data"] + [
        "--tokenizer-type", "NullTokenizer", "--train-iters", "2",
        "--data-path", str(tmp_path / "missing_text_document")]
    with pytest.raises(DataError):
        pretrain(parse_args(flags), log=lines.append)
    assert not any("arguments" in x for x in lines), lines[:3]


def test_settings_block_lists_each_setting_once():
    """A setting two config sections share (cp_comm_type) appears once."""
    block = format_config(parse_args(FLAGS + ["--train-iters", "2"]))
    assert block.count(" cp_comm_type ") == 1 and block.count(" sequence_parallel ") == 1


def test_rerun_of_finished_run_has_nothing_to_do(tmp_path):
    """Issue 21 item 10: the same command again loads iteration 2 and stops there."""
    run = _flags(save=tmp_path / "run", load=tmp_path / "run", train_iters=2,
                 eval_interval=1, eval_iters=1)
    _train(*run)
    lines = _train(*run)
    assert any("nothing to do" in x and "iteration 2" in x for x in lines), lines
    assert not any("validation loss" in x or "saved checkpoint" in x for x in lines)


def test_resume_with_other_train_iters_warns_of_the_schedule(tmp_path):
    """Issue 21 item 10: --lr-decay-iters defaults to --train-iters, so asking for more
    iterations on resume changes the decay under way: said, with the flag that keeps
    it. The same --train-iters resumes without the warning."""
    save = tmp_path / "run"
    common = _flags(save=save, load=save, eval_iters=0, lr_decay_style="cosine")
    _train(*common, *_flags(train_iters=2))
    lines = _train(*common, *_flags(train_iters=4))
    warned = [x for x in lines if "learning-rate schedule changes" in x]
    assert len(warned) == 1, lines
    assert "--train-iters is 4 here, 2 there" in warned[0]
    assert "--lr-decay-iters 2" in warned[0]
    again = _train(*common, *_flags(train_iters=5, lr_decay_iters=4))
    assert not any("learning-rate schedule" in x for x in again)
