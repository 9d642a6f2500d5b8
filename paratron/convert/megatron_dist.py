"""Megatron-Core's `torch_dist` checkpoints as Paratron logical tensors.

On disk (torch.distributed.checkpoint as Megatron-Core drives it):

    <load>/latest_checkpointed_iteration.txt
    <load>/iter_0001000/metadata.json    {"sharded_backend": "torch_dist", ...}
    <load>/iter_0001000/.metadata        pickled torch `Metadata`: every tensor's GLOBAL
                                         shape, its chunks and the byte range of each
    <load>/iter_0001000/__R_S.distcp     the chunks, each a `torch.save` blob
    <load>/iter_0001000/common.pt        `args`, `iteration`, `checkpoint_version`

The global tensors do not depend on the layout that saved them. Megatron-Core stacks a
layer's tensors along a leading dimension (`decoder.layers.mlp.linear_fc1.weight`
[layers, ...]), or, for models whose layers differ (`--moe-layer-freq`), names them per
layer (`decoder.layers.3.mlp...`); every expert implementation stores its weights as
SequentialMLP's, stacked (`...mlp.experts.experts.linear_fc1.weight` [layers, experts,
out, in]) or per expert (`...experts.experts.7.linear_fc1.weight`); a SwiGLU fc1 is
[gate; up] of the whole layer, or its two halves under `..._w` and `..._v`. Each
Paratron tensor is cut from those with one layer group read at a time, straight from
the byte ranges `.metadata` gives, every chunk checked against what `.metadata` says.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from pathlib import Path
from typing import Callable

import torch

from paratron.checkpoint.megatron_folder import megatron_format
from paratron.checkpoint.safe_pickle import load_pickle, load_torch
from paratron.checkpoint.untrusted import UntrustedFileError, inside, read_json
from paratron.convert.errors import ConversionError
from paratron.convert.hf_mapping import OUTPUT
from paratron.convert.megatron_args import config_from_args
from paratron.convert.megatron_legacy import (FUSED_NORMS, check_names, iteration_dir,
                                              load_required, read_megatron_checkpoint)
from paratron.convert.megatron_optimizer import carry_legacy_optimizer, carry_optimizer
from paratron.convert.streaming import ModelLayout, StreamedModel, model_layout

METADATA = ".metadata"
OPTIMIZER = "optimizer."
COMMON = "common.pt"
BACKEND_FILE = "metadata.json"
_LAYER = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.experts\.(?:(\d+)\.)?(linear_fc[12]\.(?:weight|bias))$")
_HALF = re.compile(r"^(.+\.(?:weight|bias))_([wv])$")
# Names of models Paratron does not build, and what they are.
_FOREIGN = (("encoder.", "an encoder-decoder (T5) or BERT model"),
            ("language_model.", "a legacy (non-Core) Megatron model"),
            ("lm_head.", "a BERT model"), ("binary_head.", "a BERT model"),
            ("vision_model.", "a multimodal model"), ("mtp.", "multi-token prediction layers"))
_MAMBA = re.compile(r"^decoder\.layers\.(?:\d+\.)?mixer\.")


def read_megatron(load_dir: str | Path, *, trust_pickle: bool, warn: Callable[[str], None],
                  optimizer: bool = False) -> StreamedModel:
    """A Megatron-LM checkpoint in either format (told apart by its files) as a stream of
    Paratron layer groups; with `optimizer`, the distributed optimizer's state and the
    run's progress come along where the checkpoint has them (megatron_optimizer.py)."""
    if Path(load_dir).is_dir() and megatron_format(load_dir) == "torch_dist":
        return read_torch_dist(load_dir, optimizer=optimizer)
    model = read_megatron_checkpoint(load_dir, trust_pickle=trust_pickle, warn=warn)
    if optimizer:
        carry_legacy_optimizer(model, Path(model.source))
    return model


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Where part of a Paratron tensor comes from: `fqn`'s global tensor indexed by
    `select` (leading indices) lands at `dest` of the Paratron tensor."""

    fqn: str
    select: tuple[int, ...]
    dest: tuple


def _is_iteration(folder: Path) -> bool:
    return (folder / METADATA).is_file() or (folder / BACKEND_FILE).is_file()


def _check_backend(folder: Path) -> None:
    path = folder / BACKEND_FILE
    if path.is_file():
        try:
            backend = read_json(path, max_bytes=1 << 16)
        except (UntrustedFileError, OSError) as exc:
            raise ConversionError(f"{path}: unreadable ({exc})") from None
        name = backend.get("sharded_backend") if isinstance(backend, dict) else None
        if name != "torch_dist":
            raise ConversionError(f"{path}: sharded_backend {name!r}; Paratron reads "
                                  f"torch_dist (re-save it with Megatron-LM's "
                                  f"--ckpt-convert-format torch_dist)")
    if not (folder / METADATA).is_file():
        raise ConversionError(f"{folder / METADATA}: missing; not a complete torch_dist "
                              f"checkpoint")


def _read_metadata(path: Path):
    """The unpickled `.metadata`, checked to have the shape torch's `Metadata` has."""
    try:
        metadata = load_pickle(path)
    except UntrustedFileError as exc:
        raise ConversionError(str(exc)) from None
    tensors = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(tensors, dict) or not isinstance(storage, dict):
        raise ConversionError(f"{path}: not torch.distributed.checkpoint metadata")
    return metadata


