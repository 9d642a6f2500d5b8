"""The sharding description: shard then gather gives back the tensor, for every layout."""

import pytest
import torch

from paratron.parallel.sharding import (duplicate_mask, full_shape, gather_tensor, set_layout,
                                       shard_tensor)


def _param(shape, dim, layout=None, qkv_heads=None):
    return set_layout(torch.nn.Parameter(torch.empty(shape)), dim=dim, fused=layout,
                      qkv_heads=qkv_heads)


@pytest.mark.parametrize("tp", [2, 4])
def test_plain_and_gate_up_round_trip(tp):
    full = torch.randn(16, 6)
    for layout in (None, "gate_up"):
        p = _param((16 // tp, 6), 0, layout)
        shards = [shard_tensor(full, p, tp, r) for r in range(tp)]
        assert all(s.shape == p.shape for s in shards)
        torch.testing.assert_close(gather_tensor(shards, p), full)
    gate_up = _param((16 // tp, 6), 0, "gate_up")
    first = shard_tensor(full, gate_up, tp, 0)
    # rank 0 holds the first slice of gate followed by the first slice of up
    torch.testing.assert_close(first[: 8 // tp], full[: 8 // tp])
    torch.testing.assert_close(first[8 // tp:], full[8: 8 + 8 // tp])


def test_replicated_kv_rows_by_hand():
    # 4 heads, 2 groups, head_dim 1: full rows are [q0 q1 k0 v0 | q2 q3 k1 v1]
    full = torch.arange(8.0).unsqueeze(1)
    p = _param((3, 1), 0, "qkv_replicated_kv", (4, 2, 1))
    assert full_shape(p, 4) == [8, 1]
    shards = [shard_tensor(full, p, 4, r).flatten().tolist() for r in range(4)]
    assert shards == [[0, 2, 3], [1, 2, 3], [4, 6, 7], [5, 6, 7]]
    torch.testing.assert_close(gather_tensor([torch.tensor(s).unsqueeze(1) for s in shards], p),
                               full)
    # ranks 1 and 3 repeat their group's k and v, which ranks 0 and 2 count
    assert duplicate_mask(p, 4, 0) is None
    assert duplicate_mask(p, 4, 1).flatten().tolist() == [False, True, True]


def test_replicated_weights_count_on_rank_zero_only():
    p = _param((4,), None)
    assert duplicate_mask(p, 2, 0) is None and duplicate_mask(p, 2, 1).all()
