"""Pipeline parallelism: which layers each stage holds, and the 1F1B schedules.

The layer stack is cut into `pp x vpp` virtual stages; rank r holds chunks c = 0..vpp-1,
chunk c being virtual stage c x pp + r (Megatron's interleaving); the first also owns the
embedding, the last the final norm, output layer and loss (uneven cuts: --decoder-first/
last-pipeline-num-layers, or counting the embedding / loss as a layer).

A schedule is data: the order in which a rank runs forward and backward steps of (chunk,
micro-batch), written down by `one_f_one_b_order` and `interleaved_order` and executed by
`run_schedule`. Activations and gradients are sent as soon as they exist through
`batch_isend_irecv`, and a step waits only for the receive it needs; both sides post
messages in the same order, which the orders guarantee. `Stage` is what the trainer
drives: this rank's chunks run over a global batch (`forward_backward`), then their
gradients completed (`finish_gradients`).
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

    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    order = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [forward(warmup + i), backward(i)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def forward_only_order(num_microbatches: int, vpp: int) -> list[Step]:
    """Evaluation: every chunk forward for every micro-batch, in pipeline order."""
    return [("F", c, m) for m in range(num_microbatches) for c in range(vpp)]


# ---------------------------------------------------------------------- execution
class _Messages:
    """Point-to-point traffic of one rank: sends fly asynchronously (their completion is
    awaited at the end of the step), a receive is waited for when it is needed."""

    def __init__(self, pg: ProcessGroups):
        self.pg = pg
        self.pending_sends: list[dist.P2POp] = []
        self.in_flight = []

    def _peer(self, offset: int) -> int:
        ranks, r = self.pg.pp_ranks, self.pg.pp.rank
        return ranks[(r + offset) % len(ranks)]

    # Activations flow to the next stage and gradients to the previous one; with two
    # stages both share one pair of ranks, so the tag keeps the two streams apart.
    ACTIVATION, GRADIENT = 0, 1

    def send(self, tensor: torch.Tensor, to_next: bool) -> None:
        tag = self.ACTIVATION if to_next else self.GRADIENT
        self.pending_sends.append(dist.P2POp(dist.isend, tensor.contiguous(),
                                             self._peer(1 if to_next else -1),
                                             group=self.pg.pp.group, tag=tag))

    def exchange(self, recv_shape=None, dtype=None, device=None,
                 from_prev: bool = True) -> torch.Tensor | None:
        """Post pending sends (and one receive); wait for the receive only."""
        ops = self.pending_sends
        self.pending_sends = []
        buffer = None
        if recv_shape is not None:
            buffer = torch.empty(recv_shape, dtype=dtype, device=device)
            tag = self.ACTIVATION if from_prev else self.GRADIENT
            ops = ops + [dist.P2POp(dist.irecv, buffer, self._peer(-1 if from_prev else 1),
                                    group=self.pg.pp.group, tag=tag)]
        if not ops:
            return None
        works = dist.batch_isend_irecv(ops)
        if buffer is not None:
            works[-1].wait()
            self.in_flight += works[:-1]
        else:
            self.in_flight += works
        return buffer

    def drain(self) -> None:
        self.exchange()
        for work in self.in_flight:
            work.wait()
        self.in_flight = []


@dataclass
class StageIO:
    """What the schedule needs to know about activations between stages."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def run_schedule(order: list[Step], chunks: list[Chunk], pg: ProcessGroups,
                 forward: Callable[[int, int, torch.Tensor | None], torch.Tensor],
                 loss: Callable[[int, torch.Tensor], torch.Tensor],
                 io: StageIO, *, forward_only: bool = False,
                 before_backward: Callable[[int, int], None] | None = None,
                 record: list | None = None) -> list[torch.Tensor]:
    """Execute a schedule order on this rank.

    forward(chunk, micro, input) runs a chunk (input is None on the first virtual stage)
    and returns its output; loss(micro, output) turns the last virtual stage's output
    into the scalar whose backward starts the step. Returns the losses computed here
    (on the last stage). `record`, if given, receives ("F"/"B", chunk, micro) as each
    step runs and the number of activations held, for tests.
    """
    messages = _Messages(pg)
    single = pg.pp.size == 1
    inputs: dict[tuple[int, int], torch.Tensor | None] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    losses = []
    for kind, c, m in order:
        chunk = chunks[c]
        if kind == "F":
            x = None
            if not chunk.is_first:
                x = messages.exchange(io.shape, io.dtype, io.device, from_prev=True)
                if not forward_only:
                    x.requires_grad_()
            with torch.set_grad_enabled(not forward_only):
                y = forward(c, m, x)
                if chunk.is_last:
                    y = loss(m, y)
                    losses.append(y.detach())
            if not chunk.is_last and not single:
                messages.send(y.detach(), to_next=True)
                messages.exchange()  # on its way now, while this rank computes on
            if not forward_only:
                inputs[c, m], outputs[c, m] = x, y
        else:
            if before_backward is not None:
                before_backward(c, m)
            y, x = outputs.pop((c, m)), inputs.pop((c, m))
            if chunk.is_last:
                torch.autograd.backward(y)
            else:
                grad = messages.exchange(io.shape, io.dtype, io.device, from_prev=False)
                torch.autograd.backward(y, grad)
            if x is not None:
                messages.send(x.grad, to_next=False)
                messages.exchange()
        if record is not None:
            record.append((kind, c, m, len(outputs)))
    messages.drain()
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

    def order(self, num_microbatches: int, forward_only: bool) -> list[Step]:
        pp, rank, vpp = self.pg.pp.size, self.pg.pp.rank, len(self.chunks)
        if forward_only:
            return forward_only_order(num_microbatches, vpp)
        if vpp > 1:
            return interleaved_order(pp, rank, num_microbatches, vpp)
        return one_f_one_b_order(pp, rank, num_microbatches)

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
            with self.timers("forward-compute"):
                return self.models[c](batch["tokens"] if chunk.is_first else None,
                                      batch.get("position_ids"), batch.get("attention_mask"),
                                      labels=batch["labels"] if chunk.is_last else None,
                                      hidden_states=hidden)

        def loss(m: int, per_token_loss: torch.Tensor) -> torch.Tensor:
            with self.timers("forward-compute"):
                return loss_fn(batches[m], per_token_loss)

        run_schedule(self.order(len(batches), forward_only), self.chunks, self.pg, forward,
                     loss, self.io, forward_only=forward_only,
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
