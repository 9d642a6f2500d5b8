"""Megatron-LM's count of floating-point operations per training iteration.

The same terms as `num_floating_point_operations` in Megatron's training loop, so
TFLOP/s and MFU read the same in both frameworks. Every GEMM runs three times (forward,
data gradient, weight gradient) at 2 operations per multiply-add: 6 x parameters
touched per token, written 12 x h x (...) where GEMMs come in in/out pairs. Causal
attention counts half of the score matrix. MoE layers count the routed top-k experts
and the shared experts; DeepSeek-V2-style models keep dense layers where
--moe-layer-freq says so; multi-latent attention counts its low-rank projections. Each
multi-token prediction module counts as Megatron counts it: one more layer of the
model's last kind, its two norms and final norm (3h) and projection (2h x h), and one
more pass through the output layer.
"""

from __future__ import annotations

from paratron.model.config import TransformerConfig, moe_layer_pattern


def _attention_per_token(m: TransformerConfig, seq_length: int) -> float:
    """Attention FLOPs of all layers for one token (forward and backward)."""
    layers, h, heads = m.num_layers, m.hidden_size, m.num_attention_heads
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank is None:
            q_term = h * heads * qk
        else:  # down projection, norm, up projection
            q_term = m.q_lora_rank * (h + heads * qk + 1)
        kv_term = m.kv_lora_rank * (h + heads * (m.qk_head_dim + m.v_head_dim) + 1)
        rope_key = h * m.qk_pos_emb_head_dim
        out_proj = heads * m.v_head_dim * h
        core = seq_length * heads * qk / 2 + seq_length * heads * m.v_head_dim / 2
        return 3 * 2 * layers * (q_term + kv_term + rope_key + out_proj + core)
    query_ratio = m.kv_channels * heads / h
    return 12 * layers * h * h * query_ratio * (
        1 + m.num_query_groups / heads + seq_length / h / 2)


def _mlp_of_layer(m: TransformerConfig, moe: bool) -> float:
    """MLP or MoE FLOPs of one layer for one token."""
    gated = 1.5 if m.swiglu else 1.0
    if not moe:
        return 12 * m.hidden_size * m.ffn_hidden_size * gated
    routed = (m.moe_ffn_hidden_size or m.ffn_hidden_size) * m.moe_router_topk
    shared = m.moe_shared_expert_intermediate_size or 0
    return 12 * m.hidden_size * (routed + shared) * gated


def _mlp_per_token(m: TransformerConfig) -> float:
    """MLP / MoE FLOPs of all layers for one token."""
    return sum(_mlp_of_layer(m, moe) for moe in moe_layer_pattern(m))


def _mtp_per_token(m: TransformerConfig, seq_length: int) -> float:
    """The multi-token prediction modules' FLOPs for one token, but their output layer."""
    h = m.hidden_size
    layer = (_attention_per_token(m, seq_length) / m.num_layers
             + _mlp_of_layer(m, moe_layer_pattern(m)[-1]))
    return (m.mtp_num_layers or 0) * (layer + 3 * 2 * (3 * h + 2 * h * h))


def flops_per_iteration(model_config: TransformerConfig, seq_length: int,
                        global_batch_size: int) -> float:
    """Training FLOPs of one iteration of `global_batch_size` sequences."""
    m = model_config
    logits = 3 * 2 * m.hidden_size * m.padded_vocab_size * (1 + (m.mtp_num_layers or 0))
    per_token = (_attention_per_token(m, seq_length) + _mlp_per_token(m)
                 + _mtp_per_token(m, seq_length) + logits)
    return global_batch_size * seq_length * per_token
