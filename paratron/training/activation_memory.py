"""The bytes autograd saves for backward on one rank, as Paratron's modules save them.

Korthikanti et al.'s accounting, redone for these kernels: norm inputs (fp32 for RMSNorm),
flash-attention q/k/v/out/log-sum-exp, the fused QKV storage kept alive by v, SwiGLU's
two tensors, MoE's permuted rows, the cross entropy's gradient of the logits (an fp32
softmax unless fused). Which of them a layer keeps is read off the model: one layer of
each kind (dense, MoE) built on the meta device says its selective recompute, and the block's own
`recompute_plan` says which layers full recompute replays. A pipeline rank holds the
micro-batches its schedule keeps in flight (found by walking the schedule's own order:
the first stage holds PP of them), plus the transient working set (one recomputed chunk
under full recompute, the logits of the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paratron.model.config import moe_layer_pattern
from paratron.model.moe import MoELayer
from paratron.model.transformer import TransformerLayer, recompute_plan
from paratron.parallel.config import rank_chunks
from paratron.parallel.cross_entropy import default_chunk_tokens
from paratron.parallel.pipeline import Chunk, interleaved_order, one_f_one_b_order
from paratron.parallel.process_groups import ProcessGroups, check_layout
from paratron.training.trainer import params_dtype

FP32 = 4


def layout_groups(cfg, pp_rank: int = 0, dp_rank: int = 0,
                  edp_rank: int = 0) -> ProcessGroups:
    """One rank of `cfg`'s layout as sizes-only process groups (no communicators), to
    build its model with: `dp_rank` is its rank in DP x CP, `edp_rank` in expert DP."""
    p = cfg.parallel
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    world = cfg.data_parallel_size * tp * pp * cp
    dp, edp = check_layout(world, tp, pp, cp, ep, etp)
    return ProcessGroups.sizes_only(world, tp=tp, cp=cp, dp=dp, dp_cp=(dp * cp, dp_rank),
                                    pp=(pp, pp_rank), mp=tp * pp, ep=ep, etp=etp,
                                    edp=(edp, edp_rank))


def layers_by_kind(model_config, pg: ProcessGroups) -> dict[bool, TransformerLayer]:
    """One layer of each kind the model has, keyed by its `moe_layer_pattern` entry
    (True: MoE), built on the meta device: the layers of a kind hold and save the same,
    and a deep model has many."""
    kinds = moe_layer_pattern(model_config)
    with torch.device("meta"):
        return {kind: TransformerLayer(model_config, kinds.index(kind), pg)
                for kind in set(kinds)}


@dataclass(frozen=True)
class ActivationShape:
    """Per-rank sizes of one micro-batch as the layers see it."""

    tokens: int        # s/CP x b: tokens of the full (TP-gathered) sequence chunk
    sharded: int       # tokens on this rank in norms and dropout (/TP under SP)
    batch: int
    seq: int           # s / CP
    width: int         # bytes of the model dtype
    mask: int          # bytes per dropout-mask element

    @classmethod
    def of(cls, cfg, pg: ProcessGroups, device: str) -> "ActivationShape":
        b, seq = cfg.training.micro_batch_size, cfg.data.seq_length // pg.cp.size
        width = params_dtype(cfg.training).itemsize
        # CUDA's fused dropout keeps a bool mask; the CPU composite one a mask in the dtype.
        mask = 1 if device == "cuda" else width
        split = pg.tp.size if cfg.model.sequence_parallel else 1
        return cls(seq * b, seq * b // split, b, seq, width, mask)

    def hidden_bytes(self, hidden_size: int) -> int:
        """One hidden state on this rank (its sequence shard under SP): what a pipeline
        stage sends and receives, and what a recomputed chunk keeps of its input."""
        return self.width * self.sharded * hidden_size


def _norm_saved(m, a: ActivationShape, tokens: int, size: int, view_of: int | None = None,
                checkpointed: bool = False) -> int:
    """A norm's saved tensors: the input, the statistics and, for RMSNorm, the
    normalised tensor that multiplies the weight. LayerNorm's kernel saves the input as
    it is; RMSNorm's composite (CPU) form an fp32 copy of it, except in fp32. An input
    not copied that is a view keeps its storage alive: `view_of` gives its bytes (0 if
    saved anyway). Under selective layernorm recompute only the input in the model
    dtype is kept."""
    if checkpointed:
        return a.width * tokens * size
    copied = m.normalization == "RMSNorm" and a.width != FP32
    kept = FP32 * tokens * size if copied else a.width * tokens * size
    if view_of is not None and not copied:
        kept = view_of
    if m.normalization == "LayerNorm":
        return kept + 2 * FP32 * tokens
    return kept + FP32 * tokens + a.width * tokens * size


def _latent_norm_saved(m, a: ActivationShape, tokens: int, size: int,
                       view_of: int | None = None) -> int:
    """An MLA latent norm's saved tensors plus its output, which the up projection
    saves; without the norm (--no-mla-latent-layernorm) the up projection saves the down
    projection's output, or keeps alive what that is a view of (`view_of` bytes)."""
    if not m.mla_latent_layernorm:
        return a.width * tokens * size if view_of is None else view_of
    return _norm_saved(m, a, tokens, size, view_of=view_of) + a.width * tokens * size