def _foreign(fqn: str) -> str | None:
    """What model a tensor name betrays when Paratron does not build it, else None."""
    if _MAMBA.match(fqn):
        return "a Mamba (hybrid) model"
    return next((what for prefix, what in _FOREIGN if fqn.startswith(prefix)), None)


def _places(fqn: str, size: torch.Size, chunks) -> list[tuple[str, _Piece]]:
    """(Paratron name, piece) for each Paratron tensor that `fqn` feeds."""
    half = _HALF.match(fqn)
    name = half.group(1) if half else fqn
    dest: tuple = ()
    match = _LAYER.match(name)
    if not match:
        return [(name, _Piece(fqn, (), ()))]
    layer, rest = match.groups()
    rest = FUSED_NORMS.get(rest, rest)
    stacked = layer is None
    leading = int(stacked)  # axes before the tensor's own: layers, then experts
    if (expert := _EXPERT.match(rest)):
        rest = "mlp.experts." + expert.group(2)
        if expert.group(1) is not None:
            dest = (int(expert.group(1)),)
        else:
            leading, dest = leading + 1, (slice(None),)
    if len(size) < leading + bool(half):
        raise ConversionError(f"{METADATA}: {fqn} has the shape {list(size)}, too few axes "
                              f"for its name")
    if half:  # the halves of [gate; up], each as long as the other
        rows = size[leading]
        start = 0 if half.group(2) == "w" else rows
        dest = (*dest, slice(start, start + rows))
    if not stacked:
        return [(f"decoder.layers.{layer}.{rest}", _Piece(fqn, (), dest))]
    layers = sorted({i for c in chunks for i in range(c.offsets[0], c.offsets[0] + c.sizes[0])})
    return [(f"decoder.layers.{i}.{rest}", _Piece(fqn, (i,), dest)) for i in layers]


def _ints(values) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int for v in values)


def _well_formed(fqn, meta) -> bool:
    """Whether an unpickled TensorStorageMetadata holds the types torch writes there."""
    chunks = getattr(meta, "chunks", None)
    return (isinstance(fqn, str) and _ints(getattr(meta, "size", None))
            and isinstance(getattr(getattr(meta, "properties", None), "dtype", None),
                           torch.dtype)
            and isinstance(chunks, list)
            and all(_ints(getattr(c, "offsets", None)) and _ints(getattr(c, "sizes", None))
                    for c in chunks))


