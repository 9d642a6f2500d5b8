"""Random streams for dropout under tensor parallelism.

Dropout on activations every TP rank holds whole must draw the same mask on every TP
rank, or the replicas drift apart; dropout on activations split over TP (a rank's heads,
a sequence shard) must draw a different mask per rank. So each rank keeps two streams:
the default generator, seeded `seed + 100 * pp_rank` (equal across a stage's TP and DP
ranks), and the tracked "model-parallel-rng" stream, seeded
`seed + 100 * pp_rank + 2718 + tp_rank` as Megatron-LM does, swapped in by
`with pg.rng.fork(): ...` around dropout inside TP regions (experts: "expert-parallel-rng",
`seed + 100 * pp_rank + 1024 + 100 * ep_rank + etp_rank`). Under sequence parallelism
the hidden states outside TP regions are shards too, so their dropout forks as well; a
nested fork of the same stream just continues it.

Recompute: `torch.utils.checkpoint` restores the default generators but not the tracked
streams, so pass `context_fn=pg.rng.checkpoint_contexts` and the recomputed dropout
draws the mask the original forward drew. The tracker lives in the process-group object
(`pg.rng`) because its seeds follow this rank's place in the grid.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"


def data_parallel_seed(seed: int, pp_rank: int = 0) -> int:
    """Seed of the default generators: the same on all TP and DP ranks of a stage."""
    return seed + 100 * pp_rank


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0) -> int:
    """Seed of the stream used inside TP regions: different on each TP rank."""
    return data_parallel_seed(seed, pp_rank) + 2718 + tp_rank


def expert_parallel_seed(seed: int, ep_rank: int, etp_rank: int, pp_rank: int = 0) -> int:
    """Seed of the stream used inside expert layers: different on each EP x ETP rank."""
    return data_parallel_seed(seed, pp_rank) + 1024 + 100 * ep_rank + etp_rank


def get_rng_state(device: torch.device | str = "cpu") -> torch.Tensor:
    """The state of the default generator of `device` (CPU or an accelerator)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device).get_rng_state(device)


def set_rng_state(state: torch.Tensor, device: torch.device | str = "cpu") -> None:
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device).set_rng_state(state, device)


class RNGStatesTracker:
    """Named generator states that `fork` swaps in for the device's default generator."""

    def __init__(self):
        self._states: dict[str, tuple[torch.device, torch.Tensor]] = {}
        self._active: set[str] = set()  # streams forked into right now

    def reset(self) -> None:
        self._states, self._active = {}, set()

    def add(self, name: str, seed: int, device: torch.device | str = "cpu") -> None:
        """A new stream `name` for `device`, seeded without touching the default one."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        device = torch.device(device)
        generator = torch.Generator(device)
        generator.manual_seed(seed)
        self._states[name] = (device, generator.get_state())

    def get_states(self) -> dict[str, tuple[torch.device, torch.Tensor]]:
        """A copy of every stream's stored state (for checkpoints, taken outside forks)."""
        return {name: (device, state.clone()) for name, (device, state) in self._states.items()}

    def set_states(self, states: dict[str, tuple[torch.device, torch.Tensor]]) -> None:
        self._states = {name: (device, state.clone())
                        for name, (device, state) in states.items()}

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draw from stream `name` inside the block; the default stream is left as it was.

        Inside a fork of the same stream (a whole sequence-parallel block forked, with
        attention dropout forking again) this is a no-op: the stream is already drawn
        from, and swapping in its stored state would repeat numbers.
        """
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} is not seeded: call "
                               f"paratron.parallel.random.seed_everything(seed, pg) first")
        if name in self._active:
            yield
            return
        device, state = self._states[name]
        outside = get_rng_state(device)
        set_rng_state(state, device)
        self._active.add(name)
        try:
            yield
        finally:
            self._active.discard(name)
            self._states[name] = (device, get_rng_state(device))
            set_rng_state(outside, device)

    def checkpoint_contexts(self):
        """`context_fn` for `torch.utils.checkpoint(use_reentrant=False)`.

        The first context notes the tracked states (and which streams are forked into)
        as the forward starts; the second puts them back for the recomputation and
        restores the current ones after it. A stream forked into around the checkpoint
        lives in the default generator, which checkpoint itself restores.
        """
        at_forward = {}

        @contextmanager
        def forward():
            at_forward.update(states=self.get_states(), active=set(self._active))
            yield

        @contextmanager
        def recompute():
            current, active = self.get_states(), self._active
            self.set_states(at_forward["states"])
            self._active = set(at_forward["active"])
            try:
                yield
            finally:
                self.set_states(current)
                self._active = active

        return forward(), recompute()


def seed_everything(seed: int, pg, device: torch.device | str = "cpu") -> None:
    """Seed Python, NumPy, the default generators and `pg.rng`'s streams for this rank.

    `pg` is the `ProcessGroups` object; `device` is where activations (and so dropout)
    live, whose default generator the tracked streams stand in for.
    """
    base = data_parallel_seed(seed, pg.pp.rank)
    random.seed(base)
    np.random.seed(base)
    torch.manual_seed(base)  # every device's default generator
    pg.rng.reset()
    pg.rng.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, pg.tp.rank, pg.pp.rank), device)
    pg.rng.add(EXPERT_PARALLEL_RNG,
               expert_parallel_seed(seed, pg.ep.rank, pg.etp.rank, pg.pp.rank), device)


def in_backward() -> bool:
    """Whether autograd's engine runs a backward on this thread: a forward now is
    activation recompute replaying one, which statistics and hooks must not count twice."""
    return torch._C._current_graph_task_id() != -1
