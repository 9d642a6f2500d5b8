"""One run of a parity check: the processes of a layout (gloo on the CPU, started here,
no launcher needed), each training a few iterations with a `Recorder` attached, and what
each rank recorded, handed back to the parent as NumPy arrays.

A rank records its module outputs and input gradients per micro-batch, its parameters'
gradients once the step's reductions are done (the tied embedding summed over stages,
DP and TP reductions; with the distributed optimizer the reduced shards all-gathered
over DP, since each rank holds only its own) and its updated weights. Everything stays
in this rank's shards; `paratron.debug.compare` puts them together.

Tests break one thing at a time through `PARATRON_PARITY_FAULT=module:function`: the
function is imported and called in every process of a parallel layout (never in the
one-process reference) before the model is built, and may patch what it likes.
"""

from __future__ import annotations

import importlib
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paratron.checkpoint.files import CheckpointError
from paratron.config import Config, resolve_vocab_size
from paratron.data.errors import DataError
from paratron.debug.recorder import Key, Recorder, hooked_modules
from paratron.options import ConfigError
from paratron.parallel.comm import all_gather_into
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import ParamLayout, layout_of
from paratron.parallel.tensor_parallel import ColumnParallelLinear
from paratron.training.moe_logging import ExpertLoad, count_expert_load, layer_expert_load

FAULT_ENV = "PARATRON_PARITY_FAULT"
RANK_DIMENSIONS = ("tp", "cp", "dp", "pp", "ep", "etp")


class ParityError(Exception):
    """A run that could not be made: one line for the user."""


@dataclass
class RankRecords:
    """What one rank recorded, with what it takes to put the shards together: the rank's
    place in each dimension ((rank, size) by name), each parameter's layout by global
    name, and the weight layout of each column-parallel linear (its output is split like
    the weight's rows). `expert_load`: each MoE layer's global tokens per expert, by
    iteration (the same on every rank)."""

    place: dict[str, tuple[int, int]]
    records: dict[Key, np.ndarray]
    param_layouts: dict[str, ParamLayout]
    column_layouts: dict[str, ParamLayout]
    expert_load: dict[int, list[ExpertLoad]] = field(default_factory=dict)


def run_layout(cfg: Config, sizes: tuple, world_size: int, iterations: int,
               fault: str | None, what: str, timeout: float = 600.0) -> list[RankRecords]:
    """Train `iterations` iterations of `cfg` on `world_size` processes laid out as `sizes`
    (tp, pp, cp, ep, etp); one `RankRecords` per rank. `what` names the run in errors."""
    ctx = _context()
    store = None
    if world_size > 1:
        store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                              wait_for_workers=False, timeout=timedelta(seconds=timeout))
    conns, procs = [], []
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True, args=(
                rank, world_size, store.port if store else 0, timeout, child, cfg, sizes,
                iterations, fault))
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        return _collect(conns, procs, timeout, what)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for conn in conns:
            conn.close()