class _Chunks:
    """Reads regions of `.metadata`'s global tensors from the `.distcp` byte ranges."""

    def __init__(self, folder: Path, metadata) -> None:
        self.folder = folder
        self.where = str(folder / METADATA)
        self.tensors = {}
        for fqn, meta in metadata.state_dict_metadata.items():
            if not hasattr(meta, "chunks"):
                continue  # BytesStorageMetadata: `_extra_state`, not a weight
            if not _well_formed(fqn, meta):
                raise ConversionError(f"{self.where}: the entry for {fqn!r} is malformed")
            size = tuple(meta.size)
            for chunk in meta.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                if len(offsets) != len(size) or len(sizes) != len(size) or any(
                        o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, size)):
                    raise ConversionError(f"{self.where}: {fqn} has a chunk at {list(offsets)} "
                                          f"of {list(sizes)} outside its shape {list(size)}")
            self.tensors[fqn] = meta
        self.storage = {}
        for index, info in metadata.storage_data.items():
            offset = getattr(index, "offset", None)
            self.storage[getattr(index, "fqn", None), tuple(offset) if _ints(offset) else None] \
                = info

    def read(self, fqn: str, select: tuple[int, ...]) -> torch.Tensor:
        """The global tensor `fqn` at the leading indices `select`, from every chunk that
        overlaps it; a region the chunks leave uncovered, or cover twice, is refused."""
        meta = self.tensors[fqn]
        shape = tuple(meta.size)[len(select):]
        out = torch.empty(shape, dtype=meta.properties.dtype)
        filled = torch.zeros(shape, dtype=torch.bool)
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if not all(o <= s < o + n for s, o, n in zip(select, offsets, sizes)):
                continue
            local = self._chunk(fqn, meta, offsets, sizes)
            local = local[tuple(s - o for s, o in zip(select, offsets))]
            region = tuple(slice(o, o + n) for o, n in
                           zip(offsets[len(select):], sizes[len(select):]))
            if filled[region].any():
                raise ConversionError(f"{self.where}: {fqn} has overlapping chunks at "
                                      f"{list(offsets)}")
            out[region] = local
            filled[region] = True
        if not filled.all():
            raise ConversionError(f"{self.where}: the chunks of {fqn} leave part of it "
                                  f"uncovered (at {list(select)}); an incomplete checkpoint")
        return out

    def load(self, info, fqn: str):
        """(the object at `info`'s byte range, read with no code run; its file), the range
        and the file checked: inside the folder, present, long enough."""
        try:
            path = inside(self.folder, getattr(info, "relative_path", None), self.where)
        except UntrustedFileError as exc:
            raise ConversionError(str(exc)) from None
        start, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(start, int) or not isinstance(length, int) or min(start, length) < 0:
            raise ConversionError(f"{self.where}: {fqn} has the byte range {start!r}, "
                                  f"{length!r}")
        if not path.is_file():
            raise ConversionError(f"{path}: missing (.metadata puts {fqn} in it)")
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(length)
        end = start + length
        if len(data) != length:
            raise ConversionError(f"{path}: truncated ({fqn} needs bytes {start}..{end}, the "
                                  f"file ends at {start + len(data)})")
        try:
            return load_torch(io.BytesIO(data)), path
        except UntrustedFileError as exc:
            raise ConversionError(f"{path}: {fqn} at bytes {start}..{end}: {exc}"
                                  ) from None

    def _chunk(self, fqn: str, meta, offsets: tuple, sizes: tuple) -> torch.Tensor:
        info = self.storage.get((fqn, offsets))
        if info is None:
            raise ConversionError(f"{self.where}: no storage entry for {fqn} at "
                                  f"{list(offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{self.where}: {fqn} is stored transformed "
                                  f"({info.transform_descriptors}); Paratron reads plain "
                                  f"chunks")
        tensor, path = self.load(info, fqn)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != meta.properties.dtype or \
                tuple(tensor.shape) != sizes:
            got = (f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                   else type(tensor).__name__)
            raise ConversionError(f"{path}: {fqn} at {list(offsets)} holds {got}, .metadata "
                                  f"says {meta.properties.dtype} {list(sizes)}")
        return tensor


