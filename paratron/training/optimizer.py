"""The optimizer wrapper: fp32 main weights, loss-scale unscaling, clipping, step.

It works on segments, the part of each parameter this rank updates: a whole parameter,
or with the distributed optimizer (ZeRO-1) its intersection with this rank's shard of
its gradient bucket, so fp32 main weights and Adam moments exist once across DP.
bf16/fp16 (and --fp64) weights get fp32 main copies; fp32 weights are updated in place;
gradients are read from the fp32 buffers (fp64 ones, under --fp64, through an fp32
copy); weight decay skips 1-D parameters, as Megatron does. With
`--optimizer-cpu-offload` the first `--optimizer-offload-fraction` of the segments keep
their main weights and state in pinned CPU memory and update there (one torch optimizer
steps both parts, so a checkpoint sees one state). `--optimizer-implementation` picks
torch's kernels; every choice computes the same AdamW update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from paratron.parallel.data_parallel import DataParallel
from paratron.parallel.sharding import duplicate_mask, layout_of
from paratron.training.lr_schedule import LRSchedule


@dataclass
class Segment:
    param: nn.Parameter       # the parameter this is a slice of
    offset: int               # where the slice starts in the flattened parameter
    model_view: torch.Tensor  # flat slice of the model weight (model dtype)
    main: torch.Tensor        # fp32 weights the optimizer updates (may alias model_view)
    grad: torch.Tensor        # fp32 slice of the gradient buffer
    decays: bool
    duplicate: torch.Tensor | None  # True where another TP rank counts this element
    host_grad: torch.Tensor | None = None  # fp32 copy of `grad` the step reads: on the CPU
    #                                        when offloaded, beside it for fp64 gradients

    @property
    def expert(self) -> bool:
        """An expert weight (laid out over EP, not TP x DP)."""
        return layout_of(self.param).expert


def _decays(name: str, param: nn.Parameter) -> bool:
    return param.dim() > 1 and not name.endswith(".bias")


def build_segments(model: DataParallel) -> list[Segment]:
    """This rank's segments of every parameter of one model chunk, in buffer order."""
    names = {id(p): n for n, p in model.module.named_parameters()}
    pg = model.pg
    segments = []
    for buffer in model.buffers:
        for bucket in buffer.buckets:
            if model.sharded:
                lo, hi = bucket.shard_start, bucket.shard_start + bucket.shard_size
            else:
                lo, hi = bucket.offset, bucket.offset + bucket.numel
            for p in bucket.params:
                start = buffer.offsets[id(p)]
                a, b = max(lo, start), min(hi, start + p.numel())
                if a >= b:
                    continue
                view = p.data.view(-1)[a - start:b - start]
                main = view if p.dtype == torch.float32 else view.detach().float().clone()
                # Elements replicated over TP (norms, shared k/v rows) count once.
                mask = duplicate_mask(p, pg.tp.size, pg.tp.rank)
                if layout_of(p).tied == "copy":
                    mask = torch.ones(p.shape, dtype=torch.bool)  # the first stage counts it
                if mask is not None:
                    mask = mask.view(-1)[a - start:b - start].to(view.device)
                segments.append(Segment(p, a - start, view, main, buffer.data[a:b],
                                        _decays(names[id(p)], p), mask))
    return segments


def offload_segments(segments: list[Segment], fraction: float) -> None:
    """Move the main weights of the first `fraction` of the elements to the CPU.

    A segment goes to the CPU while the offloaded elements, itself included, stay within
    the fraction; its main weights become a CPU fp32 copy (also for an fp32 model, whose
    main weights otherwise alias the model) and its gradient gets a CPU staging copy.
    """
    budget = fraction * sum(s.grad.numel() for s in segments)
    moved = 0
    for s in segments:
        moved += s.grad.numel()
        if moved > budget:
            break
        pinned = s.grad.is_cuda  # page-locked memory: asynchronous copies to and fro
        s.main = torch.empty(s.main.shape, dtype=torch.float32, pin_memory=pinned)
        s.main.copy_(s.model_view)
        s.host_grad = torch.empty(s.grad.shape, dtype=torch.float32, pin_memory=pinned)


class StepReport(NamedTuple):
    """What one optimizer step tells the training loop (host numbers, read at once)."""

    stepped: bool
    grad_norm: float | None
    num_zeros: int | None
    also_read: list[float]  # the values of `step(also_read=...)`


def _implementation(name: str, device: torch.device) -> dict:
    """torch optimizer keyword arguments for --optimizer-implementation; `auto` is the
    fused kernel on CUDA (one launch for every tensor) and multi-tensor elsewhere."""
    if name == "auto":
        name = "fused" if device.type == "cuda" else "foreach"
    return {"for-loop": {"foreach": False}, "foreach": {"foreach": True},
            "fused": {"fused": True}}[name]


