"""Save and load a sharded checkpoint; any layout loads any other.

    path = save_checkpoint(save_dir, iteration, models, pg, optimizer,
                           config=cfg.to_dict(), train_state={...})
    found = find_latest_valid(save_dir)          # (iteration, path) or None
    meta = load_checkpoint(found[1], models, pg, optimizer)

Every rank calls both (they use collectives) with its model chunks and its
`MixedPrecisionOptimizer` (None skips optimizer state). Each rank writes
`model_optim_rank_NNNNN.safetensors` (blocks of the logical tensors `state.py` names,
whole or a share of each) and `rng_rank_NNNNN.safetensors`; `metadata.json` holds the
config, the layout that wrote it, the train state, optimizer scalars, an index of every
tensor (shape, dtype, and the file, key, offsets and shape of each of its chunks) and
every file's size and SHA-256. Loading reads with `safetensors` only: nothing is
unpickled.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from paratron.checkpoint import files, rng
from paratron.checkpoint.untrusted import inside, regular_file
from paratron.checkpoint.state import (Chunk, collect_chunks, distributed, load_model,
                                       load_optimizer, optimizer_state_keys,
                                       optimizer_step_count)

WRITER_NICENESS = 10  # added to the background writer thread's niceness


def layout_of(models, pg) -> dict:
    """The process layout a checkpoint was written from (RNG states depend on it)."""
    return {"world_size": pg.world_size, "tp": pg.tp.size, "pp": pg.pp.size,
            "dp": pg.dp.size, "cp": pg.cp.size, "ep": pg.ep.size, "etp": pg.etp.size,
            "virtual_stages": len(models),
            "distributed_optimizer": any(getattr(m, "sharded", False) for m in models)}


def _barrier() -> None:
    if distributed():
        dist.barrier()


def _all_gather_object(obj) -> list:
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict | None = None) -> dict:
    """Write one safetensors file, synced; returns its size and checksum."""
    save_file(tensors, str(path), metadata=header)
    files.follow_umask(path)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "sha256": files.file_digest(path)}


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, models, pg,
                    optimizer=None, *, config: dict | None = None,
                    train_state: dict | None = None, save_rng: bool = True,
                    device: torch.device | str = "cpu", background: bool = False):
    """Write `<save_dir>/iter_<7-digit iteration>/` crash-safely and point `latest` at it.

    Collective: every rank calls it. Returns the checkpoint directory. With
    `background`, the tensors are copied to host memory now and written by a thread;
    the call returns a `PendingSave` whose `finish()` (collective, called later by every
    rank) waits for the files and completes the checkpoint."""
    rank = dist.get_rank() if distributed() else 0
    prepared = None
    if rank == 0:
        try:
            files.prepare_tmp_dir(save_dir, iteration)
        except (OSError, ValueError) as error:
            prepared = _reason(error)
    failed = next((f for f in _all_gather_object(prepared) if f), None)
    if failed:
        raise files.CheckpointError(f"saving checkpoint {iteration} to {save_dir} failed: "
                                    f"{failed}")
    for model in models:  # distributed optimizer: updated weights must have arrived
        if hasattr(model, "finish_param_gather"):
            model.finish_param_gather()
    # With `background` the live weights change at the next step: write a snapshot.
    chunks = collect_chunks(models, pg, optimizer, snapshot=background)
    rng_state = rng.capture(pg, device) if save_rng else None
    meta = {"format_version": files.FORMAT_VERSION, "iteration": iteration,
            "config": config, "train_state": train_state or {},
            "layout": layout_of(models, pg), "rng_saved": save_rng, "optimizer": None}
    if optimizer is not None:
        meta["optimizer"] = {
            "kind": type(optimizer.optimizer).__name__,
            "steps": optimizer.steps,
            "step_count": optimizer_step_count(optimizer),
            "state_keys": optimizer_state_keys(optimizer),
            "loss_scaler": optimizer.loss_scaler.state_dict()}
    pending = PendingSave(save_dir, iteration, rank, meta)
    if background:
        pending.start(chunks, rng_state)
        return pending
    pending.run(chunks, rng_state)
    return pending.finish()


def _reason(error: BaseException) -> str:
    """One line for an error met while writing: the path and the system's reason."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}".lstrip(": ")
    return str(error).replace("\n", " ")


