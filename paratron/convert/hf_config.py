"""Hugging Face `config.json` -> Paratron's TransformerConfig.

Each supported `model_type` has one reader that turns the Hugging Face keys into
Megatron flag destinations (the TransformerConfig field names), so a converted model
is described exactly as a user would describe it with Megatron flags. Llama, Qwen2 and
Qwen3 share one reader (they differ only in biases and the per-head q/k norm); GPT-2
has its own because its keys (`n_embd`, `n_layer`, ...) and layer shapes differ. The
mixtures of experts (Mixtral, Qwen3-MoE) add their routing to the Llama reader;
DeepSeek-V2 (multi-latent attention, shared experts, YaRN) has its own, and DeepSeek-V3
(with Kimi-K2 and Moonlight) adds sigmoid routing with an expert bias to it.

What Paratron cannot represent is refused with one line naming the key, never
approximated: a model that loads must give the same logits as in `transformers`.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable, NoReturn

from paratron.convert.errors import ConversionError
from paratron.model.config import (TransformerConfig, check_moe_config, derive_model,
                                   moe_layer_pattern)
from paratron.model.rotary import yarn_mscale
from paratron.options import ConfigError, check_numbers, number_problem


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


def fp8_block_size(hf: dict) -> tuple[int, int] | None:
    """The weight block of an FP8 checkpoint (DeepSeek-V3's and Kimi-K2's
    `quantization_config`: float8_e4m3fn weights, each [rows, cols] block scaled by one
    `weight_scale_inv`), or None for an unquantized one. Other quantizations are refused:
    their weights cannot be read back as the model's."""
    quant = hf.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if method != "fp8" or not isinstance(quant, dict):
        _refuse(hf, f"quantization_config quant_method {method!r} (only block-scaled fp8)")
    if quant.get("fmt", "e4m3") != "e4m3":
        _refuse(hf, f"quantization_config fmt {quant['fmt']!r} (only e4m3)")
    block = quant.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or any(number_problem(b, int, True) for b in block)):
        raise ConversionError(f"config.json ({hf.get('model_type')}): quantization_config "
                              f"weight_block_size {block!r}; expected two positive block "
                              f"sizes such as [128, 128]")
    return block[0], block[1]


# The numeric keys the readers use, as (type, positive): each is checked before any
# reader computes with it, so a string, NaN or zero divisor in config.json is refused
# naming the key instead of failing inside the arithmetic.
_NUMBERS: dict[str, tuple[type, bool]] = {
    **dict.fromkeys(
        ("n_embd", "n_head", "n_layer", "n_positions", "n_inner", "hidden_size",
         "num_attention_heads", "num_hidden_layers", "intermediate_size",
         "max_position_embeddings", "original_max_position_embeddings",
         "num_key_value_heads", "head_dim", "vocab_size", "num_experts_per_tok",
         "moe_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
         "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "decoder_sparse_step"),
        (int, True)),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts",
                     "first_k_dense_replace", "n_shared_experts"), (int, False)),
    **dict.fromkeys(("rope_theta", "factor", "routed_scaling_factor"), (float, True)),
    **dict.fromkeys(
        ("layer_norm_epsilon", "rms_norm_eps", "initializer_range", "router_aux_loss_coef",
         "aux_loss_alpha", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
         "attention_factor", "low_freq_factor", "high_freq_factor",
         "partial_rotary_factor"), (float, False)),
}


def _check_numbers(hf: dict) -> None:
    """Refuse a numeric key of config.json (or of its rope settings) that is not a
    finite number of its kind, or is zero or negative where that means nothing."""
    where = [(hf, "")] + [(hf[name], f"{name}.") for name in ("rope_scaling", "rope_parameters")
                          if isinstance(hf.get(name), dict)]
    for values, prefix in where:
        for key, value in values.items():
            if key in _NUMBERS and value is not None:
                problem = number_problem(value, *_NUMBERS[key])
                if problem:
                    raise ConversionError(f"config.json ({hf.get('model_type')}): "
                                          f"{prefix}{key} {value!r} {problem}")
    for layer in hf.get("mlp_only_layers") or []:
        if number_problem(layer, int):
            raise ConversionError(f"config.json ({hf.get('model_type')}): mlp_only_layers "
                                  f"holds {layer!r}; expected layer numbers")


