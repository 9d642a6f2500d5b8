"""Is a pipeline schedule's communication safe on NCCL? Checked before launch, in Python.

gloo buffers every send, so a CPU run cannot see what hangs a GPU job: NCCL matches a
pair of ranks' point-to-point operations purely by their order (no tags), runs each
rank's batched groups one after the other on one stream, and a transfer larger than its
buffers completes only when both sides have posted it. This module writes down every
rank's queue as the executor posts it (`communication_groups` of the rank's schedule
order, plus each step's expert all-to-all over the EP ranks of its stage), then checks
the rule: for each pair of ranks, what one sends is what the other receives, in the same
order; each collective group runs the same collectives in the same order; and a
simulation of the queues under those semantics finishes instead of waiting in a circle.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from paratron.parallel.pipeline import (Chunk, Message, communication_groups, model_chunks,
                                        schedule)
from paratron.parallel.process_groups import layout


@dataclass(frozen=True)
class Op:
    """One operation in a rank's queue. `what` names the data so that both sides of a
    transfer (or every member of a collective) describe it alike: the kind, the
    micro-batch and the virtual stages it goes between (or the step of an all-to-all)."""

    op: str                  # "send" | "recv" | "all-to-all"
    peer: int | tuple        # the other global rank, or the collective's ranks
    what: tuple

    def __str__(self) -> str:
        if self.op == "all-to-all":
            kind, stage, micro = self.what
            return f"expert all-to-all {kind} mb{micro} s{stage}"
        kind, micro, source, target = self.what
        way = "to" if self.op == "send" else "from"
        return f"{self.op} {kind[:4]} mb{micro} s{source}->s{target} {way} rank {self.peer}"


Queue = list[tuple[Op, ...]]  # a rank's groups, in the order it posts them


def pipeline_queues(pp: int, vpp: int, num_microbatches: int, *, forward_only: bool = False,
                    ep: int = 1, chunks_of: Callable[[int], list[Chunk]] | None = None
                    ) -> dict[int, Queue]:
    """Every rank's queue for one step of a PP x EP layout (global ranks as
    `process_groups.layout` numbers them). `chunks_of(pp_rank)` gives a rank's chunks
    (default one layer per virtual stage: how the layers split does not change who
    talks to whom)."""
    chunks_of = chunks_of or (lambda rank: model_chunks(pp * vpp, pp, rank, vpp))
    groups = layout(pp * ep, 1, pp, ep=ep)
    expert_group = {rank: tuple(ranks) for ranks in groups["ep"] for rank in ranks}
    queues = {}
    for pipeline in groups["pp"]:
        for pp_rank, rank in enumerate(pipeline):
            order, warmup = schedule(pp, pp_rank, num_microbatches, vpp, forward_only)
            posted = communication_groups(order, chunks_of(pp_rank), warmup)
            queue: Queue = []
            for i, group in enumerate(posted):
                queue.append(tuple(_op(message, pp, pp_rank, pipeline) for message in group))
                if ep > 1 and i < len(order):
                    kind, chunk, micro = order[i]
                    queue.append((Op("all-to-all", expert_group[rank],
                                     (kind, chunk * pp + pp_rank, micro)),))
            queues[rank] = [group for group in queue if group]
    return queues


def _op(message: Message, pp: int, pp_rank: int, pipeline: list[int]) -> Op:
    """A rank's message as the checker sees it: global peer, virtual stages named."""
    stage = message.chunk * pp + pp_rank
    other = stage + message.peer_offset  # the neighbouring virtual stage
    source, target = (stage, other) if message.op == "send" else (other, stage)
    peer = pipeline[(pp_rank + message.peer_offset) % pp]
    return Op(message.op, peer, (message.kind, message.micro, source, target))


def _channels(queues: dict[int, Queue]) -> dict[tuple, list[tuple[int, int, Op]]]:
    """Each rank's side of each channel, in posting order: (rank, "send"/"recv", peer)
    for transfers, (rank, "all-to-all", ranks) for collectives; entries are (rank,
    group index, op)."""
    channels = defaultdict(list)
    for rank in sorted(queues):
        for index, group in enumerate(queues[rank]):
            for op in group:
                channels[rank, op.op, op.peer].append((rank, index, op))
    return channels


def _line(rank: int, queue: Queue, start: int, show: int = 6) -> str:
    groups = " ".join("[" + ", ".join(map(str, group)) + "]"
                      for group in queue[start:start + show])
    more = " ..." if len(queue) > start + show else ""
    return f"  rank {rank}: {groups or '(done)'}{more}"


