"""Noticing a run going wrong: non-finite loss or gradients, loss spikes, stragglers.

With `--check-for-nan-in-loss-and-grad` (on by default, as in Megatron) a NaN/Inf loss or
gradient stops the run after a checkpoint, with one line naming the iteration and the
first bad parameter, except under fp16's dynamic loss scaling, where an overflow is
expected: the step is skipped and counted. A loss above `--loss-spike-factor` x the
recent mean is a warning. Each rank's own work per iteration is gathered at every log
interval, and a spread above `--straggler-threshold` names the slowest and fastest rank.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """The loss or a gradient was NaN/Inf; the message is one line."""


def _kind(value: torch.Tensor | float) -> str:
    if isinstance(value, torch.Tensor):
        return "nan" if bool(torch.isnan(value).any()) else "inf"
    return "nan" if math.isnan(value) else "inf"


def non_finite_gradients(optimizer, models) -> list[tuple[str, str]]:
    """(parameter name, 'nan' or 'inf') of every gradient with a non-finite entry, over
    all ranks. Each rank checks the gradient slices its optimizer updates (reduced over
    data parallelism; a shard with the distributed optimizer). Every rank must call it:
    the trainer does when the global gradient norm is not finite, which all ranks see."""
    names = {id(p): model.module.global_name(name)
             for model in models for name, p in model.module.named_parameters()}
    found: dict[str, str] = {}
    for segment in optimizer.segments:
        if not bool(torch.isfinite(segment.grad).all()):
            found.setdefault(names[id(segment.param)], _kind(segment.grad))
    everyone = [found]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found)
    merged: dict[str, str] = {}
    for part in everyone:
        for name, kind in part.items():
            merged.setdefault(name, kind)
    return sorted(merged.items())


def non_finite_message(iteration: int, loss: float, gradients: list[tuple[str, str]],
                       saved_to: str | None) -> str:
    """One line: which value was not finite at which iteration, and what happened."""
    if not math.isfinite(loss):
        what = f"lm loss is {_kind(loss)}"
    elif gradients:
        name, kind = gradients[0]
        more = f" (and {len(gradients) - 1} more parameters)" if len(gradients) > 1 else ""
        what = f"the gradient of {name} is {kind}{more}"
    else:
        what = "the gradient norm is not finite"
    saved = f"; saved a checkpoint to {saved_to}" if saved_to else ""
    return (f"iteration {iteration}: {what}; the step was not applied{saved}; stopping "
            f"(--no-check-for-nan-in-loss-and-grad skips such steps and goes on)")


class LossSpikeDetector:
    """Warns when a loss exceeds `factor` x the mean of the last `window` finite losses
    (once `min_history` of them are known); factor 0 turns it off."""

    def __init__(self, factor: float, window: int = 100, min_history: int = 10):
        self.factor, self.min_history = factor, min_history
        self.history: deque[float] = deque(maxlen=window)

    def check(self, iteration: int, loss: float) -> str | None:
        if not self.factor or not math.isfinite(loss):
            return None
        warning = None
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            if mean > 0 and loss > self.factor * mean:
                warning = (f"WARNING: loss spike at iteration {iteration}: lm loss "
                           f"{loss:.6E} is {loss / mean:.1f} x the mean {mean:.6E} of the "
                           f"last {len(self.history)} iterations (--loss-spike-factor "
                           f"{self.factor:g})")
        self.history.append(loss)
        return warning


def straggler_line(rank_ms: list[float], threshold: float, always: bool) -> str | None:
    """The spread of the ranks' own work per iteration: a line when it exceeds
    `threshold` (a fraction of the slowest rank's time) or when `always`."""
    if len(rank_ms) < 2:
        return None
    slow = max(range(len(rank_ms)), key=rank_ms.__getitem__)
    fast = min(range(len(rank_ms)), key=rank_ms.__getitem__)
    spread = (rank_ms[slow] - rank_ms[fast]) / rank_ms[slow] if rank_ms[slow] > 0 else 0.0
    if not always and spread <= threshold:
        return None
    label = "straggler" if spread > threshold else "rank balance"
    return (f" {label}: own work per iteration (ms, batches + forward compute) | "
            f"max: {rank_ms[slow]:.1f} (rank {slow}) | min: {rank_ms[fast]:.1f} (rank {fast}) "
            f"| spread: {100.0 * spread:.0f}% |")