def _need(hf: dict, key: str, *aliases: str) -> Any:
    """hf[key], or the first alias present (transformers writes some keys under the
    name its `attribute_map` points to, e.g. Qwen3-MoE's num_experts as
    num_local_experts), or a one-line refusal naming the key."""
    for name in (key, *aliases):
        if hf.get(name) is not None:
            return hf[name]
    raise ConversionError(f"config.json ({hf.get('model_type')}) lacks {key!r}")


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
        bias_gelu_fusion=act in _GPT2_TANH_GELU, add_bias_linear=True,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True))


def _yarn(hf: dict, params: dict, mla: bool) -> dict[str, Any]:
    """YaRN as transformers computes it (`_compute_yarn_parameters`).

    The cos/sin tables are scaled by get_mscale(factor, mscale) / get_mscale(factor,
    mscale_all_dim) when both are given, else by get_mscale(factor); DeepSeek-V2's
    attention also scales its softmax by get_mscale(factor, mscale_all_dim)^2 whenever
    mscale_all_dim is given (`yarn_apply_mscale`). Paratron derives both from one
    (mscale, mscale_all_dim) pair, so under multi-latent attention mscale_all_dim
    without mscale cannot be represented.
    """
    max_positions = _need(hf, "max_position_embeddings")
    original = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings") or max_positions
    factor = params.get("factor")
    factor = float(max_positions / original if factor is None else factor)
    if factor < 1:
        _refuse(hf, f"yarn rope factor {factor} below 1")
    if params.get("truncate", True) is False:
        _refuse(hf, "yarn rope with truncate false")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        mscale, mscale_all_dim = float(mscale), float(mscale_all_dim)
    elif mla and mscale_all_dim:
        _refuse(hf, "yarn rope mscale_all_dim without mscale under multi-latent attention")
    else:
        mscale, mscale_all_dim = 1.0, 0.0
    derived = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    given = params.get("attention_factor")
    if given is not None and not math.isclose(float(given), derived, rel_tol=1e-9):
        _refuse(hf, f"yarn rope attention_factor {given} (Paratron derives {derived} from "
                    f"factor and mscale)")
    return dict(position_embedding_type="yarn", rotary_scaling_factor=factor,
                original_max_position_embeddings=int(original),
                beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0),
                mscale=mscale, mscale_all_dim=mscale_all_dim)


def _rope(hf: dict, mla: bool = False) -> dict[str, Any]:
    """RoPE settings from either spelling: `rope_theta` + `rope_scaling` (older
    transformers) or one `rope_parameters` dict (transformers 5).

    mla: for multi-latent attention, whose softmax scale also depends on the scaling
    (transformers applies YaRN's mscale_all_dim to it for every scaled rope type), so
    only default and yarn are taken."""
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
    if kind == "yarn":
        return dict(out, **_yarn(hf, params, mla))
    if mla:
        _refuse(hf, f"rope type {kind!r} with multi-latent attention (supported: default, "
                    f"yarn)")
    if kind == "linear":
        return dict(out, rotary_seq_len_interpolation_factor=float(
            _need_param(hf, params, "factor")))
    if kind == "llama3":
        # Paratron's Llama-3 scaling fixes the blend band at Meta's published 1 and 4.
        bands = (params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0))
        if bands != (1.0, 4.0):
            _refuse(hf, f"llama3 rope low/high_freq_factor {bands} (only (1, 4))")
        original = hf.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings") or _need(hf, "max_position_embeddings")
        return dict(out, use_rope_scaling=True,
                    rope_scaling_factor=float(_need_param(hf, params, "factor")),
                    original_max_position_embeddings=int(original))
    _refuse(hf, f"rope type {kind!r} (supported: default, linear, llama3, yarn)")


