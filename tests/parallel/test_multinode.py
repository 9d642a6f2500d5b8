"""Several torchrun agents on this machine as the nodes of one job, each started with the
README's command for it: two agents of two processes train TP2 x DP2 and PP2 x DP2 to
the losses of one process, with node ranks and with c10d rendezvous; three agents of one
process meet through c10d rendezvous and train DP3 likewise."""

import subprocess
import sys

import pytest

from tests.helpers.torchrun import (ENV, TINY, finish, free_port, losses, readme_command,
                                    start)

FLAGS = TINY + ["--train-iters", "6"]
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"],
           "pp2": ["--pipeline-model-parallel-size", "2"]}


def _one_process(flags: list[str]) -> dict[int, str]:
    proc = subprocess.run([sys.executable, "-m", "paratron", "train", *flags],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return losses(proc.stdout)


def _nodes(recipe: str, nodes: int, per_node: int, flags: list[str], folder) -> dict[int, str]:
    """One agent per node, each with the README's command, and the losses rank 0 logged."""
    port, agents, logs = free_port(), [], []
    for node in range(nodes):
        variables = {"NODE_RANK": node, "GPUS_PER_NODE": per_node, "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port, "JOB_ID": f"nodes{port}"}
        logs.append(folder / f"node{node}.log")
        agents.append(start(readme_command(recipe, variables, flags, {"--nnodes": nodes}),
                            logs[-1]))
    return losses(finish(agents, logs))


def _assert_close(got: dict[int, str], expected: dict[int, str]) -> None:
    assert len(expected) == 6 and got.keys() == expected.keys()
    for iteration, loss in expected.items():
        assert float(got[iteration]) == pytest.approx(float(loss), rel=1e-5), iteration


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["nodes", "rendezvous"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_nodes_of_two_processes_equal_one_process(tmp_path, recipe, layout):
    got = _nodes(recipe, 2, 2, FLAGS + LAYOUTS[layout], tmp_path)
    _assert_close(got, _one_process(FLAGS))


@pytest.mark.slow
def test_three_nodes_meet_through_c10d_rendezvous(tmp_path):
    flags = FLAGS + ["--global-batch-size", "6"]
    _assert_close(_nodes("rendezvous", 3, 1, flags, tmp_path), _one_process(flags))