class PendingSave:
    """One rank's part of a checkpoint being written, and the collective finish."""

    def __init__(self, save_dir, iteration: int, rank: int, meta: dict):
        self.save_dir, self.iteration, self.rank, self.meta = save_dir, iteration, rank, meta
        self.tmp = files.temporary_dir(save_dir, iteration)
        self.written: dict[str, dict] = {}
        self.index: dict[str, dict] = {}
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def write(self, chunks: list[Chunk], rng_state) -> None:
        """Write this rank's files into the temporary directory."""
        if chunks:
            name = f"model_optim_rank_{self.rank:05d}.safetensors"
            self.written[name] = _write(self.tmp / name, {c.key: c.tensor for c in chunks})
            for c in chunks:
                entry = self.index.setdefault(c.name, {
                    "shape": c.shape, "dtype": str(c.tensor.dtype).removeprefix("torch."),
                    "chunks": []})
                entry["chunks"].append({"file": name, "key": c.key, "offsets": c.offsets,
                                        "shape": list(c.tensor.shape)})
        if rng_state is not None:
            name = f"rng_rank_{self.rank:05d}.safetensors"
            self.written[name] = _write(self.tmp / name, *rng_state)

    def run(self, chunks, rng_state) -> None:
        """`write`, keeping an error for `finish` to report on every rank together."""
        try:
            self.write(chunks, rng_state)
        except Exception as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def start(self, chunks, rng_state) -> None:
        self._thread = threading.Thread(target=self._run_behind_training,
                                        args=(chunks, rng_state), name="paratron-async-save",
                                        daemon=True)
        self._thread.start()

    def _run_behind_training(self, chunks, rng_state) -> None:
        """`run` at a lower CPU priority (this thread only; Linux nices threads one by
        one), so that serialising, syncing and hashing take the cores training leaves
        idle instead of slowing its steps when the host has none to spare."""
        if sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
            except OSError:
                pass  # not allowed here: write at the training thread's priority
        self.run(chunks, rng_state)

    def writing(self) -> bool:
        """Whether the background thread is still writing this rank's files."""
        return self._thread is not None and self._thread.is_alive()

    def finish(self) -> Path:
        """Wait for this rank's files, gather every rank's list, and (rank 0) write the
        metadata, rename the directory and update `latest`. Collective."""
        if self._thread is not None:
            self._thread.join()
        mine = None if self.error is None else f"rank {self.rank}: {_reason(self.error)}"
        failed = [f for f in _all_gather_object(mine) if f]
        if not failed:
            everything = _all_gather_object((self.written, self.index))
            if self.rank == 0:
                try:
                    self._finalize(everything)
                except (OSError, ValueError) as error:
                    failed = [f"rank 0: {_reason(error)}"]
            # rank 0's outcome reaches every rank (and no rank leaves before it is known)
            failed = [f for f in _all_gather_object(failed[0] if failed else None) if f]
        if failed:
            if self.rank == 0:  # nothing of a failed save is left behind
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise files.CheckpointError(f"saving checkpoint {self.iteration} to "
                                        f"{self.save_dir} failed: {failed[0]}")
        return files.checkpoint_dir(self.save_dir, self.iteration)

    def _finalize(self, everything: list) -> None:
        """Rank 0: merge every rank's file list and index into metadata.json and rename
        the directory into place."""
        all_files, all_index = {}, {}
        for written, index in everything:
            all_files.update(written)
            for key, entry in index.items():
                if key in all_index:
                    all_index[key]["chunks"] += entry["chunks"]
                else:
                    all_index[key] = entry
        files.finalize(self.save_dir, self.iteration,
                       {**self.meta, "files": all_files, "tensors": all_index})


