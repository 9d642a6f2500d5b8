"""Paratron -> Hugging Face: config.json, generation_config.json, tokenizer, safetensors.

`hf_config_from_paratron` inverts `hf_config.config_from_hf` and is checked, not trusted:
the written config.json is read back and every setting that changes what the model
computes must come back equal, so a model a Hugging Face architecture cannot express
(squared ReLU, partial rotary, sigmoid routing without MLA, ...) is refused with the
setting named.
Weights are written as `save_pretrained` does (shards of at most `max_shard_size` with
`model.safetensors.index.json`, one file when it fits), padded vocabulary rows trimmed
and routed experts one tensor per expert, so `from_pretrained` and lm-eval load it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from paratron.checkpoint.files import follow_umask
from paratron.model.config import TransformerConfig, moe_layer_pattern
from paratron.model.identity import model_identity
from paratron.convert.errors import ConversionError
from paratron.convert.hf_config import (DEEPSEEK_LATENT_NORM_EPS, hf_to_paratron_fields,
                                        transformer_config)
from paratron.convert.hf_loader import INDEX_FILE, SINGLE_FILE
from paratron.convert.hf_mapping import PER_EXPERT, architecture
from paratron.convert.streaming import StreamedModel, progress, resize_vocab, staged_output
from paratron.convert.tokenizer_files import TokenizerFiles, copy_into

ARCHITECTURE_CLASSES = {
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
}
_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


def infer_model_type(c: TransformerConfig) -> str:
    """The Hugging Face architecture a Paratron model config describes."""
    if c.multi_latent_attention:
        return "deepseek_v3" if c.moe_router_score_function == "sigmoid" else "deepseek_v2"
    if c.position_embedding_type == "learned_absolute":
        return "gpt2"
    if c.num_experts:
        return "qwen3_moe" if c.qk_layernorm else "mixtral"
    if c.qk_layernorm:
        return "qwen3"
    if c.add_qkv_bias and not c.add_bias_linear:
        return "qwen2"
    return "llama"


def _rope(c: TransformerConfig) -> dict:
    """rope_parameters (transformers 5) and the older rope_theta / rope_scaling keys."""
    params: dict = {"rope_type": "default"}
    if c.uses_yarn():
        params = {"rope_type": "yarn", "factor": c.rotary_scaling_factor,
                  "original_max_position_embeddings": c.rope_original_max_positions(),
                  "beta_fast": c.beta_fast, "beta_slow": c.beta_slow}
        if c.mscale and c.mscale_all_dim:
            params.update(mscale=c.mscale, mscale_all_dim=c.mscale_all_dim)
    elif c.use_rope_scaling:
        params = {"rope_type": "llama3", "factor": c.rope_scaling_factor,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": c.rope_original_max_positions()}
    elif c.rotary_seq_len_interpolation_factor:
        params = {"rope_type": "linear", "factor": c.rotary_seq_len_interpolation_factor}
    legacy = None if params["rope_type"] == "default" else dict(params)
    return {"rope_theta": c.rotary_base, "rope_scaling": legacy,
            "rope_parameters": {"rope_theta": c.rotary_base, **params}}


def _llama_like(c: TransformerConfig) -> dict:
    return dict(hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_query_groups, head_dim=c.kv_channels,
                max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_epsilon,
                hidden_act="silu", attention_dropout=0.0, **_rope(c))


def _dense_layers(c: TransformerConfig) -> list[int]:
    return [i for i, moe in enumerate(moe_layer_pattern(c)) if not moe]


def _by_type(c: TransformerConfig, model_type: str) -> dict:
    if model_type == "gpt2":
        return dict(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_attention_heads,
                    n_inner=c.ffn_hidden_size, n_positions=c.max_position_embeddings,
                    activation_function=("gelu_new" if c.mlp_activation() == "gelu_tanh"
                                         else "gelu"),
                    layer_norm_epsilon=c.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    if model_type == "llama":
        return dict(_llama_like(c), attention_bias=c.add_bias_linear, mlp_bias=c.add_bias_linear)
    if model_type == "qwen2":
        return dict(_llama_like(c), use_sliding_window=False, sliding_window=None)
    if model_type == "qwen3":
        return dict(_llama_like(c), attention_bias=False, use_sliding_window=False,
                    sliding_window=None)
    if model_type == "mixtral":
        return dict(_llama_like(c), intermediate_size=c.moe_ffn_hidden_size,
                    num_local_experts=c.num_experts, num_experts_per_tok=c.moe_router_topk,
                    router_aux_loss_coef=c.moe_aux_loss_coeff, sliding_window=None)
    if model_type == "qwen3_moe":
        return dict(_llama_like(c), attention_bias=False, use_sliding_window=False,
                    moe_intermediate_size=c.moe_ffn_hidden_size, num_experts=c.num_experts,
                    num_experts_per_tok=c.moe_router_topk,
                    norm_topk_prob=not c.moe_router_pre_softmax, decoder_sparse_step=1,
                    mlp_only_layers=_dense_layers(c),
                    router_aux_loss_coef=c.moe_aux_loss_coeff)
    if model_type == "deepseek_v2":
        out = _deepseek_model(c)
        if not c.num_experts:  # every layer dense (first_k_dense_replace = all of them)
            return dict(out, n_routed_experts=0)
        return dict(out, **_deepseek_v2_experts(c))
    if model_type in ("deepseek_v3", "kimi_k2"):
        # The multi-token prediction layers are stored as layers num_hidden_layers + k.
        out = dict(_deepseek_model(c), rope_interleave=True,
                   num_nextn_predict_layers=c.mtp_num_layers or 0)
        if not c.num_experts:
            return dict(out, n_routed_experts=0)
        return dict(out, **_deepseek_v3_experts(c))
    raise ConversionError(f"unsupported Hugging Face model_type {model_type!r}")


def _deepseek_model(c: TransformerConfig) -> dict:
    """The keys DeepSeek-V2 and V3 share: multi-latent attention, the dense layers."""
    dense = _dense_layers(c)
    if dense != list(range(len(dense))):
        raise ConversionError(f"DeepSeek models have dense layers only before their MoE "
                              f"layers; this model's dense layers are {dense}")
    latent = c.norm_epsilon if c.mla_latent_norm_epsilon is None else c.mla_latent_norm_epsilon
    if latent != DEEPSEEK_LATENT_NORM_EPS:
        raise ConversionError(f"the latent norms' epsilon is {latent:g}; Hugging Face's "
                              f"DeepSeek models keep {DEEPSEEK_LATENT_NORM_EPS:g} there "
                              f"(--mla-latent-norm-epsilon)")
    return dict(
            hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_attention_heads,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_epsilon,
            hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0,
            q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
            qk_nope_head_dim=c.qk_head_dim, qk_rope_head_dim=c.qk_pos_emb_head_dim,
            v_head_dim=c.v_head_dim, head_dim=c.qk_pos_emb_head_dim,
            first_k_dense_replace=len(dense), moe_layer_freq=1, **_rope(c))


def _deepseek_experts(c: TransformerConfig) -> dict:
    """The expert keys DeepSeek-V2 and V3 share."""
    shared = c.moe_shared_expert_intermediate_size or 0
    if shared % c.moe_ffn_hidden_size:
        raise ConversionError(f"--moe-shared-expert-intermediate-size {shared} is not a "
                              f"multiple of --moe-ffn-hidden-size {c.moe_ffn_hidden_size}, "
                              f"as DeepSeek's n_shared_experts needs")
    return dict(
        n_routed_experts=c.num_experts, n_shared_experts=shared // c.moe_ffn_hidden_size,
        moe_intermediate_size=c.moe_ffn_hidden_size, num_experts_per_tok=c.moe_router_topk,
        routed_scaling_factor=c.moe_router_topk_scaling_factor or 1.0,
        aux_loss_alpha=c.moe_aux_loss_coeff,
        seq_aux=c.moe_router_load_balancing_type == "seq_aux_loss")


def _deepseek_v2_experts(c: TransformerConfig) -> dict:
    """DeepSeek-V2's routing keys for a model with experts."""
    return dict(_deepseek_experts(c),
                topk_method="group_limited_greedy" if c.moe_router_num_groups else "greedy",
                n_group=c.moe_router_num_groups, topk_group=c.moe_router_group_topk,
                norm_topk_prob=False, scoring_func="softmax")