def _mismatch(queues: dict[int, Queue], channels) -> str | None:
    """The first pair whose two sides disagree on a transfer (or a collective group
    whose members disagree), with both ranks' queues from the group before it."""
    for (rank, op, peer), mine in channels.items():
        if op == "send":
            sides = [(peer, channels.get((peer, "recv", rank), []))]
        elif op == "recv":
            sides = [(peer, channels.get((peer, "send", rank), []))]
        else:
            sides = [(member, channels.get((member, op, peer), [])) for member in peer]
        for other, theirs in sides:
            for k in range(max(len(mine), len(theirs))):
                a, b = (side[k][2] if k < len(side) else None for side in (mine, theirs))
                if a is None or b is None or a.what != b.what:
                    at = [side[k][1] if k < len(side) else len(queues[r])
                          for r, side in ((rank, mine), (other, theirs))]
                    return (f"mismatch: rank {rank}'s operation {k + 1} with rank {other} "
                            f"is '{a or 'nothing'}', rank {other}'s is '{b or 'nothing'}'\n"
                            + _line(rank, queues[rank], max(at[0] - 1, 0)) + "\n"
                            + _line(other, queues[other], max(at[1] - 1, 0)))
    return None


def _deadlock(queues: dict[int, Queue], channels) -> str | None:
    """Run the queues under NCCL's semantics; the circular wait they end in, if any."""
    # A transfer (or collective) is the set of (rank, group index) that take part in it.
    transfers: list[list[tuple[int, int]]] = []
    for (rank, op, peer), mine in channels.items():
        if op == "send":
            theirs = channels[peer, "recv", rank]
            transfers += [[(rank, a[1]), (peer, b[1])] for a, b in zip(mine, theirs)]
        elif op == "all-to-all" and rank == min(peer):
            members = [channels[member, op, peer] for member in peer]
            transfers += [[(m, entry[1]) for m, entry in zip(peer, column)]
                          for column in zip(*members)]
    pending = {rank: [0] * len(queue) for rank, queue in queues.items()}
    waiting_on = defaultdict(list)  # (rank, group) -> transfers it takes part in
    for t, places in enumerate(transfers):
        for place in places:
            pending[place[0]][place[1]] += 1
            waiting_on[place].append(t)
    head = {rank: 0 for rank in queues}  # the group each rank's stream runs now

    def advance(rank: int) -> None:
        while head[rank] < len(queues[rank]) and pending[rank][head[rank]] == 0:
            head[rank] += 1

    for rank in queues:
        advance(rank)
    done = [False] * len(transfers)
    work = list(queues)
    while work:
        rank = work.pop()
        if head[rank] == len(queues[rank]):
            continue
        for t in waiting_on[rank, head[rank]]:
            if done[t] or any(head[r] != g for r, g in transfers[t]):
                continue
            done[t] = True
            for r, g in transfers[t]:
                pending[r][g] -= 1
                advance(r)
                work.append(r)
    stuck = [rank for rank in sorted(queues) if head[rank] < len(queues[rank])]
    if not stuck:
        return None
    # Every stuck rank waits for one that has not reached the matching group: follow
    # the waits from the first until a rank repeats.
    chain = [stuck[0]]
    while True:
        rank = chain[-1]
        t = next(t for t in waiting_on[rank, head[rank]] if not done[t])
        rank = next(r for r, g in transfers[t] if head[r] != g)
        if rank in chain:
            cycle = chain[chain.index(rank):]
            break
        chain.append(rank)
    return ("deadlock: circular wait " + " -> ".join(f"rank {r}" for r in cycle + cycle[:1])
            + "\n" + "\n".join(_line(r, queues[r], head[r]) for r in cycle))


def find_problem(queues: dict[int, Queue]) -> str | None:
    """None if the queues run to the end under NCCL's semantics; else the first
    mismatched pair or the circular wait, with the ranks' queues (one line each)."""
    channels = _channels(queues)
    return _mismatch(queues, channels) or _deadlock(queues, channels)


def check_communication(pp: int, vpp: int, num_microbatches: int, **options) -> str | None:
    """`find_problem` for the training step and the evaluation of a layout (keywords of
    `pipeline_queues`: ep, chunks_of)."""
    for forward_only in (False, True):
        problem = find_problem(pipeline_queues(pp, vpp, num_microbatches,
                                               forward_only=forward_only, **options))
        if problem:
            return f"{'evaluation' if forward_only else 'training'}: {problem}"
    return None


def refuse_unsafe_schedule(pg, vpp: int, num_microbatches: int) -> None:
    """Before a job's first step: refuse a schedule whose transfers NCCL would mismatch or
    leave waiting in a circle (pure Python, every rank alike)."""
    if pg.pp.size == 1:
        return
    problem = check_communication(pg.pp.size, vpp, num_microbatches, ep=pg.ep.size)
    if problem:
        raise RuntimeError(f"the pipeline schedule's communication is unsafe on NCCL; "
                           f"{problem}")
