"""Expert parallelism equals one process: the MoE layer at EP2, EP2 x TP2 (expert TP 1 and
2, with and without sequence parallelism), both token dispatchers, loop and grouped
experts, shared experts, aux and z losses on; one host read of the split sizes per
forward, none in backward.

Every rank builds the single-process layer from one seed and runs it on the input of
each data-parallel rank (EP is folded into DP: EP ranks see different tokens). Its own
layer gets its shard of the weights and its part of its data-parallel rank's input; its
outputs, input gradients and logged losses must equal the reference's for that input,
and after the reductions the trainer performs (TP sums of sequence-parallel weights, DP
sums of dense gradients, expert-DP sums of expert gradients) every gradient must equal
the reference's summed over all inputs. Gloo on CPU, fp32, dropless.
"""

import torch
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.model.config import TransformerConfig
from paratron.model.moe import grouped_mm_fn as _grouped_mm_fn
from paratron.model.moe import Experts, MoELayer
from paratron.parallel.expert_parallel import (AllGatherV, AllToAll, ReduceScatterV,
                                               chunk_transpose_index, expert_gather,
                                               expert_shard)
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import layout_of, shard_tensor
from paratron.parallel.tensor_parallel import finish_tensor_parallel_grads
from tests.helpers.sync_guard import HostSyncGuard, report

S, B, H = 8, 2, 32


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


def moe_config(sequence_parallel=False, **overrides):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=64,
                num_experts=8, moe_ffn_hidden_size=16, moe_router_topk=3, swiglu=True,
                add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                moe_shared_expert_intermediate_size=32, moe_router_pre_softmax=True,
                moe_router_topk_scaling_factor=1.5, moe_aux_loss_coeff=0.01,
                moe_z_loss_coeff=0.001, sequence_parallel=sequence_parallel)
    base.update(overrides)
    return TransformerConfig(**base)


def reference(config, dp_size):
    """Single-process layer, and per data-parallel rank: input, output gradient, output,
    input gradient, logged losses; plus the parameter gradients summed over the inputs."""
    torch.manual_seed(0)
    layer = MoELayer(config).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    runs = []
    for d in range(dp_size):
        x = torch.randn(S, B, H, generator=g).requires_grad_()
        dy = torch.randn(S, B, H, generator=g)
        y = layer(x)
        y.backward(dy)
        runs.append(dict(x=x.detach(), dy=dy, y=y.detach(), dx=x.grad,
                         aux=layer.last_aux_loss, z=layer.last_z_loss))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return layer, runs, grads


def shard_of(name, full, param, pg):
    if layout_of(param).expert:
        return expert_shard(full, param, pg)
    if name.startswith("shared_experts.linear_fc"):
        return shard_tensor(full, param, pg.tp.size, pg.tp.rank)
    return full


def _check_layer(pg, dp_rank, sp, dispatcher, grouped, etp_label):
    overrides = dict(moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped)
    ref_layer, runs, ref_grads = reference(moe_config(**overrides), pg.dp.size)
    layer = MoELayer(moe_config(sequence_parallel=sp, **overrides), pg).train()
    params = dict(layer.named_parameters())
    assert params.keys() == dict(ref_layer.named_parameters()).keys()
    with torch.no_grad():
        for name, p in ref_layer.named_parameters():
            params[name].copy_(shard_of(name, p, params[name], pg))
    run = runs[dp_rank]
    tp, r = pg.tp.size, pg.tp.rank
    piece = (lambda t: t.chunk(tp, dim=0)[r]) if sp else (lambda t: t)
    x = piece(run["x"]).clone().requires_grad_()
    with HostSyncGuard() as forward:
        y = layer(x)
    what = f"{etp_label} sp={sp} {dispatcher} grouped={grouped}"
    close(y, piece(run["y"]), atol=2e-6)
    with HostSyncGuard() as backward:
        y.backward(piece(run["dy"]))
    # The split sizes come to the host once per forward (the loop reads its row counts
    # once more); the backward reuses them.
    assert len(forward.records) <= (1 if grouped else 2), report(forward.records)
    assert not backward.records, report(backward.records)
    close(x.grad, piece(run["dx"]), atol=2e-6)
    close(layer.last_aux_loss, run["aux"])
    close(layer.last_z_loss, run["z"])
    # The trainer's reductions: TP sums of sequence-parallel weights, then DP (dense) or
    # expert-DP (experts) sums.
    finish_tensor_parallel_grads(layer.parameters(), pg)
    for name, p in params.items():
        expert = layout_of(p).expert
        size, group = (pg.edp.size, pg.edp.group) if expert else (pg.dp.size, pg.dp.group)
        if size > 1:
            dist.all_reduce(p.grad, group=group)
        close(p.grad, shard_of(name, ref_grads[name], p, pg), atol=5e-6)
    return what


