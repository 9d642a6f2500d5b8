"""FP8 mixtures of experts train like one FP8 process.

EP2 matches within rtol 1e-5 over 10 iterations: routed experts take one scale per token
row, so the rows that meet at an expert from several micro-batches never share a scale.
At EP2 x TP2 with sequence parallelism (expert TP 2) the amax of a row split over
expert-TP ranks is reduced over them, and after one step every weight is within 4e-7 of
one process; but TP's partial sums add in another order (~1e-7), a value that close to an
FP8 rounding boundary rounds the other way, and over 10 Adam steps single weights drift
by up to ~3e-5 (losses stay within 1e-5). Without FP8 the same layout is within 1e-6
(tests/parallel/test_moe_equivalence.py). With --fp64 (float64 weights, gradients and
compute, fp32 main weights) no partial sum differs beyond ~1e-16 and EP2 x TP2 + SP
equals one --fp64 process within rtol 1e-5, atol 0 (measured: bit for bit).
`test_split_expert_matmuls_equal_whole_ones` checks the expert-TP reductions on
identical inputs."""

import numpy as np
import pytest
import torch.distributed as dist

from paratron.parallel.process_groups import ProcessGroups
from tests.helpers.dist_utils import run_distributed
from tests.helpers.training import train_on_patterns
from tests.helpers.weights import full_weights

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
         "--device cpu --micro-batch-size 2 --global-batch-size 8 --eval-interval 1000 "
         "--eval-iters 0 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
         "--adam-eps 1e-4 --num-workers 0 --train-iters 10 --swiglu --normalization RMSNorm "
         "--position-embedding-type rope --disable-bias-linear --group-query-attention "
         "--num-query-groups 2 --untie-embeddings-and-output-weights --num-experts 4 "
         "--moe-ffn-hidden-size 32 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 "
         "--moe-token-dispatcher-type alltoall --fp8-format hybrid").split()
EP2_TP2_SP = ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
              "--sequence-parallel"]
LAYOUTS = {  # world, (tp, ep), flags, weights' atol
    "ep2": (2, (1, 2), ["--expert-model-parallel-size", "2"], 1e-6),
    "ep2_tp2_sp": (4, (2, 2), EP2_TP2_SP, 5e-5),
    "fp64_ep2_tp2_sp": (4, (2, 2), ["--fp64"] + EP2_TP2_SP, 0.0),
}


def _train(flags, pg=None):
    trainer, state = train_on_patterns(flags, pg)
    return state.losses, full_weights(trainer)


def _rank(flags, tp, ep):
    pg = ProcessGroups.build(tp, 1, 1, ep)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.fixture(scope="module")
def references():
    return {precision: _train(FLAGS + precision.split()) for precision in ("", "--fp64")}


def test_fp8_reaches_the_experts(references):
    plain, _ = _train([f for f in FLAGS if f not in ("--fp8-format", "hybrid")])
    assert not np.allclose(references[""][0], plain, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_moe_equals_single_process(references, layout):
    world, sizes, extra, atol = LAYOUTS[layout]
    ref_losses, ref_weights = references["--fp64" if "--fp64" in extra else ""]
    weights = {}
    for losses, rank_weights in run_distributed(world, _rank, FLAGS + extra, *sizes,
                                                timeout=300):
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        weights.update(rank_weights)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=atol, err_msg=name)


def _expert_matmuls_on_two_ranks(x, w1, w2, g):
    """One expert's fc1 (output split over the two ranks) and fc2 (input split) in FP8
    row-wise, with the amax of split rows reduced over the group; returns what each
    rank's pieces add up to."""
    import torch
    import torch.nn.functional as F
    from paratron.model.fp8 import Float8Matmul
    group, rank = dist.group.WORLD, dist.get_rank()
    fc1 = Float8Matmul("hybrid", 0, token_groups=None, out_groups=(group,),
                       recipe="rowwise_with_gw_hp")
    fc2 = Float8Matmul("hybrid", 0, token_groups=None, in_groups=(group,),
                       recipe="rowwise_with_gw_hp")
    x = x.clone().requires_grad_()
    w1 = w1.chunk(2)[rank].clone().requires_grad_()
    w2 = w2.chunk(2, dim=1)[rank].clone().requires_grad_()
    h = F.gelu(fc1(x, w1))
    y = fc2(h, w2)
    total = y.detach().clone()
    dist.all_reduce(total)
    y.backward(g)
    grad_x = x.grad.clone()
    dist.all_reduce(grad_x)
    return total, grad_x, w1.grad, w2.grad


@pytest.mark.slow
def test_split_expert_matmuls_equal_whole_ones():
    """The expert-TP reductions: with the same rows, fc1 split by output and fc2 by input
    over two ranks give one rank's FP8 results (up to the order of fc2's partial sums)."""
    import torch
    import torch.nn.functional as F
    from paratron.model.fp8 import Float8Matmul
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(32, 32, generator=gen), torch.randn(32, 32, generator=gen)
    w1, w2 = torch.randn(64, 32, generator=gen) / 8, torch.randn(32, 64, generator=gen) / 8
    whole = Float8Matmul("hybrid", 0, token_groups=None, recipe="rowwise_with_gw_hp")
    xs, w1s, w2s = (t.clone().requires_grad_() for t in (x, w1, w2))
    y = whole(F.gelu(whole(xs, w1s)), w2s)
    y.backward(g)
    results = run_distributed(2, _expert_matmuls_on_two_ranks, x, w1, w2, g, timeout=120)
    for rank, (total, grad_x, grad_w1, grad_w2) in enumerate(results):
        np.testing.assert_allclose(total, y.detach(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_x, xs.grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_w1, w1s.grad.chunk(2)[rank], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_w2, w2s.grad.chunk(2, dim=1)[rank], rtol=1e-5,
                                   atol=1e-6)
