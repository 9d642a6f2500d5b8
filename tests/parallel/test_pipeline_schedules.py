"""Pipeline schedules and stage splits against orders and layouts written out by hand.

The expected orders below are typed from the definitions, not produced by the code under
test. Notation: "F3" / "B3" is the forward / backward of micro-batch 3 (one chunk per
rank); "F1.3" / "B1.3" the forward / backward of chunk 1 on micro-batch 3.

1F1B (PP=4, 8 micro-batches): stage r runs pp - r - 1 warm-up forwards, then one
forward / one backward until the forwards run out, then the remaining backwards.

Interleaved 1F1B (PP=4, 2 chunks per rank, 8 micro-batches = 16 virtual micro-batches),
as Megatron-LM defines it: virtual micro-batch k runs chunk (k // 4) % 2 forward on
micro-batch (k // 8) * 4 + k % 4, so the forwards go
    F0.0 F0.1 F0.2 F0.3  F1.0 F1.1 F1.2 F1.3  F0.4 F0.5 F0.6 F0.7  F1.4 F1.5 F1.6 F1.7
and the backwards walk the chunks in reverse,
    B1.0 B1.1 B1.2 B1.3  B0.0 B0.1 B0.2 B0.3  B1.4 B1.5 B1.6 B1.7  B0.4 B0.5 B0.6 B0.7;
stage r runs (4 - r - 1) * 2 + (2 - 1) * 4 warm-up forwards (10, 8, 6, 4), then pairs
(next forward, next backward), then the remaining backwards.

The orders are also executed by `run_schedule` on four gloo ranks with a toy stage
(tanh(Linear) layers on [s, b, h] activations): the steps each rank runs, the
activations it holds, the losses and the gradients are checked, the last two against
the same toy stack run in this process.
"""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.pipeline import (StageIO, forward_only_order, interleaved_order,
                                        interleaved_warmup, model_chunks, one_f_one_b_order,
                                        run_schedule)
from paratron.parallel.process_groups import ProcessGroups


def _steps(text: str) -> list[tuple[str, int, int]]:
    """'F0 B0' -> [('F', 0, 0), ('B', 0, 0)];  'F1.3' -> ('F', 1, 3)."""
    steps = []
    for token in text.split():
        kind, rest = token[0], token[1:]
        chunk, micro = rest.split(".") if "." in rest else ("0", rest)
        steps.append((kind, int(chunk), int(micro)))
    return steps


PP, MICRO, VPP = 4, 8, 2

ONE_F_ONE_B = {  # PP=4, 8 micro-batches
    0: _steps("F0 F1 F2   F3 B0 F4 B1 F5 B2 F6 B3 F7 B4   B5 B6 B7"),
    1: _steps("F0 F1   F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5   B6 B7"),
    2: _steps("F0   F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6   B7"),
    3: _steps("F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7"),
}

INTERLEAVED = {  # PP=4, 2 chunks per rank, 8 micro-batches
    0: _steps("F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 F0.5 "          # warm-up 10
              "F0.6 B1.0 F0.7 B1.1 F1.4 B1.2 F1.5 B1.3 F1.6 B0.0 F1.7 B0.1 "
              "B0.2 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7"),
    1: _steps("F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 "                    # warm-up 8
              "F0.4 B1.0 F0.5 B1.1 F0.6 B1.2 F0.7 B1.3 "
              "F1.4 B0.0 F1.5 B0.1 F1.6 B0.2 F1.7 B0.3 "
              "B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7"),
    2: _steps("F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 "                              # warm-up 6
              "F1.2 B1.0 F1.3 B1.1 F0.4 B1.2 F0.5 B1.3 F0.6 B0.0 "
              "F0.7 B0.1 F1.4 B0.2 F1.5 B0.3 F1.6 B1.4 F1.7 B1.5 "
              "B1.6 B1.7 B0.4 B0.5 B0.6 B0.7"),
    3: _steps("F0.0 F0.1 F0.2 F0.3 "                                        # warm-up 4
              "F1.0 B1.0 F1.1 B1.1 F1.2 B1.2 F1.3 B1.3 "
              "F0.4 B0.0 F0.5 B0.1 F0.6 B0.2 F0.7 B0.3 "
              "F1.4 B1.4 F1.5 B1.5 F1.6 B1.6 F1.7 B1.7 "
              "B0.4 B0.5 B0.6 B0.7"),
}

