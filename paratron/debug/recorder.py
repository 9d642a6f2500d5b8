"""Hooks that record what every module of a model computes, by its global name.

`Recorder(chunks)` hooks a rank's model chunks (`GPTModel`s: one per virtual stage) and
keeps, as detached copies in `records`, each module's forward output and the gradient
with respect to its input (the gradient its own backward produced, through that module
only: the input is passed through an identity whose backward records it), per
micro-batch; `record_parameters(phase, tensors)` adds per-parameter tensors (gradients
after the reductions, updated weights) that the caller takes from wherever they live.
A record's key is a `Key`: iteration, phase, micro-batch, module name (global layer
numbers, as in checkpoints) and what it holds. The tensors are this rank's: its TP/SP/CP
shards under a parallel layout, the whole tensors at one process.

Micro-batch numbers are global: the k-th forward of a module in an iteration is this
rank's k-th micro-batch (every schedule runs each chunk's micro-batches in order), which
is micro-batch k x DP + DP rank of the global batch; its input gradient is filed under
the number of the forward it belongs to.
Forwards replayed by activation recompute are not recorded twice. Modules inside stacked
experts are not hooked (their rows are tokens routed there, which differ per layout);
the MoE layer's output and input gradient stand for them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

from paratron.parallel.random import in_backward

# Phases in the order an iteration produces them; a record's direction follows.
PHASES = ("forward", "backward", "grad", "weight")
DIRECTION = {"forward": "forward", "backward": "backward", "grad": "backward",
             "weight": "optimizer"}


class Key(NamedTuple):
    """One recorded tensor: `what` is "output" (forward), "input_grad" (backward) or a
    parameter's name within `module` (grad, weight; micro is -1 for those)."""

    iteration: int
    phase: str
    micro: int
    module: str
    what: str


class _RecordGradient(torch.autograd.Function):
    """Identity whose backward hands the gradient to `record` first."""

    @staticmethod
    def forward(ctx, x, record):
        ctx.record = record
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.record(grad)
        return grad, None


# Modules every pipeline chunk has its own of: what they return is the chunk's, not the
# model's (the block's output is its last layer's, or the final norm's).
CHUNK_MODULES = ("decoder", "rotary_pos_emb")


def hooked_modules(chunk: nn.Module):
    """(global name, module) of a model chunk's modules that get recorded: all but the
    chunk itself, the per-chunk modules, module lists and what lives inside stacked
    experts."""
    for name, module in chunk.named_modules():
        if (not name or name in CHUNK_MODULES or isinstance(module, nn.ModuleList)
                or ".experts." in f".{name}."):
            continue
        yield chunk.global_name(name), module


class Recorder:
    """Records module outputs and input gradients of a rank's model chunks.

    `dp_rank`/`dp_size` number the micro-batches globally (see the module's docstring);
    call `start_iteration(n)` before each iteration's forwards and `close()` to remove
    the hooks."""

    def __init__(self, chunks: list[nn.Module], dp_rank: int = 0, dp_size: int = 1):
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.records: dict[Key, torch.Tensor] = {}
        self.iteration = 0
        self._forwards: dict[str, int] = defaultdict(int)
        self._handles = []
        for chunk in chunks:
            for name, module in hooked_modules(chunk):
                self._handles.append(module.register_forward_pre_hook(
                    self._pre_hook(name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def start_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self._forwards.clear()

    def _micro(self, name: str) -> int:
        return self._forwards[name] * self.dp_size + self.dp_rank

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            if in_backward() or not torch.is_grad_enabled():
                return None
            for i, arg in enumerate(args):
                if isinstance(arg, torch.Tensor) and arg.requires_grad:
                    key = Key(self.iteration, "backward", self._micro(name), name, "input_grad")
                    record = lambda grad, key=key: self._keep(key, grad)  # noqa: E731
                    args = (*args[:i], _RecordGradient.apply(arg, record), *args[i + 1:])
                    return args, kwargs
            return None
        return hook

    def _hook(self, name: str):
        def hook(module, args, output):
            if in_backward():
                return
            if isinstance(output, torch.Tensor):
                self._keep(Key(self.iteration, "forward", self._micro(name), name, "output"),
                           output)
            self._forwards[name] += 1
        return hook

    def _keep(self, key: Key, tensor: torch.Tensor) -> None:
        self.records[key] = tensor.detach().clone()

    def record_parameters(self, phase: str, tensors: dict[str, torch.Tensor]) -> None:
        """Record per-parameter tensors (`phase` "grad" or "weight") by global parameter
        name (`decoder.layers.3.mlp.linear_fc1.weight`)."""
        for name, tensor in tensors.items():
            module, _, what = name.rpartition(".")
            self._keep(Key(self.iteration, phase, -1, module, what), tensor)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
