"""The feed-forward block: linear_fc1 -> activation -> linear_fc2.

With --swiglu, linear_fc1 produces [gate; up] and the activation is silu(gate) * up;
a tensor-parallel rank holds its own slice of gate and of up, side by side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import set_layout
from paratron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of x = [gate; up], saving only x: backward recomputes silu(gate)
    instead of keeping it, one ffn-wide tensor less per layer (as Megatron's
    `bias_swiglu_impl`). The kernels are autograd's own for `F.silu(gate) * up`, so the
    results are identical to it; torch.compile fuses each direction into one kernel."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat([grad_gate, grad * F.silu(gate)], dim=-1)


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "swiglu":
        return _SwiGLU.apply(x)
    if kind == "squared_relu":
        return F.relu(x).square()
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


class MLP(nn.Module):
    """The feed-forward block of one dense layer (or an MoE layer's shared experts),
    this TP rank's share.

    Holds `linear_fc1` (column-parallel, hidden -> ffn/TP, or [gate; up] of 2 x ffn/TP
    with swiglu) and `linear_fc2` (row-parallel, ffn/TP -> hidden, summed over TP). Takes
    and returns hidden states [s, b, h] (sequence shards [s/TP, b, h] under sequence
    parallelism).
    """

    def __init__(self, config, pg: ProcessGroups | None = None,
                 ffn_hidden_size: int | None = None):
        super().__init__()
        c = config
        ffn = ffn_hidden_size or c.ffn_hidden_size
        self.activation = c.mlp_activation()
        fc1_out = 2 * ffn if self.activation == "swiglu" else ffn
        self.linear_fc1 = ColumnParallelLinear(c.hidden_size, fc1_out, bias=c.add_bias_linear,
                                               pg=pg, init_std=c.init_method_std,
                                               sequence_parallel=c.sequence_parallel)
        if self.activation == "swiglu":
            for p in self.linear_fc1.parameters():
                set_layout(p, fused="gate_up")
        self.linear_fc2 = RowParallelLinear(ffn, c.hidden_size, bias=c.add_bias_linear, pg=pg,
                                            init_std=c.init_method_std
                                            / math.sqrt(2.0 * c.num_layers),
                                            sequence_parallel=c.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(activate(self.linear_fc1(x), self.activation))
