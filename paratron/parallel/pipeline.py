"""Pipeline parallelism: which layers each stage holds, and the 1F1B schedules.

The layer stack is cut into `pp x vpp` virtual stages; rank r holds chunks c = 0..vpp-1,
chunk c being virtual stage c x pp + r (Megatron's interleaving); the first also owns the
embedding, the last the final norm, output layer and loss (uneven cuts: --decoder-first/
last-pipeline-num-layers, or counting the embedding / loss as a layer).

A schedule is data: the order in which a rank runs forward and backward steps of (chunk,
micro-batch), written down by `one_f_one_b_order` and `interleaved_order`, and the
batched transfers derived from it (`communication_groups`: what was just computed goes
out with what the next step needs, as Megatron pairs them, so that NCCL, which matches a
pair of ranks' transfers by order alone, never waits in a circle; `schedule_check`
verifies every layout before its first step). `run_schedule` executes both, a step
waiting only for the receives it needs. `Stage` is what the trainer drives: this rank's
chunks run over a global batch (`forward_backward`), then their gradients completed
(`finish_gradients`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import layout_of
from paratron.parallel.tensor_parallel import finish_tensor_parallel_grads


# ---------------------------------------------------------------------- stages
def virtual_stage_sizes(num_layers: int, pp: int, vpp: int = 1, *, first: int | None = None,
                        last: int | None = None, account_for_embedding: bool = False,
                        account_for_loss: bool = False) -> list[int]:
    """Layers of each of the pp x vpp virtual stages, in pipeline order (ValueError with
    the flags to change when they do not split).

    - Even: every virtual stage gets num_layers / (pp vpp).
    - --decoder-first/last-pipeline-num-layers: those on the first/last rank, the rest
      evenly over the other ranks; each rank's layers evenly over its vpp chunks.
    - --account-for-embedding/loss-in-pipeline-split: the embedding / loss counts as a
      layer, so the first / last virtual stage holds one transformer layer fewer.
    """
    accounted = account_for_embedding or account_for_loss
    if accounted and (first is not None or last is not None):
        raise ValueError("--account-for-embedding/loss-in-pipeline-split cannot be combined "
                         "with --decoder-first/last-pipeline-num-layers; give one of them")
    stages = pp * vpp
    if accounted:
        total = num_layers + int(account_for_embedding) + int(account_for_loss)
        if total % stages:
            raise ValueError(f"--num-layers {num_layers} plus the embedding/loss counted as "
                             f"layers ({total}) is not divisible by the {stages} pipeline "
                             f"stages (pipeline size x virtual stages)")
        sizes = [total // stages] * stages
        sizes[0] -= int(account_for_embedding)
        sizes[-1] -= int(account_for_loss)
    elif first is None and last is None:
        if num_layers < stages:
            raise ValueError(f"--num-layers {num_layers} is not enough for {stages} pipeline "
                             f"stages (pipeline size {pp} x virtual stages {vpp}): every "
                             f"virtual stage needs a layer")
        if num_layers % stages:
            raise ValueError(f"--num-layers {num_layers} does not split evenly: it is not "
                             f"divisible by the {stages} pipeline stages (pipeline size "
                             f"{pp} x virtual stages {vpp})")
        sizes = [num_layers // stages] * stages
    else:
        per_rank: list[int | None] = [None] * pp
        if first is not None:
            per_rank[0] = first
        if last is not None:
            per_rank[-1] = last
        free = [i for i, n in enumerate(per_rank) if n is None]
        rest = num_layers - sum(n for n in per_rank if n is not None)
        if rest < 0 or (free and rest % len(free)) or (not free and rest):
            given = " and ".join(f"{n} on the {where} stage" for n, where in
                                 ((first, "first"), (last, "last")) if n is not None)
            raise ValueError(
                f"--num-layers {num_layers} does not split over --pipeline-model-parallel-"
                f"size {pp} with {given}: the remaining {rest} must divide evenly over the "
                f"{len(free)} other stages; change --decoder-first-pipeline-num-layers or "
                f"--decoder-last-pipeline-num-layers")
        per_rank = [n if n is not None else rest // len(free) for n in per_rank]
        if any(n % vpp for n in per_rank):
            raise ValueError(f"virtual pipeline stages: each stage's layers {per_rank} must "
                             f"divide into {vpp} chunks")
        sizes = [per_rank[v % pp] // vpp for v in range(stages)]
    # A virtual stage with no layer is pointless unless it holds the embedding or loss.
    if any(n < 0 for n in sizes) or any(
            n == 0 and not (v == 0 and account_for_embedding)
            and not (v == stages - 1 and account_for_loss) for v, n in enumerate(sizes)):
        raise ValueError(f"{num_layers} layers leave a pipeline stage without layers "
                         f"({sizes} over {pp} stages x {vpp} virtual stages); use fewer "
                         f"stages or virtual stages")
    return sizes


@dataclass(frozen=True)
class Chunk:
    """One model chunk of this rank: its layers and whether it ends the pipeline."""

    index: int          # chunk (virtual stage) index on this rank
    layers: range       # global layer numbers
    is_first: bool      # first virtual stage: owns the embedding
    is_last: bool       # last virtual stage: owns the output layer and loss


def model_chunks(num_layers: int, pp: int, pp_rank: int, vpp: int = 1,
                 **split) -> list[Chunk]:
    """This rank's chunks, in Megatron's interleaved assignment: chunk c of rank r is
    virtual stage c x pp + r."""
    sizes = virtual_stage_sizes(num_layers, pp, vpp, **split)
    starts = [sum(sizes[:v]) for v in range(len(sizes))]
    return [Chunk(c, range(starts[v], starts[v] + sizes[v]), is_first=(v == 0),
                  is_last=(v == len(sizes) - 1))
            for c in range(vpp) for v in [c * pp + pp_rank]]


def all_reduce_embedding_grads(models, pg: ProcessGroups) -> None:
    """Tied embeddings over several stages: the first stage's embedding and the last
    stage's output layer are one weight, so their gradients are summed over the
    embedding group (before the data-parallel reduction; both are sums)."""
    if pg.pp.size == 1 or len(pg.embedding_ranks) < 2:
        return
    for model in models:
        for p in model.module.parameters():
            if layout_of(p).tied:
                dist.all_reduce(p.main_grad, group=pg.embedding_group)


# ---------------------------------------------------------------------- orders
Step = tuple[str, int, int]  # ("F" | "B", chunk, micro-batch)


def one_f_one_b_order(pp: int, rank: int, num_microbatches: int) -> list[Step]:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards.

    A stage holds at most pp - rank micro-batches of activations at once.
    """
    warmup = min(pp - rank - 1, num_microbatches)
    order: list[Step] = [("F", 0, m) for m in range(warmup)]
    for i in range(num_microbatches - warmup):
        order += [("F", 0, warmup + i), ("B", 0, i)]
    order += [("B", 0, m) for m in range(num_microbatches - warmup, num_microbatches)]
    return order


