"""Running `paratron` as a user does, in a subprocess, on a tiny mock-data model; and
the check that a refusal is one line, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
TINY_TRAIN = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
              "--max-position-embeddings 8 --vocab-size 32 --mock-data --device cpu "
              "--micro-batch-size 1 --global-batch-size 2 --lr 1e-3 "
              "--num-workers 0 --eval-iters 0 --log-interval 1").split()


def train(*flags, **kwargs) -> subprocess.CompletedProcess:
    """`paratron train` on the tiny model with `flags` added (2 iterations unless
    `flags` give --train-iters)."""
    iters = [] if "--train-iters" in flags else ["--train-iters", "2"]
    return subprocess.run([sys.executable, "-m", "paratron", "train", *TINY_TRAIN, *iters,
                           *flags], capture_output=True, text=True, timeout=120, env=ENV,
                          **kwargs)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one line a refused run wrote on stderr, checked to hold every word."""
    err = proc.stderr.strip()
    assert proc.returncode in (1, 2), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for word in words:
        assert word in err, err
    return err
