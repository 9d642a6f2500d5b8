"""Watching one training step: per-module statistics, each sample's loss, and the first
op that produced a NaN or Inf.

`StepProbe` sees the step through module hooks (each module's output and output
gradient: max |x|, RMS, non-finite count), a wrapped loss function (the loss of each
sample) and a `TorchDispatchMode` that checks the output of every aten op for NaN/Inf,
so the first non-finite value is named by module, op and direction. `paratron replay`
runs the iteration it replays under one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from paratron.parallel.data_parallel import accumulated_grad
from paratron.parallel.random import in_backward

@dataclass
class Stats:
    """Running max |x|, RMS and non-finite count of the tensors seen (finite values)."""

    max_abs: float = 0.0
    sum_sq: float = 0.0
    count: int = 0
    non_finite: int = 0

    @torch.no_grad()
    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double()
        finite = torch.isfinite(t)
        values = torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device))
        self.non_finite += int((~finite).sum())
        self.max_abs = max(self.max_abs, float(values.abs().max()) if t.numel() else 0.0)
        self.sum_sq += float(values.square().sum())
        self.count += int(finite.sum())

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_sq / self.count) if self.count else 0.0

    def cells(self) -> str:
        bad = f"{self.non_finite:>8d}" if self.non_finite else f"{'':>8}"
        return f"{self.max_abs:>11.4e} {self.rms:>11.4e}{bad}"


@dataclass
class NonFinite:
    """The first op whose output held a NaN or Inf."""

    direction: str  # forward or backward
    module: str
    op: str
    micro_batch: int
    kind: str  # NaN or Inf
    inputs_finite: bool

    def __str__(self) -> str:
        source = ("its inputs were finite" if self.inputs_finite
                  else "an input already held a NaN/Inf")
        return (f"{self.kind} first in the {self.direction} of {self.module}, op {self.op}, "
                f"micro-batch {self.micro_batch} ({source})")


def _non_finite(tensors, backward: bool) -> str | None:
    """'NaN', 'Inf' or '-Inf' when a floating tensor among `tensors` holds one, else None.
    A forward's -Inf is left out: it is how attention masks are written."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if torch.isnan(t).any():
                return "NaN"
            if torch.isposinf(t).any():
                return "Inf"
            if backward and torch.isneginf(t).any():
                return "-Inf"
    return None


# Ops whose output is memory not yet written: whatever it holds means nothing.
_UNWRITTEN = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                        "new_empty_strided"})


class _NonFiniteWatch(TorchDispatchMode):
    """Checks the outputs of every aten op (views and fresh allocations aside: they only
    show what an earlier op or a parameter holds, or nothing yet) and hands the first
    non-finite one to the probe."""

    def __init__(self, probe: "StepProbe"):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self.probe.first_non_finite is None and not func.is_view
                and func.overloadpacket.__name__ not in _UNWRITTEN):
            backward = in_backward()
            kind = _non_finite(tree_flatten(out)[0], backward)
            if kind is not None:
                inputs = tree_flatten((args, kwargs))[0]
                self.probe.found_non_finite(str(func), kind, backward,
                                            _non_finite(inputs, backward) is None)
        return out


