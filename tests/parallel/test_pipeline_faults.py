"""No hang: when one pipeline stage raises, every rank stops within the distributed
timeout, and the others' error names the failing rank."""

import time

import pytest

import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.cli.args import parse_args
from paratron.model.gpt import GPTModel
from paratron.parallel.launch import PeerFailure
from paratron.training.pretrain import pretrain

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-3 --train-iters 20 --global-batch-size 4 "
         "--mock-data --vocab-size 99 --device cpu --num-workers 0 --eval-iters 0 "
         "--pipeline-model-parallel-size 2 --distributed-timeout-minutes 0.1").split()


def _failing_stage(failing_rank, failing_call, flags=FLAGS):
    """Run training where `failing_rank`'s model raises in its `failing_call`-th forward;
    returns how this rank ended ("own" error, "peer" failure named, or "finished"), the
    message and the seconds it took."""
    if dist.get_rank() == failing_rank:
        original, calls = GPTModel.forward, []

        def forward(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == failing_call:
                raise RuntimeError("injected failure in the stage's forward")
            return original(self, *args, **kwargs)

        GPTModel.forward = forward
    start = time.monotonic()
    try:
        pretrain(parse_args(flags + ["--world-size", str(dist.get_world_size())]),
                 log=lambda line: None)
        outcome = ("finished", "")
    except PeerFailure as exc:
        outcome = ("peer", str(exc))
    except RuntimeError as exc:
        outcome = ("own", str(exc))
    return outcome + (time.monotonic() - start,)


@pytest.mark.parametrize("failing", [0, 1])
@pytest.mark.slow
def test_a_failing_stage_stops_every_rank_and_is_named(failing):
    # The stage fails in its 10th forward (third iteration); the other one is then
    # blocked waiting for activations or gradients and gives up within the 6 s timeout.
    results = run_distributed(2, _failing_stage, failing, 10, timeout=120)
    own, other = results[failing], results[1 - failing]
    assert own[0] == "own" and "injected failure" in own[1]
    assert other[0] == "peer", other
    assert other[1].startswith(f"rank {failing} failed (RuntimeError: injected failure")
    assert other[2] < 60
