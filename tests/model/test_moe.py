"""The MoE layer on one process: equal to the transformers MoE blocks (Mixtral, Qwen3-MoE,
Qwen2-MoE, DeepSeek-V2 with shared experts and group-limited routing) on the same weights;
load-balancing and z losses against hand computations; the aux loss evens out expert
load; the grouped-GEMM experts equal the per-expert loop and make no
host sync; capacity drop and pad; expert bias;
refusals. fp32 on CPU.
"""

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from paratron.model.config import TransformerConfig, check_moe_config
from paratron.model.moe import grouped_mm_fn as _grouped_mm_fn
from paratron.model.moe import (MoELayer, TopKRouter, apply_capacity, moe_loss_totals,
                                topk_routing, update_expert_bias)
from paratron.parallel.process_groups import ProcessGroups
from tests.helpers.sync_guard import HostSyncGuard, report

H = 32
needs_grouped_mm = pytest.mark.skipif(_grouped_mm_fn() is None,
                                      reason="this PyTorch has no grouped_mm")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: thread start-up costs more than the work on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moe_config(**overrides):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=64,
                num_experts=8, moe_ffn_hidden_size=24, moe_router_topk=2, swiglu=True,
                add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                moe_aux_loss_coeff=0.0)
    base.update(overrides)
    return TransformerConfig(**base)


def randomize(module, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


def copy_routed(layer, gate, experts):
    with torch.no_grad():
        layer.router.weight.copy_(gate.weight)
        layer.experts.linear_fc1.weight.copy_(experts.gate_up_proj)  # [E, 2F, H]: [gate; up]
        layer.experts.linear_fc2.weight.copy_(experts.down_proj)     # [E, H, F]


def copy_shared(layer, mlp):
    with torch.no_grad():
        layer.shared_experts.linear_fc1.weight.copy_(
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        layer.shared_experts.linear_fc2.weight.copy_(mlp.down_proj.weight)


def run_both(layer, hf_block, seed=1):
    """Same input [b, s, h] through both; ours is sequence-first."""
    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf_block(x.clone())
        actual = layer(x.transpose(0, 1).contiguous()).transpose(0, 1)
    return actual, expected


@pytest.mark.parametrize("grouped", [False, pytest.param(True, marks=needs_grouped_mm)])
def test_matches_mixtral(grouped):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    hf_config = MixtralConfig(hidden_size=H, intermediate_size=24, num_local_experts=8,
                              num_experts_per_tok=2)
    hf_config._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(hf_config).eval()
    randomize(hf)
    layer = MoELayer(moe_config(moe_grouped_gemm=grouped)).eval()
    copy_routed(layer, hf.gate, hf.experts)
    actual, expected = run_both(layer, hf)
    assert expected.abs().max() > 0.1
    close(actual, expected)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_qwen3_moe(norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hf_config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=16, num_experts=16,
                               num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    hf_config._experts_implementation = "eager"
    hf = Qwen3MoeSparseMoeBlock(hf_config).eval()
    randomize(hf, seed=2)
    # Qwen3-MoE renormalises the top-k (softmax after top-k); without it, softmax first.
    layer = MoELayer(moe_config(num_experts=16, moe_ffn_hidden_size=16, moe_router_topk=4,
                                moe_router_pre_softmax=not norm_topk_prob)).eval()
    copy_routed(layer, hf.gate, hf.experts)
    actual, expected = run_both(layer, hf)
    close(actual, expected)


def test_matches_qwen2_moe_with_gated_shared_expert():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    hf_config = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=16, num_experts=8,
                               num_experts_per_tok=2, shared_expert_intermediate_size=40,
                               norm_topk_prob=False)
    hf_config._experts_implementation = "eager"
    hf = Qwen2MoeSparseMoeBlock(hf_config).eval()
    randomize(hf, seed=3)
    config = moe_config(moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=40,
                        moe_router_pre_softmax=True)
    config.moe_shared_expert_gate = True
    layer = MoELayer(config).eval()
    copy_routed(layer, hf.gate, hf.experts)
    copy_shared(layer, hf.shared_expert)
    with torch.no_grad():
        layer.shared_experts.gate_weight.copy_(hf.shared_expert_gate.weight)
    actual, expected = run_both(layer, hf)
    close(actual, expected)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_matches_deepseek_v2(method):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    groups = dict(n_group=4, topk_group=2) if method == "group_limited_greedy" else {}
    hf_config = DeepseekV2Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=16,
                                 num_experts_per_tok=3, n_shared_experts=2,
                                 routed_scaling_factor=2.5, topk_method=method,
                                 num_attention_heads=4, **groups)
    hf_config._experts_implementation = "eager"
    hf = DeepseekV2Moe(hf_config).eval()
    randomize(hf, seed=4)
    extra = (dict(moe_router_num_groups=4, moe_router_group_topk=2)
             if method == "group_limited_greedy" else {})
    layer = MoELayer(moe_config(num_experts=16, moe_ffn_hidden_size=16, moe_router_topk=3,
                                moe_shared_expert_intermediate_size=32,
                                moe_router_pre_softmax=True,
                                moe_router_topk_scaling_factor=2.5, **extra)).eval()
    copy_routed(layer, hf.gate, hf.experts)
    copy_shared(layer, hf.shared_experts)
    actual, expected = run_both(layer, hf)
    close(actual, expected)
    if method == "group_limited_greedy":
        # The groups matter for this input: plain top-k gives another result.
        plain = MoELayer(moe_config(num_experts=16, moe_ffn_hidden_size=16, moe_router_topk=3,
                                    moe_shared_expert_intermediate_size=32,
                                    moe_router_pre_softmax=True,
                                    moe_router_topk_scaling_factor=2.5)).eval()
        plain.load_state_dict(layer.state_dict())
        assert (run_both(plain, hf)[0] - expected).abs().max() > 1e-2
        logits = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
        limited = topk_routing(logits, 3, pre_softmax=True, num_groups=4, group_topk=2)[1]
        assert (limited.view(60, 4, 4).any(-1).sum(-1) <= 2).all()


# ---------------------------------------------------------------- auxiliary losses
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.5, 2.5, 0.0, 0.0],
                       [1.0, 0.0, 3.0, 0.5],
                       [2.0, 0.0, 0.0, 1.5],
                       [0.0, 1.0, 0.2, 0.1],
                       [1.0, 2.0, 3.0, 4.0]])  # 6 tokens (s=3, b=2), 4 experts


