"""When a run stops early on purpose: Megatron-LM's `--exit-signal-handler`,
`--exit-interval` and `--exit-duration-in-mins`.

A scheduler (SLURM, Kubernetes) sends SIGTERM before it kills a job; with
`--exit-signal-handler` the run finishes its current iteration, saves a checkpoint and
exits cleanly instead of losing everything since the last save. SIGINT (Ctrl-C) does
the same. Every rank must stop at the same iteration, so the decision is one all-reduce
(MAX) over all ranks per iteration — only when a signal handler or a time limit is set.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitConditions:
    def __init__(self, training_config, world_size: int, device: torch.device):
        self.t, self.world_size, self.device = training_config, world_size, device
        self.start = time.monotonic()
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "ExitConditions":
        if self.t.exit_signal_handler:
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def reason(self, iteration: int) -> str | None:
        """Why the run should stop after `iteration`, or None (collective when a signal
        handler or a duration is set: every rank gets the same answer)."""
        t = self.t
        if t.exit_interval and iteration % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval}"
        if not (t.exit_signal_handler or t.exit_duration_in_mins):
            return None
        minutes = (time.monotonic() - self.start) / 60.0
        flags = [float(self.received or 0),
                 float(bool(t.exit_duration_in_mins) and minutes > t.exit_duration_in_mins)]
        if self.world_size > 1:
            both = torch.tensor(flags, device=self.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            flags = both.tolist()
        if flags[0]:
            return f"received {signal.Signals(int(flags[0])).name}"
        if flags[1]:
            return f"--exit-duration-in-mins {t.exit_duration_in_mins} reached"
        return None
