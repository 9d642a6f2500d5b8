"""When a run stops early on purpose: Megatron-LM's `--exit-signal-handler`,
`--exit-interval` and `--exit-duration-in-mins`.

With `--exit-signal-handler` a SIGTERM from the scheduler (or Ctrl-C) lets the run finish
its iteration, save and exit cleanly; every rank must stop at the same iteration, so the
decision is one MAX all-reduce per iteration, only when a handler or time limit is set.
Without it a signal stops the run at once, as in Megatron, with one line per rank naming
the signal and the last iteration instead of a traceback (one process keeps Python's
KeyboardInterrupt, as a notebook user expects).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from paratron.parallel.launch import launcher_rank, mark_ended

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitConditions:
    def __init__(self, training_config, world_size: int, device: torch.device):
        self.t, self.world_size, self.device = training_config, world_size, device
        self.start = time.monotonic()
        self.received: int | None = None
        self.iteration: int | None = None  # the last one `reason` was asked about
        self._previous: dict = {}

    def __enter__(self) -> "ExitConditions":
        if self.t.exit_signal_handler:
            handler = self._on_signal
        elif self.world_size > 1 and threading.current_thread() is threading.main_thread():
            handler = self._stop_now  # one process (a notebook too) keeps KeyboardInterrupt
        else:
            return self
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def _stop_now(self, signum, frame) -> None:
        """One line, then exit with 128 + the signal number as a shell reports a killed
        process. `os._exit`: unwinding from here could wait in a collective on ranks
        that are already gone; a checkpoint being written is left as an interrupted
        save, which the next start recognises and skips."""
        rank = dist.get_rank() if dist.is_initialized() else launcher_rank()
        done = "during its first iteration" if self.iteration is None else \
            f"after iteration {self.iteration}"
        mark_ended(rank, signal.Signals(signum).name)  # alive: a restarted round can tell
        sys.stdout.flush()
        sys.stderr.write(f"paratron train: rank {rank} stopped by "
                         f"{signal.Signals(signum).name} {done}; nothing saved since the "
                         f"last checkpoint (--exit-signal-handler saves before exiting)\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def reason(self, iteration: int) -> str | None:
        """Why the run should stop after `iteration`, or None (collective when a signal
        handler or a duration is set: every rank gets the same answer)."""
        t = self.t
        self.iteration = iteration
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