def _need_param(hf: dict, params: dict, key: str) -> Any:
    if params.get(key) is None:
        raise ConversionError(f"config.json ({hf.get('model_type')}): rope scaling lacks "
                              f"{key!r}")
    return params[key]


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


def _layer_pattern(moe: list[bool]) -> str:
    """--moe-layer-freq for a per-layer MoE pattern: 1 when every layer is MoE, else a
    list pattern such as ([0]*1+[1]*26)."""
    if all(moe):
        return "1"
    runs: list[list] = []
    for flag in moe:
        if runs and runs[-1][0] == flag:
            runs[-1][1] += 1
        else:
            runs.append([flag, 1])
    return "(" + "+".join(f"[{int(flag)}]*{count}" for flag, count in runs) + ")"


def _routing(hf: dict, *, experts_key: tuple[str, ...], ffn_key: str, renormalise: bool,
             moe: list[bool]) -> dict[str, Any]:
    """The MoE fields shared by the readers: experts, top-k, expert size, which layers.

    renormalise: the top-k softmax weights are divided by their sum, which equals a
    softmax over the top-k logits (Paratron's default routing); otherwise the softmax
    over all experts is taken before top-k and kept as is (--moe-router-pre-softmax).
    """
    experts, topk = _need(hf, *experts_key), _need(hf, "num_experts_per_tok")
    if not 1 <= topk <= experts:
        raise ConversionError(f"config.json ({hf.get('model_type')}): num_experts_per_tok "
                              f"{topk} must be between 1 and {experts_key[0]} {experts}")
    if renormalise and topk == 1:
        _refuse(hf, "num_experts_per_tok 1 with renormalised routing weights")
    return dict(num_experts=experts, moe_router_topk=topk,
                moe_ffn_hidden_size=_need(hf, ffn_key),
                moe_router_pre_softmax=not renormalise, moe_layer_freq=_layer_pattern(moe))


def _mixtral(hf: dict) -> dict[str, Any]:
    """Mixtral: Mistral's attention, every layer MoE; softmax over all experts, top-k,
    renormalised."""
    if hf.get("sliding_window") is not None:
        _refuse(hf, "sliding-window attention (sliding_window)")
    fields = _llama_like(hf)
    n = fields["num_layers"]
    fields.update(_routing(hf, experts_key=("num_local_experts", "num_experts"),
                           ffn_key="intermediate_size",
                           renormalise=True, moe=[True] * n),
                  moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0))
    return fields


