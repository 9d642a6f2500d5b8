"""Elastic training with the README's `--nnodes 1:2` command: two agents of two processes
train DP4 with the distributed optimizer; one agent is killed with its workers (a node
lost) and the job goes on alone at DP2 from the last checkpoint; a third agent joins and
the job grows back to DP4 from the newest checkpoint, and finishes. Each part logs the
losses of an uninterrupted run at its size from the checkpoint it started from (rtol
1e-5): the optimizer state is resharded, the global batch kept by gradient accumulation,
and the samples of each global batch do not depend on the layout. Without
TORCH_DISABLE_SHARE_RDZV_TCP_STORE (torchrun's shared store) a job still shrinks, and the
restarted round names the ranks of the lost node."""

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paratron.checkpoint.files import LATEST, checkpoint_dir
from tests.helpers.torchrun import (ENV, TINY, finish, free_port, kill_agent, losses,
                                    readme_command, start)

ITERATIONS = 240
FLAGS = TINY + ["--train-iters", str(ITERATIONS), "--use-distributed-optimizer"]
LOADED = re.compile(r"successfully loaded checkpoint from \S+ at iteration (\d+)")
SAVED = re.compile(r"successfully saved checkpoint at iteration\s+(\d+)")


def _wait(what, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _segments(text: str) -> dict[int, dict[int, str]]:
    """The losses logged after each resume, by the iteration resumed from."""
    parts = LOADED.split(text)
    return {int(at): losses(part) for at, part in zip(parts[1::2], parts[2::2])}


def _uninterrupted(ckpt: Path, iteration: int, processes: int, folder: Path,
                   until: int = ITERATIONS) -> dict:
    """The losses of a run at `processes` processes resumed from checkpoint `iteration`,
    up to iteration `until`."""
    shutil.copytree(checkpoint_dir(ckpt, iteration), checkpoint_dir(folder, iteration))
    (folder / LATEST).write_text(str(iteration))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(processes), "-m", "paratron", "train",
                           *FLAGS, "--load", str(folder), "--exit-interval", str(until)],
                          capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(proc.stdout)


def _assert_close(got: dict[int, str], expected: dict[int, str]) -> None:
    for iteration, loss in got.items():
        assert float(loss) == pytest.approx(float(expected[iteration]), rel=1e-5), iteration


def _command(tmp_path: Path, port: int) -> list[str]:
    variables = {"GPUS_PER_NODE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                 "JOB_ID": "elastic", "CHECKPOINTS": tmp_path / "ck"}
    return readme_command("elastic", variables, FLAGS, {
        "--save-interval": 10, "--rdzv-conf": "last_call_timeout=5,keep_alive_interval=1"})


def _lose_a_node(command: list[str], port: int, tmp_path: Path):
    """Two agents (the first hosts the rendezvous store, so it is the one that stays)
    meet; the second is killed with its workers after the first checkpoint. Returns the
    survivor and its log."""
    survivor = start(command, tmp_path / "node0.log")
    _wait("the rendezvous store", lambda: _listening(port))
    lost = start(command, tmp_path / "node1.log")
    try:
        _wait("the first checkpoint", lambda: (tmp_path / "ck" / LATEST).exists())
    finally:
        kill_agent(lost)
    return survivor, tmp_path / "node0.log"


@pytest.mark.slow
def test_a_lost_node_shrinks_the_job_and_a_joining_node_grows_it(tmp_path):
    port, ckpt = free_port(), tmp_path / "ck"
    command = _command(tmp_path, port)
    survivor, log = _lose_a_node(command, port, tmp_path)
    try:
        _wait("a checkpoint saved after the shrink", lambda: re.search(
            LOADED.pattern + r"[\s\S]*" + SAVED.pattern, log.read_text()))
        joining = start(command, tmp_path / "node2.log")
    except BaseException:
        kill_agent(survivor)
        raise
    text = finish([survivor, joining], [log, tmp_path / "node2.log"], 240)

    segments = _segments(text)
    assert len(segments) == 2, text[-4000:]
    (shrunk_at, shrunk), (grown_at, grown) = sorted(segments.items())
    assert "ranks 2, 3 stopped answering" in text
    # Each round has a store of its own here: nothing is claimed about the previous one.
    assert "in the previous round" not in text
    assert max(grown) == ITERATIONS and set(range(shrunk_at + 1, grown_at + 1)) <= set(shrunk)
    at_dp2 = _uninterrupted(ckpt, shrunk_at, 2, tmp_path / "dp2", until=grown_at)
    _assert_close({i: shrunk[i] for i in range(shrunk_at + 1, grown_at + 1)}, at_dp2)
    _assert_close(grown, _uninterrupted(ckpt, grown_at, 4, tmp_path / "dp4"))


@pytest.mark.slow
def test_a_lost_node_shrinks_the_job_with_torchruns_shared_store(tmp_path):
    """Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE (the README says why growing needs it)
    a job still shrinks, and the restarted round names the ranks of the lost node."""
    port = free_port()
    command = _command(tmp_path, port)
    command.remove("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    command += ["--exit-interval", "40"]
    survivor, log = _lose_a_node(command, port, tmp_path)
    text = finish([survivor], [log], 240)
    assert "torchrun restart round 1: in the previous round ranks 2, 3 died" in text
    (shrunk_at, shrunk), = _segments(text).items()
    assert max(shrunk) == 40
    _assert_close(shrunk, _uninterrupted(tmp_path / "ck", shrunk_at, 2, tmp_path / "dp2", 40))
