"""`paratron train`, `python -m paratron.train`, and `pretrain_gpt.py` under torchrun run
the same training from the same Megatron flags."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-3 --train-iters 4 --log-interval 2 "
         "--eval-interval 4 --eval-iters 1 --global-batch-size 2 --mock-data "
         "--vocab-size 99 --device cpu").split()


def _losses(output: str) -> list[str]:
    return re.findall(r"lm loss: (\S+) \|", output)


def _run(command):
    proc = subprocess.run(command + FLAGS, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def reference():
    return _losses(_run([sys.executable, "-m", "paratron", "train"]))


def test_module_entry_point(reference):
    assert len(reference) == 2
    assert _losses(_run([sys.executable, "-m", "paratron.train"])) == reference


@pytest.mark.slow
def test_pretrain_gpt_shim_under_torchrun(reference):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                "--master_port", "29517", str(ROOT / "pretrain_gpt.py")])
    assert _losses(out) == reference
    assert "validation loss at iteration 4" in out


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--use-distributed-optimizer"]])
@pytest.mark.slow
def test_torchrun_two_processes_train_like_one(reference, layout):
    """The launch path itself: torchrun's environment, process groups, data on every rank."""
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29518", "-m", "paratron", "train", *layout,
                "--padded-vocab-size", "128", "--hidden-dropout", "0",
                "--attention-dropout", "0"])
    single = _losses(_run([sys.executable, "-m", "paratron", "train", "--padded-vocab-size",
                           "128", "--hidden-dropout", "0", "--attention-dropout", "0"]))
    assert [float(x) for x in _losses(out)] == pytest.approx([float(x) for x in single],
                                                             rel=1e-5)
    assert out.count("validation loss at iteration 4 |") == 1  # one rank reports