def _qwen3_moe(hf: dict) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3's attention (per-head q/k norms); layer i is MoE unless listed in
    mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step; the top-k
    weights renormalised with norm_topk_prob."""
    fields = _llama_like(hf, qk_layernorm=True)
    if fields["add_bias_linear"]:
        _refuse(hf, "attention_bias in a mixture of experts")
    experts = ("num_experts", "num_local_experts")
    if _need(hf, *experts) == 0:
        return fields  # no experts: every layer dense
    n, step = fields["num_layers"], hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    moe = [i not in dense and (i + 1) % step == 0 for i in range(n)]
    fields.update(_routing(hf, experts_key=experts, ffn_key="moe_intermediate_size",
                           renormalise=bool(hf.get("norm_topk_prob", False)), moe=moe),
                  moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0))
    return fields


# The epsilon of DeepSeek-V2's latent norms (q_a_layernorm, kv_a_layernorm): the RMSNorm
# default, not rms_norm_eps, in both transformers and DeepSeek's own code.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


def _mla_model(hf: dict) -> dict[str, Any]:
    """What DeepSeek-V2 and V3 share: multi-latent attention (optionally with a low-rank
    query), pair-wise rope with optional YaRN, SwiGLU, no biases, the first
    first_k_dense_replace layers dense."""
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(hf, f"hidden_act {hf['hidden_act']!r} (SwiGLU needs silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        _refuse(hf, "attention_bias / mlp_bias in multi-latent attention and experts")
    eps = hf.get("rms_norm_eps", 1e-6)
    # Set only where it differs (Moonlight's 1e-5), so V2/V3 configs read as before.
    latent = {} if eps == DEEPSEEK_LATENT_NORM_EPS else {
        "mla_latent_norm_epsilon": DEEPSEEK_LATENT_NORM_EPS}
    if hf.get("moe_layer_freq", 1) != 1:
        _refuse(hf, f"moe_layer_freq {hf['moe_layer_freq']}")
    hidden, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
    if hf.get("num_key_value_heads") not in (None, heads):
        _refuse(hf, f"num_key_value_heads {hf['num_key_value_heads']} other than "
                    f"num_attention_heads {heads} (every head has its own latent keys)")
    v_head_dim = _need(hf, "v_head_dim")
    return dict(
        num_layers=_need(hf, "num_hidden_layers"), hidden_size=hidden,
        ffn_hidden_size=_need(hf, "intermediate_size"),
        num_attention_heads=heads, num_query_groups=heads, group_query_attention=False,
        kv_channels=hidden // heads if hidden % heads == 0 else v_head_dim,
        multi_latent_attention=True, q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=_need(hf, "kv_lora_rank"), qk_head_dim=_need(hf, "qk_nope_head_dim"),
        qk_pos_emb_head_dim=_need(hf, "qk_rope_head_dim"), v_head_dim=v_head_dim,
        max_position_embeddings=_need(hf, "max_position_embeddings"),
        **_rope(hf, mla=True),
        normalization="RMSNorm", norm_epsilon=eps, swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        **latent)


def _deepseek_experts(hf: dict, fields: dict, renormalise: bool) -> bool:
    """Add the routed and shared experts of a DeepSeek model to `fields`; False when
    every layer is dense (the routing keys then describe nothing)."""
    n = fields["num_layers"]
    first_dense = hf.get("first_k_dense_replace") or 0
    if first_dense >= n:
        return False
    fields.update(_routing(hf, experts_key=("n_routed_experts", "num_experts"),
                           ffn_key="moe_intermediate_size", renormalise=renormalise,
                           moe=[i >= first_dense for i in range(n)]),
                  moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    shared = hf.get("n_shared_experts") or 0
    if shared:
        fields["moe_shared_expert_intermediate_size"] = shared * fields["moe_ffn_hidden_size"]
    # DeepSeek's own configs carry the training-time balancing (sequence-wise aux loss).
    if hf.get("aux_loss_alpha"):
        fields.update(moe_aux_loss_coeff=float(hf["aux_loss_alpha"]),
                      moe_router_load_balancing_type=("seq_aux_loss" if hf.get("seq_aux", True)
                                                      else "aux_loss"))
    return True


def _deepseek_v2(hf: dict) -> dict[str, Any]:
    """DeepSeek-V2 as transformers runs it: multi-latent attention, dense first layers,
    MoE with n_shared_experts always-on experts; routing is a softmax over all experts,
    top-k (greedy, or group_limited_greedy over n_group groups keeping topk_group), not
    renormalised, times routed_scaling_factor."""
    if hf.get("norm_topk_prob"):
        # transformers ignores it; DeepSeek's own code renormalises: no single answer.
        _refuse(hf, "norm_topk_prob true")
    if hf.get("scoring_func", "softmax") != "softmax":
        _refuse(hf, f"scoring_func {hf['scoring_func']!r} (only softmax)")
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        _refuse(hf, f"topk_method {method!r} (supported: greedy, group_limited_greedy)")
    fields = _mla_model(hf)
    if _deepseek_experts(hf, fields, renormalise=False) and method == "group_limited_greedy":
        fields.update(moe_router_num_groups=_need(hf, "n_group"),
                      moe_router_group_topk=_need(hf, "topk_group"))
    return fields


def _deepseek_v3(hf: dict) -> dict[str, Any]:
    """DeepSeek-V3, Kimi-K2 and Moonlight as transformers runs them: V2's model with
    sigmoid router scores; the aux-loss-free bias `e_score_correction_bias` added for the
    choice only; node-limited routing (the best topk_group of n_group groups, a group
    scored by the sum of its top-2 biased scores, then top-k inside them); the chosen
    scores renormalised and times routed_scaling_factor (Megatron's
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias).

    Megatron scores a group by its top (k / group_topk) scores, transformers by its top
    2: configs where that differs and the groups matter are refused. The MTP layers
    (num_nextn_predict_layers) are read by the multi-token prediction support."""
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        _refuse(hf, f"scoring_func {hf['scoring_func']!r} (only sigmoid)")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        _refuse(hf, f"topk_method {hf['topk_method']!r} (only noaux_tc)")
    if hf.get("norm_topk_prob", True) is False:
        _refuse(hf, "norm_topk_prob false (sigmoid routing renormalises the top-k scores)")
    if hf.get("rope_interleave", True) is False:
        _refuse(hf, "rope_interleave false (DeepSeek's rope rotates channel pairs)")
    fields = _mla_model(hf)
    if not _deepseek_experts(hf, fields, renormalise=True):
        return fields
    fields.update(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                  moe_router_enable_expert_bias=True)
    groups, group_topk = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if group_topk < groups:  # otherwise every group is kept: plain top-k
        topk = fields["moe_router_topk"]
        if topk % group_topk or topk // group_topk != 2:
            _refuse(hf, f"num_experts_per_tok {topk} with topk_group {group_topk} (a group "
                        f"scores its top 2 experts, Megatron's its top k / topk_group)")
        fields.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return fields


_READERS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "gpt2": _gpt2,
    "llama": _llama_like,
    "qwen2": partial(_llama_like, qkv_bias_only=True),
    "qwen3": partial(_llama_like, qk_layernorm=True),
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    # Kimi-K2's config.json names DeepSeek-V3's architecture kimi_k2.
    "kimi_k2": _deepseek_v3,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_READERS)


def check_model_type(hf: dict) -> str:
    """The config's model_type, or a one-line refusal listing the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in _READERS:
        raise ConversionError(f"unsupported Hugging Face model_type {model_type!r}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def mtp_fields(hf: dict) -> dict:
    """The TransformerConfig fields of a config.json's MTP layers (none without them)."""
    depth = hf.get("num_nextn_predict_layers") or 0
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConversionError(f"config.json ({hf.get('model_type')}): "
                              f"num_nextn_predict_layers {depth!r} must be a whole number")
    return {"mtp_num_layers": depth} if depth else {}


def hf_to_paratron_fields(hf: dict) -> dict[str, Any]:
    """TransformerConfig field values (Megatron dest names) for a Hugging Face config."""
    reader = _READERS[check_model_type(hf)]
    _check_numbers(hf)
    fields = reader(hf)
    fields.update(mtp_fields(hf))
    fields.update(padded_vocab_size=_need(hf, "vocab_size"),
                  init_method_std=hf.get("initializer_range", 0.02),
                  # Inference-exact by default; fine-tuning sets its own dropout.
                  hidden_dropout=0.0, attention_dropout=0.0)
    return fields


def transformer_config(fields: dict[str, Any]) -> TransformerConfig:
    """A TransformerConfig from Megatron dest names, its numbers checked and its derived
    sizes filled in as for a run. Only the model's own checks apply: a run's validation
    also wants training settings (lr, iterations), which a conversion has no business
    with."""
    model = TransformerConfig()
    for name, value in fields.items():
        if not hasattr(model, name):
            raise ConversionError(f"unknown TransformerConfig field {name!r}")
        setattr(model, name, value)
    check_numbers(model)
    derive_model(model)
    if model.num_experts:
        # The MoE layer's own checks, as one-line conversion errors rather than at build.
        try:
            moe_layer_pattern(model)
            check_moe_config(model)
        except ConfigError as exc:
            raise ConversionError(f"config.json: {exc}") from None
    return model


def config_from_hf(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a Hugging Face `config.json` dict."""
    try:
        return transformer_config(hf_to_paratron_fields(hf))
    except ConfigError as exc:  # a value the config tree refuses, named by its flag
        raise ConversionError(f"config.json ({hf.get('model_type')}): {exc}") from None