class TensorReader:
    """Logical tensors of a checkpoint, read through safetensors (memory-mapped).

    Only files that `metadata.json` lists (with size and checksum, which
    `find_latest_valid` verified) are opened, each inside the checkpoint directory and
    with a header that agrees with the index on every tensor's dtype and shape."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.index, self.listed = path, meta["tensors"], meta["files"]
        self._open: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}  # each open file's tensor names

    def has(self, name: str) -> bool:
        return name in self.index

    def open_file(self, name: str):
        """The safetensors handle of listed file `name`, checked as the class says."""
        if name not in self._open:
            where = str(self.path / files.METADATA)
            if name not in self.listed:
                raise files.CheckpointError(f"{where}: {name!r} is not among the files it "
                                            f"lists with their checksums")
            file = regular_file(inside(self.path, name, where))
            if file.stat().st_size != self.listed[name]["size"]:
                raise files.CheckpointError(f"{file}: {file.stat().st_size} bytes, expected "
                                            f"{self.listed[name]['size']}")
            files.check_header(file, {})
            try:
                self._open[name] = safe_open(str(file), framework="pt")
                self._keys[name] = set(self._open[name].keys())
            except SafetensorError as error:
                raise files.CheckpointError(f"{file}: not a readable safetensors file "
                                            f"({error})") from None
        return self._open[name]

    def _entry(self, name: str) -> dict:
        entry = self.index.get(name)
        if entry is None:
            raise ValueError(f"{self.path}: no tensor {name} in the checkpoint "
                             f"(a checkpoint of another model?)")
        return entry

    def shape(self, name: str) -> list[int]:
        return self._entry(name)["shape"]

    def __call__(self, name: str) -> torch.Tensor:
        """Logical tensor `name`, put together from its chunks."""
        entry = self._entry(name)
        if len(entry["chunks"]) == 1:  # written whole: the memory-mapped tensor itself
            return self._chunk(entry, entry["chunks"][0])
        return self.flat(name, 0, math.prod(entry["shape"])).view(entry["shape"])

    def flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened logical tensor `name`, read from the
        chunks that hold them only (`files.check_metadata` made sure that the chunks are
        runs of elements covering each element once)."""
        entry = self._entry(name)
        parts = []
        for chunk in sorted(entry["chunks"], key=lambda c: files.chunk_span(entry, c)):
            begin, end = files.chunk_span(entry, chunk)
            if begin < stop and end > start:
                block = self._chunk(entry, chunk).reshape(-1)
                parts.append(block[max(start, begin) - begin:min(stop, end) - begin])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _chunk(self, entry: dict, chunk: dict) -> torch.Tensor:
        """One chunk of a tensor's index `entry`, checked against it."""
        handle = self.open_file(chunk["file"])
        where = self.path / chunk["file"]
        if chunk["key"] not in self._keys[chunk["file"]]:
            raise files.CheckpointError(f"{where}: lacks tensor {chunk['key']}, which "
                                        f"the index places there")
        t = handle.get_tensor(chunk["key"])
        shape = files.chunk_shape(entry, chunk)
        if list(t.shape) != shape or str(t.dtype) != f"torch.{entry['dtype']}":
            raise files.CheckpointError(
                f"{where}: {chunk['key']} is {str(t.dtype).removeprefix('torch.')} "
                f"{list(t.shape)}, the index says {entry['dtype']} {shape}")
        return t


def load_checkpoint(path: str | os.PathLike, models, pg, optimizer=None, *,
                    load_optim: bool = True, load_rng: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Load the checkpoint directory `path` into this rank's `models` (and `optimizer`).

    Weights and optimizer state are resharded to this layout. With `load_rng`, RNG
    states are restored last, as `load_rng_states` does; a caller that builds its data
    iterator after loading passes `load_rng=False` and calls `load_rng_states` after.
    Returns the metadata (iteration, train_state, config, ...) for the caller to apply.
    Collective only in that every rank reads; no communication."""
    path = Path(path)
    meta = files.read_metadata(path)
    read = TensorReader(path, meta)
    load_model(models, pg, read)
    opt_meta = meta.get("optimizer")
    if optimizer is not None and load_optim:
        if opt_meta is None:
            raise ValueError(f"{path}: the checkpoint holds no optimizer state "
                             f"(saved without it); load without the optimizer")
        kind = type(optimizer.optimizer).__name__
        if opt_meta["kind"] != kind:
            raise ValueError(f"{path}: optimizer state of {opt_meta['kind']}, this run uses "
                             f"{kind}")
        load_optimizer(models, pg, optimizer, read, opt_meta["state_keys"],
                       opt_meta["step_count"])
        optimizer.steps = opt_meta["steps"]
        for group in optimizer.optimizer.param_groups:
            group["lr"] = optimizer.schedule.lr_at(optimizer.steps)
        optimizer.loss_scaler.load_state_dict(opt_meta["loss_scaler"])
    if load_rng:
        load_rng_states(path, models, pg, log=log, meta=meta)
    return meta


def load_rng_states(path: str | os.PathLike, models, pg, *,
                    log: Callable[[str], None] = print, meta: dict | None = None) -> bool:
    """Restore this rank's RNG states from the checkpoint `path`, only when its layout
    equals this run's (else a warning through `log`). Returns whether they were restored.

    Call it last: anything that draws from the global generators after it (building a
    `DataLoader` iterator draws its base seed) shifts every later random number."""
    path = Path(path)
    meta = meta if meta is not None else files.read_metadata(path)
    if not meta.get("rng_saved"):
        log(f"WARNING: {path} holds no RNG states; random streams start from the seed")
        return False
    if meta["layout"] != layout_of(models, pg):
        log(f"WARNING: RNG states not restored: the checkpoint's layout "
            f"{meta['layout']} differs from this run's {layout_of(models, pg)}")
        return False
    rank = dist.get_rank() if distributed() else 0
    name = f"rng_rank_{rank:05d}.safetensors"
    reader = TensorReader(path, meta)
    fh = reader.open_file(name)
    rng.restore(pg, {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {},
                where=str(path / name))
    return True