def interleaved_order(pp: int, rank: int, num_microbatches: int, vpp: int) -> list[Step]:
    """Megatron's interleaved 1F1B over vpp chunks per rank (micro-batches a multiple of pp).

    Virtual micro-batch k runs chunk (k // pp) % vpp on micro-batch
    (k // (pp vpp)) pp + k % pp; backward walks the chunks in reverse.
    """
    total = num_microbatches * vpp

    def forward(k):
        return ("F", (k // pp) % vpp, (k // (pp * vpp)) * pp + k % pp)

    def backward(k):
        return ("B", vpp - 1 - (k // pp) % vpp, (k // (pp * vpp)) * pp + k % pp)

    warmup = interleaved_warmup(pp, rank, num_microbatches, vpp)
    order = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [forward(warmup + i), backward(i)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def interleaved_warmup(pp: int, rank: int, num_microbatches: int, vpp: int) -> int:
    """Forwards an interleaved rank runs before its steady state (all of them when the
    micro-batches are too few for one)."""
    return min((pp - rank - 1) * 2 + (vpp - 1) * pp, num_microbatches * vpp)


def forward_only_order(num_microbatches: int, vpp: int) -> list[Step]:
    """Evaluation: every chunk forward for every micro-batch, in pipeline order."""
    return [("F", c, m) for m in range(num_microbatches) for c in range(vpp)]


def schedule(pp: int, rank: int, num_microbatches: int, vpp: int, forward_only: bool
             ) -> tuple[list[Step], int | None]:
    """The order a pipeline rank runs (evaluation, 1F1B or interleaved 1F1B) and, when
    interleaved, its warm-up forwards (`communication_groups` pairs the steps after)."""
    if forward_only:
        return forward_only_order(num_microbatches, vpp), None
    if vpp > 1:
        return (interleaved_order(pp, rank, num_microbatches, vpp),
                interleaved_warmup(pp, rank, num_microbatches, vpp))
    return one_f_one_b_order(pp, rank, num_microbatches), None


# ---------------------------------------------------------------------- communication
@dataclass
class StageIO:
    """What the schedule needs to know about activations between stages."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Message:
    """One point-to-point transfer as this rank sees it: it sends or receives the
    activation (to the next stage, from the previous) or the gradient (to the previous,
    from the next) of its chunk `chunk` on micro-batch `micro`."""

    op: str      # "send" | "recv"
    kind: str    # "activation" | "gradient"
    chunk: int
    micro: int

    @property
    def peer_offset(self) -> int:
        """Pipeline rank of the other side, relative to this one (wrapping around)."""
        return 1 if (self.op == "send") == (self.kind == "activation") else -1


def _step_messages(step: Step, chunk: Chunk) -> tuple[list[Message], list[Message]]:
    """What a step receives before it runs and sends once it has run."""
    kind, c, m = step
    if kind == "F":
        recvs = [] if chunk.is_first else [Message("recv", "activation", c, m)]
        sends = [] if chunk.is_last else [Message("send", "activation", c, m)]
    else:
        recvs = [] if chunk.is_last else [Message("recv", "gradient", c, m)]
        sends = [] if chunk.is_first else [Message("send", "gradient", c, m)]
    return recvs, sends


def communication_groups(order: list[Step], chunks: list[Chunk], warmup: int | None = None
                         ) -> list[tuple[Message, ...]]:
    """The batched transfers this rank posts: group i goes out just before step i runs,
    the last one after the last step (empty where nothing moves).

    NCCL runs a rank's groups in order on one stream and a transfer larger than its
    buffers completes only when both sides have posted it, so a send posted alone, ahead
    of the receive its peer's send waits behind, waits for ever. As in Megatron, each
    group joins what was just computed with what is needed next: in 1F1B a forward's
    send with the next backward's receive (send_forward_recv_backward) and the mirror
    after a backward. An interleaved rank (`warmup` given) runs each steady forward back
    to back with the backward after it: the pair's receives go out before it, its sends
    after it with the next receives (send_forward_backward_recv_forward_backward).
    `schedule_check` verifies both for every layout."""
    # Steps that run back to back: each alone, or when interleaved the warm-up forwards
    # alone, then (forward, backward) pairs while forwards remain, then backwards alone.
    start = warmup or 0
    stop = 0 if warmup is None else 2 * sum(kind == "F" for kind, _, _ in order) - warmup
    units = ([[step] for step in order[:start]] + [order[i:i + 2] for i in range(start, stop, 2)]
             + [[step] for step in order[max(start, stop):]])
    groups, sends = [], []
    for unit in units:
        recvs, next_sends = [], []
        for kind, c, m in unit:
            step_recvs, step_sends = _step_messages((kind, c, m), chunks[c])
            recvs, next_sends = recvs + step_recvs, next_sends + step_sends
        groups += [tuple(sends + recvs)] + [()] * (len(unit) - 1)
        sends = next_sends
    groups.append(tuple(sends))
    return groups


class PointToPoint:
    """The transport of one pipeline rank: posts a group as one `batch_isend_irecv` and
    waits for its receives only; the sends complete in the background (`drain` awaits
    them at the end of the schedule)."""

    def __init__(self, pg: ProcessGroups, io: StageIO):
        self.pg, self.io = pg, io
        self.in_flight = []

    def _peer(self, offset: int) -> int:
        ranks, r = self.pg.pp_ranks, self.pg.pp.rank
        return ranks[(r + offset) % len(ranks)]

    def exchange(self, group: tuple[Message, ...], outbox: dict
                 ) -> dict[tuple[str, int, int], torch.Tensor]:
        """Post `group`, taking each send's tensor from `outbox` (keyed by kind, chunk,
        micro); returns the received tensors under the same keys."""
        ops, received = [], {}
        for message in sorted(group, key=lambda msg: msg.op == "recv"):  # sends first
            key = (message.kind, message.chunk, message.micro)
            if message.op == "send":
                tensor = outbox.pop(key).contiguous()
            else:
                tensor = received[key] = torch.empty(self.io.shape, dtype=self.io.dtype,
                                                     device=self.io.device)
            ops.append(dist.P2POp(dist.isend if message.op == "send" else dist.irecv, tensor,
                                  self._peer(message.peer_offset), group=self.pg.pp.group))
        if not ops:
            return received
        works = dist.batch_isend_irecv(ops)
        if received:
            # gloo returns one work per op (the receives last), NCCL one for the group.
            for work in works[-len(received):]:
                work.wait()
            works = works[:-len(received)]
        self.in_flight += works
        return received

    def drain(self) -> None:
        for work in self.in_flight:
            work.wait()
        self.in_flight = []


# ---------------------------------------------------------------------- execution
def run_schedule(order: list[Step], chunks: list[Chunk], pg: ProcessGroups,
                 forward: Callable[[int, int, torch.Tensor | None], torch.Tensor],
                 loss: Callable[[int, torch.Tensor], torch.Tensor],
                 io: StageIO, *, forward_only: bool = False,
                 before_backward: Callable[[int, int], None] | None = None,
                 record: list | None = None, warmup: int | None = None,
                 transport: PointToPoint | None = None) -> list[torch.Tensor]:
    """Execute a schedule order on this rank.

    forward(chunk, micro, input) runs a chunk (input is None on the first virtual stage)
    and returns its output; loss(micro, output) turns the last virtual stage's output
    into the scalar whose backward starts the step. Returns the losses computed here
    (on the last stage). Before each step the transport (`PointToPoint` unless given)
    posts that step's `communication_groups` entry (`warmup`: the interleaved
    schedule's), and the last one after the last step.
    `record`, if given, receives ("F"/"B", chunk, micro) as each step runs and the number
    of activations held, for tests.
    """
    transport = transport or PointToPoint(pg, io)
    groups = communication_groups(order, chunks, warmup)
    inputs: dict[tuple[int, int], torch.Tensor | None] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    outbox: dict[tuple[str, int, int], torch.Tensor] = {}  # sent by the next group
    inbox: dict[tuple[str, int, int], torch.Tensor] = {}   # received, not yet used
    losses = []
    for (kind, c, m), group in zip(order, groups):
        inbox.update(transport.exchange(group, outbox))
        chunk = chunks[c]
        if kind == "F":
            x = inbox.pop(("activation", c, m), None)
            if x is not None and not forward_only:
                x.requires_grad_()
            with torch.set_grad_enabled(not forward_only):
                y = forward(c, m, x)
                if chunk.is_last:
                    y = loss(m, y)
                    losses.append(y.detach())
                else:
                    outbox["activation", c, m] = y.detach()
            if not forward_only:
                inputs[c, m], outputs[c, m] = x, y
        else:
            if before_backward is not None:
                before_backward(c, m)
            y, x = outputs.pop((c, m)), inputs.pop((c, m))
            torch.autograd.backward(y, inbox.pop(("gradient", c, m), None))
            if x is not None:
                outbox["gradient", c, m] = x.grad
        if record is not None:
            record.append((kind, c, m, len(outputs)))
    transport.exchange(groups[-1], outbox)
    transport.drain()
    return losses


class Stage:
    """This rank's part of the pipeline: its model chunks (`models[c]`, a `DataParallel`
    around the model of `chunks[c]`), the shape of what passes between stages (`io`) and
    the order of their steps. A micro-batch is a dict of `tokens`, `labels`,
    `position_ids` and, when documents share a sample, `attention_mask`; `timers(name)`
    times each phase under Megatron's timer names."""

    def __init__(self, models: list, chunks: list[Chunk], pg: ProcessGroups, io: StageIO,
                 timers: Callable[[str], AbstractContextManager]):
        self.models, self.chunks, self.pg, self.io, self.timers = models, chunks, pg, io, timers

    def forward_backward(self, batches: list[dict[str, torch.Tensor]],
                         loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                         *, forward_only: bool = False) -> None:
        """Every micro-batch forward (and backward) through this rank's chunks, in schedule
        order; `loss_fn(batch, per_token_loss)` gives the last stage's scalar whose backward
        starts each micro-batch's. Training starts from zeroed gradient buffers and reduces
        a chunk's gradients over DP on the last micro-batch only; `forward_only` evaluates."""
        for model in self.models:
            model.train(not forward_only)
            if not forward_only:
                model.zero_grad_buffer()
        last = len(batches) - 1

        def forward(c: int, m: int, hidden: torch.Tensor | None) -> torch.Tensor:
            batch, chunk = batches[m], self.chunks[c]
            # The last stage's multi-token prediction reads the tokens and the loss mask.
            ends = {"labels": batch["labels"], "loss_mask": batch.get("loss_mask")} \
                if chunk.is_last else {}
            with self.timers("forward-compute"):
                return self.models[c](batch["tokens"] if chunk.is_first or chunk.is_last
                                      else None,
                                      batch.get("position_ids"), batch.get("attention_mask"),
                                      hidden_states=hidden, **ends)

        def loss(m: int, per_token_loss: torch.Tensor) -> torch.Tensor:
            with self.timers("forward-compute"):
                return loss_fn(batches[m], per_token_loss)

        order, warmup = schedule(self.pg.pp.size, self.pg.pp.rank, len(batches),
                                 len(self.chunks), forward_only)
        run_schedule(order, self.chunks, self.pg, forward, loss, self.io,
                     forward_only=forward_only, warmup=warmup,
                     before_backward=lambda c, m: self.models[c].sync_gradients(m == last))

    def finish_gradients(self) -> None:
        """After the backward: the tied embedding's copies summed over the embedding group,
        each chunk's reduction over DP completed, and the gradients of weights the TP ranks
        share (sequence-parallel norms, replicated key/value rows) summed over TP."""
        with self.timers("embedding-grads-all-reduce"):
            all_reduce_embedding_grads(self.models, self.pg)
        with self.timers("all-grads-sync"):
            for model in self.models:
                model.finish_grad_sync()
                finish_tensor_parallel_grads(model.module.parameters(), self.pg)