def _context():
    """Processes forked from a server that imported torch and the trainer once."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "paratron.training.trainer"])
        return ctx
    return mp.get_context("spawn")


def _collect(conns, procs, timeout: float, what: str) -> list[RankRecords]:
    """Every rank's records; the first rank to fail (or die) stops the run."""
    deadline = time.monotonic() + timeout
    results: dict[int, RankRecords] = {}
    pending = dict(enumerate(conns))
    while pending:
        ready = wait(list(pending.values()) + [procs[r].sentinel for r in pending],
                     timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            raise ParityError(f"{what}: ranks {sorted(pending)} did not finish within "
                              f"{timeout:g} s")
        for rank in list(pending):
            conn = pending[rank]
            message = None
            if conn.poll():
                try:
                    message = conn.recv()
                except EOFError:
                    pass
            elif procs[rank].sentinel not in ready:
                continue
            if message is None:
                procs[rank].join(1)
                raise ParityError(f"{what}: rank {rank} exited with code "
                                  f"{procs[rank].exitcode} without a result")
            status, payload = message
            if status != "ok":
                raise ParityError(f"{what}: {payload}" if status == "refused" else
                                  f"{what}: rank {rank} failed: {payload}")
            results[rank] = payload
            del pending[rank]
    for conn in conns:
        conn.send("exit")
    return [results[rank] for rank in range(len(conns))]


def _worker(rank: int, world_size: int, port: int, timeout: float, conn, cfg: Config,
            sizes: tuple, iterations: int, fault: str | None) -> None:
    try:
        torch.set_num_threads(1)
        if world_size > 1:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                  timeout=timedelta(seconds=timeout))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
            if fault:
                module, _, function = fault.partition(":")
                getattr(importlib.import_module(module), function)()
        pg = ProcessGroups.build(*sizes)
        conn.send(("ok", _record(cfg, pg, iterations)))
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        conn.send(("refused", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent in one line
        last = traceback.format_exc().strip().splitlines()[-1]
        conn.send(("error", f"{type(exc).__name__}: {exc}" if str(exc) else last))
    try:  # stay until every rank is done: a peer may still be in a collective with us
        conn.recv()
    except EOFError:
        pass


def _record(cfg: Config, pg: ProcessGroups, iterations: int) -> RankRecords:
    """Build the run's trainer on this rank, train `iterations` iterations with a
    recorder attached, and return what it recorded."""
    from paratron.training.pretrain import build_datasets, build_tokenizer_for
    from paratron.training.trainer import Trainer

    tokenizer = build_tokenizer_for(cfg)
    if tokenizer is None:
        raise ConfigError("no tokenizer: give --tokenizer-type with its files (or, with "
                          "--mock-data, --vocab-size)")
    vocab = tokenizer.vocab_size
    cfg.model.padded_vocab_size = resolve_vocab_size(cfg, vocab)
    if pg.rank == 0:  # rank 0 builds (and caches) the sample indices, then the others
        datasets = build_datasets(cfg, tokenizer)
    if pg.world_size > 1:
        dist.barrier()
    if pg.rank != 0:
        datasets = build_datasets(cfg, tokenizer)
    trainer = Trainer(cfg, datasets, tokenizer_vocab_size=vocab, log=lambda line: None, pg=pg)
    chunks = [model.module for model in trainer.models]
    recorder = Recorder(chunks, pg.dp.rank, pg.dp.size)
    finish_gradients = trainer.stage.finish_gradients

    def finish_and_record() -> None:
        finish_gradients()
        recorder.record_parameters("grad", reduced_gradients(trainer.models))

    trainer.stage.finish_gradients = finish_and_record
    count_expert_load(trainer.models)
    expert_load = {}
    first = trainer.state.iteration + 1
    for iteration in range(first, first + iterations):
        recorder.start_iteration(iteration)
        trainer.train_step()
        trainer.state.iteration = iteration
        expert_load[iteration] = layer_expert_load(trainer.models, pg)
        for model in trainer.models:
            model.finish_param_gather()
        recorder.record_parameters("weight", {name: p for name, p, _ in _parameters(chunks)})
    recorder.close()
    trainer.release_save_folder()
    if pg.world_size > 1:
        dist.barrier()
    return RankRecords(
        place={name: (getattr(pg, name).rank, getattr(pg, name).size)
               for name in RANK_DIMENSIONS},
        records={key: t.float().cpu().numpy() for key, t in recorder.records.items()},
        param_layouts={name: layout_of(p) for name, p, _ in _parameters(chunks)},
        column_layouts={name: layout_of(module.weight) if module.weight is not None
                        else ParamLayout(dim=0)
                        for chunk in chunks for name, module in hooked_modules(chunk)
                        if isinstance(module, ColumnParallelLinear)},
        expert_load={i: load for i, load in expert_load.items() if load})


def _parameters(chunks):
    """(global name, parameter, chunk) of the chunks' parameters; the last stage's copy
    of a tied embedding is left out (the first stage's is the one saved)."""
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if layout_of(p).tied != "copy":
                yield chunk.global_name(name), p, chunk


@torch.no_grad()
def reduced_gradients(models) -> dict[str, torch.Tensor]:
    """Each parameter's gradient after the step's reductions, by global name. With the
    distributed optimizer each DP rank holds only its reduced shard of every bucket, so
    the shards are all-gathered into a copy of the buffer first."""
    full: dict[int, torch.Tensor] = {}
    for model in models:
        for buffer in model.buffers:
            data = buffer.data
            if model.sharded and buffer.dp_size > 1:
                data = data.clone()
                for bucket in buffer.buckets:
                    mine = data[bucket.shard_start:bucket.shard_start + bucket.shard_size]
                    all_gather_into(data[bucket.offset:bucket.offset + bucket.numel],
                                    mine.clone(), buffer.group)
            for p in set(bucket_param for b in buffer.buckets for bucket_param in b.params):
                start = buffer.offsets[id(p)]
                full[id(p)] = data[start:start + p.numel()].view_as(p)
    return {name: full[id(p)] for name, p, _ in _parameters([m.module for m in models])
            if id(p) in full}
