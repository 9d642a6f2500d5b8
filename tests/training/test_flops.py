"""Megatron's FLOP count against hand computations for three published models."""

import pytest

from paratron.cli.args import parse_args
from paratron.training.flops import flops_per_iteration


def _model(*flags):
    return parse_args(list(flags) + ["--lr", "1e-4", "--train-iters", "1"], check=False).model


def test_gpt3_175b():
    m = _model("--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96",
               "--seq-length", "2048", "--max-position-embeddings", "2048",
               "--padded-vocab-size", "51200")
    L, h, s, V = 96, 12288, 2048, 51200
    attention = 12 * L * h * h * (1 + 1 + s / h / 2)       # qkv + proj, causal scores
    mlp = 12 * L * h * 4 * h                                # h -> 4h -> h
    logits = 6 * h * V
    assert flops_per_iteration(m, s, 1536) == pytest.approx(1536 * s * (attention + mlp + logits))
    # Megatron's closed form with causal attention: 72 B s L h^2 (1 + s/12h + V/12Lh).
    closed = 72 * 1536 * s * L * h * h * (1 + s / (12 * h) + V / (12 * L * h))
    assert flops_per_iteration(m, s, 1536) == pytest.approx(closed)


def test_llama3_8b():
    m = _model("--model-size", "llama3-8b")
    L, h, s, V = 32, 4096, 8192, 128256
    attention = 12 * L * h * h * (1 + 8 / 32 + s / h / 2)  # 8 key/value groups of 32 heads
    mlp = 12 * L * h * 14336 * 1.5                          # SwiGLU: three h x ffn GEMMs
    logits = 6 * h * V
    per_token = attention + mlp + logits
    assert per_token == pytest.approx(51.44e9, rel=1e-3)   # ~6 x 8B parameters + attention
    assert flops_per_iteration(m, s, 1) == pytest.approx(s * per_token)


def test_deepseek_v2_lite():
    m = _model("--model-size", "deepseek-v2-lite")
    L, h, s, V, heads = 27, 2048, 4096, 102400, 16
    q = h * heads * (128 + 64)                              # no q-LoRA
    kv = 512 * (h + heads * (128 + 128) + 1)                # latent down, norm, up
    rope_key = h * 64
    out = heads * 128 * h
    core = s * heads * 192 / 2 + s * heads * 128 / 2        # causal: half the scores
    attention = 6 * L * (q + kv + rope_key + out + core)
    dense = 10944 * 1.5                                     # layer 0 is dense
    moe = (1408 * 6 + 2816) * 1.5                           # top-6 routed + 2 shared experts
    mlp = 12 * h * (dense + 26 * moe)
    logits = 6 * h * V
    assert flops_per_iteration(m, s, 8) == pytest.approx(8 * s * (attention + mlp + logits))


def test_multi_token_prediction_adds_megatrons_terms():
    """Each MTP module: one more layer, its norms (3h) and projection (2h x h), one more
    pass through the output layer, each GEMM 3 x 2 FLOPs per multiply-add."""
    flags = ("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
             "--ffn-hidden-size", "256", "--seq-length", "128",
             "--max-position-embeddings", "128", "--padded-vocab-size", "1000")
    h, s, V, ffn, depth = 64, 128, 1000, 256, 2
    layer = 12 * h * h * (1 + 1 + s / h / 2) + 12 * h * ffn
    extra = depth * (layer + 6 * (3 * h + 2 * h * h) + 6 * h * V)
    plain = flops_per_iteration(_model(*flags), s, 8)
    with_mtp = flops_per_iteration(_model(*flags, "--mtp-num-layers", str(depth)), s, 8)
    assert with_mtp - plain == pytest.approx(8 * s * extra)
