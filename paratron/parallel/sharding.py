"""How a parameter is laid out over the ranks: one `ParamLayout` record per parameter.

The layers that build a parameter attach its record (`set_layout`, or `replicated` for a
weight every TP rank holds whole); gradient reduction, clipping, initialisation,
checkpoints and conversion read it as fields (`layout_of(p).dim`, `.expert`, ...), and
the functions below cut a whole tensor into this rank's part and put it back together
from it, so no caller re-derives a layout. A parameter without a record is an ordinary
replicated one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is split, fused, reduced and tied.

    `dim` is the dimension split over TP (over ETP for an expert weight), None when every
    rank holds the whole tensor. `fused` names a fused weight whose TP shards are not
    contiguous chunks: "gate_up" (SwiGLU's fc1, rows [gate; up]; each rank holds its
    slice of gate then its slice of up) or "qkv_replicated_kv" (fused QKV with fewer
    key/value groups than TP ranks, `qkv_heads` = (heads, groups, head_dim); rows are
    group-major, [q heads of the group, k, v] per group, and rank r holds its heads' q
    rows and its group's k and v rows, which the TP/groups ranks of that group share;
    with groups >= TP contiguous chunks are whole groups and nothing is fused).
    `grad_summed_over` is the group ("tp") over which a replicated weight's gradient is
    summed after backward, because each rank applied it to its own tokens or heads only.
    `num_experts` marks a stacked expert weight [local experts, ...] split over EP along
    dim 0, whose gradient is summed over expert-DP instead of DP. `tied` marks the two
    halves of an embedding tied over pipeline stages: "embedding" on the first stage,
    "copy" for the last stage's output layer, which is counted and saved once, there.
    """

    dim: int | None = None
    fused: str | None = None
    qkv_heads: tuple[int, int, int] | None = None
    grad_summed_over: str | None = None
    num_experts: int | None = None
    tied: str | None = None

    @property
    def expert(self) -> bool:
        return self.num_experts is not None


_REPLICATED = ParamLayout()


def layout_of(param: torch.Tensor) -> ParamLayout:
    """The layout attached to `param`, or the ordinary replicated one."""
    return getattr(param, "param_layout", _REPLICATED)


def set_layout(param: nn.Parameter, **fields) -> nn.Parameter:
    """Attach `param`'s layout: its current one with `fields` changed."""
    param.param_layout = replace(layout_of(param), **fields)
    return param


def replicated(target: nn.Module | nn.Parameter, *, partial_grad: bool = False):
    """Mark a parameter, or every parameter of a module (a norm, a replicated linear), as
    whole on every TP rank. `partial_grad`: each rank applies it to its own sequence
    shard or heads only, so its gradient is summed over TP after backward."""
    params = [target] if isinstance(target, nn.Parameter) else target.parameters()
    for p in params:
        set_layout(p, dim=None, grad_summed_over="tp" if partial_grad else None)
    return target


def _kv_rows(param, tp_size: int, tp_rank: int) -> tuple[list[int], int, int]:
    """For a qkv_replicated_kv parameter: this rank's row indices into the full tensor,
    its position among the ranks sharing its group, and how many share it."""
    heads, groups, head_dim = layout_of(param).qkv_heads
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
    shape, layout = list(param.shape), layout_of(param)
    if layout.dim is None or tp_size == 1:
        return shape
    if layout.fused == "qkv_replicated_kv":
        heads, groups, head_dim = layout.qkv_heads
        shape[0] = (heads + 2 * groups) * head_dim
        return shape
    shape[layout.dim] *= tp_size
    return shape


def shard_tensor(full: torch.Tensor, param: torch.Tensor, tp_size: int,
                 tp_rank: int) -> torch.Tensor:
    """This rank's part of the unsharded tensor `full` for `param`."""
    dim, fused = layout_of(param).dim, layout_of(param).fused
    if dim is None or tp_size == 1:
        return full
    if fused == "gate_up":
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank],
                          up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    if fused == "qkv_replicated_kv":
        rows, _, _ = _kv_rows(param, tp_size, tp_rank)
        return full[rows]
    return full.chunk(tp_size, dim=dim)[tp_rank]


def gather_tensor(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor from every TP rank's shard, in rank order."""
    dim, fused = layout_of(param).dim, layout_of(param).fused
    tp_size = len(shards)
    if dim is None or tp_size == 1:
        return shards[0]
    if fused == "gate_up":
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    if fused == "qkv_replicated_kv":
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
    layout = layout_of(param)
    if tp_size == 1:
        return None
    if layout.dim is None:
        return None if tp_rank == 0 else torch.ones(param.shape, dtype=torch.bool)
    if layout.fused == "qkv_replicated_kv":
        _, j, _ = _kv_rows(param, tp_size, tp_rank)
        if j == 0:
            return None
        head_dim = layout.qkv_heads[2]
        mask = torch.zeros(param.shape, dtype=torch.bool)
        mask[-2 * head_dim:] = True
        return mask
    return None
