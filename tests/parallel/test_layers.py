"""Tensor- and sequence-parallel layers at TP=2 and TP=4 equal their unsharded versions.

Every rank builds the same full layer and inputs from one seed, loads its shard into the
parallel layer, and checks outputs, input gradients and its slice of the weight
gradients against the full layer's. Gloo on CPU, fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import layout_of, replicated
from paratron.parallel.tensor_parallel import (ColumnParallelLinear,
                                               GatherFromSequenceParallelRegion,
                                               RowParallelLinear, ScatterToSequenceParallelRegion,
                                               ScatterToTensorParallelRegion,
                                               VocabParallelEmbedding,
                                               all_reduce_sequence_parallel_grads,
                                               vocab_parallel_cross_entropy)

S, B, H = 8, 3, 16  # sequence, batch, hidden: sequence divisible by TP 2 and 4


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


def shard(t, tp, rank, dim):
    return t.chunk(tp, dim=dim)[rank]


def _check_column(tp):
    pg = ProcessGroups.build(tp=tp, pp=1)
    r = pg.tp.rank
    torch.manual_seed(0)
    full = nn.Linear(H, 24)
    x, dy = torch.randn(S, B, H), torch.randn(S, B, 24)
    x_ref = x.clone().requires_grad_()
    y_ref = full(x_ref)
    (y_ref * dy).sum().backward()
    for gather_output in (False, True):
        for sp in (False, True):
            layer = ColumnParallelLinear(H, 24, pg=pg, gather_output=gather_output,
                                         sequence_parallel=sp)
            assert layout_of(layer.weight).dim == 0 and layout_of(layer.bias).dim == 0
            with torch.no_grad():
                layer.weight.copy_(shard(full.weight, tp, r, 0))
                layer.bias.copy_(shard(full.bias, tp, r, 0))
            x_in = (shard(x, tp, r, 0) if sp else x).clone().requires_grad_()
            y = layer(x_in)
            close(y, y_ref if gather_output else shard(y_ref, tp, r, -1))
            (y * (dy if gather_output else shard(dy, tp, r, -1))).sum().backward()
            close(x_in.grad, shard(x_ref.grad, tp, r, 0) if sp else x_ref.grad)
            close(layer.weight.grad, shard(full.weight.grad, tp, r, 0))
            close(layer.bias.grad, shard(full.bias.grad, tp, r, 0))
    # A borrowed weight (tied output layer) comes in through forward.
    tied = ColumnParallelLinear(H, 24, pg=pg, bias=False, skip_weight_param_allocation=True)
    close(tied(x, weight=shard(full.weight, tp, r, 0)), shard(y_ref - full.bias, tp, r, -1))


def _check_row(tp):
    pg = ProcessGroups.build(tp=tp, pp=1)
    r = pg.tp.rank
    torch.manual_seed(0)
    full = nn.Linear(24, H)
    x, dy = torch.randn(S, B, 24), torch.randn(S, B, H)
    x_ref = x.clone().requires_grad_()
    y_ref = full(x_ref)
    (y_ref * dy).sum().backward()
    for sp in (False, True):
        for split_here in (False, True):
            layer = RowParallelLinear(24, H, pg=pg, sequence_parallel=sp)
            assert layout_of(layer.weight).dim == 1 and layout_of(layer.bias).dim is None
            assert (layout_of(layer.bias).grad_summed_over == "tp") == sp
            with torch.no_grad():
                layer.weight.copy_(shard(full.weight, tp, r, 1))
                layer.bias.copy_(full.bias)
            if split_here:  # a replicated input, split on entry to the TP region
                x_in = x.clone().requires_grad_()
                y = layer(ScatterToTensorParallelRegion.apply(x_in, pg.tp.group))
            else:
                x_in = shard(x, tp, r, -1).clone().requires_grad_()
                y = layer(x_in)
            close(y, shard(y_ref, tp, r, 0) if sp else y_ref)
            (y * (shard(dy, tp, r, 0) if sp else dy)).sum().backward()
            close(x_in.grad, x_ref.grad if split_here else shard(x_ref.grad, tp, r, -1))
            close(layer.weight.grad, shard(full.weight.grad, tp, r, 1))
            if sp:  # each rank has its sequence shard's part of the bias gradient
                all_reduce_sequence_parallel_grads(layer.parameters(), pg)
            close(layer.bias.grad, full.bias.grad)
    with pytest.raises(ValueError, match=f"sequence length 3 is not divisible by TP {tp}"):
        RowParallelLinear(24, H, pg=pg, sequence_parallel=True)(torch.randn(3, B, 24 // tp))


def _check_embedding(tp):
    pg = ProcessGroups.build(tp=tp, pp=1)
    r = pg.tp.rank
    torch.manual_seed(0)
    vocab = 20
    full = nn.Embedding(vocab, H)
    ids = torch.randint(0, vocab, (B, S))
    ids[0, :4] = torch.tensor([0, vocab - 1, vocab // tp, vocab // tp - 1])  # shard edges
    dy = torch.randn(B, S, H)
    y_ref = full(ids)
    (y_ref * dy).sum().backward()
    for sp in (False, True):
        layer = VocabParallelEmbedding(vocab, H, pg=pg, reduce_scatter_embeddings=sp)
        assert layout_of(layer.weight).dim == 0
        with torch.no_grad():
            layer.weight.copy_(shard(full.weight, tp, r, 0))
        y = layer(ids)
        if sp:  # [s/tp, b, h]
            close(y, shard(y_ref.transpose(0, 1), tp, r, 0))
            (y * shard(dy.transpose(0, 1), tp, r, 0)).sum().backward()
        else:
            close(y, y_ref)
            (y * dy).sum().backward()
        close(layer.weight.grad, shard(full.weight.grad, tp, r, 0))


def _check_cross_entropy(tp):
    pg = ProcessGroups.build(tp=tp, pp=1)
    r = pg.tp.rank
    torch.manual_seed(0)
    vocab = 24
    logits = torch.randn(B, S, vocab) * 3
    target = torch.randint(0, vocab, (B, S))
    target[0, :3] = torch.tensor([0, vocab - 1, vocab // tp])
    target[1, 1] = target[2, 5] = -100
    weight = torch.rand(B, S)
    for ignore_index in (-100, 5):
        target = target.masked_fill(target == -100, ignore_index)
        ref_logits = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1),
                              reduction="none", ignore_index=ignore_index).view(B, S)
        (ref * weight).sum().backward()
        local = shard(logits, tp, r, -1).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, pg, ignore_index=ignore_index)
        assert loss.dtype == torch.float32 and loss.shape == (B, S)
        close(loss, ref)
        assert loss[target == ignore_index].eq(0).all()
        (loss * weight).sum().backward()
        close(local.grad, shard(ref_logits.grad, tp, r, -1))


class _Block(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): the shape of a transformer sub-layer."""

    def __init__(self, pg=None, sp=False):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.fc1 = ColumnParallelLinear(H, 32, pg=pg, sequence_parallel=sp)
        self.fc2 = RowParallelLinear(32, H, pg=pg, sequence_parallel=sp)
        if sp:
            replicated(self.norm.weight, partial_grad=True)
            replicated(self.norm.bias, partial_grad=True)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _check_sequence_parallel_block(tp):
    """Norm and residual on sequence shards between a column and a row layer; the
    replicated norm weights' gradients summed over TP equal the single-process ones."""
    pg = ProcessGroups.build(tp=tp, pp=1)
    r = pg.tp.rank
    torch.manual_seed(0)
    full = _Block()
    for p in full.parameters():
        nn.init.normal_(p, std=0.3)
    x, dy = torch.randn(S, B, H), torch.randn(S, B, H)
    x_ref = x.clone().requires_grad_()
    (full(x_ref) * dy).sum().backward()
    y_ref = full(x)

    block = _Block(pg, sp=True)
    with torch.no_grad():
        for name, p in block.named_parameters():
            dim = layout_of(p).dim
            q = full.get_parameter(name)
            p.copy_(q if dim is None else shard(q, tp, r, dim))
    x_in = x.clone().requires_grad_()
    h = ScatterToSequenceParallelRegion.apply(x_in, pg.tp.group)  # [s/tp, b, h]
    h = block(h)
    close(h, shard(y_ref, tp, r, 0))
    # The loss is computed on every rank from the whole output: the gradient is not
    # partial, so the gather's backward keeps this rank's shard.
    y = GatherFromSequenceParallelRegion.apply(h, pg.tp.group, False)
    close(y, y_ref)
    (y * dy).sum().backward()
    close(x_in.grad, x_ref.grad)
    all_reduce_sequence_parallel_grads(block.parameters(), pg)
    for name, p in block.named_parameters():
        dim = layout_of(p).dim
        q = full.get_parameter(name).grad
        # Norm gradients are sums over tokens of O(1) terms, added in another order.
        close(p.grad, q if dim is None else shard(q, tp, r, dim), atol=1e-5)