def router_for(logits, **overrides):
    """A router whose logits equal `logits`: tokens are the logits, weight the identity."""
    config = moe_config(hidden_size=logits.shape[1], num_experts=logits.shape[1],
                        moe_router_topk=2, **overrides)
    router = TopKRouter(config).train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(logits.shape[1]))
    return router


def hand_aux_loss(logits, k, coeff):
    """coeff * E * sum_i f_i P_i, f_i = tokens to expert i / (T k), P_i = mean prob of i."""
    T, E = logits.shape
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    counts = [0] * E
    for row in probs:
        for i in sorted(range(E), key=lambda i: -row[i])[:k]:
            counts[i] += 1
    f = [c / (T * k) for c in counts]
    P = [sum(row[i] for row in probs) / T for i in range(E)]
    return coeff * E * sum(fi * pi for fi, pi in zip(f, P))


def test_aux_loss_equals_hand_computation_and_gives_its_gradient():
    coeff, scale = 0.1, 0.5
    router = router_for(LOGITS, moe_aux_loss_coeff=coeff)
    tokens = LOGITS.clone().requires_grad_()
    probs, routing_map, losses = router(tokens, seq_length=3, aux_loss_scale=scale)
    expected = hand_aux_loss(LOGITS, 2, coeff)
    assert expected > coeff  # skewed routing: above the balanced value coeff * 1
    close(losses["load_balancing_loss"] * coeff, torch.tensor(expected))
    # top-2 per row: (0,1) (1,0) (2,0) (0,3) (1,2) (3,2)
    assert routing_map.sum(0).tolist() == [4, 3, 3, 2]
    # Backward of a loss that ignores the probs still carries scale x d(aux)/d(weights).
    (probs * 0).sum().backward()
    weight = torch.eye(4).requires_grad_()
    scores = torch.softmax(LOGITS @ weight.t(), -1)
    counts = torch.tensor([4.0, 3.0, 3.0, 2.0])
    aux = coeff * 4 / (2 * 36) * (scores.sum(0) * counts).sum()
    (aux * scale).backward()
    close(router.weight.grad, weight.grad)


