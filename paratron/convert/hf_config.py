"""Hugging Face `config.json` -> Paratron's TransformerConfig.

Each supported `model_type` has one reader that turns the Hugging Face keys into
Megatron flag destinations (the TransformerConfig field names), so a converted model
is described exactly as a user would describe it with Megatron flags. Llama, Qwen2 and
Qwen3 share one reader (they differ only in biases and the per-head q/k norm); GPT-2
has its own because its keys (`n_embd`, `n_layer`, ...) and layer shapes differ.

What Paratron cannot represent is refused with one line naming the key, never
approximated: a model that loads must give the same logits as in `transformers`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, NoReturn

from paratron.config import Config, TransformerConfig, finalize
from paratron.convert.errors import ConversionError


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face checkpoint folder."""
    path = Path(folder) / "config.json"
    try:
        with open(path) as fh:
            hf = json.load(fh)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found; a Hugging Face checkpoint folder "
                              f"holds config.json next to its safetensors files") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return hf


def _need(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ConversionError(f"config.json ({hf.get('model_type')}) lacks {key!r}")
    return hf[key]


def _refuse(hf: dict, what: str) -> NoReturn:
    raise ConversionError(f"config.json ({hf.get('model_type')}): {what} is not supported "
                          f"by Paratron")


def _attention_shape(hf: dict, heads: int, hidden: int, head_dim: int | None,
                     groups: int) -> dict[str, Any]:
    if head_dim is None:
        if hidden % heads:
            raise ConversionError(f"config.json: hidden size {hidden} is not divisible by "
                                  f"{heads} attention heads and no head_dim is given")
        head_dim = hidden // heads
    if heads % groups:
        raise ConversionError(f"config.json: {heads} attention heads are not divisible by "
                              f"{groups} key/value heads")
    return dict(num_attention_heads=heads, num_query_groups=groups,
                group_query_attention=groups != heads, kv_channels=head_dim)


# GPT-2's activation names that mean the tanh-approximated GeLU (all the same function).
_GPT2_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2(hf: dict) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_TANH_GELU + ("gelu",):
        _refuse(hf, f"activation_function {act!r}")
    if not hf.get("scale_attn_weights", True):
        _refuse(hf, "scale_attn_weights false")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        _refuse(hf, "scale_attn_by_inverse_layer_idx")
    if hf.get("add_cross_attention"):
        _refuse(hf, "add_cross_attention")
    hidden, heads = _need(hf, "n_embd"), _need(hf, "n_head")
    return dict(
        num_layers=_need(hf, "n_layer"), hidden_size=hidden,
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
        **_attention_shape(hf, heads, hidden, None, heads),
        max_position_embeddings=_need(hf, "n_positions"),
        position_embedding_type="learned_absolute",
        normalization="LayerNorm", norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        openai_gelu=act in _GPT2_TANH_GELU, add_bias_linear=True,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True))


def _rope(hf: dict) -> dict[str, Any]:
    """RoPE settings from either spelling: `rope_theta` + `rope_scaling` (older
    transformers) or one `rope_parameters` dict (transformers 5)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    partial_factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial_factor != 1.0:
        _refuse(hf, f"partial_rotary_factor {partial_factor}")
    out = dict(position_embedding_type="rope",
               rotary_base=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if kind == "default":
        return out
    if kind == "linear":
        return dict(out, rotary_seq_len_interpolation_factor=float(params["factor"]))
    if kind == "llama3":
        # Paratron's Llama-3 scaling fixes the blend band at Meta's published 1 and 4.
        bands = (params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0))
        if bands != (1.0, 4.0):
            _refuse(hf, f"llama3 rope low/high_freq_factor {bands} (only (1, 4))")
        return dict(out, use_rope_scaling=True, rope_scaling_factor=float(params["factor"]),
                    original_max_position_embeddings=int(
                        params["original_max_position_embeddings"]))
    _refuse(hf, f"rope type {kind!r} (supported: default, linear, llama3)")


def _llama_like(hf: dict, *, qkv_bias_only: bool = False,
                qk_layernorm: bool = False) -> dict[str, Any]:
    """Llama and its descendants: RMSNorm, SwiGLU, RoPE, optional GQA.

    qkv_bias_only: biases on q/k/v and nowhere else (Qwen2), whatever the config says.
    qk_layernorm: RMSNorm over each query and key head before RoPE (Qwen3).
    """
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(hf, f"hidden_act {hf['hidden_act']!r} (SwiGLU needs silu)")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        _refuse(hf, "sliding-window attention")
    if qkv_bias_only:
        bias_linear, qkv_bias = False, True
    else:
        # Paratron has biases on every linear layer or on none (--disable-bias-linear).
        bias_linear = bool(hf.get("attention_bias", False))
        if bool(hf.get("mlp_bias", False)) != bias_linear:
            _refuse(hf, "attention_bias without mlp_bias (or the reverse)")
        qkv_bias = bias_linear
    hidden, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    return dict(
        num_layers=_need(hf, "num_hidden_layers"), hidden_size=hidden,
        ffn_hidden_size=_need(hf, "intermediate_size"),
        **_attention_shape(hf, heads, hidden, hf.get("head_dim"),
                           hf.get("num_key_value_heads") or heads),
        max_position_embeddings=_need(hf, "max_position_embeddings"),
        **_rope(hf),
        normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6), swiglu=True,
        add_bias_linear=bias_linear, add_qkv_bias=qkv_bias, qk_layernorm=qk_layernorm,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False))


_READERS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "gpt2": _gpt2,
    "llama": _llama_like,
    "qwen2": partial(_llama_like, qkv_bias_only=True),
    "qwen3": partial(_llama_like, qk_layernorm=True),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_READERS)


def check_model_type(hf: dict) -> str:
    """The config's model_type, or a one-line refusal listing the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in _READERS:
        raise ConversionError(f"unsupported Hugging Face model_type {model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def hf_to_paratron_fields(hf: dict) -> dict[str, Any]:
    """TransformerConfig field values (Megatron dest names) for a Hugging Face config."""
    fields = _READERS[check_model_type(hf)](hf)
    fields.update(padded_vocab_size=_need(hf, "vocab_size"),
                  init_method_std=hf.get("initializer_range", 0.02),
                  # Inference-exact by default; fine-tuning sets its own dropout.
                  hidden_dropout=0.0, attention_dropout=0.0)
    return fields


def transformer_config(fields: dict[str, Any]) -> TransformerConfig:
    """A finalized TransformerConfig from Megatron dest names.

    `paratron.config` finalizes whole run configs; its validation also wants training
    settings (lr, iterations) and refuses multi-process runs it cannot train yet, which
    a conversion has no business with. So this finalizes a run config that holds only
    these model settings, with the sequence length at the model's maximum.
    """
    cfg = Config()
    for name, value in fields.items():
        if not hasattr(cfg.model, name):
            raise ConversionError(f"unknown TransformerConfig field {name!r}")
        setattr(cfg.model, name, value)
    cfg.data.seq_length = cfg.model.max_position_embeddings
    finalize(cfg)
    return cfg.model


def config_from_hf(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a Hugging Face `config.json` dict."""
    return transformer_config(hf_to_paratron_fields(hf))
