"""Tensor and sequence parallelism: column/row-parallel linears, vocab-parallel embedding
and loss, and the collectives between them.

Collectives are autograd functions named for what they do in forward and backward, each
called where it is used; with one TP rank they are the identity, so these layers are
`nn.Linear`, `nn.Embedding` and `F.cross_entropy`.

Tensor parallelism (Shoeybi et al. 2019): a column-parallel linear holds a slice of the
output features, a row-parallel one a slice of the input features, so column ->
elementwise -> row needs one all-reduce in forward and one in backward. Sequence
parallelism (Korthikanti et al. 2022): outside the TP regions activations [s, b, h] are
split along the sequence, the column layer all-gathers its input and the row layer
reduce-scatters its output (the same bytes as the all-reduce, 1/TP of the activations).
A replicated weight applied to a sequence shard then gets only its shard's gradient; its
`ParamLayout` says `grad_summed_over="tp"` and `all_reduce_sequence_parallel_grads` sums
it once per step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from paratron.parallel.comm import all_gather, group_size, reduce_scatter, wide
from paratron.parallel.data_parallel import accumulated_grad
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import layout_of, replicated, set_layout


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, out of place (the input may be another branch's gradient)."""
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group and keep this rank's 1/size of dim 0."""
    _check_divisible(x, group_size(group), 0)
    return reduce_scatter(x, group)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's 1/size of `dim`."""
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x, size, dim)
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _check_divisible(x: torch.Tensor, size: int, dim: int) -> None:
    if x.shape[dim] % size:
        what = "sequence length" if dim == 0 else f"dimension {dim}"
        raise ValueError(f"{what} {x.shape[dim]} is not divisible by TP {size}")


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
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScatterToTensorParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, -1), None


class GatherFromTensorParallelRegion(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, -1), None


class ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's sequence shard (dim 0). Backward: all-gather dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, 0), None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather the sequence shards along dim 0.

    Backward: reduce-scatter along dim 0 when the consumer is TP-sharded (each rank's
    gradient is a partial sum over its slice of the weights), else keep this rank's shard
    (`grad_is_partial=False`: the consumer is replicated and every rank has the whole
    gradient).
    """

    @staticmethod
    def forward(ctx, x, group, grad_is_partial=True):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return _reduce_scatter(grad, ctx.group), None, None
        return _split(grad, ctx.group, 0), None, None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: sum partial results and keep this rank's sequence shard (dim 0).
    Backward: all-gather along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, 0), None


def all_reduce_sequence_parallel_grads(params: Iterable[nn.Parameter],
                                       pg: ProcessGroups) -> None:
    """Sum over TP the gradients of the parameters whose layout asks for it
    (`grad_summed_over="tp"`).

    Reads `accumulated_grad` (the fp32 buffer of `DataParallel` where there is one); one
    all-reduce per dtype. Call once per step after backward.
    """
    if pg.tp.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if layout_of(p).grad_summed_over == "tp":
            grad = accumulated_grad(p)
            if grad is not None:
                by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=pg.tp.group)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(summed.view_as(g))


def all_reduce_replicated_kv_grads(params: Iterable[nn.Parameter], pg: ProcessGroups) -> None:
    """Sum the gradients of key/value rows that several TP ranks share.

    With fewer key/value groups than TP ranks (layout "qkv_replicated_kv"), each rank
    holds its group's k and v rows and sees only its own query heads' use of them. One
    all-reduce over TP of a [groups, ...] tensor, each rank writing its group's slot,
    gives every rank its group's total. Call once per step after backward.
    """
    if pg.tp.size == 1:
        return
    for p in params:
        layout = layout_of(p)
        if layout.fused != "qkv_replicated_kv":
            continue
        _, groups, head_dim = layout.qkv_heads
        grad = accumulated_grad(p)
        if grad is None:
            continue
        kv = grad[-2 * head_dim:]
        slots = kv.new_zeros((groups, *kv.shape))
        group = pg.tp.rank // (pg.tp.size // groups)
        slots[group] = kv
        dist.all_reduce(slots, group=pg.tp.group)
        kv.copy_(slots[group])


def finish_tensor_parallel_grads(params: Iterable[nn.Parameter], pg: ProcessGroups) -> None:
    """Complete the gradients of weights that TP ranks share: sequence-parallel norms
    (and q/k norms) and replicated key/value rows."""
    params = list(params)
    all_reduce_sequence_parallel_grads(params, pg)
    all_reduce_replicated_kv_grads(params, pg)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows across the TP group.

    gather_output: all-gather y's last dim so every rank has the whole output.
    sequence_parallel: x is this rank's sequence shard [s/TP, b, h]; it is all-gathered
    along the sequence instead of copied.
    skip_weight_param_allocation: the weight is borrowed (tied output layer) and passed
    to forward.
    """

    matmul = staticmethod(F.linear)  # FP8 layers get model/fp8.py's Float8Matmul

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 gather_output: bool = False, pg: ProcessGroups | None = None,
                 init_std: float = 0.02, dtype=None, skip_weight_param_allocation: bool = False,
                 sequence_parallel: bool = False):
        super().__init__()
        pg = pg or ProcessGroups.single()
        if out_features % pg.tp.size:
            raise ValueError(f"output size {out_features} is not divisible by TP {pg.tp.size}")
        self.group, self.gather_output = pg.tp.group, gather_output
        self.sequence_parallel = sequence_parallel
        self.out_per_rank = out_features // pg.tp.size
        self.weight = None if skip_weight_param_allocation else set_layout(
            nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype)), dim=0)
        self.bias = set_layout(nn.Parameter(torch.zeros(self.out_per_rank, dtype=dtype)),
                               dim=0) if bias else None
        self.init_std = init_std

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if weight is None:
            raise ValueError("this layer borrows its weight: pass weight= to forward")
        if self.sequence_parallel:
            x = GatherFromSequenceParallelRegion.apply(x, self.group)
        else:
            x = CopyToTensorParallelRegion.apply(x, self.group)
        y = self.matmul(x, weight, self.bias)
        return GatherFromTensorParallelRegion.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns; partial sums reduced across TP.

    x is TP-split along its last dim (a column-parallel layer's output).
    sequence_parallel: the partial sums are reduce-scattered along the sequence, giving
    this rank's shard [s/TP, b, h]; the bias, added to that shard, gets its gradient
    summed over TP.
    """

    matmul = staticmethod(F.linear)  # FP8 layers get model/fp8.py's Float8Matmul

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 pg: ProcessGroups | None = None, init_std: float = 0.02, dtype=None,
                 sequence_parallel: bool = False):
        super().__init__()
        pg = pg or ProcessGroups.single()
        if in_features % pg.tp.size:
            raise ValueError(f"input size {in_features} is not divisible by TP {pg.tp.size}")
        self.group, self.sequence_parallel = pg.tp.group, sequence_parallel
        self.weight = set_layout(nn.Parameter(
            torch.empty(out_features, in_features // pg.tp.size, dtype=dtype)), dim=1)
        self.bias = None
        if bias:
            self.bias = replicated(nn.Parameter(torch.zeros(out_features, dtype=dtype)),
                                   partial_grad=sequence_parallel)
        self.init_std = init_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.matmul(x, self.weight)
        if self.sequence_parallel:
            y = ReduceScatterToSequenceParallelRegion.apply(partial, self.group)
        else:
            y = ReduceFromTensorParallelRegion.apply(partial, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns.

    Output [b, s, h]; with reduce_scatter_embeddings (sequence parallelism) it is
    [s/TP, b, h] instead: the partial lookups are reduce-scattered along the sequence,
    which costs no more than the all-reduce.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 pg: ProcessGroups | None = None, init_std: float = 0.02, dtype=None,
                 reduce_scatter_embeddings: bool = False):
        super().__init__()
        pg = pg or ProcessGroups.single()
        if num_embeddings % pg.tp.size:
            raise ValueError(f"vocabulary {num_embeddings} is not divisible by TP {pg.tp.size}")
        self.group = pg.tp.group
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.per_rank = num_embeddings // pg.tp.size
        self.vocab_start = pg.tp.rank * self.per_rank
        self.weight = set_layout(nn.Parameter(torch.empty(self.per_rank, embedding_dim,
                                                          dtype=dtype)), dim=0)
        self.init_std = init_std

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= self.per_rank)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return ReduceScatterToSequenceParallelRegion.apply(out.transpose(0, 1), self.group)
        return ReduceFromTensorParallelRegion.apply(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over logits split by vocabulary, never gathering them whole.

    Three all-reduces of one number per token (max logit, target logit, sum of exps).
    Backward overwrites the saved softmax in place, so it runs once per forward.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        logits = wide(logits)
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
    group = pg.tp.group if pg.tp.size > 1 else None
    vocab_start = pg.tp.rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, ignore_index)