def _deepseek_v3_experts(c: TransformerConfig) -> dict:
    """DeepSeek-V3's routing keys: sigmoid scores, the correction bias, groups (one group
    of all experts when the routing is not group-limited)."""
    return dict(_deepseek_experts(c), topk_method="noaux_tc", scoring_func="sigmoid",
                norm_topk_prob=True, n_group=c.moe_router_num_groups or 1,
                topk_group=c.moe_router_group_topk or 1)


def hf_config_from_paratron(c: TransformerConfig, model_type: str, vocab_size: int,
                            dtype: torch.dtype) -> dict:
    """config.json for a Paratron model, checked to read back as the same model."""
    hf = {"architectures": [ARCHITECTURE_CLASSES[model_type]], "model_type": model_type,
          "vocab_size": vocab_size, "tie_word_embeddings":
              not c.untie_embeddings_and_output_weights,
          "initializer_range": c.init_method_std, "use_cache": True,
          "dtype": _DTYPE_NAMES[dtype], "torch_dtype": _DTYPE_NAMES[dtype],
          # Set from the tokenizer when one is exported; else none (not a class default).
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
          **_by_type(c, model_type)}
    check_round_trip(c, hf, model_type)
    return hf


def _effective(c: TransformerConfig) -> dict:
    """What config.json must carry back for the model `c`: the settings that make it what
    it is (`model_identity`, the same test a resume applies), plus the context length a
    rotary model's config.json states, and YaRN's temperature pair and router groups as
    config.json spells their absence."""
    out = model_identity(c)
    out["max_position_embeddings"] = c.max_position_embeddings
    if c.uses_yarn() and not (c.mscale and c.mscale_all_dim):
        out["mscale"], out["mscale_all_dim"] = 1.0, 0.0
    elif not c.uses_yarn() and c.mscale and c.mscale_all_dim:
        out["mscale"], out["mscale_all_dim"] = c.mscale, c.mscale_all_dim
    if c.num_experts and not c.moe_router_num_groups:
        out.pop("moe_router_num_groups", None)
        out.pop("moe_router_group_topk", None)
    if c.num_experts and c.moe_router_score_function == "sigmoid":
        out.pop("moe_router_pre_softmax", None)  # no softmax to place
    return out