def test_seq_aux_loss_is_the_mean_over_sequences():
    coeff = 0.01
    router = router_for(LOGITS, moe_aux_loss_coeff=coeff,
                        moe_router_load_balancing_type="seq_aux_loss")
    _, _, losses = router(LOGITS.clone(), seq_length=3)
    # Tokens are [s, b] flattened: sequence j holds rows j, j+2, j+4.
    per_sequence = [hand_aux_loss(LOGITS[j::2], 2, coeff) for j in range(2)]
    close(losses["seq_load_balancing_loss"] * coeff, torch.tensor(sum(per_sequence) / 2))


def test_z_loss():
    router = router_for(LOGITS, moe_z_loss_coeff=1e-3)
    _, _, losses = router(LOGITS.clone(), seq_length=3)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS.tolist()) / 6
    close(losses["z_loss"], torch.tensor(expected))


def test_layer_records_losses_for_logging_and_not_in_eval():
    layer = MoELayer(moe_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)).train()
    randomize(layer)
    x = torch.randn(4, 2, H)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert layer.last_aux_loss is not None and layer.last_z_loss is not None
    totals = moe_loss_totals(layer)
    assert totals["load_balancing_loss"][1] == 2 and totals["z_loss"][1] == 2
    close(totals["load_balancing_loss"][0], 2 * layer.last_aux_loss)
    assert moe_loss_totals(layer) == {}
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert moe_loss_totals(layer) == {}


