"""Tensor parallelism: column/row-parallel linears, vocab-parallel embedding and loss.

Collectives are autograd functions named for what they do in forward and backward, and
each is called where it is used. With a TP group of one rank every collective is the
identity, so these layers are `nn.Linear`, `nn.Embedding` and `F.cross_entropy`.

Each parameter carries `tensor_parallel_dim` (the dimension it is split along, or None
when replicated) so clipping, checkpoints and conversion read one description.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from paratron.parallel.process_groups import ProcessGroups


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(size, dim=-1)[rank].contiguous()


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (each rank saw only its slice's use)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Forward: all-reduce partial sums. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTensorParallelRegion(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


def _mark(param: nn.Parameter, dim: int | None) -> nn.Parameter:
    param.tensor_parallel_dim = dim
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows across the TP group."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 gather_output: bool = False, pg: ProcessGroups | None = None,
                 init_std: float = 0.02, dtype=None, skip_weight_param_allocation: bool = False):
        super().__init__()
        pg = pg or ProcessGroups.single()
        if out_features % pg.tp_size:
            raise ValueError(f"output size {out_features} is not divisible by TP {pg.tp_size}")
        self.group, self.gather_output = pg.tp_group, gather_output
        self.out_per_rank = out_features // pg.tp_size
        # A layer that borrows its weight (tied output layer) gets it in forward.
        self.weight = None if skip_weight_param_allocation else _mark(
            nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype)), 0)
        self.bias = _mark(nn.Parameter(torch.zeros(self.out_per_rank, dtype=dtype)), 0) \
            if bias else None
        self.init_std = init_std

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        x = CopyToTensorParallelRegion.apply(x, self.group)
        y = F.linear(x, self.weight if weight is None else weight, self.bias)
        return GatherFromTensorParallelRegion.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns; partial sums reduced across TP."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 pg: ProcessGroups | None = None, init_std: float = 0.02, dtype=None):
        super().__init__()
        pg = pg or ProcessGroups.single()
        if in_features % pg.tp_size:
            raise ValueError(f"input size {in_features} is not divisible by TP {pg.tp_size}")
        self.group = pg.tp_group
        self.weight = _mark(nn.Parameter(torch.empty(out_features, in_features // pg.tp_size,
                                                     dtype=dtype)), 1)
        self.bias = _mark(nn.Parameter(torch.zeros(out_features, dtype=dtype)), None) \
            if bias else None
        self.init_std = init_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ReduceFromTensorParallelRegion.apply(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 pg: ProcessGroups | None = None, init_std: float = 0.02, dtype=None):
        super().__init__()
        pg = pg or ProcessGroups.single()
        if num_embeddings % pg.tp_size:
            raise ValueError(f"vocabulary {num_embeddings} is not divisible by TP {pg.tp_size}")
        self.group = pg.tp_group
        self.per_rank = num_embeddings // pg.tp_size
        self.vocab_start = pg.tp_rank * self.per_rank
        self.weight = _mark(nn.Parameter(torch.empty(self.per_rank, embedding_dim,
                                                     dtype=dtype)), 0)
        self.init_std = init_std

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return ReduceFromTensorParallelRegion.apply(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over logits split by vocabulary, never gathering them whole."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = target - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1]) | (target == ignore_index)
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside, ignored = ctx.saved_tensors
        grad = softmax
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_((grad_loss * (~ignored).to(grad.dtype)).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 pg: ProcessGroups | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (fp32, reduction none) for logits split by vocabulary over TP."""
    pg = pg or ProcessGroups.single()
    group = pg.tp_group if pg.tp_size > 1 else None
    vocab_start = pg.tp_rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, ignore_index)