CHECKS = {"column": _check_column, "row": _check_row, "embedding": _check_embedding,
          "cross_entropy": _check_cross_entropy,
          "sequence_parallel_block": _check_sequence_parallel_block}


@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_linear(tp):
    run_distributed(tp, _check_column, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_linear(tp):
    run_distributed(tp, _check_row, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding(tp):
    run_distributed(tp, _check_embedding, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(tp):
    run_distributed(tp, _check_cross_entropy, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_block(tp):
    run_distributed(tp, _check_sequence_parallel_block, tp)


def _check_tp_inside_larger_world():
    """TP=2 inside world 4 (DP=2): collectives stay inside each TP group."""
    for check in CHECKS.values():
        check(2)


def test_layers_with_tp2_dp2():
    run_distributed(4, _check_tp_inside_larger_world)


def test_layers_are_plain_at_size_one():
    """Without torch.distributed the parallel layers are nn.Linear/nn.Embedding/F.cross_entropy,
    sequence-parallel flags included."""
    torch.manual_seed(0)
    x = torch.randn(S, B, H)
    for sp in (False, True):
        lin = nn.Linear(H, 12)
        col = ColumnParallelLinear(H, 12, sequence_parallel=sp, gather_output=sp)
        row = RowParallelLinear(H, 12, sequence_parallel=sp)
        for layer in (col, row):
            with torch.no_grad():
                layer.weight.copy_(lin.weight)
                layer.bias.copy_(lin.bias)
            close(layer(x), lin(x))
        emb = nn.Embedding(10, H)
        vemb = VocabParallelEmbedding(10, H, reduce_scatter_embeddings=sp)
        with torch.no_grad():
            vemb.weight.copy_(emb.weight)
        ids = torch.randint(0, 10, (B, S))
        close(vemb(ids), emb(ids).transpose(0, 1) if sp else emb(ids))
    logits, target = torch.randn(B, S, 10), torch.randint(0, 10, (B, S))
    close(vocab_parallel_cross_entropy(logits, target),
          F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
