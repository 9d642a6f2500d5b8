"""Expert parallelism: routed experts split over ranks, tokens sent to the experts they
chose and the results sent back.

Expert layers read a stage's ranks as ETP x EP x EDP (see `process_groups`): EP equal
blocks of `num_experts / EP` consecutive experts, each expert's weights split over ETP
like a column/row-parallel MLP, copies on the EDP ranks (an expert weight's
`ParamLayout` has `num_experts`: its gradient is summed over EDP, not DP). Before
dispatch every rank holds tokens no other rank of its stage holds, with the router's
boolean map and weights [tokens, experts].

"alltoall" (Megatron-LM's MoEAlltoAllTokenDispatcher): permute to one row per (token,
expert) sorted by expert, all-to-all over EP with variable splits, all-gather over ETP,
run the local experts, and undo it all (reduce-scatter over ETP, all-to-all back, weight
and add into each token). "allgather" (MoEAllGatherTokenDispatcher): all-gather tokens,
maps and weights over ETP then EP, run the local experts, reduce-scatter the weighted
sums back. Every collective is an autograd function whose backward is its transpose,
all built on `all_to_all_single`, which every backend supports with uneven splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from paratron.parallel.comm import wide
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import gather_tensor, layout_of, shard_tensor
from paratron.parallel.tensor_parallel import (GatherFromSequenceParallelRegion,
                                               ReduceScatterToSequenceParallelRegion)


# ----------------------------------------------------------------------- collectives
def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group) -> torch.Tensor:
    """Rows x[sum(input_splits[:j]) : ...+input_splits[j]] go to rank j; the result
    holds output_splits[i] rows from each rank i, in rank order."""
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """Forward: all-to-all with variable split sizes. Backward: the same with the split
    sizes swapped (each rank's gradient rows go back where the rows came from)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _all_gather_v(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (rank i has sizes[i] rows), in rank order."""
    n = len(sizes)
    return _all_to_all(x.repeat(n, *([1] * (x.dim() - 1))), sizes, [x.shape[0]] * n, group)


def _reduce_scatter_v(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """x holds sizes[i] rows for each rank i; rank r gets the sum over ranks of their
    rows for r."""
    n, rank = len(sizes), dist.get_rank(group)
    parts = _all_to_all(x, [sizes[rank]] * n, sizes, group)
    return parts.view(n, sizes[rank], *x.shape[1:]).sum(0)


class AllGatherV(torch.autograd.Function):
    """Forward: all-gather rows of unequal counts. Backward: reduce-scatter them."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_v(grad, ctx.sizes, ctx.group), None, None


class ReduceScatterV(torch.autograd.Function):
    """Forward: sum partial rows and keep this rank's (unequal counts). Backward:
    all-gather."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _reduce_scatter_v(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_v(grad, ctx.sizes, ctx.group), None, None


def _gather_counts(counts: torch.Tensor, group, size: int) -> torch.Tensor:
    """Every rank's `counts` (same shape), stacked in rank order: [size, *counts.shape]."""
    if size == 1:
        return counts.unsqueeze(0)
    counts = counts.contiguous()
    out = counts.new_empty((size * counts.shape[0], *counts.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, counts, group=group)
    return out.view(size, *counts.shape)


# ---------------------------------------------------------------------- permutation
@dataclass
class Permutation:
    """Where the rows of routed (token, expert) pairs come from and go back to.

    The rows are sorted by expert, then by token, as `routing_map.t().nonzero()` would
    give them, but their number is fixed by shapes alone (`max_rows`), so building them
    reads nothing on the host: when fewer pairs are routed (capacity drops), the last
    rows are dummies. Each token owns `slots` places in a [tokens, slots] layout (its
    pairs in expert order) and every routed row one place there (`dest`), so gathering
    the rows and scattering them back touch distinct places, and the combine sums each
    token's slots in a fixed order: deterministic on every device. Dummy rows share one
    spare place past the layout, which holds zeros and whose results are dropped.
    """

    dest: torch.Tensor          # [max_rows] place of each row in the layout
    row_probs: torch.Tensor     # [max_rows] fp32 routing weight (0 for dummy rows)
    counts: torch.Tensor        # [experts] routed rows of each expert
    num_tokens: int
    slots: int

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """Each token's sum of its rows (the first rows.shape[0] of the permutation)
        times their routing weights: the weights multiply in fp32, the sum over the
        token's slots in fixed order is cast once to the rows' dtype."""
        places = self.num_tokens * self.slots
        total = places + 1
        layout = rows.new_zeros((total, rows.shape[-1])).index_copy(
            0, self.dest[:rows.shape[0]], rows)
        weights = self.row_probs.new_zeros(total).index_copy(0, self.dest, self.row_probs)
        weighted = (wide(layout[:places].view(self.num_tokens, self.slots, -1))
                    * weights[:places].view(self.num_tokens, self.slots, 1))
        return weighted.sum(1).to(rows.dtype)


def permute(x: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, max_rows: int,
            slots: int) -> tuple[torch.Tensor, Permutation]:
    """Rows [max_rows, h] of the routed pairs sorted by expert (see `Permutation`), with
    no host sync: a stable sort of the map puts the routed pairs first in (expert,
    token) order. `max_rows` bounds the routed pairs and `slots` the pairs of one
    token."""
    tokens, hidden = x.shape
    flat = routing_map.t().reshape(-1)
    order = torch.argsort((~flat).to(torch.uint8), stable=True)[:max_rows]
    routed = flat[order]
    expert, token = order // tokens, order % tokens
    slot = (routing_map.cumsum(1) - 1)[token, expert]
    dest = torch.where(routed, token * slots + slot, tokens * slots)
    row_probs = torch.where(routed, wide(probs)[token, expert], 0.0)
    layout = torch.cat([x.unsqueeze(1).expand(tokens, slots, hidden).reshape(-1, hidden),
                        x.new_zeros((1, hidden))])
    rows = layout.index_select(0, dest)
    return rows, Permutation(dest, row_probs, routing_map.sum(0), tokens, slots)


def chunk_transpose_index(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Rows come as chunks in (source, expert) order with `counts[source, expert]` rows
    each, `total` in all (known on the host); the index that reorders them to (expert,
    source) order."""
    sources, experts = counts.shape
    flat = counts.reshape(-1)
    starts = flat.cumsum(0) - flat
    order = torch.arange(sources * experts, device=counts.device).view(sources, experts)
    order = order.t().reshape(-1)
    sizes, starts = flat[order], starts[order]
    chunk = torch.repeat_interleave(torch.arange(order.numel(), device=counts.device), sizes,
                                    output_size=total)
    within = torch.arange(total, device=counts.device) - (sizes.cumsum(0) - sizes)[chunk]
    return starts[chunk] + within


# ------------------------------------------------------------------------ dispatchers
@dataclass
class _AllToAllPlan:
    permutation: Permutation
    input_splits: list[int]        # rows sent to each EP rank
    output_splits: list[int]       # rows received from each EP rank
    etp_sizes: list[int] | None    # rows each ETP rank holds after the EP exchange
    sort_index: torch.Tensor | None  # groups received rows by local expert


class AllToAllDispatcher:
    """Sends each routed row to the EP rank of its expert with all-to-all (see the
    module docstring). Stateless: `dispatch` returns the plan that `combine` follows.
    At EP = ETP = 1 it reads nothing on the host; above, the split sizes of every
    exchange come to the host in one read, which the backward reuses."""

    def __init__(self, num_experts: int, pg: ProcessGroups):
        self.pg, self.num_experts = pg, num_experts
        self.num_local_experts = num_experts // pg.ep.size
        self.first_expert = pg.ep.rank * self.num_local_experts

    def dispatch(self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 max_rows: int, slots: int):
        """Returns (rows of the local experts grouped by expert, possibly followed by
        rows of no expert; rows per local expert, on the device; plan)."""
        pg, local = self.pg, self.num_local_experts
        rows, permutation = permute(x, routing_map, probs, max_rows, slots)
        counts = permutation.counts
        plan = _AllToAllPlan(permutation, [], [], None, None)
        if pg.ep.size == 1 and pg.etp.size == 1:
            return rows, counts, plan
        # received[i, e]: rows that EP rank i sends to this rank's local expert e.
        everyone = _gather_counts(counts, pg.ep.group, pg.ep.size)
        received = everyone[:, self.first_expert:self.first_expert + local]
        sizes = [counts.view(pg.ep.size, local).sum(1), received.sum(1)]
        if pg.etp.size > 1:
            received = _gather_counts(received, pg.etp.group, pg.etp.size)
            sizes.append(received.sum((1, 2)))
            received = received.reshape(-1, local)
        host = torch.cat(sizes).tolist()  # the layer's one host read
        plan.input_splits = host[:pg.ep.size]
        plan.output_splits = host[pg.ep.size:2 * pg.ep.size]
        rows = rows[:sum(plan.input_splits)]
        if pg.ep.size > 1:
            rows = AllToAll.apply(rows, plan.output_splits, plan.input_splits, pg.ep.group)
        if pg.etp.size > 1:
            plan.etp_sizes = host[2 * pg.ep.size:]
            rows = AllGatherV.apply(rows, plan.etp_sizes, pg.etp.group)
        if local > 1:
            plan.sort_index = chunk_transpose_index(received, rows.shape[0])
            rows = rows.index_select(0, plan.sort_index)
        return rows, received.sum(0), plan

    def combine(self, rows: torch.Tensor, plan: _AllToAllPlan) -> torch.Tensor:
        """The experts' output rows back to their tokens, weighted: [tokens, h]."""
        pg = self.pg
        if plan.sort_index is not None:
            inverse = torch.empty_like(plan.sort_index)
            inverse[plan.sort_index] = torch.arange(plan.sort_index.numel(),
                                                    device=plan.sort_index.device)
            rows = rows.index_select(0, inverse)
        if plan.etp_sizes is not None:
            rows = ReduceScatterV.apply(rows, plan.etp_sizes, pg.etp.group)
        if pg.ep.size > 1:
            rows = AllToAll.apply(rows, plan.input_splits, plan.output_splits, pg.ep.group)
        return plan.permutation.combine(rows)


class AllGatherDispatcher:
    """All-gathers tokens, maps and weights over ETP then EP; each rank runs its local
    experts on the rows routed to them, and the weighted partial sums are
    reduce-scattered back (EP, then ETP). Above one rank, the number of rows routed to
    the local experts comes to the host in one read."""

    def __init__(self, num_experts: int, pg: ProcessGroups):
        self.pg, self.num_experts = pg, num_experts
        self.num_local_experts = num_experts // pg.ep.size
        self.first_expert = pg.ep.rank * self.num_local_experts

    def _groups(self):
        pg = self.pg
        return [(g, s) for g, s in ((pg.etp.group, pg.etp.size), (pg.ep.group, pg.ep.size))
                if s > 1]

    def dispatch(self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 max_rows: int, slots: int):
        gathered = 1
        for group, size in self._groups():
            # Backward of the gathers: each rank's gradients for the gathered tokens are
            # partial (its own experts), so they are reduce-scattered.
            x = GatherFromSequenceParallelRegion.apply(x, group, True)
            probs = GatherFromSequenceParallelRegion.apply(probs, group, True)
            routing_map = _gather_counts(routing_map.to(torch.uint8), group,
                                         size).flatten(0, 1).bool()
            gathered *= size
        window = slice(self.first_expert, self.first_expert + self.num_local_experts)
        routing_map, probs = routing_map[:, window], probs[:, window]
        slots = min(slots, self.num_local_experts)
        if gathered > 1:
            max_rows = routing_map.sum().tolist()  # the layer's one host read
        rows, permutation = permute(x, routing_map, probs, max_rows, slots)
        return rows, permutation.counts, permutation

    def combine(self, rows: torch.Tensor, plan: Permutation) -> torch.Tensor:
        out = plan.combine(rows)
        for group, _ in reversed(self._groups()):
            out = ReduceScatterToSequenceParallelRegion.apply(out, group)
        return out


def build_dispatcher(kind: str, num_experts: int, pg: ProcessGroups):
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, pg)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, pg)
    raise ValueError(f"--moe-token-dispatcher-type {kind!r}: use alltoall or allgather")


# ------------------------------------------------------------------ weight layout
def expert_shard(full: torch.Tensor, param: torch.Tensor, pg: ProcessGroups) -> torch.Tensor:
    """This rank's part of the unsharded expert tensor `full` [num_experts, ...]."""
    local = layout_of(param).num_experts // pg.ep.size
    block = full[pg.ep.rank * local:(pg.ep.rank + 1) * local]
    return shard_tensor(block, param, pg.etp.size, pg.etp.rank)


def expert_gather(shards: list[list[torch.Tensor]], param: torch.Tensor) -> torch.Tensor:
    """The unsharded expert tensor from shards[ep_rank][etp_rank]."""
    return torch.cat([gather_tensor(etp_shards, param) for etp_shards in shards], dim=0)
