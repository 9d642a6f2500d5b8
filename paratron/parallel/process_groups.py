"""The process-group object: who this rank talks to for each kind of parallelism.

It is the one piece of shared state Paratron has. At world size 1 it exists with every
size 1 and no groups, and every collective in `paratron.parallel` is then the identity,
so the single-process model runs the very same code as a sharded one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ProcessGroups:
    """Sizes, ranks and torch.distributed groups of each parallel dimension."""

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: dist.ProcessGroup | None = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> "ProcessGroups":
        """The layout of one process: every dimension of size 1."""
        return cls()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1
