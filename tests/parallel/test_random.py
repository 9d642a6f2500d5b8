"""Dropout streams: different across TP ranks inside `fork`, identical outside, and
replayed exactly by activation recompute."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.random import (EXPERT_PARALLEL_RNG, RNGStatesTracker,
                                      data_parallel_seed, expert_parallel_seed,
                                      model_parallel_seed, seed_everything)


def test_seeds_follow_megatron():
    assert data_parallel_seed(1234, pp_rank=2) == 1434
    assert model_parallel_seed(1234, tp_rank=3) == 1234 + 2718 + 3
    assert model_parallel_seed(1234, tp_rank=1, pp_rank=1) == 1234 + 100 + 2718 + 1
    assert expert_parallel_seed(1234, ep_rank=2, etp_rank=1, pp_rank=1) == \
        1234 + 100 + 1024 + 200 + 1


def test_fork_leaves_the_default_stream_alone():
    pg = ProcessGroups.single()
    seed_everything(7, pg)
    plain = [torch.rand(5) for _ in range(2)]
    seed_everything(7, pg)
    first = torch.rand(5)
    with pg.rng.fork():
        inside = [torch.rand(5) for _ in range(2)]
    second = torch.rand(5)
    torch.testing.assert_close([first, second], plain)  # as if the fork had not happened
    assert not torch.equal(inside[0], plain[1])
    with pg.rng.fork():  # the tracked stream continues where it stopped
        third = torch.rand(5)
    generator = torch.Generator().manual_seed(model_parallel_seed(7, 0))
    torch.testing.assert_close([*inside, third], [torch.rand(5, generator=generator)
                                                  for _ in range(3)])


def test_nested_fork_continues_the_stream():
    pg = ProcessGroups.single()
    seed_everything(7, pg)
    with pg.rng.fork():
        a = torch.rand(3)
        with pg.rng.fork():
            b = torch.rand(3)
        c = torch.rand(3)
    generator = torch.Generator().manual_seed(model_parallel_seed(7, 0))
    torch.testing.assert_close([a, b, c], [torch.rand(3, generator=generator)
                                           for _ in range(3)])


def test_unseeded_stream_is_refused():
    tracker = RNGStatesTracker()
    with pytest.raises(RuntimeError, match="not seeded"):
        with tracker.fork():
            pass
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)


def _masks(tp, pp):
    pg = ProcessGroups.build(tp=tp, pp=pp)
    seed_everything(1234, pg)
    x = torch.ones(4096)
    outside = F.dropout(x, 0.5)
    with pg.rng.fork():
        inside = F.dropout(x, 0.5)
    with pg.rng.fork(EXPERT_PARALLEL_RNG):
        expert = F.dropout(x, 0.5)
    after = F.dropout(x, 0.5)
    return pg.tp.rank, pg.dp.rank, pg.pp.rank, outside, inside, expert, after


@pytest.mark.parametrize("tp", [2, 4])
def test_dropout_masks_across_tensor_parallel_ranks(tp):
    results = run_distributed(tp, _masks, tp, 1)
    inside = [r[4] for r in results]
    for r in results[1:]:
        torch.testing.assert_close(r[3], results[0][3])  # outside: the same everywhere
        torch.testing.assert_close(r[6], results[0][6])
    for i in range(tp):
        for j in range(i):
            assert not torch.equal(inside[i], inside[j])  # inside: one mask per TP rank


def test_dropout_masks_with_tp2_dp2_pp2():
    """Equal across DP replicas, different across TP ranks inside and across stages."""
    results = run_distributed(8, _masks, 2, 2)
    by_coords = {(tp, dp, pp): rest for tp, dp, pp, *rest in results}
    for (tp, dp, pp), (outside, inside, _, _) in by_coords.items():
        torch.testing.assert_close(outside, by_coords[(0, 0, pp)][0])
        torch.testing.assert_close(inside, by_coords[(tp, 0, pp)][1])
        assert not torch.equal(inside, by_coords[(1 - tp, dp, pp)][1])
        assert not torch.equal(outside, by_coords[(tp, dp, 1 - pp)][0])


def _block(x, w, rng):
    """Dropout both outside and inside a forked region, as in a transformer layer."""
    h = F.dropout(x @ w, 0.5)
    with rng.fork():
        h = F.dropout(torch.tanh(h), 0.5)
    return h.sum()


@pytest.mark.parametrize("outer_fork", [False, True])
def test_checkpoint_recompute_replays_tracked_stream(outer_fork):
    """Checkpointed dropout, inside and outside fork, replays its masks; also when the
    checkpoint itself runs inside a fork (a sequence-parallel block under one fork)."""
    pg = ProcessGroups.single()
    x = torch.randn(16, 16)

    def gradient(recompute, context_fn=None):
        seed_everything(3, pg)
        w = torch.randn(16, 16, requires_grad=True)
        for _ in range(2):  # the second step starts from advanced streams
            with pg.rng.fork() if outer_fork else contextlib.nullcontext():
                if recompute:
                    kwargs = {} if context_fn is None else {"context_fn": context_fn}
                    loss = checkpoint(_block, x, w, pg.rng, use_reentrant=False, **kwargs)
                else:
                    loss = _block(x, w, pg.rng)
            torch.rand(3)  # other work between forward and backward moves the streams
            with pg.rng.fork():
                torch.rand(3)
            loss.backward()
        return w.grad, torch.rand(3), pg.rng.get_states()

    grad, after, states = gradient(recompute=False)
    grad_ckpt, after_ckpt, states_ckpt = gradient(True, pg.rng.checkpoint_contexts)
    torch.testing.assert_close(grad_ckpt, grad)
    torch.testing.assert_close(after_ckpt, after)  # recompute leaves both streams as they were
    assert all(torch.equal(states[k][1], states_ckpt[k][1]) for k in states)
    # Without the contexts the recomputed inner dropout draws a new mask.
    grad_plain, _, _ = gradient(True)
    assert not torch.allclose(grad_plain, grad)

