"""Which settings make a model what it is: the test a resume applies to a checkpoint.

A checkpoint's tensors mean something only to the model that trained them, so `--load`
compares the recorded TransformerConfig with the run's on every field except
`RUN_SETTINGS` (dropout, initialisation, recompute, kernels, auxiliary losses, the
layout), which a run may change between save and resume. A field added later without a
decision here therefore makes a resume refuse rather than load into the wrong model. The
vocabulary is compared apart (`vocabulary_difference`): its padding follows the TP size.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from paratron.model.config import (UNRECORDED_VALUES, TransformerConfig, derive_model,
                                   moe_layer_pattern)
from paratron.options import check_numbers, flags_of

# Settings of a run, not of the model: they change how it is trained or executed, never
# the shapes of its weights or the function a forward pass computes.
RUN_SETTINGS = frozenset({
    "attention_dropout", "hidden_dropout", "init_method_std",
    "recompute_activations", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "recompute_modules", "cpu_offloading",
    "cpu_offloading_num_layers", "cross_entropy_loss_fusion", "cross_entropy_chunk_size",
    "torch_compile", "torch_compile_backend",
    "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_router_bias_update_rate", "moe_token_dispatcher_type", "moe_grouped_gemm",
    "mtp_loss_scaling_factor",
    "sequence_parallel", "cp_comm_type",
    "fp8", "fp8_recipe", "fp8_margin", "fp8_wgrad", "first_last_layers_bf16",
    "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
    # Spellings whose effect is compared instead: the query groups, the position
    # embedding type and the MoE layer pattern.
    "group_query_attention", "use_rotary_position_embeddings", "moe_layer_freq",
})
# Compared by `vocabulary_difference`, since TP padding may differ.
VOCABULARY_SETTINGS = frozenset({"vocab_size", "extra_vocab_size", "padded_vocab_size",
                                 "make_vocab_size_divisible_by"})
_FIELDS = {f.name: f for f in dataclasses.fields(TransformerConfig)}
_MLA = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
        "mla_latent_layernorm", "mla_latent_norm_epsilon"}
_ROTARY = {"rotary_base", "rotary_percent", "rotary_interleaved",
           "rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor",
           "original_max_position_embeddings"}
_YARN = {"rotary_scaling_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
_ACTIVATIONS = ("swiglu", "squared_relu")  # the first one set decides; else a GeLU
# Compared as one, after the settings they depend on: whether a GeLU is tanh-approximated.
_GELU = ("openai_gelu", "bias_gelu_fusion")
TOKENS = "tokens"  # `vocabulary_difference`: the run's tokens do not fit the checkpoint's


def model_identity(c: TransformerConfig) -> dict[str, Any]:
    """The settings of `c` that define its weights and its function, by field name
    (`moe_pattern` stands for --moe-layer-freq), leaving out those that cannot matter
    for this model (MLA sizes without MLA, rotary settings without rotary, ...)."""
    out = {k: v for k, v in dataclasses.asdict(c).items()
           if k not in RUN_SETTINGS and k not in VOCABULARY_SETTINGS and k not in _GELU}
    out.update(_effective_values(c))
    drop = _irrelevant(c)
    return {k: v for k, v in out.items() if k not in drop}


def _effective_values(c: TransformerConfig) -> dict[str, Any]:
    """Settings whose spelling varies for one model, as the model uses them."""
    out: dict[str, Any] = {}
    if c.mlp_activation().startswith("gelu"):
        out["bias_gelu_fusion"] = c.mlp_activation() == "gelu_tanh"
    if c.uses_yarn():
        out["position_embedding_type"] = "yarn"  # rope + a scaling factor under MLA
    if c.uses_yarn() or c.use_rope_scaling:
        out["original_max_position_embeddings"] = c.rope_original_max_positions()
    if c.num_experts:
        out["moe_pattern"] = moe_layer_pattern(c)
        # Unset means the default: the dense size, a scale of 1, no shared experts.
        out["moe_ffn_hidden_size"] = c.moe_ffn_hidden_size or c.ffn_hidden_size
        out["moe_router_topk_scaling_factor"] = c.moe_router_topk_scaling_factor or 1.0
        out["moe_shared_expert_intermediate_size"] = c.moe_shared_expert_intermediate_size or 0
    return out


def _irrelevant(c: TransformerConfig) -> set[str]:
    """Settings that `c`'s other settings make moot (nothing reads them)."""
    if c.multi_latent_attention:  # its own head sizes; its latent norms have their own flag
        drop = {"kv_channels", "num_query_groups", "qk_layernorm"}
    else:
        drop = set(_MLA)
    if c.position_embedding_type not in ("rope", "yarn"):
        drop |= _ROTARY | _YARN
    else:
        drop.add("max_position_embeddings")  # no weights and no effect under rotary
        if not c.uses_yarn():
            drop |= _YARN
        if not c.use_rope_scaling:
            drop.add("rope_scaling_factor")
        if not (c.uses_yarn() or c.use_rope_scaling):
            drop.add("original_max_position_embeddings")
    if c.position_embedding_type == "none":
        drop.add("max_position_embeddings")
    decides = next((a for a in _ACTIVATIONS if getattr(c, a)), None)
    if decides:
        drop |= set(_ACTIVATIONS[_ACTIVATIONS.index(decides) + 1:])
    if c.add_bias_linear:
        drop.add("add_qkv_bias")  # the QKV projection has its bias either way
    if not c.num_experts:
        drop |= {f for f in _FIELDS if f.startswith("moe_")}
    elif all(moe_layer_pattern(c)):
        drop.add("ffn_hidden_size")  # no dense MLP left
    if c.num_experts and c.moe_expert_capacity_factor is None:
        drop |= {"moe_pad_expert_input_to_capacity", "moe_token_drop_policy"}
    return drop