def test_recompute_counts_once_and_keeps_gradients():
    config = moe_config(moe_aux_loss_coeff=0.01, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True)
    layer = MoELayer(config).train()
    randomize(layer)
    x = torch.randn(4, 2, H, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    counts = layer.router.local_tokens_per_expert.clone()
    assert counts.sum() == 4 * 2 * 2
    layer.zero_grad()
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for p, g in zip(layer.parameters(), grads):
        close(p.grad, g, atol=1e-6)
    close(layer.router.local_tokens_per_expert, 2 * counts)
    assert moe_loss_totals(layer)["load_balancing_loss"][1] == 2


def _load_after_training(coeff, steps=40):
    torch.manual_seed(0)
    layer = MoELayer(moe_config(hidden_size=16, moe_ffn_hidden_size=16,
                                moe_aux_loss_coeff=coeff))
    g = torch.Generator().manual_seed(1)
    randomize(layer, std=0.1)
    shift = torch.randn(16, generator=g)
    with torch.no_grad():  # experts 0 and 1 attract every token at the start
        layer.router.weight[0] += 0.3 * shift
        layer.router.weight[1] += 0.2 * shift
    target = torch.randn(16, 16, generator=g) / 4
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(16, 4, 16, generator=g) + shift
        loss = (layer(x) - torch.tanh(x @ target)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.randn(64, 4, 16, generator=g) + shift
        _, routing_map, _ = layer.router(x.reshape(-1, 16), seq_length=64)
    load = routing_map.sum(0).float()
    return load / load.sum()


def test_aux_loss_evens_out_expert_load():
    without, with_aux = _load_after_training(0.0), _load_after_training(0.1)
    cv = lambda load: (load.std() / load.mean()).item()  # noqa: E731
    assert without.max() > 0.4 and (without == 0).sum() >= 4  # collapsed onto two experts
    assert with_aux.max() < 0.25 and (with_aux > 0).all()
    assert cv(with_aux) < 0.3 * cv(without)


# --------------------------------------------------------------------- experts
ROUTERS = {
    "top-k": {},
    "capacity drop": dict(moe_expert_capacity_factor=0.5),
    "capacity pad": dict(moe_expert_capacity_factor=0.5, moe_pad_expert_input_to_capacity=True),
    "group-limited": dict(moe_router_num_groups=3, moe_router_group_topk=2,
                          moe_router_pre_softmax=True),
    "aux-loss-free (sigmoid, expert bias)": dict(moe_router_score_function="sigmoid",
                                                 moe_router_enable_expert_bias=True),
    "top-1 pre-softmax": dict(moe_router_topk=1, moe_router_pre_softmax=True),
}


def _run_experts(layer, x, kernel):
    """Output and gradients (input, then every parameter) of one forward and backward."""
    layer.experts.grouped_gemm = kernel != "loop"
    x = x.clone().requires_grad_()
    out = layer(x)
    out.float().backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return [out] + [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", list(ROUTERS))
@needs_grouped_mm
def test_grouped_experts_equal_the_loop(router, dtype):
    """The default, sync-free experts (one grouped GEMM per linear) against the
    per-expert loop: 6 experts, top-3 of 21 tokens (groups not multiples of the
    alignment, one expert left without tokens), forward and every gradient."""
    torch.manual_seed(0)
    config = moe_config(num_experts=6, moe_ffn_hidden_size=16, moe_router_topk=3,
                        moe_shared_expert_intermediate_size=16)
    for key, value in ROUTERS[router].items():
        setattr(config, key, value)
    layer = MoELayer(config)
    randomize(layer)
    with torch.no_grad():
        layer.router.weight[0] = -10.0  # expert 0 gets no token
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 6))
    layer = layer.to(dtype)
    x = torch.randn(7, 3, H, dtype=dtype)
    expected = _run_experts(copy.deepcopy(layer), x, "loop")
    actual = _run_experts(layer, x, "grouped")
    for a, b in zip(actual, expected):
        if dtype == torch.float32:
            close(a, b, atol=1e-6)
        else:
            assert (a.float() - b.float()).norm() <= 0.01 * b.float().norm()


def test_experts_without_rows_get_zero_gradients():
    """Every local expert joins backward, those without rows with a zero gradient; rows
    after the experts' (capacity drops) give no output."""
    layer = MoELayer(moe_config(num_experts=6, moe_ffn_hidden_size=16))
    randomize(layer)
    for grouped in (False, True):
        experts = layer.experts
        experts.grouped_gemm = grouped
        experts.zero_grad()
        out = experts(torch.randn(10, H), torch.tensor([0, 8, 0, 0, 0, 0]))
        out[:8].sum().backward()
        assert experts.linear_fc1.weight.grad[0].abs().sum() == 0
        assert experts.linear_fc1.weight.grad[1].abs().sum() > 0


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_layer_makes_no_host_sync(dispatcher):
    """At EP = ETP = 1 the layer's forward and backward read nothing on the host."""
    layer = MoELayer(moe_config(moe_token_dispatcher_type=dispatcher,
                                moe_expert_capacity_factor=1.0))
    randomize(layer)
    x = torch.randn(6, 2, H, requires_grad=True)
    with HostSyncGuard() as guard:
        layer(x).sum().backward()
    assert not guard.records, report(guard.records)


def test_reset_parameters_from_draws_each_expert_by_name():
    layer = MoELayer(moe_config())
    seen = []

    def generator_for(suffix):
        seen.append(suffix)
        return torch.Generator().manual_seed(len(suffix) * 7 + int(suffix[1:]))

    layer.experts.linear_fc1.reset_parameters_from(generator_for)
    assert seen == [f".{e}" for e in range(8)]
    expected = torch.empty(48, H).normal_(0, 0.02, generator=generator_for(".3"))
    close(layer.experts.linear_fc1.weight[3], expected)


# --------------------------------------------------------------------- capacity
def test_capacity_drop_by_probs_and_position_and_pad():
    # 4 tokens, 2 experts, top-1: every token prefers expert 0; capacity ceil(4/2 x 1) = 2.
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    probs, routing_map = topk_routing(logits, 1, pre_softmax=True)
    assert routing_map[:, 0].all()
    p, m = apply_capacity(probs, routing_map, 1, 1.0, "probs")
    assert m[:, 0].tolist() == [False, True, True, False] and not m[:, 1].any()
    close(p[:, 0], probs[:, 0] * torch.tensor([0.0, 1, 1, 0]))
    _, m = apply_capacity(probs, routing_map, 1, 1.0, "position")
    assert m[:, 0].tolist() == [True, True, False, False]
    p, m = apply_capacity(probs, routing_map, 1, 1.0, "probs", pad_to_capacity=True)
    assert m.sum(0).tolist() == [2, 2]  # expert 1 padded with the first two tokens
    assert m[:, 1].tolist() == [True, True, False, False] and (p[:, 1] == 0).all()
    # A generous factor drops nothing.
    _, m = apply_capacity(probs, routing_map, 1, 4.0, "probs")
    assert torch.equal(m, routing_map)


@pytest.mark.parametrize("pad", [False, True])
def test_layer_drops_tokens_over_capacity(pad):
    config = moe_config(hidden_size=2, num_experts=2, moe_router_topk=1,
                        moe_router_pre_softmax=True, moe_ffn_hidden_size=8,
                        moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=pad)
    layer = MoELayer(config).eval()
    randomize(layer)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[[1.0, 0.3]], [[3.0, -0.2]], [[2.0, 0.1]], [[0.5, 0.7]]])  # [4, 1, 2]
    with torch.no_grad():
        out = layer(x)
        dropless = MoELayer(moe_config(hidden_size=2, num_experts=2, moe_router_topk=1,
                                       moe_router_pre_softmax=True, moe_ffn_hidden_size=8))
        dropless.load_state_dict(layer.state_dict())
        full = dropless.eval()(x)
    assert (out[0] == 0).all() and (out[3] == 0).all()  # lowest weights dropped
    close(out[1:3], full[1:3], atol=1e-7)