@dataclass
class StepProbe:
    """Watches one step of the model chunks `models` (DataParallel-wrapped GPTModels):
    statistics per module (by global name), per-sample losses, the first non-finite op
    and, with `keep_tensors`, the tensors themselves."""

    models: list
    keep_tensors: bool = False
    activations: dict[str, Stats] = field(default_factory=dict)
    gradients: dict[str, Stats] = field(default_factory=dict)
    weight_grads: dict[str, Stats] = field(default_factory=dict)
    sample_losses: list[float] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # the tokens of each sample
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    first_non_finite: NonFinite | None = None
    micro_batch: int = -1
    first_micro_batch: int = 0
    _forward: list[str] = field(default_factory=list)   # modules whose forward runs
    _backward: list[str] = field(default_factory=list)  # modules whose backward runs

    def modules(self):
        """(global name, module) of every submodule of every chunk."""
        for chunk in self.models:
            model = chunk.module
            for name, module in model.named_modules():
                if name:
                    yield model.global_name(name), module

    def found_non_finite(self, op: str, kind: str, backward: bool,
                         inputs_finite: bool) -> None:
        stack = self._backward if backward else self._forward
        self.first_non_finite = NonFinite("backward" if backward else "forward",
                                          stack[-1] if stack else "(outside any module)", op,
                                          self.micro_batch, kind, inputs_finite)

    # -- hooks
    def _pre_forward(self, name: str):
        def hook(module, args):
            self._forward.append(name)
            inputs = [a for a in tree_flatten(args)[0]
                      if isinstance(a, torch.Tensor) and a.requires_grad]
            if inputs:  # its input's gradient ends the module's backward
                inputs[0].register_hook(lambda grad: self._leave_backward(name))
        return hook

    def _post_forward(self, name: str):
        def hook(module, args, output):
            self._forward.pop()
            if in_backward():
                return  # recomputed in backward: seen already
            out = next((t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)
                        and t.is_floating_point()), None)
            if out is None:
                return
            self.activations.setdefault(name, Stats()).add(out)
            self._keep(f"output/{name}/{self.micro_batch}", out)
            if out.requires_grad:
                out.register_hook(lambda grad, m=self.micro_batch: self._enter_backward(
                    name, m, grad))
        return hook

    def _enter_backward(self, name: str, micro_batch: int, grad: torch.Tensor) -> None:
        self._backward.append(name)
        self.gradients.setdefault(name, Stats()).add(grad)
        self._keep(f"output_grad/{name}/{micro_batch}", grad)

    def _leave_backward(self, name: str) -> None:
        if name in self._backward:
            del self._backward[len(self._backward) - 1 - self._backward[::-1].index(name)]

    def _keep(self, key: str, t: torch.Tensor) -> None:
        if self.keep_tensors:
            self.tensors[key] = t.detach().clone().contiguous()

    # -- one step
    def loss_fn(self, loss_fn):
        """`loss_fn` that also records the loss and tokens of each sample of the batch."""
        def observed(batch, per_token_loss):
            mask = batch["loss_mask"].float()
            per_sample = ((per_token_loss.detach().float() * mask).sum(dim=1)
                          / mask.sum(dim=1).clamp(min=1.0))
            self.sample_losses += per_sample.tolist()
            self.samples += list(batch["tokens"])
            for key, value in batch.items():
                self._keep(f"batch/{key}/{self.micro_batch}", value)
            return loss_fn(batch, per_token_loss)
        return observed

    @contextmanager
    def watching(self, stage, micro_batch: int | None):
        """Route the stage's next `forward_backward` through the probe (only micro-batch
        `micro_batch` of it when given)."""
        plain = stage.forward_backward
        self.first_micro_batch = micro_batch or 0

        def forward_backward(batches, loss_fn, *, forward_only=False):
            chosen = batches if micro_batch is None else batches[micro_batch:micro_batch + 1]
            with self._hooked(), _NonFiniteWatch(self):
                plain(chosen, self.loss_fn(loss_fn), forward_only=forward_only)
            self._read_weight_grads()

        stage.forward_backward = forward_backward
        try:
            yield self
        finally:
            del stage.forward_backward  # the class's method again

    @contextmanager
    def _hooked(self):
        handles = [self.models[0].module.register_forward_pre_hook(self._next_micro_batch)]
        for name, module in self.modules():
            handles.append(module.register_forward_pre_hook(self._pre_forward(name)))
            handles.append(module.register_forward_hook(self._post_forward(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _next_micro_batch(self, module, args) -> None:
        if not in_backward():
            self.micro_batch = (self.first_micro_batch if self.micro_batch < 0
                                else self.micro_batch + 1)

    def _read_weight_grads(self) -> None:
        """Each parameter's gradient as backward left it (before clipping and the step)."""
        for chunk in self.models:
            model = chunk.module
            for name, param in model.named_parameters():
                grad = accumulated_grad(param)
                if grad is None:
                    continue
                name = model.global_name(name)
                self.weight_grads.setdefault(name, Stats()).add(grad)
                self._keep(f"weight_grad/{name}", grad)


def non_finite_parameters(models) -> list[str]:
    """Global names of the parameters that hold a NaN or Inf."""
    return [chunk.module.global_name(name) for chunk in models
            for name, param in chunk.module.named_parameters()
            if not torch.isfinite(param.detach()).all()]


