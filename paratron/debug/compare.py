"""Putting a layout's shards back into global tensors and comparing them with the
one-process run's.

Parameters (gradients, weights) are put together from their layouts, as checkpoints do:
`gather_tensor` over TP, `expert_gather` over EP x expert-TP. Activations carry no
layout, so their splits are read off the shapes against the reference's: a leading
sequence dimension (dimension 0, or 1 for batch-first tensors) held 1/CP (the
load-balanced chunks r and 2CP-1-r) or, under sequence parallelism, 1/(CP x TP), and
any other dimension held 1/TP (a column-parallel linear's output features follow its
weight's rows, fused gate/up and key/value layouts included). A module whose output is
batch-first at one process and sequence-first here (the vocab-parallel embedding's
reduce-scatter under sequence parallelism) is compared with its dimensions 0 and 1
swapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paratron.debug.recorder import DIRECTION, PHASES, Key
from paratron.debug.workers import RankRecords
from paratron.parallel.expert_parallel import expert_gather
from paratron.parallel.sharding import ParamLayout, gather_tensor

# Summation order differs between layouts; Adam turns that noise in near-zero gradients
# into somewhat larger noise in the update.
DEFAULT_TOLERANCE = {"fp64": 1e-10, "fp32": 5e-5, "bf16": 2e-2, "fp16": 5e-3}


@dataclass
class Difference:
    """How far one recorded tensor of a layout is from the reference: the largest
    |layout - reference| over the largest |reference| (inf when the layout did not record
    it or it cannot be put together in the reference's shape)."""

    key: Key
    relative: float
    problem: str | None = None  # why `relative` is inf

    def describe(self) -> str:
        k = self.key
        what = {"output": "output", "input_grad": "input gradient"}.get(
            k.what, f"{k.what} {'gradient' if k.phase == 'grad' else 'after the update'}")
        micro = f", micro-batch {k.micro}" if k.micro >= 0 else ""
        size = self.problem or f"relative difference {self.relative:.2e}"
        return (f"{k.module} ({DIRECTION[k.phase]}: {what}), iteration {k.iteration}{micro}: "
                f"{size}")


def differences(reference: dict[Key, np.ndarray], ranks: list[RankRecords]
                ) -> list[Difference]:
    """Every reference record's difference from the layout's, in the order an iteration
    produces them: iteration, then forward / backward / gradients / weights, then
    micro-batch, then the order the reference recorded them in."""
    shards = _by_key(ranks)
    params = {name: layout for rank in ranks for name, layout in rank.param_layouts.items()}
    columns = {name: layout for rank in ranks for name, layout in rank.column_layouts.items()}
    tp, cp = ranks[0].place["tp"][1], ranks[0].place["cp"][1]
    order = {key: i for i, key in enumerate(reference)}
    keys = sorted(reference, key=lambda k: (k.iteration, PHASES.index(k.phase), k.micro,
                                            order[k]))
    out = []
    for key in keys:
        if key not in shards:
            out.append(Difference(key, np.inf, "not recorded by the layout"))
            continue
        if key.phase in ("grad", "weight"):
            copies = _parameter(shards[key], params[f"{key.module}.{key.what}"])
        else:
            copies = _activation(shards[key], reference[key].shape, tp, cp,
                                 columns.get(key.module))
        if not copies or any(c.shape != reference[key].shape for c in copies):
            out.append(Difference(key, np.inf, "its shards do not make the reference's shape"))
            continue
        out.append(max((_difference(key, c, reference[key]) for c in copies),
                       key=lambda d: d.relative))
    return out


def _difference(key: Key, value: np.ndarray, reference: np.ndarray) -> Difference:
    scale = float(np.abs(reference).max(initial=0.0))
    error = float(np.abs(value.astype(np.float64) - reference).max(initial=0.0))
    if not np.isfinite(error):
        return Difference(key, np.inf, "not finite (here or in the reference)")
    return Difference(key, error / scale if scale > 0 else error)


def _by_key(ranks: list[RankRecords]) -> dict[Key, list[tuple[dict, np.ndarray]]]:
    out: dict[Key, list] = {}
    for rank in ranks:
        for key, value in rank.records.items():
            out.setdefault(key, []).append((rank.place, value))
    return out


def _tensor(array: np.ndarray, layout: ParamLayout) -> torch.Tensor:
    """A shard as a tensor carrying `layout`, as the sharding helpers read it."""
    tensor = torch.from_numpy(array)
    tensor.param_layout = layout
    return tensor


def _parameter(shards, layout: ParamLayout) -> list[np.ndarray]:
    """A parameter put together once from each set of copies of its shards: the copies
    other DP ranks (and, when it is replicated, other TP ranks) hold must agree too."""
    copies: dict = {}
    for place, value in shards:
        copies.setdefault(_shard_of(place, layout), []).append(_tensor(value, layout))
    out = []
    for i in range(min(len(c) for c in copies.values())):
        pick = {where: c[i] for where, c in copies.items()}
        if layout.expert:
            ep, etp = (1 + max(where[d] for where in pick) for d in (0, 1))
            grid = [[pick[e, t] for t in range(etp)] for e in range(ep)]
            out.append(expert_gather(grid, grid[0][0]).numpy())
        else:
            parts = [pick[r] for r in sorted(pick)]
            out.append(gather_tensor(parts, parts[0]).numpy())
    return out


def _shard_of(place: dict, layout: ParamLayout):
    """Which shard of a parameter a rank holds: its (EP, expert-TP) ranks for experts,
    its TP rank for a TP-split weight, the one whole tensor otherwise."""
    if layout.expert:
        return place["ep"][0], place["etp"][0]
    return place["tp"][0] if layout.dim is not None else 0


def _activation(shards, shape: tuple, tp: int, cp: int,
                column: ParamLayout | None) -> list[np.ndarray]:
    """An activation put together from the TP x CP ranks that hold its micro-batch; once
    per TP rank when every TP rank holds it whole (the copies must agree). Empty when
    its shards do not make `shape`."""
    copies = _unsplit(shards, tuple(shape), tp, cp, column)
    if not copies and len(shape) > 1:  # sequence-first here, batch-first there
        swapped = (shape[1], shape[0], *shape[2:])
        copies = [np.swapaxes(c, 0, 1) for c in _unsplit(shards, swapped, tp, cp, column)]
    return copies


def _unsplit(shards, shape: tuple, tp: int, cp: int,
             column: ParamLayout | None) -> list[np.ndarray]:
    grid = {(place["tp"][0], place["cp"][0]): value for place, value in shards}
    local = next(iter(grid.values())).shape
    if len(local) != len(shape):
        return []
    ratios = [g // n if n and g % n == 0 else 0 for g, n in zip(shape, local)]
    seq = next((d for d in range(min(2, len(shape))) if ratios[d] != 1), None)
    split_by_tp = seq is not None and ratios[seq] == cp * tp and tp > 1
    if seq is not None and ratios[seq] not in (cp, cp * tp):
        return []
    tp_dims = [d for d in range(len(shape)) if d != seq and ratios[d] != 1]
    if any(ratios[d] != tp for d in tp_dims) or len(tp_dims) > 1 or (tp_dims and split_by_tp):
        return []
    if split_by_tp:
        per_cp = [[np.concatenate([grid[t, c] for t in range(tp)], axis=seq)
                   for c in range(cp)]]
    elif tp_dims:
        per_cp = [[_join_features([grid[t, c] for t in range(tp)], tp_dims[0], column)
                   for c in range(cp)]]
    else:  # whole on every TP rank
        per_cp = [[grid[t, c] for c in range(cp)] for t in range(tp)]
    return [parts[0] if cp == 1 or seq is None else _join_context_parallel(parts, seq)
            for parts in per_cp]


def _join_context_parallel(parts: list[np.ndarray], seq: int) -> np.ndarray:
    """The sequence from each CP rank's part: rank c holds chunks c and 2CP-1-c."""
    cp = len(parts)
    chunks = [None] * (2 * cp)
    for c, part in enumerate(parts):
        chunks[c], chunks[2 * cp - 1 - c] = np.split(part, 2, axis=seq)
    return np.concatenate(chunks, axis=seq)


def _join_features(parts: list[np.ndarray], dim: int, column: ParamLayout | None
                   ) -> np.ndarray:
    """TP shards of a feature dimension: a column-parallel output's last dimension is
    laid out like its weight's rows (dimension 0 there)."""
    if column is None or dim != parts[0].ndim - 1:
        return np.concatenate(parts, axis=dim)
    rows = [_tensor(np.ascontiguousarray(np.moveaxis(p, -1, 0)), column) for p in parts]
    return np.moveaxis(gather_tensor(rows, rows[0]).numpy(), 0, -1)
