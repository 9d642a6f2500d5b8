"""Automatic restart under torchrun, with the README's restart command: a worker SIGKILLed
after the first checkpoint, the agent restarts the group (`--max-restarts`), Paratron
resumes from the newest complete checkpoint, and every iteration after the resume logs
the uninterrupted run's loss bit for bit (RNG states are restored in the same layout);
five times in a row with torchrun's static rendezvous and once with c10d rendezvous. The
restarted round's log names the rank that was killed and the iteration it resumed from.
The SLURM template asks for a requeue and for torchrun's restarts."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from paratron.cli.args import parse_args
from tests.helpers.torchrun import (ENV, ROOT, finish, free_port, losses, readme_command,
                                    start, worker_rank, workers)

# With dropout: the restored RNG states are part of what must match.
FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --vocab-size 64 --mock-data --device cpu "
         "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 40 "
         "--log-interval 1 --eval-iters 0 --num-workers 0 "
         "--distributed-backend gloo").split()
RESTARTED = "torchrun restart round 1"


def _torchrun(folder: Path, rendezvous: str) -> list[str]:
    variables = {"GPUS_PER_NODE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(),
                 "JOB_ID": "restart", "CHECKPOINTS": folder}
    if rendezvous == "static":
        return readme_command("restart", variables, FLAGS,
                              {"--max-restarts": 2, "--save-interval": 5})
    # The c10d recipe on one node, with the restart recipe's checkpoint flags.
    checkpoints = ["--save", str(folder), "--load", str(folder), "--save-interval", "5"]
    return readme_command("rendezvous", variables, FLAGS + checkpoints,
                          {"--nnodes": 1, "--max-restarts": 2})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    log = folder / "agent.log"
    found = losses(finish([start(_torchrun(folder / "ck", "static"), log)], [log], 300))
    assert sorted(found) == list(range(1, 41))
    return found


def _killed_and_restarted(folder: Path, rendezvous: str) -> tuple[str, int]:
    """The log of a run whose worker was killed after the first checkpoint, and that
    worker's rank."""
    log = folder / "agent.log"
    agent = start(_torchrun(folder / "ck", rendezvous), log)
    deadline = time.time() + 120
    while not (folder / "ck" / "latest_checkpointed_iteration.txt").exists():
        assert agent.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    victim = max(workers(agent))  # one worker of the first round
    rank = worker_rank(victim)
    os.kill(victim, signal.SIGKILL)
    return finish([agent], [log], 300), rank


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous,attempt", [("static", i) for i in range(5)]
                         + [("c10d", 0)])
def test_a_killed_worker_is_restarted_and_every_later_iteration_is_bit_identical(
        tmp_path, uninterrupted, rendezvous, attempt):
    out, killed = _killed_and_restarted(tmp_path, rendezvous)
    assert f"{RESTARTED}: in the previous round rank {killed} died" in out, out[-4000:]
    restarted = out[out.index(RESTARTED):]
    resumed = re.search(r"successfully loaded checkpoint from \S+ at iteration (\d+)", restarted)
    assert resumed and int(resumed.group(1)) % 5 == 0, restarted[-4000:]
    after = losses(restarted)
    assert sorted(after) == list(range(int(resumed.group(1)) + 1, 41))
    assert after == {i: uninterrupted[i] for i in after}  # the logged strings, bit for bit
    before = losses(out[:out.index(RESTARTED)])
    assert before == {i: uninterrupted[i] for i in before}


def test_the_slurm_template_requeues_and_restarts(tmp_path):
    """examples/slurm/train.sbatch asks SLURM to requeue the job and torchrun to restart
    its workers; the command it runs on each node (srun, scontrol and python stood in for
    by scripts) parses as torchrun's and `paratron train`'s arguments."""
    template = ROOT / "examples" / "slurm" / "train.sbatch"
    assert "#SBATCH --requeue" in template.read_text().splitlines()
    tools, argv = tmp_path / "bin", tmp_path / "argv"
    tools.mkdir()
    (tools / "scontrol").write_text("#!/bin/bash\necho node1\necho node2\n")
    (tools / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit
    (tools / "python").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {argv}\n')
    for tool in tools.iterdir():
        tool.chmod(0o755)
    flags = FLAGS + ["--save", "/shared/ckpt", "--load", "/shared/ckpt"]
    subprocess.run(["bash", str(template), *flags], check=True, timeout=60, env={
        **ENV, "PATH": f"{tools}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "7"})
    words = argv.read_text().splitlines()
    assert words[:2] == ["-m", "torch.distributed.run"]
    launch = get_args_parser().parse_args(words[2:])
    assert (launch.nnodes, launch.node_rank, launch.max_restarts) == ("2", 1, 3)
    assert (launch.rdzv_backend, launch.rdzv_endpoint) == ("c10d", "node1:29500")
    assert launch.module and launch.training_script == "paratron"
    assert launch.training_script_args[0] == "train"
    cfg = parse_args(launch.training_script_args[1:])
    assert cfg.checkpoint.save == cfg.checkpoint.load == "/shared/ckpt"