# ------------------------------------------------------------------ expert bias
def test_expert_bias_steers_choice_only_and_moves_towards_idle_experts():
    config = moe_config(hidden_size=4, num_experts=4, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True)
    router = router_for(LOGITS, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True)
    probs, routing_map, _ = router(LOGITS.clone(), seq_length=3)
    counts = routing_map.sum(0).float()
    close(router.local_tokens_per_expert, counts)
    layer = MoELayer(config)
    layer.router = router
    update_expert_bias(layer, ProcessGroups.single(), rate=0.1)
    close(router.expert_bias, torch.sign(counts.mean() - counts) * 0.1)
    assert router.local_tokens_per_expert.sum() == 0
    # A large bias on expert 2 makes every token choose it; its weight stays sigmoid-based.
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    probs, routing_map, _ = router(LOGITS.clone(), seq_length=3)
    assert routing_map[:, 2].all()
    sig = torch.sigmoid(LOGITS)
    chosen = sig * routing_map
    close(probs, chosen / chosen.sum(-1, keepdim=True))
    assert "expert_bias" in router.state_dict()


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, sizes, message", [
    (dict(num_experts=6), dict(ep_size=4), "--num-experts 6 is not divisible by "
                                            "--expert-model-parallel-size 4"),
    (dict(moe_router_topk=9), {}, "--moe-router-topk 9 must be between 1 and --num-experts 8"),
    (dict(add_bias_linear=True), {}, "--disable-bias-linear"),
    (dict(moe_router_enable_expert_bias=True), {}, "--moe-router-score-function sigmoid"),
    (dict(moe_router_topk=1), {}, "--moe-router-pre-softmax"),
    (dict(moe_router_num_groups=3), {}, "--moe-router-num-groups must divide"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=1, moe_router_topk=3), {},
     "--moe-router-topk 3 is above the experts"),
    (dict(moe_pad_expert_input_to_capacity=True), {}, "needs --moe-expert-capacity-factor"),
    (dict(moe_router_load_balancing_type="sinkhorn"), {}, "is not supported"),
    (dict(moe_ffn_hidden_size=18), dict(tp_size=2, etp_size=4), "not divisible by expert "
                                                                  "tensor-parallel size 4"),
])
def test_refusals(overrides, sizes, message):
    with pytest.raises(ValueError, match="^[^\n]*$") as error:
        check_moe_config(moe_config(**overrides), **sizes)
    assert message in str(error.value)
