"""Data parallelism: fp32 gradient buffers reduced in buckets across data-parallel ranks.

Every parameter's gradient is added, as soon as autograd has it, into `param.main_grad`,
a view of one contiguous fp32 buffer per dtype (fp64 for fp64 weights: --fp64 sums every
gradient in fp64 before it is rounded once), and `param.grad` is released; at DP 1 too,
so the optimizer always reads one place and accumulating micro-batches in fp32 is free.
The buffer is cut into buckets (`--ddp-bucket-size`, parameters in reverse order, about
the order backward produces them), each reduced across DP on the last micro-batch (all-
reduce, or reduce-scatter with the distributed optimizer, rank r owning every bucket's
r-th slice), during backward with `--overlap-grad-reduce`. Gradients are summed: the loss
is already normalised by the global batch's token count. With the distributed optimizer
the weights live in a buffer of the same layout, so updated slices are all-gathered in
place (overlapped with the next forward under `--overlap-param-gather`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from paratron.parallel.comm import all_gather_into, reduce_scatter_into, wide_dtype
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import layout_of

DEFAULT_BUCKET_SIZE = 40_000_000


def accumulated_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient backward accumulated for `param`: its fp32 `main_grad` view when a
    `DataParallel` wrapper owns it, else autograd's `param.grad` (a bare module)."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


class Bucket:
    """A contiguous range of a buffer holding whole parameters, padded to a multiple
    of the data-parallel size so it splits into equal shards."""

    def __init__(self, params: list[nn.Parameter], offset: int, numel: int, dp_size: int,
                 dp_rank: int):
        self.params, self.offset, self.numel = params, offset, numel
        self.shard_size = numel // dp_size
        self.shard_start = offset + dp_rank * self.shard_size  # in buffer coordinates
        self.pending: set[int] = set()
        self.grad_handle = None
        self.grad_shard_out: torch.Tensor | None = None
        self.param_handle = None
        # A tied embedding split over pipeline stages is first summed over the embedding
        # group (after backward), so its bucket waits for finish_grad_sync.
        self.deferred = any(layout_of(p).tied for p in params)

    def reset(self) -> None:
        self.pending = {id(p) for p in self.params}
        self.grad_handle, self.grad_shard_out = None, None


class GradBuffer:
    """fp32 gradients (and, sharded, the weights) of the parameters of one dtype that
    are reduced over one group: DP x CP for dense weights, expert-DP for experts."""

    def __init__(self, params: list[nn.Parameter], bucket_size: int, group, dp_size: int,
                 dp_rank: int, device, keep_params_contiguous: bool):
        self.group, self.dp_size = group, dp_size
        self.buckets: list[Bucket] = []
        layout: list[tuple[nn.Parameter, int]] = []
        offset, bucket_start, bucket_params = 0, 0, []
        ordered = list(reversed(params))
        for i, p in enumerate(ordered):
            layout.append((p, offset))
            offset += p.numel()
            bucket_params.append(p)
            if offset - bucket_start >= bucket_size or i == len(ordered) - 1:
                padded = -(-(offset - bucket_start) // dp_size) * dp_size
                self.buckets.append(Bucket(bucket_params, bucket_start, padded, dp_size,
                                           dp_rank))
                offset = bucket_start = bucket_start + padded
                bucket_params = []
        self.numel = offset
        for bucket in self.buckets:
            bucket.buffer = self  # the buffer (data, group) a bucket is a range of
        self.data = torch.zeros(self.numel, dtype=wide_dtype(params[0].dtype), device=device)
        self.param_data = None
        if keep_params_contiguous:
            self.param_data = torch.zeros(self.numel, dtype=params[0].dtype, device=device)
        self.offsets = {}
        for p, start in layout:
            self.offsets[id(p)] = start
            p.main_grad = self.data[start:start + p.numel()].view_as(p)
            if self.param_data is not None:
                view = self.param_data[start:start + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view


class DataParallel(nn.Module):
    """Wraps one model chunk; its gradients land in fp32 buffers and get reduced over DP."""

    def __init__(self, module: nn.Module, pg: ProcessGroups | None = None, *,
                 bucket_size: int | None = None, overlap_grad_reduce: bool = False,
                 use_distributed_optimizer: bool = False, overlap_param_gather: bool = False):
        super().__init__()
        self.module = module
        self.pg = pg or ProcessGroups.single()
        pg = self.pg
        dp = pg.dp_cp.size
        self.sharded = use_distributed_optimizer and dp > 1
        self.overlap_grad_reduce = overlap_grad_reduce and dp > 1
        self.overlap_param_gather = overlap_param_gather and self.sharded
        self._sync = True
        params = [p for p in module.parameters() if p.requires_grad]
        device = params[0].device
        # Experts are replicated over the expert-data-parallel group only.
        groups = {False: (pg.dp_cp.group, pg.dp_cp.size, pg.dp_cp.rank),
                  True: (pg.edp.group, pg.edp.size, pg.edp.rank)}
        by_kind: dict[tuple[torch.dtype, bool], list[nn.Parameter]] = {}
        for p in params:
            by_kind.setdefault((p.dtype, layout_of(p).expert), []).append(p)
        size = bucket_size or max(DEFAULT_BUCKET_SIZE, 1_000_000 * dp)
        self.buffers = [GradBuffer(ps, size, *groups[expert], device, self.sharded)
                        for (_, expert), ps in by_kind.items()]
        self._bucket_of = {id(p): b for buf in self.buffers for b in buf.buckets
                           for p in b.params}
        for bucket in self.buckets:
            bucket.reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        if self.overlap_param_gather:
            for m in module.modules():
                if any(True for _ in m.parameters(recurse=False)):
                    m.register_forward_pre_hook(self._wait_for_params)

    @property
    def buckets(self) -> list[Bucket]:
        return [b for buf in self.buffers for b in buf.buckets]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ------------------------------------------------------------ gradients
    def sync_gradients(self, enabled: bool) -> None:
        """Whether the coming backward may start reductions: only on the last micro-batch
        of a step (the schedules set this before every backward)."""
        self._sync = enabled

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.overlap_grad_reduce and self._sync:
            bucket = self._bucket_of[id(param)]
            bucket.pending.discard(id(param))
            if not bucket.pending and not bucket.deferred:
                self._start_grad_reduce(bucket)

    @staticmethod
    def _bucket_grad(bucket: Bucket) -> torch.Tensor:
        return bucket.buffer.data[bucket.offset:bucket.offset + bucket.numel]

    def _start_grad_reduce(self, bucket: Bucket) -> None:
        grads = self._bucket_grad(bucket)
        group, async_op = bucket.buffer.group, self.overlap_grad_reduce
        if bucket.buffer.dp_size == 1:
            bucket.pending = set()
            return
        if self.sharded:
            bucket.grad_shard_out = torch.empty(bucket.shard_size, dtype=grads.dtype,
                                                device=grads.device)
            bucket.grad_handle = reduce_scatter_into(bucket.grad_shard_out, grads, group,
                                                 async_op)
        else:
            bucket.grad_handle = dist.all_reduce(grads, group=group, async_op=async_op)
        bucket.pending = set()

    def zero_grad_buffer(self) -> None:
        for buffer in self.buffers:
            buffer.data.zero_()
        for bucket in self.buckets:
            bucket.reset()

    def finish_grad_sync(self) -> None:
        """Complete every bucket's reduction (start those backward did not start)."""
        if all(buf.dp_size == 1 for buf in self.buffers):
            return
        for bucket in self.buckets:
            if bucket.grad_handle is None:
                self._start_grad_reduce(bucket)
        for bucket in self.buckets:
            if bucket.grad_handle is not None and hasattr(bucket.grad_handle, "wait"):
                bucket.grad_handle.wait()
            if bucket.grad_shard_out is not None:
                start = bucket.shard_start - bucket.offset
                self._bucket_grad(bucket)[start:start + bucket.shard_size].copy_(
                    bucket.grad_shard_out)
            bucket.grad_handle, bucket.grad_shard_out = None, None

    # ------------------------------------------------------------ weights
    def start_param_gather(self) -> None:
        """All-gather every bucket's updated weight shards (async with overlap)."""
        for buf in self.buffers:
            if buf.dp_size == 1:
                continue
            for bucket in buf.buckets:
                full = buf.param_data[bucket.offset:bucket.offset + bucket.numel]
                mine = full[bucket.shard_start - bucket.offset:][:bucket.shard_size].clone()
                bucket.param_handle = all_gather_into(full, mine, buf.group,
                                                  self.overlap_param_gather)
                if not self.overlap_param_gather:
                    bucket.param_handle = None

    def _wait_for_params(self, module, args) -> None:
        for p in module.parameters(recurse=False):
            bucket = self._bucket_of.get(id(p))
            if bucket is not None and bucket.param_handle is not None:
                bucket.param_handle.wait()
                bucket.param_handle = None

    def finish_param_gather(self) -> None:
        for bucket in self.buckets:
            if bucket.param_handle is not None:
                bucket.param_handle.wait()
                bucket.param_handle = None
