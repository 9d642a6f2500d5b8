"""Multi-latent attention (DeepSeek-V2), with Megatron-Core's module names.

Keys and values are expanded per head from one low-rank latent per token; the positional
part of the key is one rope key per token shared by every head:

    q  = linear_q_proj(x)                                   (no --q-lora-rank)
       = linear_q_up_proj(q_layernorm(linear_q_down_proj(x)))
    c, k_pe = split(linear_kv_down_proj(x), [kv_lora_rank, qk_pos_emb_head_dim])
    k_nope, v = split(linear_kv_up_proj(kv_layernorm(c)), [qk_head_dim, v_head_dim])
    q = [q_nope, rope(q_pe)],  k = [k_nope, rope(k_pe) for every head]
    out = linear_proj(softmax(q k^T * scale + causal) v)

DeepSeek-V2 rotates consecutive pairs of rope channels, so they are permuted to the
halves layout first (unless --rotary-interleaved); the scale is
1/sqrt(qk_head_dim + qk_pos_emb_head_dim), times yarn_mscale^2 under YaRN. Generation
caches the normalised latent and rope key, far smaller than expanded keys and values.
Heads are split over TP; the down projections and latent norms are replicated, and under
sequence parallelism the small latents (not the hidden state) are all-gathered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paratron.model.attention import attend
from paratron.model.norms import build_norm
from paratron.model.rotary import apply_rotary, yarn_mscale
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import replicated
from paratron.parallel.tensor_parallel import (ColumnParallelLinear, CopyToTensorParallelRegion,
                                               GatherFromSequenceParallelRegion, RowParallelLinear)


class ReplicatedLinear(nn.Module):
    """y = x A^T (+ b) with the whole weight on every TP rank (Megatron's "duplicated").

    sequence_parallel: x is this rank's sequence shard, so the weight's gradient covers
    this shard's tokens only and is summed over TP.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 init_std: float = 0.02, dtype=None, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        replicated(self, partial_grad=sequence_parallel)
        self.init_std = init_std

    matmul = staticmethod(F.linear)  # FP8 layers get model/fp8.py's Float8Matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)


def _replicated_norm(config, size: int) -> nn.Module:
    """A latent norm, replicated over TP; summed over TP under sequence parallelism. With
    --no-mla-latent-layernorm the identity, as in Megatron's MLA without --qk-layernorm."""
    if not config.mla_latent_layernorm:
        return nn.Identity()
    eps = config.mla_latent_norm_epsilon
    norm = build_norm(config.normalization, size, config.norm_epsilon if eps is None else eps)
    return replicated(norm, partial_grad=config.sequence_parallel)


def apply_mla_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleaved: bool) -> torch.Tensor:
    """DeepSeek-V2's rope on x [s, b, heads, d]: the pairs (2i, 2i+1) are rotated.

    With halves-layout tables the channels are permuted to [evens, odds] first (the
    same permutation for q and k, so q.k is that of the pair rotation)."""
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"multi-latent attention rotates all {x.shape[-1]} rope channels, "
                         f"but the rotary tables cover {cos.shape[-1]}")
    if not interleaved:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    return apply_rotary(x, cos, sin, interleaved)


