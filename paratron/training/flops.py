"""Megatron-LM's count of floating-point operations per training iteration.

The 12 = 3 x 2 x 2 factor: every GEMM runs three times (forward, data gradient, weight
gradient), GEMMs come in pairs (in/out projections), and an m x n by n x k GEMM costs
2mnk operations. Causal attention counts half of the score matrix.
"""

from __future__ import annotations


def flops_per_iteration(model_config, seq_length: int, global_batch_size: int) -> float:
    m = model_config
    h, layers = m.hidden_size, m.num_layers
    query_ratio = m.kv_channels * m.num_attention_heads / h
    gated = 1.5 if m.swiglu else 1.0
    attention = (1 + m.num_query_groups / m.num_attention_heads
                 + seq_length / h / 2) * query_ratio
    mlp = m.ffn_hidden_size / h * gated
    logits = m.padded_vocab_size / (2 * layers * h)
    return 12.0 * global_batch_size * seq_length * layers * h * h * (attention + mlp + logits)