def _attention_saved(m, pg: ProcessGroups, a: ActivationShape, core_recomputed: bool) -> int:
    """q, k, v (v keeps the whole fused QKV or kv up-projection alive, being a view of
    it), the attention output (also linear_proj's input) and, unless selective recompute
    replays the core attention, its fp32 log-sum-exp (flash style: no score matrix)."""
    t, T, w = pg.tp.size, a.tokens, a.width
    heads = m.num_attention_heads // t
    total = 0
    if m.multi_latent_attention:
        q_dim, v_dim = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
        if m.q_lora_rank is not None:
            total += _latent_norm_saved(m, a, T, m.q_lora_rank)
        latent = w * T * (m.kv_lora_rank + m.qk_pos_emb_head_dim)  # the down projection
        total += _latent_norm_saved(m, a, T, m.kv_lora_rank, view_of=latent)
        kv_heads, k_dim = heads, q_dim
        q = k = w * T * heads * q_dim                       # [nope, rope] concatenated
        v = w * T * heads * (m.qk_head_dim + v_dim)         # the kv up-projection
        if v_dim < q_dim and pg.cp.size == 1:
            # SDPA pads v to the query's width (a copy; the up-projection is freed)
            # and keeps its padded output beside linear_proj's narrower input.
            v = 2 * w * T * heads * q_dim
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
    if pg.cp.size > 1:
        # The other ranks' keys and values (ring steps or all-gather) and the fp32
        # partial outputs that online softmax merges.
        total += (pg.cp.size - 1) * (w * T * kv_heads * (k_dim + v_dim)
                                     + FP32 * T * heads * v_dim + lse)
    return total + lse


def _mlp_saved(m, a: ActivationShape, tokens: int, ffn_local: int) -> int:
    """SwiGLU: fc1 output (it recomputes silu(gate)), the product; GeLU / squared ReLU:
    fc1 output and the activation."""
    return a.width * tokens * ffn_local * (3 if m.swiglu else 2)


def _moe_saved(m, pg: ProcessGroups, a: ActivationShape) -> int:
    """Router (fp32 logits input, scores, top-k), permuted rows, experts, the fp32
    weighted combine; routed rows assume balanced experts."""
    t, w, h, E, k = pg.tp.size, a.width, m.hidden_size, m.num_experts, m.moe_router_topk
    etp, ep = pg.etp.size, pg.ep.size
    sp = a.sharded != a.tokens
    routed_tokens = a.sharded            # the tokens the router sees
    rows = k * a.tokens // t             # rows this rank dispatches (1/TP of the tokens)
    expert_rows = rows * etp             # rows each expert-TP rank computes
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
    places, combined = rows, rows        # each token's k places; rows back from the experts
    if m.moe_token_dispatcher_type == "allgather":
        # Every gathered token has places for the local experts (min(k, E / EP) of them).
        places, combined = rows // k * etp * ep * min(k, E // ep), expert_rows
    total += 17 * combined               # expert and token index of each row, routed flag
    if (ep > 1 or etp > 1) and E // ep > 1:
        total += 2 * 8 * expert_rows     # the sort by local expert and its inverse
    ffn = (m.moe_ffn_hidden_size or m.ffn_hidden_size) // etp
    total += w * expert_rows * h + _mlp_saved(m, a, expert_rows, ffn)
    # The combine: expert output rows, their weights and places, and the fp32 layout of
    # weighted rows (one spare place).
    total += (w * h + FP32 + 8) * combined + FP32 * (places + 1) * (h + 1)
    return total