# Evaluation: each micro-batch through both chunks, in micro-batch order, on every rank.
FORWARD_ONLY = _steps("F0.0 F1.0 F0.1 F1.1 F0.2 F1.2 F0.3 F1.3 "
                      "F0.4 F1.4 F0.5 F1.5 F0.6 F1.6 F0.7 F1.7")

# The strawman: every forward, then every backward (GPipe without recomputation).
ALL_FORWARDS_THEN_BACKWARDS = _steps("F0 F1 F2 F3 F4 F5 F6 F7 B0 B1 B2 B3 B4 B5 B6 B7")


# ---------------------------------------------------------------------- the orders
@pytest.mark.parametrize("rank", range(PP))
def test_one_f_one_b_order_matches_hand_written(rank):
    assert one_f_one_b_order(PP, rank, MICRO) == ONE_F_ONE_B[rank]


@pytest.mark.parametrize("rank", range(PP))
def test_interleaved_order_matches_hand_written(rank):
    assert interleaved_order(PP, rank, MICRO, VPP) == INTERLEAVED[rank]


def test_forward_only_order_matches_hand_written():
    assert forward_only_order(MICRO, VPP) == FORWARD_ONLY
    assert forward_only_order(3, 1) == _steps("F0 F1 F2")


def test_hand_written_orders_are_complete():
    """Sanity of the literals themselves: every (chunk, micro) runs F once and B once,
    B after its F."""
    for orders, chunks in ((ONE_F_ONE_B, 1), (INTERLEAVED, VPP)):
        for order in orders.values():
            assert sorted(order) == sorted((k, c, m) for k in "FB" for c in range(chunks)
                                           for m in range(MICRO))
            for c in range(chunks):
                for m in range(MICRO):
                    assert order.index(("F", c, m)) < order.index(("B", c, m))


# ---------------------------------------------------------------------- toy stack
LAYERS, S, B, H = 8, 3, 2, 4
DTYPE = torch.float64


def _toy_layers() -> list[torch.nn.Linear]:
    layers = []
    for i in range(LAYERS):
        torch.manual_seed(100 + i)
        layers.append(torch.nn.Linear(H, H, dtype=DTYPE))
    return layers


def _toy_batch(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + m)
    return (torch.randn(S, B, H, generator=g, dtype=DTYPE),
            torch.randn(S, B, H, generator=g, dtype=DTYPE))


def _apply(layers, x):
    for layer in layers:
        x = torch.tanh(layer(x))
    return x


def _toy_loss(y, target):
    return ((y - target) ** 2).mean()


def _reference(num_microbatches: int):
    """The whole stack in this process: per-micro-batch losses and summed gradients."""
    layers = _toy_layers()
    losses = []
    for m in range(num_microbatches):
        x, target = _toy_batch(m)
        loss = _toy_loss(_apply(layers, x), target)
        loss.backward()
        losses.append(loss.item())
    return losses, {i: (layer.weight.grad, layer.bias.grad) for i, layer in enumerate(layers)}


def _execute(pg, order, vpp, num_microbatches, forward_only=False, warmup=None):
    """Run `order` on this rank with the toy stack (`warmup`: the interleaved schedule's,
    whose steady pairs share their transfers); what happened, losses, gradients."""
    layers = _toy_layers()
    chunks = model_chunks(LAYERS, pg.pp.size, pg.pp.rank, vpp)

    def forward(c, m, x):
        assert (x is None) == chunks[c].is_first
        if x is None:
            x = _toy_batch(m)[0]
        return _apply([layers[i] for i in chunks[c].layers], x)

    def loss(m, y):
        return _toy_loss(y, _toy_batch(m)[1])

    record, before = [], []
    losses = run_schedule(order, chunks, pg, forward, loss, StageIO((S, B, H), DTYPE,
                                                                   torch.device("cpu")),
                          forward_only=forward_only, warmup=warmup,
                          before_backward=lambda c, m: before.append((c, m)),
                          record=record)
    grads = {i: (layers[i].weight.grad, layers[i].bias.grad)
             for chunk in chunks for i in chunk.layers}
    return dict(steps=[step[:3] for step in record], held=[step[3] for step in record],
                before_backward=before, losses=[float(x) for x in losses], grads=grads)


