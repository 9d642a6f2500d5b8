"""How a parameter is split over tensor-parallel ranks, read from the parameter itself.

Layers set two attributes on each parameter:

* `tensor_parallel_dim`: the dimension split across TP ranks, or None when every rank
  holds the whole tensor;
* `tensor_parallel_layout` (optional): "gate_up" for SwiGLU's fused fc1, whose rows
  are [gate; up], so each rank holds its slice of gate followed by its slice of up.

Fused QKV needs no special layout: its rows are grouped by query group, so contiguous
chunks are whole groups. Tests, checkpoints and conversion all shard and gather through
these two functions instead of re-deriving the layout.
"""

from __future__ import annotations

import torch


def shard_tensor(full: torch.Tensor, param: torch.Tensor, tp_size: int,
                 tp_rank: int) -> torch.Tensor:
    """This rank's part of the unsharded tensor `full` for `param`."""
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None or tp_size == 1:
        return full
    if getattr(param, "tensor_parallel_layout", None) == "gate_up":
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank],
                          up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def gather_tensor(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor from every TP rank's shard, in rank order."""
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None or len(shards) == 1:
        return shards[0]
    if getattr(param, "tensor_parallel_layout", None) == "gate_up":
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)
