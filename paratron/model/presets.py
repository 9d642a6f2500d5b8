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


def _shape(layers, hidden, heads, ffn=None, groups=None, **extra):
    shape = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)
    if ffn is not None:
        shape["ffn_hidden_size"] = ffn
    if groups is not None:
        shape.update(group_query_attention=True, num_query_groups=groups)
    shape.update(extra)
    return shape


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
}
