"""Checkpoint throughput: Paratron's save and load against torch.distributed.checkpoint.

Each configuration (model size x process count) starts gloo processes on this machine
that build the training state of a bf16 GPT with the distributed optimizer (fp32 main
weights and Adam moments as after a step), then time, on every rank:

  paratron save / load   `save_checkpoint` / `load_checkpoint` (sha256 of every file on
                         save; the load reshards, so it reads whole logical tensors)
  dcp save / load        `torch.distributed.checkpoint` of the same tensors: the bf16
                         weights under one key on every rank (DCP writes a replicated tensor
                         once) and this rank's fp32 optimizer segments under keys of their
                         own (`optim/<state>/<param>@<offset>`). The distributed optimizer's
                         segments are uneven flat ranges that a DTensor placement cannot
                         express, so DCP's plain per-rank state dict is the like-for-like
                         choice; it saves the same bytes with the same write pattern.

It reports seconds (slowest rank), GB/s (checkpoint bytes on disk / seconds), the bytes the
ranks put into collectives during the operation (summed over ranks; every torch.distributed
collective is wrapped and counts its tensor or pickled-object payload) and each rank's peak
resident memory during the operation (VmHWM, reset before it) above its resident memory
before it. The `--async-save` section trains a small model in one process and compares the
iteration time while a background save is being written with the iteration time without.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint.py --sizes 75M 300M --procs 4 8 \
        --dir /tmp/ckpt_bench
"""

from __future__ import annotations

import argparse
import inspect
import pickle
import shutil
import statistics
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from paratron.checkpoint import load_checkpoint, save_checkpoint
from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer

VOCAB = 32768
SIZES = {"75M": (20, 512), "300M": (22, 1024)}  # (layers, hidden): 80M and 310M parameters
# Each torch.distributed collective and the argument holding what this rank sends.
COLLECTIVES = {"all_reduce": "tensor", "all_gather": "tensor",
               "all_gather_into_tensor": "input_tensor", "reduce_scatter": "input_list",
               "reduce_scatter_tensor": "input", "broadcast": "tensor", "gather": "tensor",
               "scatter": "scatter_list", "all_to_all": "input_tensor_list",
               "all_to_all_single": "input", "all_gather_object": "obj",
               "gather_object": "obj", "broadcast_object_list": "object_list",
               "scatter_object_list": "scatter_object_input_list"}
ROOTED = ("broadcast", "scatter", "broadcast_object_list", "scatter_object_list")


class RandomTokens:
    """Token sequences that depend on the index only."""

    def __init__(self, seq_length: int):
        self.seq_length = seq_length

    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        tokens = np.random.default_rng(i).integers(0, VOCAB, self.seq_length + 1)
        return {"tokens": tokens[:-1], "labels": tokens[1:],
                "loss_mask": np.ones(self.seq_length, np.float32),
                "position_ids": np.arange(self.seq_length)}


def model_flags(layers: int, hidden: int, seq: int, world: int) -> list[str]:
    return (f"--num-layers {layers} --hidden-size {hidden} --num-attention-heads {hidden // 64} "
            f"--seq-length {seq} --max-position-embeddings {seq} --vocab-size {VOCAB} "
            f"--micro-batch-size 1 --global-batch-size {world} --train-iters 1000 --lr 1e-4 "
            f"--bf16 --device cpu --eval-iters 0 --eval-interval 100000 "
            f"--log-interval 100000").split()


# ------------------------------------------------------------------ measuring
def _payload(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_payload(v) for v in value)
    return 0


class CollectiveBytes:
    """Counts the payload this rank sends through torch.distributed's collectives: tensors
    by their size, objects by their pickled size (what the object collectives send); a
    broadcast or scatter counts on its source rank only."""

    def __init__(self):
        self.bytes = 0
        for name, sent in COLLECTIVES.items():
            setattr(dist, name, self._counted(getattr(dist, name), name, sent))

    def _counted(self, fn, name: str, sent: str):
        signature = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            source = bound.arguments.get("src", bound.arguments.get("group_src"))
            if name not in ROOTED or source in (None, dist.get_rank()):
                value = bound.arguments[sent]
                self.bytes += (len(pickle.dumps(value)) if "object" in name
                               else _payload(value))
            return fn(*args, **kwargs)
        return wrapper


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def measure(counter: CollectiveBytes, fn) -> dict:
    """Seconds (all ranks done), collective bytes and peak memory above the start."""
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
        fh.write("5")
    before_rss, before_bytes = _status_kib("VmRSS:"), counter.bytes
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return {"seconds": time.perf_counter() - start, "bytes": counter.bytes - before_bytes,
            "peak_gb": _status_kib("VmHWM:") / 2**20,
            "extra_gb": (_status_kib("VmHWM:") - before_rss) / 2**20}


def dcp_state(trainer) -> dict[str, torch.Tensor]:
    """The same tensors as Paratron's checkpoint, keyed for DCP (see the docstring)."""
    out = {}
    for chunk in trainer.models:
        for name, p in chunk.module.named_parameters():
            out[f"model/{chunk.module.global_name(name)}"] = p.data
    state = trainer.optimizer.optimizer.state
    for seg in trainer.optimizer.segments:
        name = next(n for c in trainer.models for n, p in c.module.named_parameters()
                    if p is seg.param)
        out[f"optim/main/{name}@{seg.offset}"] = seg.main
        for key, value in state[seg.main].items():
            if value.dim() > 0:
                out[f"optim/{key}/{name}@{seg.offset}"] = value
    return out