class MixedPrecisionOptimizer:
    """The optimizer step over every model chunk of this rank.

    Holds the `segments` this rank updates (flat slices of parameters and of their fp32
    gradient buffers, each with an fp32 `main` copy unless the weight is fp32 already),
    the torch optimizer (AdamW or SGD) over those main copies in two groups (with and
    without weight decay), the lr schedule and the loss scaler. `step()` unscales,
    checks for overflow, clips by the global norm, updates and copies the weights back.
    """

    def __init__(self, models: list[DataParallel], optimizer_config, schedule: LRSchedule,
                 loss_scaler):
        o = optimizer_config
        self.config, self.models = o, list(models)
        self.pg = self.models[0].pg
        self.schedule, self.loss_scaler = schedule, loss_scaler
        self.segments = [s for model in self.models for s in build_segments(model)]
        if o.optimizer_cpu_offload:
            offload_segments(self.segments, o.optimizer_offload_fraction)
        self.offloaded = [s for s in self.segments if s.host_grad is not None]
        for s in self.segments:  # fp64 gradients (--fp64) step fp32 main weights
            if s.host_grad is None and s.grad.dtype != torch.float32:
                s.host_grad = torch.empty(s.grad.shape, dtype=torch.float32,
                                          device=s.grad.device)
        self.staged = [s for s in self.segments if s.host_grad is not None]
        # From the config, not this rank's weights: every rank must join the same sums,
        # also a pipeline stage that happens to hold no MoE layer.
        self.has_experts = bool(self.models[0].module.config.num_experts)
        groups = [{"params": [s.main for s in self.segments if s.decays],
                   "weight_decay": o.weight_decay},
                  {"params": [s.main for s in self.segments if not s.decays],
                   "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        lr = schedule.lr_at(0)
        kernels = _implementation(o.optimizer_implementation, self.segments[0].grad.device)
        self.fused = bool(kernels.get("fused"))
        if o.optimizer == "adam":
            self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(o.adam_beta1, o.adam_beta2),
                                               eps=o.adam_eps, **kernels)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=o.sgd_momentum, **kernels)
        self.steps = 0  # successful optimizer steps, what the lr schedule counts

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _global_sum(self, dense: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Sum per-rank statistics over the ranks holding other parts of the model.

        Dense weights: their DP x CP shards (distributed optimizer), TP shards and
        pipeline stages (TP x PP). Experts: their expert-DP shards, the other experts
        (EP), expert-TP shards and pipeline stages.
        """
        pg, sharded = self.pg, self.models[0].sharded
        pg.all_reduce(dense, *(["dp_cp"] if sharded else []), "mp")
        if self.has_experts:
            pg.all_reduce(expert, *(["edp"] if sharded else []), "ep", "etp", "pp")
        return dense + expert

    def _statistics(self, expert: bool, count_zeros: bool) -> torch.Tensor:
        """[sum of squared gradients, zero gradient entries] (float64, on the device) of
        this rank's dense or expert segments, each element counted once over TP."""
        segments = [s for s in self.segments if s.expert == expert]
        stats = torch.zeros(2, dtype=torch.float64, device=self.segments[0].grad.device)
        if not segments:
            return stats
        counted = [s.grad if s.duplicate is None else s.grad.masked_fill(s.duplicate, 0.0)
                   for s in segments]
        squares = torch.stack(torch._foreach_norm(counted)).double().square().sum()
        if not count_zeros:
            return torch.stack([squares, stats[1]])
        zeros = sum(((g == 0) if s.duplicate is None else (g == 0) & ~s.duplicate).sum()
                    for s, g in zip(segments, counted))
        return torch.stack([squares, zeros.double()])

    @torch.no_grad()
    def step(self, also_read: torch.Tensor | None = None,
             count_zeros: bool = False) -> StepReport:
        """Unscale, check overflow, clip, update, copy back (and all-gather shards).

        The host reads the gradient norm, the zero count (only with `count_zeros`: a pass
        over every gradient) and `also_read` (the iteration's losses, a 1-D device tensor)
        together, once, before the update is queued; the norm and zero count are None
        when the step was skipped for an overflow.
        """
        grads = [s.grad for s in self.segments]
        scale = self.loss_scaler.scale
        if scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
        stats = self._global_sum(self._statistics(False, count_zeros),
                                 self._statistics(True, count_zeros))
        if also_read is not None:
            stats = torch.cat([stats, also_read.detach().double()])
        squares, zeros, *values = stats.tolist()  # the step's one wait for the device
        norm = math.sqrt(squares) if math.isfinite(squares) else math.inf
        found_inf = not math.isfinite(norm)
        self.loss_scaler.update(found_inf)
        if found_inf:
            return StepReport(False, None, None, values)
        if self.config.clip_grad > 0 and norm > self.config.clip_grad:
            torch._foreach_mul_(grads, self.config.clip_grad / (norm + 1e-6))
        self._stage_grads()
        for s in self.segments:
            s.main.grad = s.grad if s.host_grad is None else s.host_grad
        self.optimizer.step()
        for s in self.segments:
            s.main.grad = None
            if s.main is not s.model_view:
                s.model_view.copy_(s.main, non_blocking=s.main.is_pinned())
        for model in self.models:
            if model.sharded:
                model.start_param_gather()
        self.steps += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(self.steps)
        return StepReport(True, norm, int(zeros) if count_zeros else None, values)

    def _stage_grads(self) -> None:
        """Fill the fp32 gradient copies the step reads (an offloaded segment's on the
        CPU, an fp64 gradient's beside it) with the unscaled, clipped gradients, and make
        every state tensor live where its main weights do."""
        if self.offloaded or self.fused:
            self._place_state()
        for s in self.staged:
            s.host_grad.copy_(s.grad, non_blocking=s.host_grad.is_pinned())
        if any(s.grad.is_cuda for s in self.offloaded):
            torch.cuda.current_stream(self.offloaded[0].grad.device).synchronize()

    def _place_state(self) -> None:
        """State loaded from a checkpoint sits beside the model; the torch optimizer wants
        it beside each main weight (its step counter too when fused)."""
        for s in self.segments:
            state = self.optimizer.state.get(s.main)
            if not state:
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and value.device != s.main.device \
                        and (value.dim() > 0 or self.fused):
                    state[key] = value.to(s.main.device)
