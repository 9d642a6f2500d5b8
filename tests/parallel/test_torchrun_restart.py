"""Automatic restart under torchrun: a worker SIGKILLed after the first checkpoint, the
agent restarts the group (`--max-restarts`), Paratron resumes from the newest complete
checkpoint and ends with the uninterrupted run's final loss; five times in a row with
torchrun's static rendezvous and once with c10d rendezvous. The restarted round's log
names the round, the rank that died and the iteration it resumed from."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --vocab-size 64 --mock-data --device cpu "
         "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 40 "
         "--log-interval 1 --eval-iters 0 --num-workers 0 --save-interval 5 "
         "--distributed-backend gloo").split()
LAST = re.compile(r"iteration\s+40/\s*40 \|.*?lm loss: (\S+) \|")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(folder: Path, rendezvous: str) -> subprocess.Popen:
    port = _port()
    launch = (["--master_port", str(port)] if rendezvous == "static" else
              ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"])
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--max-restarts", "2", *launch, "-m", "paratron.train", *FLAGS,
         "--save", str(folder), "--load", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _workers(agent: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(agent)], capture_output=True,
                                           text=True).stdout.split()]


def _final_loss(output: str) -> str:
    found = LAST.findall(output)
    assert found, output[-3000:]
    return found[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    proc = _torchrun(tmp_path_factory.mktemp("straight") / "ck", "static")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return _final_loss(out)


def _killed_and_restarted(folder: Path, rendezvous: str) -> str:
    proc = _torchrun(folder, rendezvous)
    deadline = time.time() + 120
    while not (folder / "latest_checkpointed_iteration.txt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    os.kill(max(_workers(proc.pid)), signal.SIGKILL)  # one worker of the first round
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous,attempt", [("static", i) for i in range(5)]
                         + [("c10d", 0)])
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(
        tmp_path, uninterrupted, rendezvous, attempt):
    out = _killed_and_restarted(tmp_path / "ck", rendezvous)
    assert _final_loss(out) == uninterrupted
    said = re.search(r"torchrun restart round 1: in the previous round rank (\d) died", out)
    assert said, out[-4000:]
    resumed = re.search(r"successfully loaded checkpoint from \S+ at iteration (\d+)", out)
    assert resumed and int(resumed.group(1)) % 5 == 0, out[-4000:]
