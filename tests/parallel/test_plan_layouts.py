"""The plan's per-rank weights, gradient buffers and optimizer state equal what each
rank of a real run holds after one step, at TP2, PP2 (tied embedding copied to the
last stage), DP2 with the distributed optimizer (padded shards) and EP2 for a tiny MoE
(with the distributed optimizer over DP x CP 2 for the dense weights). On one-stage
layouts the activation estimate is also checked against the bytes autograd saves on
each rank (TP2 with and without sequence parallelism, EP2's routed rows)."""

import pytest
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from paratron.training.memory_plan import chunk_saved_bytes, rank_chunks
from tests.helpers.plan import (ACTIVATION_RTOL, TINY, held_state_bytes, measured_saved_bytes,
                                planned_state_bytes)
from tests.helpers.training import PatternData

DENSE = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --group-query-attention --num-query-groups 2 "
         "--hidden-dropout 0 --global-batch-size 4").split()
MOE = DENSE + ("--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 "
               "--moe-shared-expert-intermediate-size 48").split()

LAYOUTS = {
    "tp2": (dict(tp=2, pp=1), DENSE + ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": (dict(tp=2, pp=1),
               DENSE + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (dict(tp=1, pp=2), DENSE + ["--pipeline-model-parallel-size", "2"]),
    # 100 padded to 128, odd-sized buffers: the shards end in padding on rank 1.
    "dp2-distributed-optimizer": (dict(tp=1, pp=1), DENSE + ["--use-distributed-optimizer"]),
    "ep2": (dict(tp=1, pp=1, ep=2),
            MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


def _rank_holds(sizes, flags):
    pg = ProcessGroups.build(**sizes)
    cfg = parse_args(TINY + flags + ["--world-size", str(dist.get_world_size())])
    trainer = Trainer(cfg, (PatternData(cfg.data.seq_length, 100), None, None), pg=pg,
                      log=lambda line: None)
    trainer.train_step()
    for model in trainer.models:
        model.finish_param_gather()
    planned = planned_state_bytes(trainer.cfg, pg.pp.rank, pg.dp_cp.rank, pg.edp.rank)
    numel = sum(p.numel() for model in trainer.models for p in model.module.parameters())
    activations = None
    if pg.pp.size == 1:
        activations = (measured_saved_bytes(trainer),
                       chunk_saved_bytes(trainer.cfg, rank_chunks(trainer.cfg, 0)[0], "cpu"))
    return held_state_bytes(trainer), planned, numel, activations


def _every_layout():
    return {name: _rank_holds(sizes, flags) for name, (sizes, flags) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def held():
    """{layout: [rank 0's (held, planned, parameter count), rank 1's]}: one pair of
    processes runs every layout in turn."""
    per_rank = run_distributed(2, _every_layout, timeout=180)
    return {name: [ranks[name] for ranks in per_rank] for name in LAYOUTS}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_plan_equals_what_each_rank_holds(held, name):
    results = held[name]
    for rank, (held, planned, _, _) in enumerate(results):
        assert planned == held, f"rank {rank}"
    if results[0][3] is not None:
        # Summed over the ranks: experts receive data-dependent shares of the routed
        # rows, but every row sent is received once.
        measured, estimate = (sum(result[3][i] for result in results) for i in (0, 1))
        assert estimate == pytest.approx(measured, rel=ACTIVATION_RTOL)
    if name == "dp2-distributed-optimizer":
        # Sharded, not replicated: the two ranks' fp32 main weights are one replica.
        numel = results[0][2]
        assert sum(result[0]["main_weights"] for result in results) == 4 * numel