def _all_schedules():
    pg = ProcessGroups.build(1, PP)
    r = pg.pp.rank
    assert pg.pp.size == PP
    runs = {
        "1f1b": _execute(pg, one_f_one_b_order(PP, r, MICRO), 1, MICRO),
        "1f1b_16": _execute(pg, one_f_one_b_order(PP, r, 16), 1, 16),
        "interleaved": _execute(pg, interleaved_order(PP, r, MICRO, VPP), VPP, MICRO,
                                warmup=interleaved_warmup(PP, r, MICRO, VPP)),
        # 4 micro-batches: ranks 0 and 1 run every forward before any backward.
        "interleaved_4": _execute(pg, interleaved_order(PP, r, 4, VPP), VPP, 4,
                                  warmup=interleaved_warmup(PP, r, 4, VPP)),
        "all_forwards_then_backwards": _execute(pg, ALL_FORWARDS_THEN_BACKWARDS, 1, MICRO),
        "forward_only": _execute(pg, forward_only_order(MICRO, VPP), VPP, MICRO,
                                 forward_only=True),
    }
    dist.barrier()
    return runs


@pytest.fixture(scope="module")
def runs():
    """{schedule: [per-rank result]} from one 4-rank run."""
    results = run_distributed(PP, _all_schedules, timeout=30)
    return {name: [results[rank][name] for rank in range(PP)] for name in results[0]}


@pytest.fixture(scope="module")
def reference():
    return {n: _reference(n) for n in (4, MICRO, 16)}


# ---------------------------------------------------------------------- execution
@pytest.mark.parametrize("schedule, expected", [("1f1b", ONE_F_ONE_B),
                                                ("interleaved", INTERLEAVED)])
def test_executed_steps_match_hand_written(runs, schedule, expected):
    for rank in range(PP):
        run = runs[schedule][rank]
        assert run["steps"] == expected[rank], f"rank {rank}"
        assert run["before_backward"] == [(c, m) for k, c, m in expected[rank] if k == "B"]


def test_forward_only_executes_hand_written_order(runs, reference):
    for rank in range(PP):
        run = runs["forward_only"][rank]
        assert run["steps"] == FORWARD_ONLY
        assert run["held"] == [0] * len(FORWARD_ONLY)
        assert run["before_backward"] == []
        assert all(g == (None, None) for g in run["grads"].values())
    assert runs["forward_only"][PP - 1]["losses"] == pytest.approx(reference[MICRO][0],
                                                                   rel=1e-12)


@pytest.mark.parametrize("schedule, micro", [("1f1b", MICRO), ("1f1b_16", 16),
                                             ("interleaved", MICRO), ("interleaved_4", 4),
                                             ("all_forwards_then_backwards", MICRO)])
def test_losses_and_gradients_equal_one_process(runs, reference, schedule, micro):
    ref_losses, ref_grads = reference[micro]
    for rank in range(PP - 1):
        assert runs[schedule][rank]["losses"] == []
    assert runs[schedule][PP - 1]["losses"] == pytest.approx(ref_losses, rel=1e-12)
    grads = {}
    for run in runs[schedule]:
        assert not set(grads) & set(run["grads"])
        grads.update(run["grads"])
    assert sorted(grads) == list(range(LAYERS))
    for i, (weight, bias) in ref_grads.items():
        torch.testing.assert_close(grads[i][0], weight, msg=f"layer {i} weight")
        torch.testing.assert_close(grads[i][1], bias, msg=f"layer {i} bias")


