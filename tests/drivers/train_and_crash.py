"""Run `paratron train <flags>` with crash injection and exact loss recording, for the
resume tests (works under torchrun too).

    python train_and_crash.py [--kill-at N] [--crash-in-save-at N] [--losses FILE] -- <flags>

--kill-at N: SIGKILL this process just before iteration N+1 runs (no cleanup, no flush
beyond what the code already did) — a `kill -9` at a known point.
--crash-in-save-at N: SIGKILL this process in the middle of writing checkpoint N, after
its first file and before the second.
--losses FILE: append "iteration repr(loss)" per iteration (FILE.<rank>), full precision.
"""

import argparse
import os
import signal
import sys

from paratron.checkpoint import checkpointing
from paratron.cli.main import main
from paratron.training.trainer import Trainer


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(args):
    rank = os.environ.get("RANK", "0")
    step = Trainer.train_step

    def train_step(self):
        if args.kill_at is not None and self.state.iteration == args.kill_at:
            _die()
        result = step(self)
        if args.losses:
            with open(f"{args.losses}.{rank}", "a") as fh:
                fh.write(f"{self.state.iteration + 1} {result[0]!r}\n")
        return result

    Trainer.train_step = train_step
    write = checkpointing._write

    def crashing_write(path, tensors, header=None):
        out = write(path, tensors, header)
        if args.crash_in_save_at is not None and \
                path.parent.name == f"iter_{args.crash_in_save_at:07d}.tmp":
            _die()
        return out

    checkpointing._write = crashing_write


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--crash-in-save-at", type=int)
    parser.add_argument("--losses")
    argv = sys.argv[1:]
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    install(args)
    sys.exit(main(["train", *argv[split + 1:]]))
