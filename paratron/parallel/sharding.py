"""How a parameter is split over tensor-parallel ranks, read from the parameter itself.

Layers set attributes on each parameter:

* `tensor_parallel_dim`: the dimension split across TP ranks, or None when every rank
  holds the whole tensor;
* `tensor_parallel_layout` (optional):
  - "gate_up": SwiGLU's fused fc1, rows [gate; up]; each rank holds its slice of gate
    followed by its slice of up;
  - "qkv_replicated_kv": fused QKV with fewer key/value groups than TP ranks
    (`qkv_heads` = (heads, groups, head_dim)). Rows are group-major, [q heads of the
    group, k, v] per group; rank r holds its heads' q rows and the k and v rows of its
    group, which the TP/groups ranks of that group share.

Fused QKV with groups >= TP needs no layout: contiguous chunks are whole groups. Tests,
initialisation, gradient clipping, checkpoints and conversion all go through these
functions instead of re-deriving the layout.
"""

from __future__ import annotations

import torch


def _kv_rows(param, tp_size: int, tp_rank: int) -> tuple[list[int], int, int]:
    """For a qkv_replicated_kv parameter: this rank's row indices into the full tensor,
    its position among the ranks sharing its group, and how many share it."""
    heads, groups, head_dim = param.qkv_heads
    share = tp_size // groups
    group, j = tp_rank // share, tp_rank % share
    per_group = heads // groups
    block = (per_group + 2) * head_dim
    local_heads = heads // tp_size
    q_start = group * block + j * local_heads * head_dim
    rows = list(range(q_start, q_start + local_heads * head_dim))
    kv_start = group * block + per_group * head_dim
    rows += list(range(kv_start, kv_start + 2 * head_dim))
    return rows, j, share


def full_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    """The unsharded shape of `param`."""
    shape = list(param.shape)
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None or tp_size == 1:
        return shape
    if getattr(param, "tensor_parallel_layout", None) == "qkv_replicated_kv":
        heads, groups, head_dim = param.qkv_heads
        shape[0] = (heads + 2 * groups) * head_dim
        return shape
    shape[dim] *= tp_size
    return shape


def shard_tensor(full: torch.Tensor, param: torch.Tensor, tp_size: int,
                 tp_rank: int) -> torch.Tensor:
    """This rank's part of the unsharded tensor `full` for `param`."""
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None or tp_size == 1:
        return full
    layout = getattr(param, "tensor_parallel_layout", None)
    if layout == "gate_up":
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank],
                          up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    if layout == "qkv_replicated_kv":
        rows, _, _ = _kv_rows(param, tp_size, tp_rank)
        return full[rows]
    return full.chunk(tp_size, dim=dim)[tp_rank]


def gather_tensor(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor from every TP rank's shard, in rank order."""
    dim = getattr(param, "tensor_parallel_dim", None)
    tp_size = len(shards)
    if dim is None or tp_size == 1:
        return shards[0]
    layout = getattr(param, "tensor_parallel_layout", None)
    if layout == "gate_up":
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    if layout == "qkv_replicated_kv":
        full = shards[0].new_empty(full_shape(param, tp_size))
        for rank, shard in enumerate(shards):
            rows, _, _ = _kv_rows(param, tp_size, rank)
            full[rows] = shard
        return full
    return torch.cat(shards, dim=dim)


def duplicate_mask(param: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor | None:
    """Which elements of this rank's `param` another TP rank also holds and counts:
    True where this copy must be left out of a global sum (the gradient norm). None when
    every element is this rank's own."""
    dim = getattr(param, "tensor_parallel_dim", None)
    if tp_size == 1:
        return None
    if dim is None:
        return None if tp_rank == 0 else torch.ones(param.shape, dtype=torch.bool)
    if getattr(param, "tensor_parallel_layout", None) == "qkv_replicated_kv":
        _, j, _ = _kv_rows(param, tp_size, tp_rank)
        if j == 0:
            return None
        head_dim = param.qkv_heads[2]
        mask = torch.zeros(param.shape, dtype=torch.bool)
        mask[-2 * head_dim:] = True
        return mask
    return None
