"""Two data-parallel ranks: a rank slower at its own work is named in the straggler
report; a rank that fails is named by the other, which stops within the distributed
timeout instead of hanging."""

import re
import time

import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from tests.parallel.test_pipeline_faults import _failing_stage
from paratron.cli.args import parse_args
from paratron.training.pretrain import pretrain
from paratron.training.trainer import Trainer

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 1e-3 --micro-batch-size 2 --global-batch-size 4 "
         "--mock-data --vocab-size 99 --device cpu --num-workers 0 --eval-iters 0 "
         "--world-size 2").split()


def _slow_rank_one(sleep_s):
    if dist.get_rank() == 1:
        original = Trainer._global_batch

        def slow(self, iterator):
            time.sleep(sleep_s)
            return original(self, iterator)

        Trainer._global_batch = slow
    lines = []
    pretrain(parse_args(FLAGS + ["--train-iters", "4", "--log-interval", "2"]),
             log=lines.append)
    return lines


def test_straggler_report_names_the_slow_rank():
    lines = run_distributed(2, _slow_rank_one, 0.2, timeout=120)[0]
    reports = [x for x in lines if x.startswith(" straggler:")]
    assert len(reports) == 2, lines
    for report in reports:
        found = re.search(r"max: ([\d.]+) \(rank 1\) \| min: ([\d.]+) \(rank 0\)", report)
        assert found, report
        assert float(found[1]) >= 200.0  # the slow rank's own work includes its sleep


def test_a_failing_data_parallel_rank_is_named_without_a_hang():
    # Rank 1 fails in its third iteration; rank 0 is then blocked in the gradient
    # all-reduce and gives up within the 6 s timeout, naming rank 1.
    flags = FLAGS + ["--train-iters", "10", "--distributed-timeout-minutes", "0.1"]
    own, other = run_distributed(2, _failing_stage, 1, 3, flags, timeout=120)[::-1]
    assert own[0] == "own" and "injected failure" in own[1]
    assert other[0] == "peer", other
    assert other[1].startswith("rank 1 failed (RuntimeError: injected failure")
    assert other[2] < 60