def saved_model_config(saved: dict) -> TransformerConfig:
    """The TransformerConfig a checkpoint's recorded `config["model"]` describes, with
    derived sizes filled in as for a run (settings unknown to this version ignored).
    A TypeError or ValueError when the record does not describe a model."""
    if not isinstance(saved, dict):
        raise TypeError("the recorded model configuration is not an object")
    model = TransformerConfig(**{k: v for k, v in {**UNRECORDED_VALUES, **saved}.items()
                                 if k in _FIELDS})
    check_numbers(model)
    derive_model(model)
    model_identity(model)  # a record it cannot be computed from fails here
    return model


def first_difference(saved: TransformerConfig, run: TransformerConfig
                     ) -> tuple[str, Any, Any] | None:
    """(setting, checkpoint's value, run's value) of the first model setting that differs,
    in the order the config declares them; None when the models are the same. Settings
    both models have come first: one that only one model has (the rotary base of a
    rotary model) follows from a switch that differs (the position embedding type)."""
    want, have = model_identity(saved), model_identity(run)
    keys = dict.fromkeys([*want, *have])
    for key in sorted(keys, key=lambda k: (k not in want or k not in have)):
        if want.get(key) != have.get(key):
            return key, want.get(key), have.get(key)
    return None


def vocabulary_difference(saved: TransformerConfig, run: TransformerConfig,
                          run_tokens: int | None) -> tuple[str, Any, Any] | None:
    """Whether the run's vocabulary is not the checkpoint's up to TP padding.

    Where both give --vocab-size (NullTokenizer and mock runs; conversions record the
    model's vocabulary there too) the sizes must agree. Otherwise the run's token count
    (`run_tokens`, its tokenizer's plus --extra-vocab-size) must fit in what the
    checkpoint covers: a checkpoint of a tokenizer run records no token count, so its
    padded rows are what can be checked. Returns (setting, checkpoint's, run's) or None.
    """
    if saved.vocab_size and run.vocab_size:
        for key in ("vocab_size", "extra_vocab_size"):
            if getattr(saved, key) != getattr(run, key):
                return key, getattr(saved, key), getattr(run, key)
        return None
    covered = (saved.vocab_size + saved.extra_vocab_size if saved.vocab_size
               else saved.padded_vocab_size)
    if run_tokens is not None and covered is not None and run_tokens > covered:
        return TOKENS, covered, run_tokens
    return None


def flag_fix(key: str, saved: TransformerConfig) -> str:
    """What to give on the command line to build the checkpoint's model again for the
    setting `key`, e.g. "give --num-layers 4" or "leave out --swiglu"."""
    if key == "moe_pattern":
        key = "moe_layer_freq"
    if key == "bias_gelu_fusion":  # whether the checkpoint's GeLU is tanh-approximated
        return ("give --openai-gelu" if saved.mlp_activation() == "gelu_tanh"
                else "give --no-bias-gelu-fusion and leave out --openai-gelu")
    if key == "num_query_groups":
        return f"give --group-query-attention --num-query-groups {saved.num_query_groups}"
    if key not in _FIELDS:
        return "give the flags the checkpoint was trained with"
    f, value = _FIELDS[key], getattr(saved, key)
    flag = flags_of(f)[0] if "help" in f.metadata else "--" + key.replace("_", "-")
    if isinstance(f.default, bool):
        switch_on = not value if f.default else value  # a --disable-... flag sets False
        return f"give {flag}" if switch_on else f"leave out {flag}"
    if value is None:
        return f"leave out {flag}"
    return f"give {flag} {shlex.quote(str(value))}"
