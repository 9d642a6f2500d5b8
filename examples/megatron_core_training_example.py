"""Train a GPT model on synthetic data with Paratron's library API.

The command-line interface is that of the `megatron_core_training_example.py` script
in the users' notes, so their launch commands work unchanged:

    # one process (CPU or one GPU)
    python examples/megatron_core_training_example.py --num-layers=2 --hidden-size=128 \
        --num-attention-heads=4 --batch-size=4 --train-steps=10 --dataset-size=100

    # TP2 x PP2 on 4 processes (GPUs, or the CPU with --device cpu)
    torchrun --nproc_per_node=4 examples/megatron_core_training_example.py \
        --tensor-model-parallel-size=2 --pipeline-model-parallel-size=2 \
        --batch-size=16 --epochs=3 --train-steps=1000 --sequence-parallel --fp16

What it shows: a `Config` built in Python (no Megatron flags), the process groups
joined from torchrun's environment or `--init-method`/`--world-size`, a `Trainer`
over a user-defined dataset, and a hand-written loop over `Trainer.train_step` that
times each step, watches memory from a background thread and writes a JSON
performance summary.

The synthetic data are arithmetic progressions modulo the vocabulary (a random start
and stride per sample), so the next token is predictable and the loss falls.
Training stops after --train-steps optimizer steps or --epochs passes over the
--dataset-size samples, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time

import torch

# Run from a checkout without installing: the repository root holds `paratron/`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paratron.config import config_from_dict  # noqa: E402
from paratron.options import ConfigError  # noqa: E402
from paratron.parallel.launch import PeerFailure  # noqa: E402
from paratron.training.pretrain import leave_distributed, setup_process_groups  # noqa: E402
from paratron.training.trainer import Trainer  # noqa: E402

PROG = "megatron_core_training_example.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-attention-heads", type=int, default=8)
    model.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="default 4 x hidden size")
    model.add_argument("--vocab-size", type=int, default=1024)
    model.add_argument("--seq-length", type=int, default=256)
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=8,
                       help="samples per optimizer step over all data-parallel ranks")
    train.add_argument("--micro-batch-size", type=int, default=1,
                       help="samples per forward/backward on one rank")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--train-steps", type=int, default=100)
    train.add_argument("--dataset-size", type=int, default=10000,
                       help="synthetic samples in one epoch")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--gradient-clip-val", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=1234)
    par = p.add_argument_group("parallelism and launch")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--world-size", type=int, default=None,
                     help="processes in the job when not given by torchrun")
    par.add_argument("--init-method", default=None, help="e.g. tcp://MASTER_IP:29500")
    par.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    prec = p.add_argument_group("precision")
    prec.add_argument("--fp16", action="store_true")
    prec.add_argument("--bf16", action="store_true")
    mon = p.add_argument_group("monitoring")
    mon.add_argument("--monitor-memory-continuously", action="store_true",
                     help="sample memory in a background thread and report the peak")
    mon.add_argument("--memory-monitor-interval", type=float, default=1.0,
                     help="seconds between memory samples")
    mon.add_argument("--save-performance-summary", nargs="?", metavar="PATH",
                     const="performance_summary.json", default=None,
                     help="write step times, throughput and memory as JSON "
                          "(default file: performance_summary.json)")
    mon.add_argument("--log-interval", type=int, default=1)
    args = p.parse_args(argv)
    if args.memory_monitor_interval <= 0:
        p.error("--memory-monitor-interval must be positive")
    for name in ("batch_size", "epochs", "train_steps", "dataset_size", "log_interval"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


class ArithmeticSequences(torch.utils.data.Dataset):
    """Sample i: (start + stride * k) mod vocab for k < seq + 1, from a generator seeded
    by (seed, i), so every rank and every layout sees the same sample i."""

    def __init__(self, size: int, seq_length: int, vocab_size: int, seed: int):
        self.size, self.seq_length, self.vocab_size, self.seed = size, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=gen).tolist()
        text = (start + (stride % 7 + 1) * torch.arange(self.seq_length + 1)) % self.vocab_size
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


class MemoryMonitor:
    """Samples this process's memory every `interval` seconds in a daemon thread:
    allocated GPU memory on CUDA, resident set size on the CPU."""

    def __init__(self, device: torch.device, interval: float):
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        with open("/proc/self/statm") as fh:  # resident pages, Linux
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.current_mib())

    def start(self) -> "MemoryMonitor":
        self.samples.append(self.current_mib())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.current_mib())

    @property
    def peak_mib(self) -> float:
        peak = max(self.samples + [self.current_mib()])
        if self.device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(self.device) / 2**20)
        return peak


def build_config(args: argparse.Namespace, steps: int):
    """Paratron's Config, by Megatron's setting names, from the example's flags."""
    return config_from_dict(dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        # The vocabulary is padded only up to a multiple of TP, so every layout whose TP
        # divides --vocab-size builds the same model.
        vocab_size=args.vocab_size, make_vocab_size_divisible_by=1,
        seq_length=args.seq_length,
        max_position_embeddings=args.seq_length, position_embedding_type="rope",
        normalization="RMSNorm", swiglu=args.ffn_hidden_size is None,
        add_bias_linear=False, untie_embeddings_and_output_weights=True,
        attention_dropout=0.0, hidden_dropout=0.0,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.batch_size,
        train_iters=steps, lr=args.lr, min_lr=args.lr / 10, lr_decay_style="cosine",
        lr_warmup_iters=min(args.warmup_steps, steps), clip_grad=args.gradient_clip_val,
        weight_decay=0.1, adam_beta2=0.95, seed=args.seed, eval_iters=0,
        fp16=args.fp16, bf16=args.bf16, device=args.device, num_workers=0,
        dataloader_type="cyclic",
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        world_size=args.world_size, init_method=args.init_method))