def mla_softmax_scale(config) -> float:
    """1/sqrt(q head dim), times yarn_mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = 1.0 / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)
    if config.rotary_scaling_factor > 1 and config.mscale_all_dim:
        scale *= yarn_mscale(config.rotary_scaling_factor, config.mscale_all_dim) ** 2
    return scale


class MLASelfAttention(nn.Module):
    """forward(x [s, b, h] (or [s/TP, b, h] under SP), rotary=(cos, sin) over
    qk_pos_emb_head_dim, attention_mask=None) -> same shape as x."""

    def __init__(self, config, layer_number: int, pg: ProcessGroups | None = None):
        super().__init__()
        pg = pg or ProcessGroups.single()
        c = config
        if c.num_attention_heads % pg.tp.size:
            raise ValueError(f"--num-attention-heads {c.num_attention_heads} is not divisible "
                             f"by TP {pg.tp.size}")
        self.config, self.pg, self.layer_number = c, pg, layer_number
        self.heads = c.num_attention_heads // pg.tp.size
        self.q_head_dim = c.qk_head_dim + c.qk_pos_emb_head_dim
        sp, std = c.sequence_parallel, c.init_method_std
        q_out = c.num_attention_heads * self.q_head_dim
        if c.q_lora_rank is None:
            self.linear_q_proj = ColumnParallelLinear(c.hidden_size, q_out, bias=False, pg=pg,
                                                      init_std=std, sequence_parallel=sp)
        else:
            self.linear_q_down_proj = ReplicatedLinear(c.hidden_size, c.q_lora_rank,
                                                       init_std=std, sequence_parallel=sp)
            self.q_layernorm = _replicated_norm(c, c.q_lora_rank)
            self.linear_q_up_proj = ColumnParallelLinear(c.q_lora_rank, q_out, bias=False,
                                                         pg=pg, init_std=std,
                                                         sequence_parallel=sp)
        self.linear_kv_down_proj = ReplicatedLinear(
            c.hidden_size, c.kv_lora_rank + c.qk_pos_emb_head_dim, init_std=std,
            sequence_parallel=sp)
        self.kv_layernorm = _replicated_norm(c, c.kv_lora_rank)
        self.linear_kv_up_proj = ColumnParallelLinear(
            c.kv_lora_rank, c.num_attention_heads * (c.qk_head_dim + c.v_head_dim),
            bias=False, pg=pg, init_std=std, sequence_parallel=sp)
        self.linear_proj = RowParallelLinear(
            c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.add_bias_linear,
            pg=pg, init_std=std / math.sqrt(2.0 * c.num_layers), sequence_parallel=sp)
        self.softmax_scale = mla_softmax_scale(c)
        self.recompute_core = "core_attn" in (c.recompute_modules or []) \
            and c.recompute_granularity == "selective"

    def forward(self, x: torch.Tensor, rotary=None, attention_mask=None,
                inference_params=None) -> torch.Tensor:
        """inference_params (generation): the normalised latent and the rotated rope key
        of this step join the cached ones, and keys and values are expanded from all of
        them (see the module docstring)."""
        c, group = self.config, self.pg.tp.group
        # Queries: this rank's heads for the whole sequence.
        if c.q_lora_rank is None:
            q = self.linear_q_proj(x)
        else:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads, self.q_head_dim)
        q_nope, q_pe = q.split([c.qk_head_dim, c.qk_pos_emb_head_dim], dim=-1)

        # Keys and values from the latent (on this rank's tokens under SP).
        latent, k_pe = self.linear_kv_down_proj(x).split(
            [c.kv_lora_rank, c.qk_pos_emb_head_dim], dim=-1)
        latent = self.kv_layernorm(latent)
        # The shared rope key: each rank uses it for its own heads only, so its gradient
        # is summed over TP (all-reduce, or reduce-scatter back to the shards under SP).
        if c.sequence_parallel:
            k_pe = GatherFromSequenceParallelRegion.apply(k_pe, group, True)
        else:
            k_pe = CopyToTensorParallelRegion.apply(k_pe, group)
        k_pe = k_pe.unsqueeze(2)  # [s, b, 1, rope dim]

        if rotary is not None:
            cos, sin = rotary
            q_pe = apply_mla_rotary(q_pe, cos, sin, c.rotary_interleaved)
            k_pe = apply_mla_rotary(k_pe, cos, sin, c.rotary_interleaved)
        if inference_params is not None:  # the whole cached context from here on
            latent, k_pe = inference_params.append(self.layer_number, latent, k_pe)
        kv = self.linear_kv_up_proj(latent)  # whole sequence
        kv = kv.view(kv.shape[0], b, self.heads, c.qk_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.heads, -1)], dim=-1)

        return self.linear_proj(attend(self, q, k, v, attention_mask))
