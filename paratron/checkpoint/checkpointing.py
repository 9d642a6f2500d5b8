"""Save and load a sharded checkpoint; any layout loads any other.

    path = save_checkpoint(save_dir, iteration, models, pg, optimizer,
                           config=cfg.to_dict(), train_state={...})
    found = find_latest_valid(save_dir)          # (iteration, path) or None
    meta = load_checkpoint(found[1], models, pg, optimizer)

`models` are the model chunks of this rank (`DataParallel` wrappers or `GPTModel`s),
`optimizer` the `MixedPrecisionOptimizer` (or None to skip optimizer state). Every rank
calls both functions (they use collectives). The files:

* `model_optim_rank_NNNNN.safetensors`: the logical tensors rank NNNNN wrote
  (`state.py` names them), each whole and unsharded;
* `rng_rank_NNNNN.safetensors`: rank NNNNN's RNG states (`rng.py`);
* `metadata.json`: format version, iteration, the run's config, the layout that wrote
  it, the train state, optimizer scalars (optimizer kind, successful steps, the torch
  optimizer's step counter, per-element state names, loss-scaler state), an index of
  every logical tensor (shape, dtype, chunks: file, key, offsets) and every file's size
  and SHA-256.

Loading reads with `safetensors` only (nothing is unpickled). The index format has room
for a tensor in several chunks at offsets; this writer stores each whole (offsets all
zero) and the reader accepts only that.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from paratron.checkpoint import files, rng
from paratron.checkpoint.state import (collect_tensors, distributed, load_model,
                                       load_optimizer, optimizer_state_keys,
                                       optimizer_step_count)


def layout_of(models, pg) -> dict:
    """The process layout a checkpoint was written from (RNG states depend on it)."""
    return {"world_size": pg.world_size, "tp": pg.tp_size, "pp": pg.pp_size,
            "dp": pg.dp_size, "cp": pg.cp_size, "ep": pg.ep_size, "etp": pg.etp_size,
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
    if rank == 0:
        files.prepare_tmp_dir(save_dir, iteration)
    _barrier()
    for model in models:  # distributed optimizer: updated weights must have arrived
        if hasattr(model, "finish_param_gather"):
            model.finish_param_gather()
    tensors = collect_tensors(models, pg, optimizer)
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
    if background:  # the live weights change at the next step: write a snapshot
        tensors = {k: v.clone() for k, v in tensors.items()}
        pending.start(tensors, rng_state)
        return pending
    pending.write(tensors, rng_state)
    return pending.finish()


class PendingSave:
    """One rank's part of a checkpoint being written, and the collective finish."""

    def __init__(self, save_dir, iteration: int, rank: int, meta: dict):
        self.save_dir, self.iteration, self.rank, self.meta = save_dir, iteration, rank, meta
        self.tmp = files.temporary_dir(save_dir, iteration)
        self.written: dict[str, dict] = {}
        self.index: dict[str, dict] = {}
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def write(self, tensors: dict[str, torch.Tensor], rng_state) -> None:
        """Write this rank's files into the temporary directory."""
        if tensors:
            name = f"model_optim_rank_{self.rank:05d}.safetensors"
            self.written[name] = _write(self.tmp / name, tensors)
            for key, t in tensors.items():
                self.index[key] = {"shape": list(t.shape),
                                   "dtype": str(t.dtype).removeprefix("torch."),
                                   "chunks": [{"file": name, "key": key,
                                               "offsets": [0] * t.dim()}]}
        if rng_state is not None:
            name = f"rng_rank_{self.rank:05d}.safetensors"
            self.written[name] = _write(self.tmp / name, *rng_state)

    def start(self, tensors, rng_state) -> None:
        def run():
            try:
                self.write(tensors, rng_state)
            except BaseException as error:  # noqa: BLE001 - reported by finish()
                self.error = error
        self._thread = threading.Thread(target=run, name="paratron-async-save", daemon=True)
        self._thread.start()

    def finish(self) -> Path:
        """Wait for this rank's files, gather every rank's list, and (rank 0) write the
        metadata, rename the directory and update `latest`. Collective."""
        if self._thread is not None:
            self._thread.join()
        failed = _all_gather_object(None if self.error is None else
                                    f"rank {self.rank}: {self.error}")
        if any(failed):
            raise RuntimeError(f"saving checkpoint {self.iteration} to {self.save_dir} "
                               f"failed: {next(f for f in failed if f)}")
        everything = _all_gather_object((self.written, self.index))
        if self.rank == 0:
            all_files, all_index = {}, {}
            for w, i in everything:
                all_files.update(w)
                for key, entry in i.items():
                    if key in all_index:
                        all_index[key]["chunks"] += entry["chunks"]
                    else:
                        all_index[key] = entry
            files.finalize(self.save_dir, self.iteration,
                           {**self.meta, "files": all_files, "tensors": all_index})
        _barrier()
        return files.checkpoint_dir(self.save_dir, self.iteration)


class TensorReader:
    """Logical tensors of a checkpoint, read through safetensors (memory-mapped)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.index = path, meta["tensors"]
        self._open: dict[str, object] = {}

    def has(self, name: str) -> bool:
        return name in self.index

    def _file(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(str(self.path / name), framework="pt")
        return self._open[name]

    def __call__(self, name: str) -> torch.Tensor:
        entry = self.index.get(name)
        if entry is None:
            raise ValueError(f"{self.path}: no tensor {name} in the checkpoint "
                             f"(a checkpoint of another model?)")
        chunks = entry["chunks"]
        if len(chunks) != 1 or any(chunks[0]["offsets"]):
            raise ValueError(f"{self.path}: {name} is stored in {len(chunks)} chunks; this "
                             f"reader takes whole tensors only")
        t = self._file(chunks[0]["file"]).get_tensor(chunks[0]["key"])
        if list(t.shape) != entry["shape"]:
            raise ValueError(f"{self.path / chunks[0]['file']}: {name} has shape "
                             f"{list(t.shape)}, the index says {entry['shape']}")
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
        load_optimizer(models, pg, optimizer, read, read.has, opt_meta["state_keys"],
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
    file = path / f"rng_rank_{rank:05d}.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        header = fh.metadata()
    rng.restore(pg, tensors, header)
    return True
