"""Context parallelism at CP=2 and CP=4 equals causal attention on one process.

The load-balanced layout and positions are checked against hand-written chunk lists.
Attention: every rank builds the full q, k, v and output gradient from one seed, keeps
its tokens, runs `context_parallel_attention` (p2p and all_gather; MHA, GQA, MQA, a
value head size different from the query/key one) and compares its output and its
q/k/v gradients with its rows of `scaled_dot_product_attention` over the whole
sequence, also under activation recompute. The p2p step kernel is checked against plain
autograd over the same math, including the gradient that flows into its log-sum-exp.
Gloo on CPU, fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.context_parallel import (BlockAttention, context_parallel_attention,
                                                context_parallel_chunks,
                                                context_parallel_positions,
                                                split_for_context_parallel)
from paratron.parallel.process_groups import ProcessGroups

# ---------------------------------------------------------------------- layout
# Chunks of 2 x CP in each rank's order, and the positions they hold, written by hand.
CP2_SEQ8 = {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]}
CP4_SEQ16 = {0: [0, 1, 14, 15], 1: [2, 3, 12, 13], 2: [4, 5, 10, 11], 3: [6, 7, 8, 9]}


def test_chunks_by_hand():
    assert [context_parallel_chunks(2, r) for r in range(2)] == [(0, 3), (1, 2)]
    assert [context_parallel_chunks(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5),
                                                                 (3, 4)]


@pytest.mark.parametrize("cp, seq, expected", [(2, 8, CP2_SEQ8), (4, 16, CP4_SEQ16)])
def test_split_and_positions_by_hand(cp, seq, expected):
    tokens = torch.arange(100, 100 + 3 * seq).view(3, seq)  # [b, s]
    hidden = torch.randn(seq, 3, 5)  # [s, b, h]
    for rank, positions in expected.items():
        assert context_parallel_positions(seq, cp, rank).tolist() == positions
        assert split_for_context_parallel(tokens, cp, rank, seq_dim=1).tolist() == \
            tokens[:, positions].tolist()
        assert torch.equal(split_for_context_parallel(hidden, cp, rank, seq_dim=0),
                           hidden[positions])
    # Every position is held by exactly one rank.
    held = sorted(p for r in range(cp) for p in context_parallel_positions(seq, cp, r).tolist())
    assert held == list(range(seq))


def test_cp1_is_the_identity():
    x = torch.randn(6, 2)
    assert split_for_context_parallel(x, 1, 0, seq_dim=0) is x
    assert context_parallel_positions(7, 1, 0).tolist() == list(range(7))


@pytest.mark.parametrize("cp, seq", [(2, 6), (4, 12), (2, 5)])
def test_refuses_sequence_not_divisible_by_twice_cp(cp, seq):
    for call in (lambda: split_for_context_parallel(torch.zeros(2, seq), cp, 0, seq_dim=1),
                 lambda: context_parallel_positions(seq, cp, 0)):
        with pytest.raises(ValueError, match=f"sequence length {seq} is not divisible by "
                                             f"2 x context-parallel size {cp}") as info:
            call()
        assert "\n" not in str(info.value)


def test_refuses_bad_arguments():
    q, k, v = torch.zeros(4, 1, 4, 8), torch.zeros(4, 1, 3, 8), torch.zeros(4, 1, 3, 8)
    with pytest.raises(ValueError, match="not divisible by 3 key/value heads"):
        context_parallel_attention(q, k, v, ProcessGroups.single())
    with pytest.raises(ValueError, match="--cp-comm-type must be one of p2p, all_gather"):
        context_parallel_attention(q, q, q, ProcessGroups.single(), "ring")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        context_parallel_chunks(2, 2)


# ---------------------------------------------------------------------- step kernel
def _block_reference(q, k, v, causal, scale, keep=None):
    """Scores -> log-sum-exp -> probabilities -> output with plain autograd ops."""
    n, g = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(n // g, 1), v.repeat_interleave(n // g, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        s_q, s_k = scores.shape[-2:]
        allowed = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    if keep is not None:
        p = p * keep
    return p @ v, lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, groups, d_v", [(4, 4, 6), (4, 2, 5), (2, 1, 6)])
def test_block_kernel_matches_autograd_reference(causal, heads, groups, d_v):
    """Outputs, and gradients through both out and lse (the merge differentiates both),
    equal plain autograd over the same math."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, groups, 5, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, groups, 5, d_v, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        out, lse = BlockAttention.apply(q, k, v, causal, 0.4, 0.0)
        return out.double(), lse.double()

    # The kernel computes in fp32, the reference in float64.
    out, lse = fn(q, k, v)
    ref_out, ref_lse = _block_reference(q, k, v, causal, 0.4)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), (q, k, v))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_block_kernel_dropout_replays_its_mask():
    """Backward redraws forward's dropout mask from the saved generator state, and the
    default generator moves on as it would after one draw."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3, requires_grad=True) for _ in range(3))
    torch.manual_seed(7)
    out, lse = BlockAttention.apply(q, k, v, True, 0.5, 0.25)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    keep = (torch.rand(1, 2, 4, 4) >= 0.25) / 0.75
    assert torch.equal(torch.get_rng_state(), after)
    ref_out, ref_lse = _block_reference(q, k, v, True, 0.5, keep)
    torch.testing.assert_close(out, ref_out)
    d_out = torch.randn_like(out)
    torch.manual_seed(123)  # backward must not depend on the generator's state now
    grads = torch.autograd.grad((out * d_out).sum() + lse.sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * d_out).sum() + ref_lse.sum(), (q, k, v))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- attention
# (query heads, key/value heads, q/k head size, v head size)
CASES = [(4, 4, 8, 8), (4, 2, 8, 8), (4, 1, 8, 8), (4, 2, 8, 12)]
B = 2


def _full_reference(seq, heads, groups, d, d_v, seed):
    torch.manual_seed(seed)
    q = torch.randn(seq, B, heads, d)
    k = torch.randn(seq, B, groups, d)
    v = torch.randn(seq, B, groups, d_v)
    d_out = torch.randn(seq, B, heads * d_v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in leaves), is_causal=True, scale=0.3,
        enable_gqa=groups != heads).permute(2, 0, 1, 3).reshape(seq, B, -1)
    (out * d_out).sum().backward()
    return (q, k, v, d_out), out.detach(), [t.grad for t in leaves]


def _check_attention(cp, seq):
    pg = ProcessGroups.build(tp=1, pp=1, cp=cp)
    assert pg.cp.size == cp
    rank = pg.cp.rank
    diffs = {}
    for case_id, (heads, groups, d, d_v) in enumerate(CASES):
        inputs, ref_out, ref_grads = _full_reference(seq, heads, groups, d, d_v, case_id)
        mine = lambda t: split_for_context_parallel(t, cp, rank, seq_dim=0)  # noqa: E731
        runs = [("p2p", False), ("all_gather", False)]
        if case_id == 1:  # recompute replays the exchanges in backward
            runs += [("p2p", True), ("all_gather", True)]
        for comm_type, recompute in runs:
            q, k, v = (mine(t).clone().requires_grad_() for t in inputs[:3])
            if recompute:
                out = checkpoint(context_parallel_attention, q, k, v, pg, comm_type,
                                 scale=0.3, use_reentrant=False)
            else:
                out = context_parallel_attention(q, k, v, pg, comm_type, scale=0.3)
            assert out.shape == (seq // cp, B, heads * d_v)
            (out * mine(inputs[3])).sum().backward()
            got = [out, q.grad, k.grad, v.grad]
            want = [mine(ref_out)] + [mine(g) for g in ref_grads]
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{comm_type} {name} case "
                                                         f"{case_id}: {m}")
                key = (comm_type, name)
                diffs[key] = max(diffs.get(key, 0.0), (a - b).abs().max().item())
    return diffs


@pytest.mark.parametrize("cp, seq", [(2, 16), (4, 24)])
def test_context_parallel_attention_equals_full_causal(cp, seq):
    per_rank = run_distributed(cp, _check_attention, cp, seq, timeout=120)
    worst = {key: max(d[key] for d in per_rank) for key in per_rank[0]}
    print(f"CP{cp} max abs diffs:", {f"{c}/{n}": f"{x:.1e}" for (c, n), x in worst.items()})


def test_cp1_is_causal_attention():
    inputs, ref_out, _ = _full_reference(8, 4, 2, 8, 6, 0)
    out = context_parallel_attention(*inputs[:3], ProcessGroups.single(), scale=0.3)
    torch.testing.assert_close(out, ref_out)
