"""torchrun jobs on this machine, several agents on 127.0.0.1, started with the README's
commands.

The README's cluster recipes are fenced blocks, each after a `<!-- torchrun: NAME -->`
line. `readme_command(NAME, ...)` turns one into the argument list a test runs: `torchrun`
becomes this Python's `-m torch.distributed.run` (under `env`, which takes the block's
leading `VAR=value` words), `$VARIABLES` take the given values, the values of the options
in `sizes` replace the README's (nodes, processes, restarts, rendezvous timeouts: a
cluster's settings, not this machine's), and `<flags>` becomes the test's training flags.
A recipe edited in the README is therefore the recipe tested.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# A tiny model whose every layout computes what one process does (no dropout; adam eps
# as in tests.helpers.flags; the vocabulary padded alike at every TP size).
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--max-position-embeddings 16 --vocab-size 64 --padded-vocab-size 128 --mock-data "
        "--device cpu --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --adam-eps 1e-4 "
        "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 "
        "--num-workers 0 --distributed-backend gloo").split()
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_block(name: str) -> str:
    """The shell command of the README block named `name`, its continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- torchrun: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"README.md has no block marked <!-- torchrun: {name} -->"
    return found.group(1).replace("\\\n", " ").strip()


def readme_command(name: str, variables: dict, flags: list[str],
                   sizes: dict | None = None) -> list[str]:
    """The README block `name` as arguments: see the module docstring."""
    line = readme_block(name)
    for key, value in variables.items():
        line = line.replace(f"${key}", str(value))
    assert "$" not in line, f"unset variable in {line}"
    args = shlex.split(line)
    at = args.index("torchrun")
    environment = args[:at]  # VAR=value words before the command, as the shell takes them
    assert all("=" in word for word in environment), line
    for option, value in (sizes or {}).items():
        assert option in args, f"{option} is not in the README's {name} command"
        args[args.index(option) + 1] = str(value)
    flags_at = args.index("<flags>")
    return ["env", *environment, sys.executable, "-m", "torch.distributed.run",
            *args[at + 1:flags_at], *flags, *args[flags_at + 1:]]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """One agent, its output (and its workers') into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)


def finish(agents: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> str:
    """Wait for every agent and return the logs together; every agent must succeed."""
    try:
        codes = [agent.wait(timeout) for agent in agents]
    finally:
        for agent in agents:
            kill_agent(agent)
    text = "\n".join(log.read_text() for log in logs)
    assert codes == [0] * len(agents), text[-4000:]
    return text


def workers(agent: subprocess.Popen) -> list[int]:
    """The process ids of an agent's workers."""
    found = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def worker_rank(pid: int) -> int:
    """A worker's global rank, from the environment torchrun gave it."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def kill_agent(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers, as a node that is lost (nothing if it ended)."""
    if agent.poll() is not None:
        return
    children = workers(agent)
    for pid in [agent.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


def losses(text: str) -> dict[int, str]:
    """Iteration -> the logged lm loss string, the last logged for each iteration."""
    return {int(it): loss for it, loss in LOSS.findall(text)}
