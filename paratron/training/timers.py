"""Megatron-style named timers and their `(min, max) time across ranks (ms):` block.

As in Megatron-LM, `--timing-log-level` 0 reports the coarse timers (evaluation), 1 adds
the iteration's phases, 2 the per-micro-batch detail. On CUDA a timer waits for the
device only when its level is reported, since waiting costs throughput; level 2 also
puts a barrier before the level-1 phases so they exclude waiting for slower ranks.
Unreported timers still measure host time, which the straggler report reads.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

# Megatron's names and levels, in the order Megatron prints them.
TIMER_LEVELS = {
    "forward-backward": 1,
    "forward-compute": 2,
    "batch-generator": 2,
    "embedding-grads-all-reduce": 1,
    "all-grads-sync": 1,
    "optimizer": 1,
    "evaluate": 0,
}


class Timer:
    """A stopwatch that accumulates the time between start() and stop() until popped."""

    def __init__(self, name: str, sync: Callable[[], None] | None = None,
                 barrier: Callable[[], None] | None = None):
        self.name, self._sync, self._barrier = name, sync, barrier
        self.elapsed = 0.0  # seconds since the last pop
        self.count = 0      # starts since the last pop
        self._started: float | None = None

    def start(self) -> None:
        if self._started is not None:
            raise RuntimeError(f"timer {self.name} is already running")
        if self._barrier is not None:
            self._barrier()
        if self._sync is not None:
            self._sync()
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is None:
            raise RuntimeError(f"timer {self.name} was not started")
        if self._sync is not None:
            self._sync()
        self.elapsed += time.perf_counter() - self._started
        self.count += 1
        self._started = None

    def pop(self) -> tuple[float, int]:
        """Seconds and starts accumulated since the last pop; resets both."""
        out = (self.elapsed, self.count)
        self.elapsed, self.count = 0.0, 0
        return out

    def __enter__(self) -> "Timer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Timers:
    """The named timers of one rank, created on first use."""

    def __init__(self, log_level: int, device: torch.device, world_size: int = 1):
        self.log_level, self.device, self.world_size = log_level, device, world_size
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        timer = self._timers.get(name)
        if timer is None:
            if name not in TIMER_LEVELS:
                raise KeyError(f"unknown timer {name!r}; known: {', '.join(TIMER_LEVELS)}")
            level = TIMER_LEVELS[name]
            reported = level <= self.log_level
            sync = torch.cuda.synchronize if reported and self.device.type == "cuda" else None
            barrier = (dist.barrier if self.log_level == 2 and level == 1 and self.world_size > 1
                       else None)
            timer = self._timers[name] = Timer(name, sync, barrier)
        return timer

    def reported(self, names=None) -> list[str]:
        """The names at or below the reported level, in Megatron's order."""
        names = TIMER_LEVELS if names is None else names
        return [n for n in names if TIMER_LEVELS[n] <= self.log_level]

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return {name: (t.elapsed, t.count) for name, t in self._timers.items()}

    def restore(self, snapshot: dict[str, tuple[float, int]], keep=()) -> None:
        """Undo what every timer but those in `keep` accumulated since `snapshot`."""
        for name, timer in self._timers.items():
            if name not in keep:
                timer.elapsed, timer.count = snapshot.get(name, (0.0, 0))

    def pop_ms(self, names: list[str], normalizer: float = 1.0) -> list[float]:
        """Milliseconds per `normalizer` of each named timer since its last pop; -1 for a
        timer this rank never started (so other ranks' values decide its min and max)."""
        out = []
        for name in names:
            elapsed, count = self(name).pop()
            out.append(elapsed * 1000.0 / normalizer if count else -1.0)
        return out


def gather_over_ranks(values: list[float], device: torch.device) -> torch.Tensor:
    """[world size, len(values)]: every rank's values (one all_gather); this rank's
    alone without a process group."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine.unsqueeze(0).cpu()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return torch.stack(parts).cpu()


def min_max(table: torch.Tensor) -> list[tuple[float, float] | None]:
    """Per column, (min, max) over the ranks that ran the timer (None if none did)."""
    out = []
    for column in table.T:
        ran = column[column >= 0]
        out.append((float(ran.min()), float(ran.max())) if ran.numel() else None)
    return out


def format_min_max(names: list[str], spans: list[tuple[float, float] | None]) -> str | None:
    """Megatron's block: a header, then one dotted line per timer that some rank ran."""
    rows = [f"    {(name + ' ').ljust(48, '.')}: ({span[0]:.2f}, {span[1]:.2f})"
            for name, span in zip(names, spans) if span is not None]
    if not rows:
        return None
    return "\n".join(["(min, max) time across ranks (ms):"] + rows)