def layer_saved_bytes(m, layer: TransformerLayer, a: ActivationShape) -> int:
    """Bytes one transformer layer saves for backward per micro-batch (no full
    recompute; the layer's selective recompute honoured)."""
    pg, h = layer.pg, m.hidden_size
    total = 2 * (_norm_saved(m, a, a.sharded, h, checkpointed=layer.recompute_norm)
                 + a.width * a.tokens * h)                  # each norm + linear input
    if layer.hidden_dropout > 0:
        total += 2 * a.mask * a.sharded * h
    total += _attention_saved(m, pg, a, layer.self_attention.recompute_core)
    if layer.recompute_mlp:
        return total
    if isinstance(layer.mlp, MoELayer):
        # The MoE layer has no dense linear input of its own (counted in _moe_saved).
        return total - a.width * a.tokens * h + _moe_saved(m, pg, a)
    return total + _mlp_saved(m, a, a.tokens, m.ffn_hidden_size // pg.tp.size)


def _saved_per_layer(m, pg: ProcessGroups, a: ActivationShape) -> list[int]:
    """`layer_saved_bytes` of every layer of the model, by global layer number."""
    by_kind = {kind: layer_saved_bytes(m, layer, a)
               for kind, layer in layers_by_kind(m, pg).items()}
    return [by_kind[kind] for kind in moe_layer_pattern(m)]


def _chunk_saved(m, pg: ProcessGroups, a: ActivationShape, chunk: Chunk,
                 saved: list[int]) -> int:
    h, vocab = m.hidden_size, m.padded_vocab_size // pg.tp.size
    total = 0
    if chunk.is_first:
        total += 8 * a.tokens                       # token ids
        if m.position_embedding_type == "learned_absolute":
            total += 8 * a.tokens
        if m.hidden_dropout > 0:
            total += a.mask * a.sharded * h
    plan = recompute_plan(m, len(chunk.layers))
    if m.position_embedding_type in ("rope", "yarn") and any(not rc for _, rc in plan):
        # Saved by the rotations; inside recomputed layers they are recomputed too.
        rot = (m.qk_pos_emb_head_dim if m.multi_latent_attention
               else int(m.kv_channels * m.rotary_percent))
        total += 2 * FP32 * a.tokens * rot          # cos and sin tables
    for layers, recomputed in plan:
        if recomputed:
            total += a.hidden_bytes(h)              # the chunk's input only
        else:
            total += sum(saved[chunk.layers[i]] for i in layers)
    if chunk.is_last:
        total += _norm_saved(m, a, a.sharded, h) + a.width * a.tokens * h
        if m.cross_entropy_loss_fusion:
            total += a.width * a.tokens * vocab     # the gradient, written in forward
            total += (1 + FP32) * a.tokens          # ignored mask, loss mask
        else:
            total += FP32 * a.tokens * vocab        # softmax, reused as the gradient
            total += (8 + 2 + FP32) * a.tokens      # target ids, masks, loss mask
    return total


def chunk_saved_bytes(cfg, chunk: Chunk, device: str = "cuda") -> int:
    """Bytes one model chunk saves for backward per micro-batch: embedding, layers (or
    only each recompute chunk's input), final norm, output layer input and the cross
    entropy's gradient of the logits."""
    pg = layout_groups(cfg)
    a = ActivationShape.of(cfg, pg, device)
    return _chunk_saved(cfg.model, pg, a, chunk, _saved_per_layer(cfg.model, pg, a))


def _working_set(m, pg: ProcessGroups, a: ActivationShape, chunk: Chunk,
                 saved: list[int], device: str) -> int:
    """Transient bytes on top of the saved ones: the layers of one recompute chunk
    while backward replays them, and the last stage's logits with one fp32 copy (the
    fused cross entropy: with one chunk's fp32 and model-dtype temporaries)."""
    total = 0
    replayed = [layers for layers, recomputed in recompute_plan(m, len(chunk.layers))
                if recomputed]
    if replayed:
        total += max(sum(saved[chunk.layers[i]] for i in layers) for layers in replayed)
    if chunk.is_last:
        vocab = m.padded_vocab_size // pg.tp.size
        copied = a.tokens
        if m.cross_entropy_loss_fusion:
            copied = min(a.tokens, m.cross_entropy_chunk_size
                         or default_chunk_tokens(vocab, device))
        total += a.width * a.tokens * vocab + (FP32 + a.width) * copied * vocab
    return total


def stage_activation_bytes(cfg, pp_rank: int = 0, device: str = "cuda") -> int:
    """Peak activation bytes of one pipeline rank over a training step: the saved
    bytes of the micro-batches in flight, found by walking the schedule's order, with
    each pipeline stage's received input and sent output, plus the working set."""
    m, t = cfg.model, cfg.training
    pg = layout_groups(cfg, pp_rank)
    a = ActivationShape.of(cfg, pg, device)
    saved = _saved_per_layer(m, pg, a)
    chunks = rank_chunks(cfg, pp_rank)
    boundary = a.hidden_bytes(m.hidden_size)
    per_chunk = []
    for chunk in chunks:
        held = _chunk_saved(m, pg, a, chunk, saved)
        if pg.pp.size > 1:
            held += boundary * ((not chunk.is_first) + (not chunk.is_last))
        per_chunk.append(held)
    micro = t.global_batch_size // (t.micro_batch_size * pg.dp.size)
    order = (interleaved_order(pg.pp.size, pp_rank, micro, len(chunks)) if len(chunks) > 1
             else one_f_one_b_order(pg.pp.size, pp_rank, micro))
    live, peak = 0, 0
    for kind, c, _ in order:
        live += per_chunk[c] if kind == "F" else -per_chunk[c]
        peak = max(peak, live)
    return peak + max(_working_set(m, pg, a, chunk, saved, device) for chunk in chunks)
