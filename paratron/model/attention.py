"""Self-attention (MHA / GQA) with Megatron-Core's fused QKV layout.

`linear_qkv` produces, for each query group, its query heads followed by one key and
one value head: [groups, (heads_per_group + 2) x head_dim]. A tensor-parallel rank thus
holds whole query groups. The core attention is `scaled_dot_product_attention`, causal,
with grouped heads broadcast by SDPA itself.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from paratron.model.norms import build_norm
from paratron.model.rotary import apply_rotary
from paratron.parallel.context_parallel import context_parallel_attention
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import replicated, set_layout
from paratron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def core_attention(q, k, v, attention_mask, dropout_p: float, scale: float) -> torch.Tensor:
    """q [s, b, n, d], k/v [s, b, g, d] -> [s, b, n*d]; causal unless a mask is given.

    attention_mask, when given, is boolean [b, 1, s, s] with True where attention is
    allowed (packed documents, --reset-attention-mask); it already includes causality.
    A value head narrower than the query's (MLA) is padded with zeros to its width, as
    Hugging Face's DeepSeek does for flash attention: the fused kernels take one head
    width (torch's inductor also mis-fuses the unfused form), and the padding's output
    columns, zeros, are dropped.
    """
    width = v.shape[-1]
    if width < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - width))
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=dropout_p,
        is_causal=attention_mask is None, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1])
    s, b = out.shape[2], out.shape[0]
    return out[..., :width].permute(2, 0, 1, 3).reshape(s, b, -1)


def attend(module: nn.Module, q, k, v, attention_mask) -> torch.Tensor:
    """Core attention of an attention module (`pg`, `config`, `softmax_scale`,
    `recompute_core`): dropout masks drawn per TP rank (heads are split over TP), and
    recomputed in backward under selective recompute."""
    dropout = module.config.attention_dropout if module.training else 0.0
    pg = module.pg

    def run(q, k, v):
        if pg.cp.size > 1:  # this rank's two sequence chunks against the whole sequence
            return context_parallel_attention(q, k, v, pg, module.config.cp_comm_type,
                                              scale=module.softmax_scale, dropout_p=dropout)
        return core_attention(q, k, v, attention_mask, dropout, module.softmax_scale)

    with pg.rng.fork() if dropout > 0 else contextlib.nullcontext():
        if module.recompute_core and module.training:
            return checkpoint(run, q, k, v, use_reentrant=False,
                              context_fn=pg.rng.checkpoint_contexts)
        return run(q, k, v)


class SelfAttention(nn.Module):
    """Multi-head or grouped-query self-attention of one layer, this TP rank's share.

    Holds `linear_qkv` (column-parallel: `groups` query groups per rank, each its
    `heads / groups` query heads then one key and one value head of `head_dim`), the
    optional per-head `q_layernorm`/`k_layernorm`, and `linear_proj` (row-parallel, back
    to the hidden size). Takes and returns hidden states [s, b, h] (sequence shards
    [s/TP, b, h] under sequence parallelism); with fewer query groups than TP ranks,
    each rank keeps the one key/value group its query heads use.
    """

    def __init__(self, config, layer_number: int, pg: ProcessGroups | None = None):
        super().__init__()
        pg = pg or ProcessGroups.single()
        c = config
        self.config = c
        self.head_dim = c.kv_channels
        tp = pg.tp.size
        self.heads = c.num_attention_heads // tp
        # Fewer key/value groups than TP ranks: each rank keeps its group's k and v.
        self.replicated_kv = c.num_query_groups < tp
        self.groups = 1 if self.replicated_kv else c.num_query_groups // tp
        qkv_out = tp * (self.heads + 2 * self.groups) * c.kv_channels
        out_std = c.init_method_std / math.sqrt(2.0 * c.num_layers)
        self.pg, self.layer_number = pg, layer_number
        self.linear_qkv = ColumnParallelLinear(c.hidden_size, qkv_out, pg=pg,
                                               bias=c.add_bias_linear or c.add_qkv_bias,
                                               init_std=c.init_method_std,
                                               sequence_parallel=c.sequence_parallel)
        if self.replicated_kv:
            for p in self.linear_qkv.parameters():
                set_layout(p, fused="qkv_replicated_kv",
                           qkv_heads=(c.num_attention_heads, c.num_query_groups, c.kv_channels))
        if c.qk_layernorm:
            # Replicated, but each TP rank applies them to its own heads only: the
            # gradient is the sum over TP, like a norm's under sequence parallelism.
            self.q_layernorm, self.k_layernorm = (
                replicated(build_norm(c.normalization, c.kv_channels, c.norm_epsilon),
                           partial_grad=tp > 1) for _ in range(2))
        else:
            self.q_layernorm = self.k_layernorm = None
        self.linear_proj = RowParallelLinear(c.num_attention_heads * c.kv_channels,
                                             c.hidden_size, bias=c.add_bias_linear, pg=pg,
                                             init_std=out_std,
                                             sequence_parallel=c.sequence_parallel)
        self.softmax_scale = 1.0 / math.sqrt(c.kv_channels)
        self.recompute_core = "core_attn" in (c.recompute_modules or []) \
            and c.recompute_granularity == "selective"

    def forward(self, x: torch.Tensor, rotary=None, attention_mask=None,
                inference_params=None) -> torch.Tensor:
        """inference_params (generation): this step's keys and values join the cached
        ones of this layer, and the queries attend to all of them under
        `attention_mask`, which the model built from the cache."""
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x)  # the whole sequence, also under sequence parallelism
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(s, b, self.heads, self.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin, self.config.rotary_interleaved)
            k = apply_rotary(k, cos, sin, self.config.rotary_interleaved)
        if inference_params is not None:
            k, v = inference_params.append(self.layer_number, k, v)
        out = attend(self, q, k, v, attention_mask)
        return self.linear_proj(out)
