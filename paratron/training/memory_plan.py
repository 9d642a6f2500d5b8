"""Per-GPU memory of a parallel layout, worked out from the config, and a layout to pick.

The figures are what Paratron itself allocates on one rank, not a textbook rule of
thumb, so `paratron plan` can be checked against a real Trainer tensor by tensor:

- weights: this rank's parameters (`model_parameters` lists them in the order the
  modules create them) in the model's dtype; with the distributed optimizer they live
  in the padded contiguous buffers of `paratron.parallel.data_parallel`.
- gradients: the fp32 gradient buffers, one per (dtype, dense/expert) of each model
  chunk, cut into buckets padded to a multiple of the group that reduces them (DP x CP
  for dense weights, expert-DP for experts).
- optimizer: fp32 main weights (only when the weights are bf16/fp16) and the Adam
  moments (or SGD momentum) of the elements this rank updates: the whole buffer, or its
  shard of every bucket with the distributed optimizer (`build_segments`).
- activations: the bytes autograd saves for backward per micro-batch, layer by layer,
  as Paratron's modules save them (Korthikanti et al.'s accounting, redone for these
  kernels: fp32 norm inputs, flash-attention q/k/v/out/log-sum-exp, the fused QKV
  storage kept alive by v, SwiGLU's three tensors, MoE's permuted rows, the fp32
  softmax of the vocabulary-parallel cross entropy), times the micro-batches a stage
  holds under the 1F1B schedule (found by walking the schedule's own order: the first
  stage holds PP of them), plus the transient working set (one recomputed chunk under
  full recompute, the logits of the last stage).
- communication: the pipeline's receive buffers (alongside the activations), and the
  distributed optimizer's reduce-scatter outputs or weight all-gather sources,
  whichever is larger (after backward, when the activations are freed: the total
  counts the larger of the two phases).

Recommendation rule (`recommend`): among the layouts whose total stays under
(1 - headroom) x GPU memory, prefer

1. no activation recompute added by the planner (it re-runs the forward, about a third
   more compute),
2. the fewest model-parallel ranks TP x PP x CP (more data parallelism, whose one
   gradient reduction per step overlaps backward, instead of per-layer collectives or
   pipeline bubbles),
3. the smallest expert-parallel size (fewer all-to-all exchanges),
4. fewer pipeline stages, then less context parallelism (for the same model-parallel
   size tensor parallelism inside a node costs less than a pipeline bubble),
5. the least memory.
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field

import torch

from paratron.config import (Config, ConfigError, finalize, moe_layer_pattern,
                             pipeline_split, validate, virtual_stages)
from paratron.parallel.data_parallel import DEFAULT_BUCKET_SIZE
from paratron.parallel.pipeline import (Chunk, interleaved_order, model_chunks,
                                        one_f_one_b_order)

GIB = 2 ** 30
FP32 = 4


def dtype_bytes(cfg: Config) -> int:
    """Bytes per element of the model's weights and activations."""
    return 2 if cfg.training.bf16 or cfg.training.fp16 else 4


# ------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class Layout:
    """Sizes of one way to place the run on `world` GPUs (etp defaults to tp)."""

    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        return self.world // (self.expert_tp * self.ep * self.pp)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @classmethod
    def of(cls, cfg: Config) -> "Layout":
        p = cfg.parallel
        world = (cfg.data_parallel_size * p.tensor_model_parallel_size
                 * p.pipeline_model_parallel_size * p.context_parallel_size)
        return cls(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   p.context_parallel_size, p.expert_model_parallel_size,
                   p.expert_tensor_parallel_size)

    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp} EP{self.ep}"


def layout_config(base: Config, layout: Layout) -> Config:
    """A copy of `base` run on `layout`, finalized and validated (ConfigError if the
    trainer would refuse it), with the padded vocabulary resolved for its TP size."""
    from paratron.training.trainer import resolve_vocab_size

    cfg = copy.deepcopy(base)
    p = cfg.parallel
    p.world_size = layout.world
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.context_parallel_size, p.expert_model_parallel_size = layout.cp, layout.ep
    p.expert_tensor_parallel_size = layout.etp
    finalize(cfg)
    validate(cfg)
    cfg.model.padded_vocab_size = resolve_vocab_size(cfg, None)
    return cfg


# ------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamShape:
    name: str
    numel: int
    expert: bool = False


def _norm(name: str, size: int, m) -> list[ParamShape]:
    out = [ParamShape(f"{name}.weight", size)]
    if m.normalization == "LayerNorm":
        out.append(ParamShape(f"{name}.bias", size))
    return out