def check_round_trip(c: TransformerConfig, hf: dict, model_type: str) -> None:
    """Refuse when config.json `hf` would not read back as the model `c` describes."""
    try:
        back = transformer_config(hf_to_paratron_fields(hf))
    except ConversionError as exc:
        raise ConversionError(f"this model has no Hugging Face {model_type} equivalent: "
                              f"{exc}") from None
    want, got = _effective(c), _effective(back)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ConversionError(f"this model has no Hugging Face {model_type} equivalent: "
                                  f"its setting {key}={want.get(key)!r} would read back as "
                                  f"{got.get(key)!r}")


# ------------------------------------------------------------------ tokenizer
def _write_gpt2_tokenizer_config(folder: Path, max_length: int) -> None:
    """vocab.json + merges.txt alone (Megatron's GPT2BPETokenizer files): the
    tokenizer_config.json that makes `AutoTokenizer` load them as GPT-2's tokenizer."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
              "add_prefix_space": False}
    if "<|endoftext|>" in vocab:
        config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                      unk_token="<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export_tokenizer(files: TokenizerFiles, dst: Path, max_length: int,
                     vocab_rows: int) -> dict:
    """Copy the tokenizer into the export and return its special token ids."""
    copy_into(files, dst)
    src = next(iter(files.files.values())).parent
    if files.kind == "gpt2":
        _write_gpt2_tokenizer_config(dst, max_length)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(dst))
    except Exception as exc:  # noqa: BLE001 - any failure is the tokenizer's files
        raise ConversionError(f"{src}: transformers cannot load this tokenizer "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                              ) from None
    if len(tok) > vocab_rows:
        raise ConversionError(f"{src}: the tokenizer has {len(tok)} tokens but the model "
                              f"only {vocab_rows} embedding rows; give the tokenizer the "
                              f"model was trained with (--tokenizer-model)")
    return {k: v for k, v in (("bos_token_id", tok.bos_token_id),
                              ("eos_token_id", tok.eos_token_id),
                              ("pad_token_id", tok.pad_token_id)) if v is not None}


# ------------------------------------------------------------------ weights
def parse_size(text: str) -> int:
    """'5GB', '500MB', '40KB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: give a size such as 5GB or 500MB")
    unit = match.group(2).upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    if "I" in match.group(2).upper():
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return max(int(float(match.group(1)) * scale), 1)


class _ShardWriter:
    """safetensors shards of at most `limit` bytes, named as `save_pretrained` names them."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"part-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        follow_umask(path)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / "part-00000.safetensors").rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"part-{i:05d}.safetensors").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(
            weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def save_hf_folder(model: StreamedModel, save_dir: str | Path, *,
                   dtype: torch.dtype | None = None,
                   max_shard_size: int = 5 * 10**9, model_type: str | None = None) -> Path:
    """Write `model` as a Hugging Face folder at `save_dir`, crash-safely."""
    c = model.config
    model_type = model_type or model.model_type or infer_model_type(c)
    arch = architecture(model_type)
    stream = model.groups()  # the first group (the embedding) gives the stored dtype
    stored_dtype = next(iter(next(stream).values())).dtype
    stream.close()
    out_dtype = dtype or stored_dtype
    hf = hf_config_from_paratron(c, model_type, model.vocab_size, out_dtype)
    with staged_output(save_dir) as tmp:
        if model.tokenizer is not None:
            ids = export_tokenizer(model.tokenizer, tmp, c.max_position_embeddings,
                                   model.vocab_size)
            hf.update(ids)
            generation = {"_from_model_config": True, **ids}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        else:
            (tmp / "generation_config.json").write_text(json.dumps(
                {"_from_model_config": True}, indent=2))
        shards = _ShardWriter(tmp, max_shard_size)
        with progress(model.num_groups, "writing Hugging Face safetensors") as bar:
            for group in model.groups():
                group = resize_vocab(group, model.vocab_size)
                for key, tensor in group.items():
                    kind, _, name = key.partition("/")
                    if kind == "model":
                        tensor = tensor.to(out_dtype) if tensor.is_floating_point() else tensor
                    elif kind != "buffer" or not arch.maps(name):
                        raise ConversionError(f"{model.source}: {key} has no Hugging Face "
                                              f"{model_type} equivalent")
                    # Buffers (DeepSeek-V3's expert bias) keep their precision, as
                    # transformers keeps them in fp32.
                    for hf_name, part in arch.to_hf(name, tensor, c, 0, PER_EXPERT).items():
                        shards.add(hf_name, part)
                bar.update()
        shards.finish()
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    return Path(save_dir)
