"""The collectives every parallel dimension shares: sizes of a possibly-absent group,
all-gather and reduce-scatter along dimension 0.

torch.distributed renamed `all_gather_into_tensor` / `reduce_scatter_tensor` to
`all_gather_single` / `reduce_scatter_single`; this is the one place that picks whichever
the installed version has. A group of None stands for a single rank (the process-group
object has no communicator at size 1), so every function here is then the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of `dtype` values are taken in: fp32 for 16-bit and fp32 values,
    fp64 for fp64 ones (the --fp64 check mode, which must not round anywhere to fp32)."""
    return torch.promote_types(dtype, torch.float32)


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in its `wide_dtype`."""
    return t.to(wide_dtype(t.dtype))


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Write every rank's `x`, concatenated along dim 0 in group-rank order, into `out`."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Write this rank's 1/size of dim 0 of the sum over ranks of `x` into `out`."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, x, group=group, async_op=async_op)


def all_gather(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in group-rank order."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    all_gather_into(out, x, group)
    return out if dim == 0 else torch.cat(out.chunk(size), dim=dim)


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over ranks of `x`, of which this rank keeps its 1/size of dim 0."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    reduce_scatter_into(out, x, group)
    return out