# ---------------------------------------------------------------------- memory
def test_one_f_one_b_first_stage_holds_at_most_pp_microbatches(runs):
    for schedule in ("1f1b", "1f1b_16"):
        held = [max(run["held"]) for run in runs[schedule]]
        assert held[0] <= PP
        assert held == [4, 3, 2, 1], schedule  # stage r holds pp - r
    # Without 1F1B's interleaving of backwards the bound is not met: all 8 held.
    assert max(runs["all_forwards_then_backwards"][0]["held"]) == MICRO
    assert runs["all_forwards_then_backwards"][0]["held"][:MICRO] == list(range(1, MICRO + 1))


def test_interleaved_holds_warmup_plus_one(runs):
    # Warm-up forwards (10, 8, 6, 4) plus the first steady forward.
    assert [max(run["held"]) for run in runs["interleaved"]] == [11, 9, 7, 5]


def test_held_counts_follow_steps(runs):
    """activations_held is the forwards run minus the backwards run so far."""
    for schedule in ("1f1b", "interleaved"):
        for run in runs[schedule]:
            held = 0
            for (kind, _, _), recorded in zip(run["steps"], run["held"]):
                held += 1 if kind == "F" else -1
                assert recorded == held
            assert held == 0


# ---------------------------------------------------------------------- stage split
def _layout(num_layers, pp, vpp=1, **split):
    """[[layers of each chunk] for each rank], checking chunk indices and first/last."""
    out = []
    for rank in range(pp):
        chunks = model_chunks(num_layers, pp, rank, vpp, **split)
        assert [c.index for c in chunks] == list(range(vpp))
        for c in chunks:
            assert c.is_first == (rank == 0 and c.index == 0)
            assert c.is_last == (rank == pp - 1 and c.index == vpp - 1)
        out.append([c.layers for c in chunks])
    return out


@pytest.mark.parametrize("args, split, expected", [
    # Even split, no virtual stages.
    ((8, 4), {}, [[range(0, 2)], [range(2, 4)], [range(4, 6)], [range(6, 8)]]),
    # Megatron's interleaving: 8 layers, PP=2, 2 chunks per rank.
    ((8, 2, 2), {}, [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]),
    # 8 layers, PP=2, 4 chunks per rank: one layer per chunk, alternating.
    ((8, 2, 4), {}, [[range(0, 1), range(2, 3), range(4, 5), range(6, 7)],
                     [range(1, 2), range(3, 4), range(5, 6), range(7, 8)]]),
    # 8 layers, PP=4, 2 chunks per rank.
    ((8, 4, 2), {}, [[range(0, 1), range(4, 5)], [range(1, 2), range(5, 6)],
                     [range(2, 3), range(6, 7)], [range(3, 4), range(7, 8)]]),
    # 7 layers over 3 stages as 3|2|2.
    ((7, 3), dict(first=3), [[range(0, 3)], [range(3, 5)], [range(5, 7)]]),
    # DeepSeek-V2-Lite: 27 layers, PP=4, 6 on the first stage -> 6|7|7|7.
    ((27, 4), dict(first=6), [[range(0, 6)], [range(6, 13)], [range(13, 20)],
                              [range(20, 27)]]),
    # Last-stage override: 10 layers, PP=3, 2 last -> 4|4|2.
    ((10, 3), dict(last=2), [[range(0, 4)], [range(4, 8)], [range(8, 10)]]),
    # Both overrides: 10 layers, PP=4, 1 first, 3 last -> 1|3|3|3.
    ((10, 4), dict(first=1, last=3), [[range(0, 1)], [range(1, 4)], [range(4, 7)],
                                      [range(7, 10)]]),
    # PP=2 with a first-stage override: the last stage takes the rest -> 3|5.
    ((8, 2), dict(first=3), [[range(0, 3)], [range(3, 8)]]),
    # Uneven first stage with 2 chunks per rank: 8 layers, PP=3, 4 first -> 4|2|2, every
    # stage's layers halved over its chunks: [0-1][4-5] | [2][6] | [3][7].
    ((8, 3, 2), dict(first=4), [[range(0, 2), range(4, 6)], [range(2, 3), range(6, 7)],
                                [range(3, 4), range(7, 8)]]),
    # The embedding counted as a layer: 7 + 1 over 4 stages, the first one short -> 1|2|2|2.
    ((7, 4), dict(account_for_embedding=True), [[range(0, 1)], [range(1, 3)],
                                                [range(3, 5)], [range(5, 7)]]),
    # The loss counted as a layer: 7 + 1 over 4, the last one short -> 2|2|2|1.
    ((7, 4), dict(account_for_loss=True), [[range(0, 2)], [range(2, 4)], [range(4, 6)],
                                           [range(6, 7)]]),
    # Both: 6 + 2 over 4 -> 1|2|2|1.
    ((6, 4), dict(account_for_embedding=True, account_for_loss=True),
     [[range(0, 1)], [range(1, 3)], [range(3, 5)], [range(5, 6)]]),
    # 15 + 1 over 4 -> 3|4|4|4 (a 16-layer-equivalent stack with the embedding as one).
    ((15, 4), dict(account_for_embedding=True), [[range(0, 3)], [range(3, 7)],
                                                 [range(7, 11)], [range(11, 15)]]),
    # No pipeline: everything on the one stage.
    ((5, 1), {}, [[range(0, 5)]]),
], ids=["8_pp4", "8_pp2_vpp2", "8_pp2_vpp4", "8_pp4_vpp2", "7_pp3_first3",
        "27_pp4_first6", "10_pp3_last2", "10_pp4_first1_last3", "8_pp2_first3",
        "8_pp3_vpp2_first4", "7_pp4_embedding", "7_pp4_loss", "6_pp4_embedding_loss",
        "15_pp4_embedding", "5_pp1"])
