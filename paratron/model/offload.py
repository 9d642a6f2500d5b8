"""Activation offload: what the first layers save for backward waits in CPU memory.

Between a layer's forward and backward autograd keeps every tensor its ops saved, the
bulk of training memory, held longest by the earliest layers. With `--cpu-offloading
--cpu-offloading-num-layers N`, layers numbered below N (global numbers: every pipeline
layout offloads the same layers) run under `saved_tensors_hooks` that copy each saved
tensor to pinned CPU memory and back when backward asks. The hooks wrap a layer's
recompute checkpoint, so under recompute only its inputs are offloaded; weights are
never copied.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn


class ActivationOffload:
    """Offloads the saved tensors of layers numbered below `num_layers`; counts what it
    moved (`packed`, `unpacked`, `bytes`) so a run can tell it happened."""

    def __init__(self, num_layers: int = 0):
        self.num_layers = num_layers
        self.packed = 0
        self.unpacked = 0
        self.bytes = 0

    @classmethod
    def from_config(cls, config) -> "ActivationOffload":
        return cls(config.cpu_offloading_num_layers if config.cpu_offloading else 0)

    def __call__(self, layers: list[nn.Module]):
        """The context a chunk of layers runs its forward in (numbered by its first)."""
        first = layers[0]
        if (first.layer_number >= self.num_layers or not first.training
                or not torch.is_grad_enabled()):
            return contextlib.nullcontext()
        weights = {p.untyped_storage().data_ptr() for layer in layers
                   for p in layer.parameters()}
        return torch.autograd.graph.saved_tensors_hooks(
            functools.partial(self._pack, weights), self._unpack)

    def _pack(self, weights: set[int], tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() in weights:
            return tensor  # a weight or a view of one: resident anyway
        # Pinned host memory lets the copies run asynchronously with the GPU's stream.
        pinned = tensor.is_cuda
        # Same strides as the original (when dense), so backward takes the same kernels.
        host = torch.empty_like(tensor, device="cpu", pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        self.packed += 1
        self.bytes += host.numel() * host.element_size()
        return tensor.device, host, pinned

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, pinned = packed
        self.unpacked += 1
        return host.to(device, non_blocking=pinned)
