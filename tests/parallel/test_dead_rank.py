"""A rank that dies (SIGKILL) or is stopped (SIGSTOP) in the middle of training is named
by the survivors: one line on stderr, exit code 1, no traceback, within the distributed
timeout plus the few seconds the heartbeats need to tell a silent rank from a slow one.
Launched by hand (--init-method, MASTER_ADDR) and under torchrun, whose failure summary
then shows that line as its root cause."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-3 --micro-batch-size 2 --global-batch-size 4 "
         "--mock-data --vocab-size 99 --device cpu --num-workers 0 --eval-iters 0 "
         "--train-iters 100000 --log-interval 1 --distributed-timeout-minutes 0.1").split()
TIMEOUT_S = 6  # --distributed-timeout-minutes 0.1
TRAIN = [sys.executable, "-m", "paratron", "train", *FLAGS]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Job:
    """Processes that are all killed when the test ends, and after `limit_s` seconds
    whatever happens, so no test can hang."""

    def __init__(self, limit_s: float = 90):
        self.procs: list[subprocess.Popen] = []
        self.watchdog = threading.Timer(limit_s, self.kill)
        self.watchdog.start()

    def start(self, cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True)
        self.procs.append(proc)
        return proc

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.cancel()
        self.kill()
        for proc in self.procs:
            proc.wait()


def _wait_for_training(stream) -> None:
    """Read rank 0's log up to its second iteration: every group exists, steps run."""
    for line in stream:
        if " iteration " in line and "2/" in line:
            return
    raise AssertionError("training never reached its second iteration")


def _by_hand(job: _Job, launch: str) -> list[subprocess.Popen]:
    """Two ranks launched by hand, joining through --init-method or MASTER_ADDR."""
    port = _free_port()
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    join = (["--init-method", f"tcp://127.0.0.1:{port}"] if launch == "init-method"
            else [])
    return [job.start(TRAIN + ["--world-size", "2", "--rank", str(rank), *join],
                      env if launch == "MASTER_ADDR" else ENV)
            for rank in range(2)]


def _survivor_error(proc: subprocess.Popen) -> tuple[str, float]:
    """The survivor's stderr and how long it took to exit after the fault."""
    start = time.monotonic()
    _, err = proc.communicate(timeout=80)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    return err, time.monotonic() - start


@pytest.mark.slow
def test_a_killed_rank_is_named_by_the_survivor():
    with _Job() as job:
        survivor, victim = _by_hand(job, "init-method")
        _wait_for_training(survivor.stdout)
        victim.kill()
        err, seconds = _survivor_error(survivor)
    assert err.splitlines() == [
        "paratron train: error: rank 1 stopped answering (no heartbeat for 4 s: the "
        "process died or is stopped); rank 0 stopped waiting for it"], err
    assert seconds < TIMEOUT_S + 20


@pytest.mark.slow
def test_a_stopped_rank_is_named_after_the_distributed_timeout():
    with _Job() as job:
        survivor, victim = _by_hand(job, "MASTER_ADDR")
        _wait_for_training(survivor.stdout)
        victim.send_signal(signal.SIGSTOP)
        err, seconds = _survivor_error(survivor)
    assert err.startswith("paratron train: error: rank 1 stopped answering"), err
    assert len(err.splitlines()) == 1, err
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 20


@pytest.mark.slow
def test_a_killed_store_host_is_named():
    # Launched by hand, rank 0 holds the rendezvous store: its heartbeats cannot be read,
    # and that itself names it.
    with _Job() as job:
        victim, survivor = _by_hand(job, "init-method")
        _wait_for_training(victim.stdout)
        victim.kill()
        err, _ = _survivor_error(survivor)
    assert len(err.splitlines()) == 1 and err.startswith(
        "paratron train: error: rank 0 stopped answering (the rendezvous store it hosts "
        "is unreachable"), err


def _workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, read from /proc."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        rank = [v for v in env if v.startswith(b"RANK=")]
        if rank:
            workers[int(rank[0][5:])] = int(entry.name)
    return workers


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.slow
def test_torchrun_root_cause_names_the_stopped_rank():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "paratron", "train", *FLAGS]
    with _Job() as job:
        launcher = job.start(cmd, ENV, stderr=subprocess.STDOUT)
        _wait_for_training(launcher.stdout)
        workers = _workers(launcher.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while not _exited(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        # torchrun asks the stopped rank to terminate, and would wait 30 s for it.
        os.kill(workers[1], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 1, out
    root = out.split("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 0" in root, out
    assert ("traceback : paratron train: error: rank 1 stopped answering" in root), out
