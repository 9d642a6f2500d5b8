"""Megatron's learning-rate schedule: linear warm-up, then a decay style.

The schedule is a pure function of the number of optimizer steps taken (`lr_at`), so
it can be checked against a hand-computed table. Like Megatron, the scheduler only
advances on successful steps (an fp16 step skipped for overflow does not count), and
the value it holds after a step is the rate of the next iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_style: str = "linear"
    init_lr: float = 0.0
    wsd_decay_steps: int | None = None
    wsd_decay_style: str = "exponential"

    def lr_at(self, step: int) -> float:
        """Learning rate after `step` successful optimizer steps."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * step / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if step > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            warmup = max(self.warmup_steps, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warmup) / math.sqrt(max(step, 1)))
        decay_ratio = (step - self.warmup_steps) / max(self.decay_steps - self.warmup_steps, 1)
        if self.decay_style == "linear":
            coeff = 1.0 - decay_ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        elif self.decay_style == "WSD":
            coeff = self._wsd_coeff(step)
        else:
            raise ValueError(f"unknown lr decay style {self.decay_style!r}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _wsd_coeff(self, step: int) -> float:
        """Warm-up, stable at max_lr, then anneal over the last wsd_decay_steps."""
        anneal_start = self.decay_steps - self.wsd_decay_steps
        if step <= anneal_start:
            return 1.0
        ratio = (step - anneal_start) / self.wsd_decay_steps
        if self.wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        if self.wsd_decay_style == "exponential":
            return (2.0 * math.pow(0.5, ratio)) - 1.0
        if self.wsd_decay_style == "minus_sqrt":
            return 1.0 - math.sqrt(ratio)
        raise ValueError(f"unknown WSD decay style {self.wsd_decay_style!r}")

    @classmethod
    def from_config(cls, o, train_iters: int) -> "LRSchedule":
        """Built from an OptimizerConfig (steps in iterations)."""
        return cls(max_lr=o.lr, min_lr=o.min_lr, warmup_steps=o.lr_warmup_iters,
                   decay_steps=o.lr_decay_iters or train_iters, decay_style=o.lr_decay_style,
                   init_lr=o.lr_warmup_init, wsd_decay_steps=o.lr_wsd_decay_iters,
                   wsd_decay_style=o.lr_wsd_decay_style)