def _pieces(chunks: _Chunks, layout: ModelLayout, tied: bool) -> dict[str, list[_Piece]]:
    """Every Paratron tensor's pieces, checked to fill it exactly."""
    found: dict[str, list[_Piece]] = {}
    for fqn, meta in chunks.tensors.items():
        if fqn.startswith(OPTIMIZER):
            continue  # the distributed optimizer's buffers: megatron_optimizer.py
        for name, piece in _places(fqn, meta.size, meta.chunks):
            if name == OUTPUT and tied:
                continue  # the output layer's copy of the tied embedding
            found.setdefault(name, []).append(piece)
    check_names(set(found), layout, chunks.where)
    for name, pieces in found.items():
        want = torch.empty(layout.shape(name), device="meta")
        covered = 0
        for piece in pieces:
            stored = tuple(chunks.tensors[piece.fqn].size)[len(piece.select):]
            try:
                target = tuple(want[piece.dest].shape)
            except IndexError:
                target = None
            if target != stored:
                part = "" if name == piece.fqn else f" for {name}"
                raise ConversionError(f"{chunks.where}: tensor {piece.fqn} has the shape "
                                      f"{list(stored)}{part}, the saved args imply "
                                      f"{list(layout.shape(name))}")
            covered += math.prod(stored)
        if covered != want.numel() or len({repr(p.dest) for p in pieces}) != len(pieces):
            raise ConversionError(f"{chunks.where}: the tensors stored for {name} do not "
                                  f"make up its shape {list(layout.shape(name))}")
    return found


def read_torch_dist(load_dir: str | Path, optimizer: bool = False) -> StreamedModel:
    """A Megatron-Core torch_dist checkpoint as a stream of Paratron layer groups."""
    load_dir = Path(load_dir)
    folder = load_dir if _is_iteration(load_dir) else iteration_dir(load_dir)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: missing (latest_checkpointed_iteration.txt names "
                              f"it)")
    _check_backend(folder)
    metadata = _read_metadata(folder / METADATA)
    common_path = folder / COMMON
    common = load_required(common_path, "cannot tell the model's shape")
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise ConversionError(f"{common_path}: holds no 'args'; cannot tell the model's "
                              f"shape")
    if getattr(args, "hybrid_override_pattern", None):
        raise ConversionError(f"{common_path}: a hybrid (Mamba) model "
                              f"(hybrid_override_pattern), which Paratron does not build")
    chunks = _Chunks(folder, metadata)
    for fqn in chunks.tensors:
        if (what := _foreign(fqn)):
            raise ConversionError(f"{chunks.where}: {fqn} belongs to {what}, which Paratron "
                                  f"does not build")
    config = config_from_args(args, common_path)
    layout = model_layout(config)
    pieces = _pieces(chunks, layout, tied=not config.untie_embeddings_and_output_weights)

    def assemble(name: str) -> torch.Tensor:
        parts = pieces[name]
        first = chunks.tensors[parts[0].fqn].properties.dtype
        full = torch.empty(layout.shape(name), dtype=first)
        for piece in parts:
            full[piece.dest] = chunks.read(piece.fqn, piece.select)
        return full

    def groups():
        for names in layout.groups:
            yield {layout.key(n): assemble(n) for n in names}

    model = StreamedModel(config=config, vocab_size=config.padded_vocab_size, groups=groups,
                          num_groups=len(layout.groups), source=str(folder))
    if optimizer and any(f.startswith(OPTIMIZER) for f in metadata.state_dict_metadata):
        carry_optimizer(model, args, common, folder, chunks=chunks)
    return model
