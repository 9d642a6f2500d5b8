"""Where metrics go besides the console: TensorBoard, Weights & Biases, a JSON-lines file.

Scalars are keyed by iteration. TensorBoard also gets Megatron's `<tag> vs samples`
series keyed by consumed samples; W&B only takes steps that never decrease, so it gets
the per-iteration series alone (as in Megatron). `wandb` is imported only when
`--wandb-project` asks for it; `WANDB_MODE=offline` and the other W&B variables work
as usual.
"""

from __future__ import annotations

import json
import os

from paratron.checkpoint.files import write_atomic
from paratron.options import ConfigError


class TensorBoardWriter:
    """Scalars to TensorBoard event files, also against consumed samples (as Megatron)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--tensorboard-dir {log_dir}: cannot create it "
                              f"({exc.strerror}); pick a writable folder") from None
        self.writer = SummaryWriter(log_dir=log_dir, max_queue=1000)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def scalar_vs_samples(self, tag: str, value: float, samples: int) -> None:
        self.writer.add_scalar(f"{tag} vs samples", value, samples)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """Scalars to a Weights & Biases run, against iterations only."""

    def __init__(self, project: str, name: str | None, save_dir: str | None, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package: pip install wandb "
                              "(or drop --wandb-project)") from None
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def scalar_vs_samples(self, tag: str, value: float, samples: int) -> None:
        pass  # W&B steps must not decrease; samples would interleave with iterations

    def close(self) -> None:
        self.run.finish()


class JsonlWriter:
    """One JSON object per line, flushed at once, so a script can follow the run."""

    def __init__(self, path: str):
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            self.file = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--metrics-jsonl {path}: cannot write it ({exc.strerror})") from None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_json_atomically(path: str, record: dict, flag: str) -> None:
    """Write a JSON file whole or not at all, as checkpoint files are written (a link at
    `path` is refused); a failure becomes a one-line error naming `flag`."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, json.dumps(record, indent=2) + "\n")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: cannot write it "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


class ScalarWriters:
    """Every scalar sink of this rank (none, TensorBoard, W&B or both)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def scalar(self, tag: str, value: float | None, step: int, samples: int | None = None) -> None:
        if value is None:
            return
        for sink in self.sinks:
            sink.scalar(tag, float(value), step)
            if samples is not None:
                sink.scalar_vs_samples(tag, float(value), samples)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
