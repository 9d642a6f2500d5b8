"""Multi-latent attention: DeepSeek-V2's math (against transformers' DeepseekV2Attention)
and tensor / sequence parallelism at TP=2 and TP=4 (against the single-process module).
"""

import math

import pytest
import torch

from tests.helpers.dist_utils import run_distributed
from paratron.model.config import TransformerConfig
from paratron.model.mla import MLASelfAttention
from paratron.model.rotary import build_rotary
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.random import seed_everything
from paratron.parallel.sharding import layout_of, shard_tensor
from paratron.parallel.tensor_parallel import finish_tensor_parallel_grads

HIDDEN, HEADS, KV_RANK, NOPE, ROPE, V = 64, 4, 16, 16, 8, 12
YARN = dict(factor=4.0, mscale=0.707, mscale_all_dim=0.707, original_max=32)


def mla_config(q_lora_rank=None, yarn=True, **overrides) -> TransformerConfig:
    kw = dict(num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
              max_position_embeddings=128, position_embedding_type="rope",
              multi_latent_attention=True, q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK,
              qk_head_dim=NOPE, qk_pos_emb_head_dim=ROPE, v_head_dim=V,
              normalization="RMSNorm", norm_epsilon=1e-6, add_bias_linear=False,
              attention_dropout=0.0, hidden_dropout=0.0, rotary_base=10000.0)
    if yarn:
        kw.update(rotary_scaling_factor=YARN["factor"], mscale=YARN["mscale"],
                  mscale_all_dim=YARN["mscale_all_dim"],
                  original_max_position_embeddings=YARN["original_max"],
                  beta_fast=32.0, beta_slow=1.0)
    kw.update(overrides)
    return TransformerConfig(**kw)


def close(actual, expected, what: str) -> None:
    """fp32 equality up to summation order: rtol 1e-5, and an absolute slack of 1e-6 of
    the tensor's largest entry for entries that cancel to near zero."""
    atol = 1e-6 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def random_weights(module: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn at random (norm weights around one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------
# DeepSeek-V2's math: transformers' attention with the same weights


def _hf_attention(q_lora_rank, yarn):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf

    rope = dict(rope_type="default", rope_theta=10000.0)
    if yarn:
        rope = dict(rope_type="yarn", rope_theta=10000.0, factor=YARN["factor"],
                    mscale=YARN["mscale"], mscale_all_dim=YARN["mscale_all_dim"],
                    original_max_position_embeddings=YARN["original_max"],
                    beta_fast=32, beta_slow=1)
    config = transformers.DeepseekV2Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=128,
        attention_bias=False, rms_norm_eps=1e-6, num_hidden_layers=1, vocab_size=32,
        intermediate_size=32, rope_parameters=rope, attn_implementation="eager")
    attention = hf.DeepseekV2Attention(config, layer_idx=0).eval()
    random_weights(attention, seed=1234)
    return attention, hf.DeepseekV2RotaryEmbedding(config)


# Our module names -> DeepseekV2Attention's; the weights are the same tensors, unpermuted.
HF_NAMES = {"linear_q_proj": "q_proj", "linear_q_down_proj": "q_a_proj",
            "q_layernorm": "q_a_layernorm", "linear_q_up_proj": "q_b_proj",
            "linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
            "linear_kv_up_proj": "kv_b_proj", "linear_proj": "o_proj"}


def _copy_from_hf(ours: MLASelfAttention, theirs) -> None:
    copied = 0
    with torch.no_grad():
        for mine, hf_name in HF_NAMES.items():
            if hasattr(ours, mine):
                getattr(ours, mine).weight.copy_(getattr(theirs, hf_name).weight)
                copied += 1
    assert copied == len(list(ours.parameters())) == len(list(theirs.parameters()))


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("yarn", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mla_matches_transformers(q_lora_rank, yarn, interleaved):
    theirs, hf_rotary = _hf_attention(q_lora_rank, yarn)
    config = mla_config(q_lora_rank, yarn, rotary_interleaved=interleaved)
    ours = MLASelfAttention(config, layer_number=1).eval()
    _copy_from_hf(ours, theirs)

    b, s = 2, 12
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, s, HIDDEN, generator=g)
    # Positions past the original context, where YaRN's interpolation matters.
    position_ids = (torch.arange(s) + 25).unsqueeze(0).expand(b, s)
    causal = torch.full((s, s), torch.finfo(torch.float32).min).triu(1).expand(b, 1, s, s)

    x_hf = x.clone().requires_grad_()
    expected, _ = theirs(x_hf, attention_mask=causal,
                         position_embeddings=hf_rotary(x, position_ids))
    x_ours = x.transpose(0, 1).clone().requires_grad_()
    actual = ours(x_ours, build_rotary(config)(position_ids)).transpose(0, 1)
    assert (actual - expected).abs().max().item() < 1e-5

    dy = torch.randn(expected.shape, generator=g)
    (expected * dy).sum().backward()
    (actual * dy).sum().backward()
    close(x_ours.grad.transpose(0, 1), x_hf.grad, "input grad")
    for name, hf_name in HF_NAMES.items():
        if hasattr(ours, name):
            close(getattr(ours, name).weight.grad, getattr(theirs, hf_name).weight.grad, name)


def test_mla_softmax_scale_and_mask():
    """The YaRN softmax scale; an explicit causal mask equals the implicit one."""
    config = mla_config(24, yarn=True)
    attention = MLASelfAttention(config, layer_number=1)
    m = 0.1 * 0.707 * math.log(4.0) + 1.0
    assert attention.softmax_scale == pytest.approx(m * m / math.sqrt(NOPE + ROPE), rel=1e-12)
    assert MLASelfAttention(mla_config(24, yarn=False), 1).softmax_scale == \
        pytest.approx(1 / math.sqrt(NOPE + ROPE), rel=1e-12)
    random_weights(attention, seed=3)
    s, b = 10, 2
    x = torch.randn(s, b, HIDDEN)
    rotary = build_rotary(config)(torch.arange(s).unsqueeze(0).expand(b, s))
    mask = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)
    torch.testing.assert_close(attention(x, rotary, mask), attention(x, rotary),
                               rtol=1e-6, atol=1e-6)