def test_model_chunks_layout(args, split, expected):
    assert _layout(*args, **split) == expected


def test_embedding_only_first_stage_is_allowed():
    # 3 layers + the embedding over 4 stages: the first stage holds only the embedding.
    assert [c.layers for r in range(4) for c in model_chunks(3, 4, r,
                                                             account_for_embedding=True)] == [
        range(0, 0), range(0, 1), range(1, 2), range(2, 3)]


@pytest.mark.parametrize("args, split, match", [
    ((8, 3), {}, "does not split"),                        # 8 over 3
    ((9, 3), dict(first=2), "remaining 7"),                # 7 left for 2 stages
    ((8, 4), dict(first=3, last=2), "remaining 3"),        # 3 left for 2 stages
    ((4, 2), dict(first=5), "remaining -1"),               # more than there is
    ((8, 4), dict(account_for_embedding=True), "not divisible"),   # 9 over 4
    ((6, 2, 2), {}, "not divisible by the 4 pipeline stages"),  # 3 per rank, 2 chunks
    ((4, 4, 2), {}, "not enough for 8 pipeline stages"),  # 1 per rank, 2 chunks
    ((4, 3), dict(first=4), "without layers"),            # nothing left for 2 stages

    ((9, 3, 2), dict(first=4), "remaining 5"),             # 5 left for 2 stages
    ((10, 3, 2), dict(first=4), "divide into 2 chunks"),   # 4|3|3: 3 not in 2 chunks
])
def test_model_chunks_refusals(args, split, match):
    with pytest.raises(ValueError, match=match) as info:
        model_chunks(*args[:2], 0, *args[2:], **split)
    assert "\n" not in str(info.value)


def test_model_chunks_embedding_in_split_with_virtual_stages():
    # Megatron counts the embedding against the first *virtual* stage: (7 + 1) / (2 x 2)
    # = 2 layers per chunk, one fewer on the first.
    assert _layout(7, 2, 2, account_for_embedding=True) == [
        [range(0, 1), range(3, 5)], [range(1, 3), range(5, 7)]]


def test_model_chunks_refuses_first_with_embedding_in_split():
    with pytest.raises(ValueError):
        model_chunks(7, 3, 0, first=3, account_for_embedding=True)