def _check_equivalence(tp, ep, etp, sps):
    pg = ProcessGroups.build(tp=tp, pp=1, ep=ep, etp=etp)
    assert pg.ep.size == ep and pg.etp.size == etp
    checked = []
    for sp in sps:
        for dispatcher in ("alltoall", "allgather"):
            for grouped in (False, True) if _grouped_mm_fn() else (False,):
                checked.append(_check_layer(pg, pg.dp.rank, sp, dispatcher, grouped,
                                            f"TP{tp} EP{ep} ETP{etp}"))
    return checked


def test_ep2_equals_one_process():
    results = run_distributed(2, _check_equivalence, 1, 2, 1, (False,), timeout=120)
    assert len(results[0]) == (4 if _grouped_mm_fn() else 2)


def _check_ep2_tp2():
    checked = _check_equivalence(2, 2, 1, (False, True))
    checked += _check_equivalence(2, 2, 2, (False, True))
    return checked


def test_ep2_tp2_equals_one_process_with_expert_tp_1_and_2():
    results = run_distributed(4, _check_ep2_tp2, timeout=180)
    assert len(results[0]) == (16 if _grouped_mm_fn() else 8)


def _check_collectives():
    """The variable-size collectives and their backward against hand-made results."""
    pg = ProcessGroups.build(tp=1, pp=1, ep=2)
    r, group = pg.ep.rank, pg.ep.group
    # rank 0 sends 2 rows to itself and 1 to rank 1; rank 1 sends 0 and 3.
    send = [[2, 1], [0, 3]]
    x = (torch.arange(sum(send[r]) * 2, dtype=torch.float32).view(-1, 2) + 10 * r)
    x.requires_grad_()
    recv = [send[0][r], send[1][r]]
    y = AllToAll.apply(x, recv, send[r], group)
    rows0 = torch.arange(6.0).view(3, 2)
    rows1 = torch.arange(6.0).view(3, 2) + 10
    expected = torch.cat([rows0[:2], rows1[:0]]) if r == 0 else torch.cat([rows0[2:], rows1])
    close(y, expected)
    (y * (r + 1)).sum().backward()
    close(x.grad, torch.tensor([1.0, 1.0, 2.0] if r == 0 else [2.0, 2.0, 2.0])[:, None]
          .expand(-1, 2))
    sizes = [1, 3]
    z = torch.full((sizes[r], 2), float(r + 1), requires_grad=True)
    gathered = AllGatherV.apply(z, sizes, group)
    close(gathered, torch.tensor([1.0, 2, 2, 2])[:, None].expand(-1, 2))
    gathered.sum().backward()
    close(z.grad, torch.full((sizes[r], 2), 2.0))  # both ranks used every row once
    w = torch.ones(4, 2, requires_grad=True)
    part = ReduceScatterV.apply(w * (r + 1), sizes, group)
    close(part, torch.full((sizes[r], 2), 3.0))
    part.sum().backward()
    close(w.grad, torch.full((4, 2), float(r + 1)))
    return True


def test_collectives_with_uneven_splits():
    assert run_distributed(2, _check_collectives) == [True, True]


def test_chunk_transpose_and_expert_shards():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # [source, expert]
    # rows: s0e0 s0e0 s0e2 | s1e0 s1e1 s1e1 s1e1 -> e0: s0 s0 s1, e1: s1 s1 s1, e2: s0
    assert chunk_transpose_index(counts, 7).tolist() == [0, 1, 3, 4, 5, 6, 2]
    config = moe_config()
    full = torch.randn(8, 32, H)  # [experts, 2 x ffn (gate; up), h]
    shards = []
    for ep_rank in range(2):
        row = []
        for etp_rank in range(2):
            pg = ProcessGroups.sizes_only(ep=(2, ep_rank), etp=(2, etp_rank))
            experts = Experts(config, pg)
            param = experts.linear_fc1.weight
            assert list(param.shape) == [4, 16, H]
            part = expert_shard(full, param, pg)
            gate, up = full[ep_rank * 4:(ep_rank + 1) * 4].chunk(2, dim=1)
            close(part, torch.cat([gate.chunk(2, 1)[etp_rank], up.chunk(2, 1)[etp_rank]], 1))
            row.append(part)
        shards.append(row)
    close(expert_gather(shards, param), full)


def _generator_for(suffix):
    return torch.Generator().manual_seed(1000 + int(suffix[1:]))


def test_expert_initialisation_is_the_same_in_every_layout():
    config = moe_config()
    whole = Experts(config, ProcessGroups.single())
    whole.linear_fc1.reset_parameters_from(_generator_for)
    whole.linear_fc2.reset_parameters_from(_generator_for)
    for ep, etp in ((2, 1), (4, 2), (1, 2)):
        for ep_rank in range(ep):
            for etp_rank in range(etp):
                pg = ProcessGroups.sizes_only(ep=(ep, ep_rank), etp=(etp, etp_rank))
                experts = Experts(config, pg)
                for name in ("linear_fc1", "linear_fc2"):
                    linear = getattr(experts, name)
                    linear.reset_parameters_from(_generator_for)
                    full = getattr(whole, name).weight
                    close(linear.weight, expert_shard(full, linear.weight, pg), atol=0)