def build(size: str, world: int):
    """This rank's bf16 model and distributed optimizer with Adam moments as after a
    step, without the fp32 gradient buffers (saving never reads them). Ranks build one
    after the other, so only one holds the fp32 initial weights at a time and eight ranks
    of the large model fit in this machine's memory."""
    cfg = parse_args(model_flags(*SIZES[size], 16, world)
                     + ["--use-distributed-optimizer", "--world-size", str(world)])
    pg = ProcessGroups.build(1, 1)
    for turn in range(world):
        if turn == dist.get_rank():
            trainer = Trainer(cfg, (RandomTokens(16), None, None), pg=pg,
                              log=lambda line: None)
            for chunk in trainer.models:
                for p in chunk.module.parameters():
                    p.main_grad = None
                for buffer in chunk.buffers:
                    buffer.data = torch.empty(0)
            optimizer = trainer.optimizer
            for seg in optimizer.segments:
                seg.grad = None
                optimizer.optimizer.state[seg.main] = {
                    "step": torch.tensor(1.0), "exp_avg": torch.randn_like(seg.main) * 1e-3,
                    "exp_avg_sq": torch.rand_like(seg.main) * 1e-6}
            optimizer.steps = 1
        dist.barrier()
    return trainer


def worker(rank: int, world: int, port: int, size: str, root: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=30))
    trainer = build(size, world)
    counter = CollectiveBytes()
    root = Path(root)
    models, pg, opt = trainer.models, trainer.pg, trainer.optimizer
    result = {
        "paratron save": measure(counter, lambda: save_checkpoint(
            root / "paratron", 1, models, pg, opt, config=None, train_state={"iteration": 1})),
        "paratron load": measure(counter, lambda: load_checkpoint(
            root / "paratron" / "iter_0000001", models, pg, opt, load_rng=False)),
    }
    state = dcp_state(trainer)
    result["dcp save"] = measure(counter, lambda: dcp.save(state, checkpoint_id=root / "dcp"))
    result["dcp load"] = measure(counter, lambda: dcp.load(state, checkpoint_id=root / "dcp"))
    if rank == 0:
        result["disk"] = {kind: sum(f.stat().st_size for f in (root / kind).rglob("*")
                                    if f.is_file()) for kind in ("paratron", "dcp")}
        result["params"] = sum(p.numel() for c in models for p in c.module.parameters())
    queue.put((rank, result))
    dist.barrier()
    dist.destroy_process_group()


def run_config(size: str, world: int, root: Path, port: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    root.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=worker, args=(r, world, port, size, str(root), queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(root)
    return results


def report(size: str, world: int, results: dict) -> None:
    disk, params = results[0]["disk"], results[0]["params"]
    print(f"\n## {size} ({params / 1e6:.0f}M parameters), {world} processes")
    print("| operation | seconds | GB/s | collective bytes (all ranks) | peak RSS / rank (GB) "
          "| above start / rank (GB) |")
    print("|---|---|---|---|---|---|")
    for op in ("paratron save", "paratron load", "dcp save", "dcp load"):
        rows = [results[r][op] for r in sorted(results)]
        seconds = max(r["seconds"] for r in rows)
        gb = disk[op.split()[0]] / 1e9
        print(f"| {op} | {seconds:.2f} | {gb / seconds:.2f} | "
              f"{sum(r['bytes'] for r in rows) / 1e6:.1f} MB | "
              f"{max(r['peak_gb'] for r in rows):.2f} | {max(r['extra_gb'] for r in rows):.2f} |")
    print(f"checkpoint on disk: paratron {disk['paratron'] / 1e9:.2f} GB, "
          f"dcp {disk['dcp'] / 1e9:.2f} GB")


# ------------------------------------------------------------------ async save
def async_section(root: Path, iters: int, interval: int) -> None:
    """Iteration times of a small model trained in one process, saving every `interval`
    iterations with --async-save: those while a save is written against the others."""
    cfg = parse_args(model_flags(8, 512, 64, 1)
                     + ["--save", str(root / "async"), "--async-save"])
    trainer = Trainer(cfg, (RandomTokens(64), None, None), log=lambda line: None)
    checkpoints = trainer.checkpoints
    during, normal, blocked = [], [], []
    for it in range(1, iters + 1):
        writing = checkpoints.pending is not None and checkpoints.pending.writing()
        start = time.perf_counter()
        trainer.train_step()
        (during if writing else normal).append(time.perf_counter() - start)
        trainer.state.iteration = it
        if it % interval == 0:
            start = time.perf_counter()
            checkpoints.save()
            blocked.append(time.perf_counter() - start)
    checkpoints.wait()
    shutil.rmtree(root / "async")
    if not during:
        print(f"\n## --async-save: every save finished within its iteration; "
              f"{statistics.mean(normal[1:]):.3f} s per iteration")
        return
    mean_normal, mean_during = statistics.mean(normal[1:]), statistics.mean(during)
    print(f"\n## --async-save: {iters} iterations, a save every {interval}")
    print(f"iteration time: {mean_normal:.3f} s without a save being written "
          f"({len(normal) - 1} iterations), {mean_during:.3f} s while one is written "
          f"({len(during)}): {100 * (mean_during / mean_normal - 1):+.1f} %")
    print(f"save() call (waits for the previous save, then snapshots): "
          f"{statistics.mean(blocked):.3f} s mean, {max(blocked):.3f} s max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--procs", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckpt_bench"))
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--async-iters", type=int, default=40)
    parser.add_argument("--async-interval", type=int, default=10)
    args = parser.parse_args()
    for size in args.sizes:
        for world in args.procs:
            report(size, world, run_config(size, world, args.dir / f"{size}_{world}",
                                           args.port))
    if args.async_iters:
        async_section(args.dir, args.async_iters, args.async_interval)


if __name__ == "__main__":
    main()
