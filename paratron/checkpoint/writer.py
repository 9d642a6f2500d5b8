"""Write a checkpoint one group of logical tensors at a time, from one process.

A converter has no live model: it produces logical tensors a layer at a time and must
never hold the whole model. This writer puts each group into its own safetensors file and
then writes the same `metadata.json` and `latest_checkpointed_iteration.txt` as
`save_checkpoint`, so any layout loads the result.

    writer = LogicalCheckpointWriter(save_dir, iteration=0)
    for group in groups:
        writer.add({"model/embedding.word_embeddings.weight": tensor, ...})
    writer.finish(config=cfg.to_dict())
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from paratron.checkpoint import files

# Who wrote the checkpoint: one process, no parallel layout (RNG states are not saved,
# so no later run compares its layout against this one).
CONVERTER_LAYOUT = {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "etp": 1,
                    "virtual_stages": 1, "distributed_optimizer": False}


class LogicalCheckpointWriter:
    """`<save_dir>/iter_<7-digit iteration>/`, written group by group."""

    def __init__(self, save_dir: str | os.PathLike, iteration: int = 0):
        self.save_dir, self.iteration = Path(save_dir), iteration
        self.tmp = files.prepare_tmp_dir(save_dir, iteration)
        self.written: dict[str, dict] = {}
        self.index: dict[str, dict] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write one group of logical tensors (`model/<name>`, `buffer/<name>`, ...) as
        a file of its own."""
        if not tensors:
            return
        name = f"model_part_{len(self.written):05d}.safetensors"
        path = self.tmp / name
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
        files.follow_umask(path)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        self.written[name] = {"size": path.stat().st_size, "sha256": files.file_digest(path)}
        for key, t in tensors.items():
            if key in self.index:
                raise ValueError(f"logical tensor {key} written twice")
            self.index[key] = {"shape": list(t.shape),
                               "dtype": str(t.dtype).removeprefix("torch."),
                               "chunks": [{"file": name, "key": key, "offsets": [0] * t.dim()}]}

    def finish(self, *, config: dict, train_state: dict | None = None,
               optimizer: dict | None = None) -> Path:
        """Write metadata.json, rename the directory into place, point `latest` at it.
        `optimizer` is the metadata's optimizer entry when `optim/...` tensors were added."""
        meta = {"format_version": files.FORMAT_VERSION, "iteration": self.iteration,
                "config": config, "train_state": train_state or {},
                "layout": dict(CONVERTER_LAYOUT), "rng_saved": False, "optimizer": optimizer,
                "files": self.written, "tensors": self.index}
        return files.finalize(self.save_dir, self.iteration, meta)
