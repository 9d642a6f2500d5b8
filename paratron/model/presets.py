"""Published hyper-parameters of well-known models, selectable with `--model-size`.

Each preset is a dict of Megatron flag destinations; any flag on the command line or
in `--config` overrides it. Vocabulary sizes are the Hugging Face checkpoints' (already
padded by their authors), so converted weights fit without reshaping.
"""

_GPT2 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
             norm_epsilon=1e-5, openai_gelu=True, max_position_embeddings=1024,
             seq_length=1024, hidden_dropout=0.1, attention_dropout=0.1)

_LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
              add_bias_linear=False, untie_embeddings_and_output_weights=True,
              hidden_dropout=0.0, attention_dropout=0.0)

_QWEN25 = dict(_LLAMA, add_qkv_bias=True, group_query_attention=True, rotary_base=1000000.0,
               norm_epsilon=1e-6, seq_length=4096)

_QWEN3 = dict(_LLAMA, qk_layernorm=True, group_query_attention=True, rotary_base=1000000.0,
              norm_epsilon=1e-6, kv_channels=128, max_position_embeddings=40960,
              padded_vocab_size=151936, seq_length=4096)


_DEEPSEEK_V2 = dict(_LLAMA, multi_latent_attention=True, kv_lora_rank=512, qk_head_dim=128,
                    qk_pos_emb_head_dim=64, v_head_dim=128, norm_epsilon=1e-6,
                    rotary_base=10000.0, rotary_scaling_factor=40.0,
                    original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                    mscale=0.707, mscale_all_dim=0.707, max_position_embeddings=163840,
                    padded_vocab_size=102400, seq_length=4096, moe_router_topk=6,
                    moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.001,
                    moe_router_pre_softmax=True, moe_token_dispatcher_type="alltoall")

_MOE = dict(moe_router_load_balancing_type="aux_loss", moe_token_dispatcher_type="alltoall")


def _shape(layers, hidden, heads, ffn=None, groups=None, **extra):
    shape = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)
    if ffn is not None:
        shape["ffn_hidden_size"] = ffn
    if groups is not None:
        shape.update(group_query_attention=True, num_query_groups=groups)
    shape.update(extra)
    return shape


# DeepSeek-V3's family: V2's attention (7168 wide, latent ranks 1536 / 512) and experts of
# 2048 with one shared, routed by sigmoid scores with the aux-loss-free expert bias, eight
# per token, the chosen scores renormalised and scaled. The sequence-wise aux loss keeps
# the DeepSeek-V3 paper's small factor 1e-4 (its config.json's aux_loss_alpha says 1e-3).
_DEEPSEEK_V3 = dict(_DEEPSEEK_V2, **_shape(61, 7168, 128, 18432), q_lora_rank=1536,
                    moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048,
                    moe_router_topk=8, moe_router_pre_softmax=False,
                    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                    moe_aux_loss_coeff=1e-4, mscale=1.0, mscale_all_dim=1.0)


PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(_GPT2, **_shape(12, 768, 12)),
    "gpt2-355m": dict(_GPT2, **_shape(24, 1024, 16)),
    "gpt2-774m": dict(_GPT2, **_shape(36, 1280, 20)),
    "gpt2-1.5b": dict(_GPT2, **_shape(48, 1600, 25)),
    "llama2-7b": dict(_LLAMA, **_shape(32, 4096, 32, 11008), norm_epsilon=1e-5,
                      max_position_embeddings=4096, seq_length=4096, padded_vocab_size=32000),
    "llama3-8b": dict(_LLAMA, **_shape(32, 4096, 32, 14336, groups=8), norm_epsilon=1e-5,
                      rotary_base=500000.0, max_position_embeddings=8192, seq_length=8192,
                      padded_vocab_size=128256),
    "qwen2.5-0.5b": dict(_QWEN25, **_shape(24, 896, 14, 4864, groups=2),
                         untie_embeddings_and_output_weights=False,
                         max_position_embeddings=32768, padded_vocab_size=151936),
    "qwen2.5-1.5b": dict(_QWEN25, **_shape(28, 1536, 12, 8960, groups=2),
                         untie_embeddings_and_output_weights=False,
                         max_position_embeddings=131072, padded_vocab_size=151936),
    "qwen2.5-7b": dict(_QWEN25, **_shape(28, 3584, 28, 18944, groups=4),
                       max_position_embeddings=131072, padded_vocab_size=152064),
    "qwen2.5-32b": dict(_QWEN25, **_shape(64, 5120, 40, 27648, groups=8), norm_epsilon=1e-5,
                        max_position_embeddings=131072, padded_vocab_size=152064),
    "qwen2.5-72b": dict(_QWEN25, **_shape(80, 8192, 64, 29568, groups=8), norm_epsilon=1e-5,
                        max_position_embeddings=131072, padded_vocab_size=152064),
    "qwen3-0.6b": dict(_QWEN3, **_shape(28, 1024, 16, 3072, groups=8),
                       untie_embeddings_and_output_weights=False),
    "qwen3-8b": dict(_QWEN3, **_shape(36, 4096, 32, 12288, groups=8)),
    "qwen3-32b": dict(_QWEN3, **_shape(64, 5120, 64, 25600, groups=8)),
    # Mixtures of experts. DeepSeek-V2: the first layer is dense (ffn_hidden_size), the
    # others MoE with 2 shared experts; routing is softmax over all experts, top-k, no
    # renormalisation, times the routed scaling factor (V2 also group-limited).
    "deepseek-v2-lite": dict(_DEEPSEEK_V2, **_shape(27, 2048, 16, 10944), num_experts=64,
                             moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816,
                             moe_layer_freq="([0]+[1]*26)", moe_router_topk_scaling_factor=1.0),
    "deepseek-v2": dict(_DEEPSEEK_V2, **_shape(60, 5120, 128, 12288), q_lora_rank=1536,
                        num_experts=160, moe_ffn_hidden_size=1536,
                        moe_shared_expert_intermediate_size=3072,
                        moe_layer_freq="([0]+[1]*59)", moe_router_num_groups=8,
                        moe_router_group_topk=3, moe_router_topk_scaling_factor=16.0),
    # config.json of deepseek-ai/DeepSeek-V3 on the Hugging Face Hub: 3 dense layers, 256
    # experts in 8 groups of which a token reaches 4, YaRN x40 over 4096 positions, one
    # multi-token prediction module (num_nextn_predict_layers).
    "deepseek-v3": dict(_DEEPSEEK_V3, num_experts=256, moe_layer_freq="([0]*3+[1]*58)",
                        mtp_num_layers=1, moe_router_num_groups=8, moe_router_group_topk=4,
                        moe_router_topk_scaling_factor=2.5, padded_vocab_size=129280),
    # config.json of moonshotai/Kimi-K2-Instruct (model_type kimi_k2): 64 heads, 384
    # experts in one group, one dense layer, YaRN x32 with beta 1 / 1, rope base 50000.
    "kimi-k2": dict(_DEEPSEEK_V3, num_attention_heads=64, num_experts=384,
                    moe_layer_freq="([0]+[1]*60)", moe_router_topk_scaling_factor=2.827,
                    rotary_base=50000.0, rotary_scaling_factor=32.0, beta_fast=1.0,
                    beta_slow=1.0, max_position_embeddings=131072, padded_vocab_size=163840),
    # config.json of moonshotai/Moonlight-16B-A3B (model_type deepseek_v3): V2-Lite's
    # shape with V3's routing, 64 experts in one group, no rope scaling.
    "moonlight-16b-a3b": dict(
        _DEEPSEEK_V3, **_shape(27, 2048, 16, 11264), q_lora_rank=None, num_experts=64,
        moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816, moe_router_topk=6,
        moe_layer_freq="([0]+[1]*26)", moe_router_topk_scaling_factor=2.446,
        norm_epsilon=1e-5, mla_latent_norm_epsilon=1e-6, rotary_base=50000.0,
        rotary_scaling_factor=1.0, original_max_position_embeddings=None,
        max_position_embeddings=8192, padded_vocab_size=163840),
    "mixtral-8x7b": dict(_LLAMA, **_MOE, **_shape(32, 4096, 32, 14336, groups=8), num_experts=8,
                         moe_ffn_hidden_size=14336, moe_router_topk=2, moe_aux_loss_coeff=0.02,
                         norm_epsilon=1e-5, rotary_base=1000000.0,
                         max_position_embeddings=32768, seq_length=4096,
                         padded_vocab_size=32000),
    "qwen3-30b-a3b": dict(_QWEN3, **_MOE, **_shape(48, 2048, 32, 6144, groups=4), num_experts=128,
                          moe_ffn_hidden_size=768, moe_router_topk=8, moe_aux_loss_coeff=0.001),
    "qwen2-57b-a14b": dict(_QWEN25, **_MOE, **_shape(28, 3584, 28, 18944, groups=4),
                           num_experts=64, moe_ffn_hidden_size=2560, moe_router_topk=8,
                           moe_shared_expert_intermediate_size=20480, moe_aux_loss_coeff=0.001,
                           max_position_embeddings=32768, padded_vocab_size=151936,
                           moe_router_pre_softmax=True, moe_shared_expert_gate=True),
}
