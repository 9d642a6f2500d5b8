"""FP8 scales do not depend on the layout: a dense Llama trained in FP8 at TP2 with
sequence parallelism, PP2, CP2 and TP2 x CP2 casts with the one-process run's scales and
trains like it over 10 iterations (fp32 main weights, CPU, gloo); so do PP2 with virtual
stages and DP2 with the distributed optimizer and full recompute.

With --fp64 (float64 weights, gradients and compute; fp32 main weights and Adam state)
sums split over ranks agree with whole ones to ~1e-16, so no FP8 rounding can go another
way: every layout's losses are within rtol 1e-5 and its final weights equal the
one-process run's within rtol 1e-5, atol 0 (measured: bit for bit), with torchao's
tensorwise recipe and with `--fp8-recipe rowwise`. In fp32, below,
FP8's rounding amplifies float reordering:

Every tensorwise amax of the first step equals the one-process one: exactly in the
forward, within 1e-6 in the backward, whose gradients add TP partial sums and CP
attention blocks in another order (~1e-7, as without FP8). Every iteration's loss is
within rtol 1e-5. The final weights are within rtol 1e-5 plus an atol: now and then a
small gradient element whose last bits differ lies on a rounding midpoint and rounds the
other way, one FP8 step (at the first step of TP2 and of CP2, an element of layer 0's
qkv output gradient scales to -29.9996 on one process and to -30.0002 split, between
e5m2's -28 and -32); Adam turns such changes of small gradient entries into updates of
up to the learning rate, and single weights drift by up to ~2e-5 (hybrid) or ~1e-4
(e4m3) in 10 steps.
With the group reductions switched off inside the ranks, TP2 + SP casts with each
shard's own scale and its losses leave the one-process run: the checks can fail."""

from unittest import mock

import numpy as np
import pytest
import torch.distributed as dist

from paratron.cli.args import parse_args
from paratron.model import fp8
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.dist_utils import run_distributed
from tests.helpers.flags import COMMON, LLAMA
from tests.helpers.training import PatternData
from tests.helpers.weights import full_weights

# Every FP8 GEMM dimension per rank a multiple of 16 down to TP2 x CP2 + SP: qkv out
# (4 + 2 x 2) x 8 = 64, fc1 out 2 x 64, and 4 x 16 tokens a micro-batch.
ITERS = 10
FLAGS = COMMON + LLAMA + ["--ffn-hidden-size", "64", "--micro-batch-size", "4",
                          "--train-iters", str(ITERS), "--fp8-format", "hybrid"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PARALLEL = {  # world, (tp, pp, cp), flags
    "tp2_sp": (2, (2, 1, 1), TP2_SP),
    "pp2": (2, (1, 2, 1), ["--pipeline-model-parallel-size", "2"]),
    "cp2": (2, (1, 1, 2), ["--context-parallel-size", "2"]),
    "tp2_sp_cp2": (4, (2, 1, 2), TP2_SP + ["--context-parallel-size", "2"]),
    "pp2_vpp2": (2, (1, 2, 1), ["--pipeline-model-parallel-size", "2",
                                "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp2_distopt_recompute": (2, (1, 1, 1), [
        "--use-distributed-optimizer", "--recompute-granularity", "full",
        "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
}
# Where each rank casts tensors of the one-process run's micro-batches (split or whole),
# so its first step's amaxes are the one-process ones.
SAME_CASTS = {"tp2_sp", "cp2", "tp2_sp_cp2"}
E4M3, FP64, ROWWISE = ["--fp8-format", "e4m3"], ["--fp64"], ["--fp8-recipe", "rowwise"]
RUNS = {  # name: parallel layout, flags of the run (and its reference), weights' atol
    "tp2_sp": ("tp2_sp", [], 5e-5),
    "tp2_sp_e4m3": ("tp2_sp", E4M3, 2e-4),
    "pp2": ("pp2", [], 1e-6),
    "cp2": ("cp2", [], 5e-5),
    "tp2_sp_cp2": ("tp2_sp_cp2", [], 5e-5),
    **{f"fp64_{name}": (name, FP64, 0.0) for name in ("tp2_sp", "pp2", "cp2", "tp2_sp_cp2",
                                                      "dp2_distopt_recompute")},
    "fp64_pp2_vpp2": ("pp2_vpp2", FP64 + ["--num-layers", "4"], 0.0),
    "fp64_tp2_sp_e4m3": ("tp2_sp", FP64 + E4M3, 0.0),
    "fp64_tp2_sp_rowwise": ("tp2_sp", FP64 + ROWWISE, 0.0),
    "fp64_cp2_rowwise": ("cp2", FP64 + ROWWISE, 0.0),
}


def _recording(amaxes: list, local: bool):
    """`fp8._group_max` that also records each tensorwise amax it returns; `local`: the
    rank's own amax, not reduced over the groups that split the tensor."""
    group_max = fp8._group_max

    def record(amax, groups):
        amax = amax if local else group_max(amax, groups)
        amaxes.append(amax.flatten().tolist())
        return amax
    return record


def _train(flags, pg=None, local_amax=False):
    """Losses, unsharded weights and every amax (in cast order) of an FP8 run."""
    amaxes = []
    with mock.patch.object(fp8, "_group_max", _recording(amaxes, local_amax)):
        trainer = Trainer(parse_args(flags), (PatternData(16, 120), None, None), pg=pg,
                          log=lambda line: None)
        state = trainer.train()
    return state.losses, full_weights(trainer), amaxes


def _rank(flags, sizes, local_amax=False):
    pg = ProcessGroups.build(*sizes)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg, local_amax)


@pytest.fixture(scope="module")
def references():
    """The one-process run of some flags, trained once."""
    cache = {}

    def reference(flags):
        if tuple(flags) not in cache:
            cache[tuple(flags)] = _train(FLAGS + flags)
        return cache[tuple(flags)]
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_fp8_equals_single_process(references, run):
    layout, flags, atol = RUNS[run]
    world, sizes, parallel = PARALLEL[layout]
    ref_losses, ref_weights, ref_amaxes = references(flags)
    first_step = len(ref_amaxes) // ITERS
    weights = {}
    for losses, rank_weights, amaxes in run_distributed(world, _rank, FLAGS + flags + parallel,
                                                        sizes, timeout=240):
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        # Row-wise scales belong to the rank's own rows.
        if layout in SAME_CASTS and ROWWISE != flags[-2:]:
            for got, want in zip(amaxes[:first_step], ref_amaxes[:first_step]):
                np.testing.assert_allclose(got, want, rtol=1e-6)
        weights.update(rank_weights)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.slow
def test_local_amax_leaves_single_process(references):
    """Without the group reductions a weight shard's scale is its own, so TP2 + SP casts
    other values than one process and the losses part."""
    world, sizes, parallel = PARALLEL["tp2_sp"]
    ref_losses, _, _ = references([])
    losses, _, _ = run_distributed(world, _rank, FLAGS + parallel, sizes, True, timeout=240)[0]
    assert not np.allclose(losses, ref_losses, rtol=1e-5)