def train(args: argparse.Namespace) -> dict:
    steps = min(args.train_steps, math.ceil(args.epochs * args.dataset_size / args.batch_size))
    cfg = build_config(args, steps)
    pg = setup_process_groups(cfg)
    say = print if pg.rank == 0 else (lambda *a, **k: None)
    dataset = ArithmeticSequences(args.dataset_size, args.seq_length, args.vocab_size, args.seed)
    trainer = Trainer(cfg, (dataset, None, None), log=say, pg=pg)
    params = sum(p.numel() for m in trainer.models for p in m.module.parameters())
    say(f"world {pg.world_size} = TP {pg.tp.size} x PP {pg.pp.size} x DP {pg.dp.size}; "
        f"{params:,} parameters on rank 0; {steps} steps of {args.batch_size} samples; "
        f"device {trainer.device}")
    monitor = (MemoryMonitor(trainer.device, args.memory_monitor_interval).start()
               if args.monitor_memory_continuously else None)
    tokens_per_step = args.batch_size * args.seq_length
    step_times, losses = [], []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        loss, stepped, grad_norm, _ = trainer.train_step()
        trainer.state.iteration = step
        step_times.append(time.perf_counter() - tick)
        losses.append(loss)
        if step % args.log_interval == 0 or step == steps:
            line = (f"step {step:5d}/{steps} | loss {loss:.4f} | "
                    f"grad norm {grad_norm if grad_norm is not None else float('nan'):.3f} | "
                    f"{step_times[-1] * 1000:.1f} ms | "
                    f"{tokens_per_step / step_times[-1]:.0f} tokens/s"
                    + ("" if stepped else " | skipped (loss scale)"))
            if monitor:
                line += f" | memory {monitor.current_mib():.0f} MiB (peak {monitor.peak_mib:.0f})"
            say(line)
    total = time.perf_counter() - started
    if monitor:
        monitor.stop()
    steady = step_times[1:] or step_times  # the first step includes warm-up work
    summary = {
        "world_size": pg.world_size, "tensor_model_parallel_size": pg.tp.size,
        "pipeline_model_parallel_size": pg.pp.size, "data_parallel_size": pg.dp.size,
        "parameters_rank0": params, "steps": steps, "batch_size": args.batch_size,
        "seq_length": args.seq_length, "total_seconds": total,
        "mean_step_seconds": sum(steady) / len(steady),
        "tokens_per_second": tokens_per_step * len(steady) / sum(steady),
        "first_loss": losses[0], "last_loss": losses[-1],
        "peak_memory_mib": monitor.peak_mib if monitor else None,
        "memory_samples": len(monitor.samples) if monitor else 0,
        "device": str(trainer.device),
    }
    say(f"done: {steps} steps in {total:.1f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"{summary['tokens_per_second']:.0f} tokens/s")
    if args.save_performance_summary and pg.rank == 0:
        with open(args.save_performance_summary, "w") as fh:
            json.dump(summary, fh, indent=2)
        say(f"performance summary written to {args.save_performance_summary}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
        leave_distributed()
    except (ConfigError, PeerFailure) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
