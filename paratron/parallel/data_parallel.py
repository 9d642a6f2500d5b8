"""Data parallelism: gradients accumulate into contiguous fp32 buffers, reduced in buckets.

Every parameter's gradient is added into `param.main_grad`, a view of one contiguous
fp32 buffer per parameter dtype, by a hook that runs as soon as autograd has the
gradient; `param.grad` is then released. This holds at data-parallel size 1 too, so
the optimizer always reads the same place, and accumulating over micro-batches in
fp32 costs nothing extra for half-precision weights.

At size 1 `finish_grad_sync` has nothing to reduce; the multi-rank reduction (all-reduce
or reduce-scatter of buckets) plugs in here.
"""

from __future__ import annotations

import torch
from torch import nn

from paratron.parallel.process_groups import ProcessGroups


class GradBuffer:
    """One contiguous fp32 gradient buffer for a list of parameters of one dtype."""

    def __init__(self, params: list[nn.Parameter], device):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        offset = 0
        # Reverse order: roughly the order in which backward produces gradients.
        for p in reversed(params):
            p.main_grad = self.data[offset:offset + p.numel()].view_as(p)
            offset += p.numel()


class DataParallel(nn.Module):
    """Wraps a model so that its gradients land in fp32 buffers (and, over DP, get reduced)."""

    def __init__(self, module: nn.Module, pg: ProcessGroups | None = None):
        super().__init__()
        self.module = module
        self.pg = pg or ProcessGroups.single()
        params = [p for p in module.parameters() if p.requires_grad]
        device = params[0].device
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.buffers = [GradBuffer(ps, device) for ps in by_dtype.values()]
        for p in params:
            p.register_post_accumulate_grad_hook(self._accumulate)

    @staticmethod
    def _accumulate(param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        for buffer in self.buffers:
            buffer.data.zero_()

    def finish_grad_sync(self) -> None:
        """Reduce gradients across data-parallel ranks (nothing to do at size 1)."""
        if self.pg.dp_size > 1:
            raise RuntimeError("data-parallel gradient reduction needs the multi-process "
                               "data-parallel layer")
