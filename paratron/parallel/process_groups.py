"""The process-group object: who this rank talks to for each kind of parallelism.

It is the one piece of shared state Paratron has. At world size 1 it exists with every
size 1 and no groups, and every collective in `paratron.parallel` is then the identity,
so the single-process model runs the very same code as a sharded one.

The grid. world = TP x CP x DP x PP, and a global rank is read as the digits
(tp, cp, dp, pp) with TP the fastest-changing one, as Megatron-LM numbers ranks (order
"tp-cp-ep-dp-pp"). Neighbouring ranks therefore share a TP group: TP all-reduces run in
every layer and must stay on the fast links inside one machine, while DP's one reduction
per step and PP's point-to-point sends can cross machines.

Expert layers read the same ranks differently: ETP x EP x EDP x PP, with EP taking the
place CP has for the dense layers. ETP (expert tensor parallel) defaults to TP, and EDP
(expert data parallel) is whatever is left: world / (ETP x EP x PP). So attention and
experts share the pipeline stages but slice the ranks of a stage their own way.

A group spanning several dimensions (DP x CP for gradient reduction, TP x PP for the
model-parallel group) lists its ranks with the earlier dimension of the order fastest,
which is also ascending global rank, so a rank's index in the list is its group rank.

Fields per dimension: `<dim>_size`, `<dim>_rank` (index inside the group) and
`<dim>_group`, for dim in tp, cp, dp, dp_cp, pp, mp (TP x PP), ep, etp, edp. Plus
`pp_ranks` (the global ranks of this rank's pipeline, for sends to the neighbouring
stages), the embedding group (first and last stage of the pipeline, which both hold the
tied word embeddings) and `rng`, the dropout streams (see `paratron.parallel.random`).
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


@dataclass
class ProcessGroups:
    """Sizes, ranks and torch.distributed groups of each parallel dimension.

    A group is None when its size is 1 without torch.distributed (single process);
    code that communicates checks the size first, since `group=None` would mean the
    whole world to torch.distributed.
    """

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: dist.ProcessGroup | None = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None
    dp_cp_size: int = 1
    dp_cp_rank: int = 0
    dp_cp_group: dist.ProcessGroup | None = None
    mp_size: int = 1
    mp_rank: int = 0
    mp_group: dist.ProcessGroup | None = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    etp_size: int = 1
    etp_rank: int = 0
    etp_group: dist.ProcessGroup | None = None
    edp_size: int = 1
    edp_rank: int = 0
    edp_group: dist.ProcessGroup | None = None
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
                    fields.update({f"{name}_size": len(key), f"{name}_rank": key.index(rank),
                                   f"{name}_group": made[key]})
                if name == "pp":
                    fields["pp_ranks"] = key
        return cls(**fields)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