def _linear(name: str, rows: int, cols: int, bias: bool, bias_size: int | None = None,
            expert: bool = False) -> list[ParamShape]:
    out = [ParamShape(f"{name}.weight", rows * cols, expert)]
    if bias:
        out.append(ParamShape(f"{name}.bias", bias_size or rows, expert))
    return out


def _attention(m, tp: int) -> list[ParamShape]:
    """SelfAttention / MLASelfAttention parameters on one TP rank, in creation order."""
    h, n = m.hidden_size, m.num_attention_heads
    if m.multi_latent_attention:
        q_dim = m.qk_head_dim + m.qk_pos_emb_head_dim
        out = []
        if m.q_lora_rank is None:
            out += _linear("linear_q_proj", n * q_dim // tp, h, False)
        else:
            out += _linear("linear_q_down_proj", m.q_lora_rank, h, False)
            out += _norm("q_layernorm", m.q_lora_rank, m)
            out += _linear("linear_q_up_proj", n * q_dim // tp, m.q_lora_rank, False)
        out += _linear("linear_kv_down_proj", m.kv_lora_rank + m.qk_pos_emb_head_dim, h, False)
        out += _norm("kv_layernorm", m.kv_lora_rank, m)
        out += _linear("linear_kv_up_proj", n * (m.qk_head_dim + m.v_head_dim) // tp,
                       m.kv_lora_rank, False)
        out += _linear("linear_proj", h, n * m.v_head_dim // tp, m.add_bias_linear)
        return out
    d, g = m.kv_channels, m.num_query_groups
    local_groups = 1 if g < tp else g // tp
    qkv_rows = (n // tp + 2 * local_groups) * d
    out = _linear("linear_qkv", qkv_rows, h, m.add_bias_linear or m.add_qkv_bias)
    if m.qk_layernorm:
        out += _norm("q_layernorm", d, m) + _norm("k_layernorm", d, m)
    out += _linear("linear_proj", h, n * d // tp, m.add_bias_linear, h)
    return out


def _mlp(m, ffn: int, tp: int, prefix: str = "mlp") -> list[ParamShape]:
    fc1 = 2 * ffn if m.swiglu else ffn
    return (_linear(f"{prefix}.linear_fc1", fc1 // tp, m.hidden_size, m.add_bias_linear)
            + _linear(f"{prefix}.linear_fc2", m.hidden_size, ffn // tp, m.add_bias_linear,
                      m.hidden_size))


def _moe(m, tp: int, ep: int, etp: int) -> list[ParamShape]:
    h, local = m.hidden_size, m.num_experts // ep
    ffn = (m.moe_ffn_hidden_size or m.ffn_hidden_size) // etp
    fc1 = 2 * ffn if m.swiglu else ffn
    out = [ParamShape("mlp.router.weight", m.num_experts * h),
           ParamShape("mlp.experts.linear_fc1.weight", local * fc1 * h, True),
           ParamShape("mlp.experts.linear_fc2.weight", local * h * ffn, True)]
    if m.moe_shared_expert_intermediate_size:
        out += _mlp(m, m.moe_shared_expert_intermediate_size, tp, "mlp.shared_experts")
        if m.moe_shared_expert_gate:
            out.append(ParamShape("mlp.shared_experts.gate_weight", h))
    return out


def model_parameters(cfg: Config, chunk: Chunk) -> list[ParamShape]:
    """The parameters of one model chunk on one rank, in `module.parameters()` order
    (which fixes the gradient buffer's bucket layout)."""
    m, lay = cfg.model, Layout.of(cfg)
    out = _embedding_parameters(cfg, chunk)
    moe = moe_layer_pattern(m)
    for layer in chunk.layers:
        out += _layer_parameters(m, lay, moe[layer])
    return out + _head_parameters(cfg, chunk)


def _embedding_parameters(cfg: Config, chunk: Chunk) -> list[ParamShape]:
    m, tp = cfg.model, Layout.of(cfg).tp
    if not chunk.is_first:
        return []
    out = [ParamShape("embedding.word_embeddings.weight",
                      m.padded_vocab_size // tp * m.hidden_size)]
    if m.position_embedding_type == "learned_absolute":
        out.append(ParamShape("embedding.position_embeddings.weight",
                              m.max_position_embeddings * m.hidden_size))
    return out


def _layer_parameters(m, lay: Layout, moe: bool) -> list[ParamShape]:
    """One transformer layer's parameters on one rank (dense or MoE)."""
    out = _norm("input_layernorm", m.hidden_size, m) + _attention(m, lay.tp)
    out += _norm("pre_mlp_layernorm", m.hidden_size, m)
    return out + (_moe(m, lay.tp, lay.ep, lay.expert_tp) if moe
                  else _mlp(m, m.ffn_hidden_size, lay.tp))


def _head_parameters(cfg: Config, chunk: Chunk) -> list[ParamShape]:
    """The final norm and (unless tied to this chunk's embedding) the output layer."""
    m, tp = cfg.model, Layout.of(cfg).tp
    if not chunk.is_last:
        return []
    out = _norm("decoder.final_layernorm", m.hidden_size, m)
    if m.untie_embeddings_and_output_weights or not chunk.is_first:
        out.append(ParamShape("output_layer.weight", m.padded_vocab_size // tp * m.hidden_size))
    return out


def rank_chunks(cfg: Config, pp_rank: int) -> list[Chunk]:
    return model_chunks(cfg.model.num_layers, cfg.parallel.pipeline_model_parallel_size,
                        pp_rank, virtual_stages(cfg), **pipeline_split(cfg))


# ------------------------------------------------------------------ buffers and state
@dataclass
class Buffer:
    """The layout of one gradient buffer: buckets as (start, padded size), and where each
    parameter starts; `dp_size` is the size of the group that reduces it."""

    dp_size: int
    expert: bool = False
    numel: int = 0
    buckets: list[tuple[int, int]] = field(default_factory=list)
    params: list[tuple[int, int]] = field(default_factory=list)  # (start, numel)


def grad_buffers(params: list[ParamShape], layout: Layout,
                 bucket_size: int | None) -> list[Buffer]:
    """The buffers `DataParallel` builds for one chunk: parameters grouped dense/expert
    (one dtype), in reverse order, cut into buckets of at least `bucket_size` elements,
    each padded to a multiple of its reducing group."""
    dp_dense = layout.dp * layout.cp
    size = bucket_size or max(DEFAULT_BUCKET_SIZE, 1_000_000 * dp_dense)
    kinds: dict[bool, list[ParamShape]] = {}
    for p in params:
        kinds.setdefault(p.expert, []).append(p)
    buffers = []
    for expert, group in kinds.items():
        buf = Buffer(layout.edp if expert else dp_dense, expert)
        offset = bucket_start = 0
        ordered = list(reversed(group))
        for i, p in enumerate(ordered):
            buf.params.append((offset, p.numel))
            offset += p.numel
            if offset - bucket_start >= size or i == len(ordered) - 1:
                padded = -(-(offset - bucket_start) // buf.dp_size) * buf.dp_size
                buf.buckets.append((bucket_start, padded))
                offset = bucket_start = bucket_start + padded
        buf.numel = offset
        buffers.append(buf)
    return buffers


def _owned_elements(buf: Buffer, sharded: bool, dp_rank: int) -> int:
    """Parameter elements of `buf` this rank updates (padding excluded)."""
    elements, first = 0, 0
    for start, numel in buf.buckets:
        lo, hi = start, start + numel
        if sharded:
            shard = numel // buf.dp_size
            lo = start + (dp_rank % buf.dp_size) * shard
            hi = lo + shard
        # Buckets and parameters both run in buffer order: skip the parameters that end
        # before this bucket once, rather than scanning all of them for every bucket.
        while first < len(buf.params) and sum(buf.params[first]) <= lo:
            first += 1
        for p_start, p_numel in itertools.islice(buf.params, first, None):
            if p_start >= hi:
                break
            elements += min(hi, p_start + p_numel) - max(lo, p_start)
    return elements


@dataclass
class StateBytes:
    weights: int = 0
    grads: int = 0
    main_weights: int = 0
    optimizer_moments: int = 0
    reduce_scatter: int = 0     # fp32 outputs of every bucket's reduce-scatter
    param_gather: int = 0       # model-dtype sources of the weight all-gathers

    @property
    def optimizer(self) -> int:
        return self.main_weights + self.optimizer_moments


def state_bytes(cfg: Config, pp_rank: int = 0, dp_rank: int = 0,
                edp_rank: int = 0) -> StateBytes:
    """Weights, fp32 gradient buffers and optimizer state held by one rank. The rank in
    the DP x CP group (dense weights) and in the expert-DP group matter only with the
    distributed optimizer; rank 0 holds the most (padding ends the last shard)."""
    lay, p, o = Layout.of(cfg), cfg.parallel, cfg.optimizer
    width = dtype_bytes(cfg)
    sharded = p.use_distributed_optimizer and lay.dp * lay.cp > 1
    moments = (2 if o.optimizer == "adam" else int(o.sgd_momentum != 0)) * FP32
    out = StateBytes()
    for chunk in rank_chunks(cfg, pp_rank):
        params = model_parameters(cfg, chunk)
        buffers = grad_buffers(params, lay, p.ddp_bucket_size)
        if sharded:
            out.weights += sum(b.numel for b in buffers) * width
        else:
            out.weights += sum(x.numel for x in params) * width
        for buf in buffers:
            out.grads += buf.numel * FP32
            elements = _owned_elements(buf, sharded, edp_rank if buf.expert else dp_rank)
            out.main_weights += elements * FP32 if width != FP32 else 0
            out.optimizer_moments += elements * moments
            if sharded and buf.dp_size > 1:
                shards = [numel // buf.dp_size for _, numel in buf.buckets]
                out.reduce_scatter += sum(shards) * FP32
                gather = sum(shards) if p.overlap_param_gather else max(shards)
                out.param_gather = max(out.param_gather, gather * width)
    return out


# ------------------------------------------------------------------ activations
@dataclass
class ActivationShape:
    """Per-rank sizes of one micro-batch as the layers see it."""

    tokens: int        # s/CP x b: tokens of the full (TP-gathered) sequence chunk
    sharded: int       # tokens on this rank in norms and dropout (/TP under SP)
    batch: int
    seq: int           # s / CP
    width: int         # bytes of the model dtype
    mask: int          # bytes per dropout-mask element


def _shape(cfg: Config, device: str) -> ActivationShape:
    lay, b = Layout.of(cfg), cfg.training.micro_batch_size
    seq = cfg.data.seq_length // lay.cp
    sp = cfg.parallel.sequence_parallel
    width = dtype_bytes(cfg)
    # CUDA's fused dropout keeps a bool mask; the CPU composite one a mask in the dtype.
    mask = 1 if device == "cuda" else width
    return ActivationShape(seq * b, seq * b // (lay.tp if sp else 1), b, seq, width, mask)


def _norm_saved(m, a: ActivationShape, tokens: int, size: int, view_of: int | None = None,
                checkpointed: bool = False) -> int:
    """A norm's saved tensors (it computes in fp32): the fp32 input, the statistics and,
    for RMSNorm, the normalised tensor that multiplies the weight. In fp32 the input is
    not copied: when it is a view, `view_of` gives the bytes of the storage it keeps
    alive (0 if saved anyway). Under selective layernorm recompute only the input in
    the model dtype is kept."""
    if checkpointed:
        return a.width * tokens * size
    fp32_input = FP32 * tokens * size
    if view_of is not None and a.width == FP32:
        fp32_input = view_of
    if m.normalization == "LayerNorm":
        copies = 2 * FP32 * size if a.width != FP32 else 0  # weight.float(), bias.float()
        return fp32_input + 2 * FP32 * tokens + copies
    return fp32_input + FP32 * tokens + a.width * tokens * size


def _attention_saved(m, lay: Layout, a: ActivationShape, core_recomputed: bool) -> int:
    """q, k, v (v keeps the whole fused QKV or kv up-projection alive, being a view of
    it), the attention output (also linear_proj's input) and, unless selective recompute
    replays the core attention, its fp32 log-sum-exp (flash style: no score matrix)."""
    t, T, w = lay.tp, a.tokens, a.width
    heads = m.num_attention_heads // t
    total = 0
    if m.multi_latent_attention:
        q_dim, v_dim = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
        if m.q_lora_rank is not None:
            total += _norm_saved(m, a, T, m.q_lora_rank) + w * T * m.q_lora_rank
        latent = w * T * (m.kv_lora_rank + m.qk_pos_emb_head_dim)  # the down projection
        total += _norm_saved(m, a, T, m.kv_lora_rank, view_of=latent) + w * T * m.kv_lora_rank
        kv_heads, k_dim = heads, q_dim
        q = k = w * T * heads * q_dim                       # [nope, rope] concatenated
        v = w * T * heads * (m.qk_head_dim + v_dim)         # the kv up-projection
    else:
        d, g = m.kv_channels, m.num_query_groups
        kv_heads = 1 if g < t else g // t
        k_dim = v_dim = d
        rope = m.position_embedding_type in ("rope", "yarn")
        q = w * T * heads * d if rope else 0                # rotated copies
        k = w * T * kv_heads * d if rope else 0
        v = w * T * (heads + 2 * kv_heads) * d              # the fused QKV output
        if m.qk_layernorm:
            # k is a view of the QKV output; q too with one local group, else a copy.
            q_view = 0 if kv_heads == 1 else None
            total += _norm_saved(m, a, T * heads, d, view_of=q_view)
            total += _norm_saved(m, a, T * kv_heads, d, view_of=0)
    total += q + k + v + w * T * heads * v_dim
    if core_recomputed:
        return total
    lse = FP32 * a.batch * heads * a.seq
    if lay.cp > 1:
        # The other ranks' keys and values (ring steps or all-gather) and the fp32
        # partial outputs that online softmax merges.
        total += (lay.cp - 1) * (w * T * kv_heads * (k_dim + v_dim)
                                 + FP32 * T * heads * v_dim + lse)
    return total + lse


def _mlp_saved(m, a: ActivationShape, tokens: int, ffn_local: int) -> int:
    """SwiGLU: fc1 output, silu(gate), the product; GeLU / squared ReLU: fc1 output and
    the activation."""
    return a.width * tokens * ffn_local * (4 if m.swiglu else 2)


def _moe_saved(m, lay: Layout, a: ActivationShape) -> int:
    """Router (fp32 logits input, scores, top-k), permuted rows, experts, the fp32
    weighted combine; routed rows assume balanced experts."""
    t, w, h, E, k = lay.tp, a.width, m.hidden_size, m.num_experts, m.moe_router_topk
    sp = a.sharded != a.tokens
    routed_tokens = a.sharded            # the tokens the router sees
    rows = k * a.tokens // t             # rows this rank dispatches (1/TP of the tokens)
    expert_rows = rows * lay.expert_tp   # rows each expert-TP rank computes
    total = 0
    shared = m.moe_shared_expert_intermediate_size
    # The norm output: saved as the shared experts' linear input (gathered under SP)
    # and, in fp32 form, as the router's input.
    if shared:
        total += w * a.tokens * h + _mlp_saved(m, a, a.tokens, shared // t)
        if m.moe_shared_expert_gate:
            total += FP32 * a.tokens
    if w != FP32 or sp or not shared:
        total += FP32 * routed_tokens * h
    if w != FP32:
        total += FP32 * E * h            # the router weight in fp32
    scores = E if m.moe_router_pre_softmax or m.moe_router_score_function == "sigmoid" else k
    total += routed_tokens * (FP32 * scores + 8 * k)
    if m.moe_aux_loss_coeff and m.moe_router_load_balancing_type != "none":
        total += routed_tokens * (FP32 * E + 8 * k) + FP32 * (E + 1)
    if m.moe_z_loss_coeff:
        total += routed_tokens * FP32 * (E + 1) + FP32
    total += 16 * rows                   # expert and token index of each row
    if (lay.ep > 1 or lay.expert_tp > 1) and E // lay.ep > 1:
        total += 2 * 8 * expert_rows     # the sort by local expert and its inverse
    ffn = (m.moe_ffn_hidden_size or m.ffn_hidden_size) // lay.expert_tp
    total += w * expert_rows * h + _mlp_saved(m, a, expert_rows, ffn)
    total += 2 * FP32 * rows * h + FP32 * rows
    return total


def layer_saved_bytes(cfg: Config, layer: int, device: str = "cuda") -> int:
    """Bytes one transformer layer saves for backward per micro-batch (no full
    recompute; selective recompute modules honoured)."""
    m, lay = cfg.model, Layout.of(cfg)
    a = _shape(cfg, device)
    selective = (m.recompute_modules or []) if m.recompute_granularity == "selective" else []
    norm_ckpt = "layernorm" in selective
    total = 2 * (_norm_saved(m, a, a.sharded, m.hidden_size, checkpointed=norm_ckpt)
                 + a.width * a.tokens * m.hidden_size)      # each norm + linear input
    if m.hidden_dropout > 0:
        total += 2 * a.mask * a.sharded * m.hidden_size
    total += _attention_saved(m, lay, a, "core_attn" in selective)
    if "mlp" in selective:
        return total
    if m.num_experts and moe_layer_pattern(m)[layer]:
        # The MoE layer has no dense linear input of its own (counted in _moe_saved).
        return total - a.width * a.tokens * m.hidden_size + _moe_saved(m, lay, a)
    return total + _mlp_saved(m, a, a.tokens, m.ffn_hidden_size // lay.tp)


def _layer_bytes(cfg: Config, device: str):
    """layer number -> `layer_saved_bytes`, worked out once per kind (dense, MoE): the
    layers of a kind save the same, and a deep model has many."""
    moe = moe_layer_pattern(cfg.model)
    first = {kind: moe.index(kind) for kind in (False, True) if kind in moe}
    by_kind = {kind: layer_saved_bytes(cfg, n, device) for kind, n in first.items()}
    return lambda layer: by_kind[moe[layer]]


def _recompute_chunks(cfg: Config, layers: range) -> list[tuple[list[int], bool]]:
    """(global layer numbers, recomputed?) per checkpoint chunk, as TransformerBlock."""
    m, local = cfg.model, list(layers)
    if m.recompute_granularity != "full":
        return [([n], False) for n in local]
    if m.recompute_method == "uniform":
        size = m.recompute_num_layers or 1
        return [(local[i:i + size], True) for i in range(0, len(local), size)]
    return [([n], i < m.recompute_num_layers) for i, n in enumerate(local)]


def chunk_saved_bytes(cfg: Config, chunk: Chunk, device: str = "cuda") -> int:
    """Bytes one model chunk saves for backward per micro-batch: embedding, layers (or
    only each recompute chunk's input), final norm, output layer input and the fp32
    softmax of the cross entropy."""
    m, lay = cfg.model, Layout.of(cfg)
    a = _shape(cfg, device)
    h, vocab = m.hidden_size, m.padded_vocab_size // lay.tp
    total = 0
    if chunk.is_first:
        total += 8 * a.tokens                       # token ids
        if m.position_embedding_type == "learned_absolute":
            total += 8 * a.tokens
        if m.hidden_dropout > 0:
            total += a.mask * a.sharded * h
    plan = _recompute_chunks(cfg, chunk.layers)
    if m.position_embedding_type in ("rope", "yarn") and any(not rc for _, rc in plan):
        # Saved by the rotations; inside recomputed layers they are recomputed too.
        rot = (m.qk_pos_emb_head_dim if m.multi_latent_attention
               else int(m.kv_channels * m.rotary_percent))
        total += 2 * FP32 * a.tokens * rot          # cos and sin tables
    saved = _layer_bytes(cfg, device)
    for layers, recomputed in plan:
        if recomputed:
            total += a.width * a.sharded * h        # the chunk's input only
        else:
            total += sum(saved(n) for n in layers)
    if chunk.is_last:
        total += _norm_saved(m, a, a.sharded, h) + a.width * a.tokens * h
        total += FP32 * a.tokens * vocab            # softmax, reused as the gradient
        total += (8 + 2 + FP32) * a.tokens          # target ids, masks, loss mask
    return total


def _working_set(cfg: Config, chunk: Chunk, device: str) -> int:
    """Transient bytes on top of the saved ones: the layers of one recompute chunk
    while backward replays them, and the last stage's logits with one fp32 copy."""
    m, lay, a = cfg.model, Layout.of(cfg), _shape(cfg, device)
    total = 0
    replayed = [layers for layers, recomputed in _recompute_chunks(cfg, chunk.layers)
                if recomputed]
    if replayed:
        saved = _layer_bytes(cfg, device)
        total += max(sum(saved(n) for n in layers) for layers in replayed)
    if chunk.is_last:
        total += (a.width + FP32) * a.tokens * (m.padded_vocab_size // lay.tp)
    return total


def stage_activation_bytes(cfg: Config, pp_rank: int = 0, device: str = "cuda") -> int:
    """Peak activation bytes of one pipeline rank over a training step: the saved
    bytes of the micro-batches in flight, found by walking the schedule's order, with
    each pipeline stage's received input and sent output, plus the working set."""
    lay, t = Layout.of(cfg), cfg.training
    chunks = rank_chunks(cfg, pp_rank)
    a = _shape(cfg, device)
    boundary = a.width * a.sharded * cfg.model.hidden_size
    per_chunk = []
    for chunk in chunks:
        held = chunk_saved_bytes(cfg, chunk, device)
        if lay.pp > 1:
            held += boundary * ((not chunk.is_first) + (not chunk.is_last))
        per_chunk.append(held)
    micro = t.global_batch_size // (t.micro_batch_size * lay.dp)
    vpp = len(chunks)
    order = (interleaved_order(lay.pp, pp_rank, micro, vpp) if vpp > 1
             else one_f_one_b_order(lay.pp, pp_rank, micro))
    live, peak = 0, 0
    for kind, c, _ in order:
        live += per_chunk[c] if kind == "F" else -per_chunk[c]
        peak = max(peak, live)
    return peak + max(_working_set(cfg, chunk, device) for chunk in chunks)


# ------------------------------------------------------------------ per GPU
@dataclass
class RankMemory:
    """Bytes one GPU holds, by kind. The data-parallel buffers exist only after
    backward, when the activations are gone, so the total takes the larger phase."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    pipeline_buffers: int   # activation and gradient receive buffers between stages
    dp_buffers: int         # reduce-scatter outputs or weight all-gather sources

    @property
    def communication(self) -> int:
        return self.pipeline_buffers + self.dp_buffers

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer
                + max(self.activations + self.pipeline_buffers, self.dp_buffers))


def rank_memory(cfg: Config, pp_rank: int = 0, dp_rank: int = 0,
                device: str = "cuda") -> RankMemory:
    lay = Layout.of(cfg)
    state = state_bytes(cfg, pp_rank, dp_rank)
    pipeline = 0
    if lay.pp > 1:
        a = _shape(cfg, device)
        pipeline = 2 * a.width * a.sharded * cfg.model.hidden_size
    return RankMemory(state.weights, state.grads, state.optimizer,
                      stage_activation_bytes(cfg, pp_rank, device), pipeline,
                      max(state.reduce_scatter, state.param_gather))


def peak_rank_memory(cfg: Config, device: str = "cuda") -> RankMemory:
    """The busiest pipeline rank (data-parallel rank 0, which owns the most state)."""
    return max((rank_memory(cfg, r, 0, device)
                for r in range(cfg.parallel.pipeline_model_parallel_size)),
               key=lambda mem: mem.total)


# ------------------------------------------------------------------ before launching
def minimum_rank_bytes(cfg: Config, pp_rank: int = 0, device: str = "cuda") -> int:
    """A lower bound of what one rank of pipeline stage `pp_rank` allocates: its weights,
    fp32 gradients and optimizer state (sharded over DP x CP with the distributed
    optimizer, bucket padding left out) and the activations of the micro-batches the
    1F1B schedule keeps in flight (one per stage ahead, one only when interleaved).
    Unlike `rank_memory` it costs a few operations per layer whatever the sizes, so
    absurd settings are refused in a moment rather than planned tensor by tensor."""
    lay, t, o = Layout.of(cfg), cfg.training, cfg.optimizer
    width = dtype_bytes(cfg)
    moe = moe_layer_pattern(cfg.model)
    per_kind = {kind: sum(x.numel for x in _layer_parameters(cfg.model, lay, kind))
                for kind in set(moe)}
    saved = _layer_bytes(cfg, device)
    elements = activations = 0
    chunks = rank_chunks(cfg, pp_rank)
    for chunk in chunks:
        head = _embedding_parameters(cfg, chunk) + _head_parameters(cfg, chunk)
        elements += sum(x.numel for x in head) + sum(per_kind[moe[n]] for n in chunk.layers)
        activations += chunk_saved_bytes(cfg, chunk, device)
    micro = t.global_batch_size // (t.micro_batch_size * max(lay.dp, 1))
    in_flight = min(lay.pp - pp_rank, micro) if len(chunks) == 1 else 1
    state = (2 if o.optimizer == "adam" else int(o.sgd_momentum != 0)) * FP32
    state += FP32 if width != FP32 else 0
    if cfg.parallel.use_distributed_optimizer:
        state /= lay.dp * lay.cp
    return int(elements * (width + FP32 + state) + activations * in_flight)


def device_memory_bytes(device: str) -> int:
    """Memory of the device a rank runs on: the GPU's (LOCAL_RANK's) total, or for the
    CPU the machine's physical memory, lowered to the container's limit when one is
    set (cgroup v2 or v1)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))
                                                ).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as fh:
                total = min(total, int(fh.read().strip()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            continue
    return total


def run_device(cfg: Config) -> str:
    """"cuda" or "cpu": where `paratron train` will run (--device auto picks CUDA when
    present)."""
    if cfg.training.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.training.device


def check_fits_device(cfg: Config, tokenizer_vocab_size: int | None = None) -> None:
    """Refuse, in one line and before anything is allocated, a run whose smallest
    possible footprint (`minimum_rank_bytes` of the first and last pipeline stages)
    exceeds the memory of its device; on a CPU the ranks of this machine share it.
    Meant to run before the process group exists, once the config is validated."""
    from paratron.training.trainer import resolve_vocab_size

    device = run_device(cfg)
    est = copy.deepcopy(cfg)
    try:
        est.model.padded_vocab_size = resolve_vocab_size(est, tokenizer_vocab_size)
    except ConfigError:  # known only once the tokenizer is read: leave it out
        est.model.padded_vocab_size = 0
    pp = cfg.parallel.pipeline_model_parallel_size
    need = max(minimum_rank_bytes(est, r, device) for r in {0, pp - 1})
    ranks = 1 if device == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    have = device_memory_bytes(device)
    if need * ranks > have:
        per = f" x {ranks} ranks" if ranks > 1 else ""
        raise ConfigError(
            f"this run needs at least {gib(need)} GiB per rank{per} (weights, gradients, "
            f"optimizer state, activations) but the {device} has {gib(have)} GiB; lower "
            f"--num-layers, --hidden-size, --seq-length or --micro-batch-size, or split "
            f"the model over more ranks ('paratron plan' shows the layouts)")


# ------------------------------------------------------------------ planning
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)


@dataclass
class Candidate:
    layout: Layout
    memory: RankMemory
    recompute_memory: RankMemory | None  # with full recompute added, when not asked for

    def needs_recompute(self, budget: float) -> bool | None:
        """False: fits as asked; True: fits only with full recompute; None: neither."""
        if self.memory.total <= budget:
            return False
        if self.recompute_memory is not None and self.recompute_memory.total <= budget:
            return True
        return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(base: Config, num_gpus: int,
                      pinned: dict[str, int] | None = None) -> list[Layout]:
    """Every TP x PP x CP (x EP for MoE) split of `num_gpus` GPUs, sizes named in
    `pinned` (tp, pp, cp, ep) held fixed."""
    pinned = pinned or {}
    out = []
    sizes = _divisors(num_gpus)
    experts = base.model.num_experts
    for tp in [pinned["tp"]] if "tp" in pinned else sizes:
        for pp in [pinned["pp"]] if "pp" in pinned else sizes:
            for cp in [pinned["cp"]] if "cp" in pinned else sizes:
                if num_gpus % (tp * pp * cp):
                    continue
                eps = [pinned["ep"]] if "ep" in pinned else (sizes if experts else [1])
                for ep in eps:
                    out.append(Layout(num_gpus, tp, pp, cp, ep,
                                      base.parallel.expert_tensor_parallel_size))
    return out


def plan(base: Config, num_gpus: int, pinned: dict[str, int] | None = None,
         device: str = "cuda") -> tuple[list[Candidate], list[tuple[Layout, str]]]:
    """Memory of every layout the trainer would accept, and why the others are refused."""
    candidates, refused = [], []
    asked_recompute = base.model.recompute_granularity == "full"
    layouts = candidate_layouts(base, num_gpus, pinned)
    if not layouts:  # pinned sizes that do not divide the GPUs: let validation say so
        sizes = {dim: (pinned or {}).get(dim, 1) for dim in ("tp", "pp", "cp", "ep")}
        layouts = [Layout(num_gpus, **sizes, etp=base.parallel.expert_tensor_parallel_size)]
    for layout in layouts:
        try:
            cfg = layout_config(base, layout)
        except ConfigError as exc:
            refused.append((layout, str(exc)))
            continue
        with_recompute = None
        if not asked_recompute:
            rc = copy.deepcopy(cfg)
            for key, value in FULL_RECOMPUTE.items():
                setattr(rc.model, key, value)
            with_recompute = peak_rank_memory(rc, device)
        candidates.append(Candidate(layout, peak_rank_memory(cfg, device), with_recompute))
    return candidates, refused


def preference(candidate: Candidate, budget: float) -> tuple:
    """The sort key of the recommendation rule in the module docstring (fitting layouts
    first)."""
    needs = candidate.needs_recompute(budget)
    lay = candidate.layout
    memory = candidate.memory if not needs else candidate.recompute_memory
    return (needs is None, bool(needs), lay.model_parallel, lay.ep, lay.pp, lay.cp,
            memory.total)


def recommend(candidates: list[Candidate], budget: float) -> Candidate | None:
    """The preferred layout that fits in `budget` bytes per GPU, or None."""
    fitting = [c for c in candidates if c.needs_recompute(budget) is not None]
    return min(fitting, key=lambda c: preference(c, budget)) if fitting else None


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"