def test_mla_parameters_describe_their_sharding():
    pg = ProcessGroups.single()
    attention = MLASelfAttention(mla_config(24, sequence_parallel=True), 1, pg)
    dims = {n: layout_of(p).dim for n, p in attention.named_parameters()}
    assert dims == {"linear_q_down_proj.weight": None, "q_layernorm.weight": None,
                    "linear_q_up_proj.weight": 0, "linear_kv_down_proj.weight": None,
                    "kv_layernorm.weight": None, "linear_kv_up_proj.weight": 0,
                    "linear_proj.weight": 1}
    marked = {n for n, p in attention.named_parameters()
              if layout_of(p).grad_summed_over == "tp"}
    assert marked == {"linear_q_down_proj.weight", "q_layernorm.weight",
                      "linear_kv_down_proj.weight", "kv_layernorm.weight"}
    # Weights a per-name initialisation draws (init_std), the output projection scaled.
    stds = {n: m.init_std for n, m in attention.named_children() if hasattr(m, "init_std")}
    assert set(stds) == {"linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                         "linear_kv_up_proj", "linear_proj"}
    assert stds["linear_proj"] == pytest.approx(0.02 / 2.0)
    unmarked = MLASelfAttention(mla_config(24), 1, pg)
    assert not any(layout_of(p).grad_summed_over == "tp" for p in unmarked.parameters())


def test_mla_selective_recompute_replays_dropout():
    """Recomputed core attention draws the same dropout masks: equal outputs and grads."""
    results = []
    for modules in (None, ["core_attn"]):
        config = mla_config(None, attention_dropout=0.3,
                            recompute_granularity="selective" if modules else None,
                            recompute_modules=modules)
        pg = ProcessGroups.single()
        seed_everything(5, pg)
        attention = MLASelfAttention(config, 1, pg).train()
        assert attention.recompute_core == bool(modules)
        random_weights(attention, seed=9)
        s, b = 8, 2
        x = torch.randn(s, b, HIDDEN, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        rotary = build_rotary(config)(torch.arange(s).unsqueeze(0).expand(b, s))
        y = attention(x, rotary)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in attention.parameters()]))
    (y0, dx0, g0), (y1, dx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=1e-6, atol=1e-7)
    for a, b_ in zip(g1, g0):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-7)
    # The masks are really drawn: evaluation mode differs.
    assert not torch.equal(y0, attention.eval()(x, rotary).detach())


# ---------------------------------------------------------------------------------------
# Tensor and sequence parallelism equal one process


def _check_tensor_parallel(tp: int) -> list[str]:
    pg = ProcessGroups.build(tp=tp, pp=1)
    r = pg.tp.rank
    s, b = 8, 2
    checked = []
    for q_lora_rank in (None, 24):
        for sp in (False, True):
            config = mla_config(q_lora_rank, yarn=True, sequence_parallel=sp)
            torch.manual_seed(0)
            reference = MLASelfAttention(config, 1)  # one process's module, on every rank
            random_weights(reference, seed=42)
            parallel = MLASelfAttention(config, 1, pg)
            with torch.no_grad():
                full = dict(reference.named_parameters())
                for name, p in parallel.named_parameters():
                    p.copy_(shard_tensor(full[name], p, tp, r))
            g = torch.Generator().manual_seed(11)
            x = torch.randn(s, b, HIDDEN, generator=g)
            dy = torch.randn(s, b, HIDDEN, generator=g)
            rotary = build_rotary(config)(torch.arange(s).unsqueeze(0).expand(b, s))

            x_ref = x.clone().requires_grad_()
            y_ref = reference(x_ref, rotary)
            (y_ref * dy).sum().backward()

            def mine(t):
                return t.chunk(tp, dim=0)[r] if sp else t

            x_par = mine(x).clone().requires_grad_()
            y = parallel(x_par, rotary)
            (y * mine(dy)).sum().backward()
            finish_tensor_parallel_grads(parallel.parameters(), pg)

            where = f"TP={tp} q_lora_rank={q_lora_rank} sp={sp}"
            close(y, mine(y_ref), f"{where} output")
            close(x_par.grad, mine(x_ref.grad), f"{where} input grad")
            for name, p in parallel.named_parameters():
                close(p.grad, shard_tensor(full[name].grad, p, tp, r), f"{where} {name}")
            checked.append(where)
    return checked


@pytest.mark.parametrize("tp", [2, 4])
def test_mla_tensor_parallel_equals_one_process(tp):
    results = run_distributed(tp, _check_tensor_parallel, tp, timeout=60)
    assert all(len(r) == 4 for r in results)
