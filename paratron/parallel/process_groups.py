"""The process-group object: who this rank talks to for each kind of parallelism.

It is the one piece of shared state Paratron has. At world size 1 every size is 1 and
every collective in `paratron.parallel` is the identity, so one process runs the very
same code as a sharded run.

world = TP x CP x DP x PP, a global rank read as the digits (tp, cp, dp, pp) with TP
fastest, as Megatron-LM numbers ranks ("tp-cp-ep-dp-pp"): TP all-reduces run in every
layer and stay on a machine's fast links, while DP's one reduction per step and PP's sends
can cross machines. Expert layers read the same ranks as ETP x EP x EDP x PP (ETP
defaults to TP, EDP is what is left). A group over several dimensions (DP x CP, TP x PP)
lists its ranks in ascending order, so a rank's index there is its group rank.

Each dimension is one record, `pg.tp.size`, `pg.tp.rank`, `pg.tp.group` (likewise cp,
dp, dp_cp, pp, mp = TP x PP, ep, etp, edp), beside `pp_ranks` (this pipeline's global
ranks), the embedding group (first and last stage, which hold the tied embeddings) and
`rng`, the dropout streams (`paratron.parallel.random`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from paratron.parallel.random import RNGStatesTracker

ORDER = ("tp", "cp", "ep", "dp", "pp")


def check_layout(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1,
                 etp: int | None = None) -> tuple[int, int]:
    """(DP, expert DP) of this layout, or a one-line ValueError saying what to change.

    Pure arithmetic: call it before any process exists to refuse a bad layout early.
    """
    etp = tp if etp is None else etp
    for name, value in (("tensor-model-parallel-size", tp),
                        ("pipeline-model-parallel-size", pp),
                        ("context-parallel-size", cp), ("expert-model-parallel-size", ep),
                        ("expert-tensor-parallel-size", etp), ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    model = tp * cp * pp
    if world_size % model:
        raise ValueError(f"world size {world_size} is not divisible by TP {tp} x CP {cp} x "
                         f"PP {pp} = {model}; change the parallel sizes or the process count")
    expert = etp * ep * pp
    if world_size % expert:
        raise ValueError(f"world size {world_size} is not divisible by expert TP {etp} x EP "
                         f"{ep} x PP {pp} = {expert}; change --expert-model-parallel-size "
                         f"or --expert-tensor-parallel-size")
    return world_size // model, world_size // expert


def rank_groups(sizes: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """Every group spanning `dims` of a grid with these `sizes` laid out in ORDER.

    The ranks form an array indexed [pp, dp, ep, cp, tp] (TP fastest). Moving the
    spanned axes last and flattening the rest gives one row per group; within a row and
    across rows the earlier dimension of ORDER changes fastest, as in Megatron-LM.
    """
    axes = list(reversed(ORDER))
    grid = torch.arange(math.prod(sizes[d] for d in ORDER)).reshape([sizes[d] for d in axes])
    inside = [i for i, d in enumerate(axes) if d in dims]
    outside = [i for i, d in enumerate(axes) if d not in dims]
    group_size = math.prod(sizes[d] for d in dims)
    return grid.permute(outside + inside).reshape(-1, group_size).tolist()


def layout(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1,
           etp: int | None = None) -> dict[str, list[list[int]]]:
    """The global ranks of every group of every kind: exactly what `build` creates."""
    etp = tp if etp is None else etp
    dp, edp = check_layout(world_size, tp, pp, cp, ep, etp)
    dense = dict(tp=tp, cp=cp, ep=1, dp=dp, pp=pp)
    expert = dict(tp=etp, cp=1, ep=ep, dp=edp, pp=pp)
    pipelines = rank_groups(dense, ("pp",))
    return {
        "tp": rank_groups(dense, ("tp",)),
        "cp": rank_groups(dense, ("cp",)),
        "dp": rank_groups(dense, ("dp",)),
        # CP ranks hold the same weights and see different tokens: their gradients are
        # reduced together with DP's.
        "dp_cp": rank_groups(dense, ("cp", "dp")),
        "pp": pipelines,
        # Every shard of one model replica: where a global gradient norm is summed.
        "mp": rank_groups(dense, ("tp", "pp")),
        "embedding": [sorted({ranks[0], ranks[-1]}) for ranks in pipelines],
        "ep": rank_groups(expert, ("ep",)),
        "etp": rank_groups(expert, ("tp",)),
        "edp": rank_groups(expert, ("dp",)),
    }


@dataclass(frozen=True)
class Dimension:
    """One parallel dimension as this rank sees it: how many ranks share it, this rank's
    index among them, and their torch.distributed group (None at size 1 without
    torch.distributed; code that communicates checks `size` first, since `group=None`
    would mean the whole world to torch.distributed)."""

    size: int = 1
    rank: int = 0
    group: dist.ProcessGroup | None = field(default=None, compare=False)


DIMENSIONS = ("tp", "cp", "dp", "dp_cp", "pp", "mp", "ep", "etp", "edp")


@dataclass
class ProcessGroups:
    """Each parallel dimension of this rank (`pg.tp.size`, `pg.tp.rank`, `pg.tp.group`
    for tp, cp, dp, dp_cp, pp, mp, ep, etp, edp), plus the pipeline's global ranks, the
    embedding group and the dropout streams."""

    tp: Dimension = Dimension()
    cp: Dimension = Dimension()
    dp: Dimension = Dimension()
    dp_cp: Dimension = Dimension()
    pp: Dimension = Dimension()
    mp: Dimension = Dimension()
    ep: Dimension = Dimension()
    etp: Dimension = Dimension()
    edp: Dimension = Dimension()
    pp_ranks: tuple[int, ...] = (0,)
    embedding_ranks: tuple[int, ...] = (0,)  # empty on middle pipeline stages
    embedding_group: dist.ProcessGroup | None = None
    rank: int = 0
    world_size: int = 1
    rng: RNGStatesTracker = field(default_factory=RNGStatesTracker, repr=False,
                                  compare=False)

    @classmethod
    def single(cls) -> "ProcessGroups":
        """The layout of one process: every dimension of size 1."""
        return cls()

    @classmethod
    def sizes_only(cls, world_size: int = 1, **dims: int | tuple[int, int]) -> "ProcessGroups":
        """A layout without communicators, for planning and tests: each keyword is a
        dimension's size, or its (size, rank)."""
        made = {name: Dimension(*((value,) if isinstance(value, int) else value))
                for name, value in dims.items()}
        return cls(world_size=world_size, **made)

    @classmethod
    def build(cls, tp: int, pp: int, cp: int = 1, ep: int = 1, etp: int | None = None, *,
              timeout_minutes: float | None = None) -> "ProcessGroups":
        """Create every group of the layout over the initialised torch.distributed world.

        All ranks must call this with the same sizes (group creation is collective). The
        sizes are checked before any group is made. Without torch.distributed a layout
        of all ones is the single-process one.
        """
        if not dist.is_initialized():
            check_layout(1, tp, pp, cp, ep, etp)
            return cls.single()
        world_size, rank = dist.get_world_size(), dist.get_rank()
        groups = layout(world_size, tp, pp, cp, ep, etp)
        timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
        made: dict[tuple[int, ...], dist.ProcessGroup] = {}
        fields: dict[str, object] = dict(rank=rank, world_size=world_size,
                                         embedding_ranks=(), embedding_group=None)
        for name, rank_lists in groups.items():
            for ranks in rank_lists:
                key = tuple(ranks)
                # Same ranks, same communicator (e.g. EDP = DP without experts).
                if key not in made:
                    made[key] = dist.new_group(list(key), timeout=timeout)
                if rank not in key:
                    continue
                if name == "embedding":
                    fields.update(embedding_ranks=key, embedding_group=made[key])
                else:
                    fields[name] = Dimension(len(key), key.index(rank), made[key])
                if name == "pp":
                    fields["pp_ranks"] = key
        return cls(**fields)

    def all_reduce(self, tensor: torch.Tensor, *dims: str,
                   op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` in place over each named dimension in turn (over several
        disjoint dimensions that is one reduction over their product), skipping those of
        size 1."""
        for name in dims:
            dim = getattr(self, name)
            if dim.size > 1:
                dist.all_reduce(tensor, op=op, group=dim.group)
        return tensor

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1
