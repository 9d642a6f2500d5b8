"""Mixture of experts: router, routed experts, shared experts (Megatron-Core names).

    x [s, b, h] -> router -> top-k experts per token -> dispatch -> experts -> combine
                -> + shared_experts(x) -> [s, b, h]

Routing (`topk_routing`) reproduces each Hugging Face reference exactly. The
load-balancing losses follow Megatron-Core's formulas and reach backward through
`MoEAuxLossAutoScaler`. Routed experts are split over EP (and ETP) by
`paratron.parallel.expert_parallel`, which needs every rank of a stage to hold different
tokens: under sequence parallelism they do; without it each TP rank dispatches its 1/TP
of the tokens and the results are all-gathered back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from paratron.model.config import check_moe_config
from paratron.model.mlp import MLP, activate
from paratron.parallel.comm import wide
from paratron.parallel.expert_parallel import build_dispatcher
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.random import in_backward
from paratron.parallel.sharding import layout_of, replicated, set_layout, shard_tensor
from paratron.parallel.tensor_parallel import (GatherFromSequenceParallelRegion,
                                               ScatterToSequenceParallelRegion)

# ------------------------------------------------------------------------ routing
def _select(scores: torch.Tensor, topk: int, num_groups: int | None, group_topk: int | None,
            group_score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and indices of each row, within the best `group_topk` groups when
    group-limited."""
    if not group_topk:
        return scores.topk(topk, dim=-1)
    tokens, experts = scores.shape
    grouped = scores.view(tokens, num_groups, experts // num_groups)
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
    chosen = group_scores.topk(group_topk, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, chosen, True)
    expert_mask = group_mask.repeat_interleave(experts // num_groups, dim=1)
    return scores.masked_fill(~expert_mask, float("-inf")).topk(topk, dim=-1)


def topk_routing(logits: torch.Tensor, topk: int, *, score_function: str = "softmax",
                 pre_softmax: bool = False, num_groups: int | None = None,
                 group_topk: int | None = None, scaling_factor: float | None = None,
                 expert_bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [tokens, experts] (zero off the chosen experts, fp32) and the
    boolean routing map, from router logits [tokens, experts].

    * Mixtral, Qwen3-MoE (norm_topk_prob): softmax over the top-k logits, which equals
      softmax over all experts, top-k, renormalised (the default);
    * DeepSeek-V2, Qwen2-MoE: softmax over all experts, top-k, not renormalised
      (`pre_softmax`), times `scaling_factor` (DeepSeek's routed_scaling_factor);
    * group-limited (`num_groups`, `group_topk`): experts in equal groups, the best
      groups chosen first, then top-k inside them. With softmax scores a group scores
      its best expert (DeepSeek-V2's group_limited_greedy); with sigmoid scores the sum
      of its top (k / group_topk) experts (DeepSeek-V3, Megatron);
    * sigmoid scores: top-k, renormalised when k > 1; `expert_bias` is added for the
      choice only (aux-loss-free balancing, moved by `update_expert_bias`).
    """
    logits = wide(logits)
    if score_function == "softmax":
        group_score = "max"
        if pre_softmax:
            scores = torch.softmax(logits, dim=-1)
            probs, index = _select(scores, topk, num_groups, group_topk, group_score)
        else:
            top_logits, index = _select(logits, topk, num_groups, group_topk, group_score)
            probs = torch.softmax(top_logits, dim=-1)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        choice = scores if expert_bias is None else scores + expert_bias.float()
        _, index = _select(choice, topk, num_groups, group_topk, "topk_sum")
        probs = scores.gather(1, index)
        if topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown router score function {score_function!r}")
    if scaling_factor:
        probs = probs * scaling_factor
    routing_probs = torch.zeros_like(logits).scatter(1, index, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
    return routing_probs, routing_map


def expert_capacity(num_tokens: int, num_experts: int, topk: int, factor: float) -> int:
    """Megatron's capacity: ceil(tokens x k / experts x factor)."""
    return math.ceil(num_tokens * topk / num_experts * factor)


def apply_capacity(probs: torch.Tensor, routing_map: torch.Tensor, topk: int, factor: float,
                   drop_policy: str = "probs", pad_to_capacity: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert: the highest routing weights ("probs")
    or the earliest tokens ("position"); with pad_to_capacity every expert gets exactly
    min(capacity, tokens) tokens, those it was not routed to with weight zero."""
    tokens, experts = probs.shape
    keep = min(expert_capacity(tokens, experts, topk, factor), tokens)
    if drop_policy == "probs":
        key = torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
    else:
        key = routing_map.float()
    # Stable: equal keys (and the unrouted tokens used for padding) keep token order.
    kept = torch.sort(key, dim=0, descending=True, stable=True).indices[:keep]
    capacity_mask = torch.zeros_like(routing_map).scatter(0, kept, True)
    final_map = capacity_mask if pad_to_capacity else routing_map & capacity_mask
    return probs * final_map, final_map


def routing_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-token scores over all experts that the load-balancing loss uses."""
    if score_function == "softmax":
        return torch.softmax(wide(logits), dim=-1)
    scores = torch.sigmoid(wide(logits))
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def switch_load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor,
                               total_tokens: int, topk: int, num_experts: int) -> torch.Tensor:
    """E / (k T^2) * sum_i (sum_t scores[t, i]) * tokens_i, without the coefficient.

    `scores` may be this rank's share of the tokens and `tokens_per_expert`/`total_tokens`
    the counts over every rank holding the micro-batch: the ranks' results then sum to
    the loss of the whole micro-batch. With the columns of several sequences side by
    side ([T, b*E], seq_aux_loss) it is the sum of the sequences' losses.
    """
    return (scores.sum(dim=0) * tokens_per_expert).sum() * (
        num_experts / (topk * total_tokens * total_tokens))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2, without the coefficient (ST-MoE)."""
    return torch.logsumexp(wide(logits), dim=-1).square().mean()


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Forward: returns `output` unchanged. Backward: also gives `aux_loss` the gradient
    `scale`, so the auxiliary loss joins the backward pass without being added to the
    language-model loss."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss) * ctx.scale, None


def _all_reduce_over(value: torch.Tensor, groups: list) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(value, group=group)
    return value


# ------------------------------------------------------------------------- modules
class TopKRouter(nn.Module):
    """weight [num_experts, hidden] (replicated). forward(tokens [T, h]) -> routing
    weights [T, E] (fp32), routing map [T, E] (bool), loss values {name: tensor}."""

    def __init__(self, config, tokens_split_over_tp: bool = False):
        super().__init__()
        c = config
        self.config = c
        self.num_experts, self.topk = c.num_experts, c.moe_router_topk
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        # Under sequence parallelism each TP rank routes its own tokens.
        replicated(self.weight, partial_grad=c.sequence_parallel)
        self.init_std = c.init_method_std
        self.tokens_split_over_tp = tokens_split_over_tp
        if c.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(c.num_experts))
            self.register_buffer("local_tokens_per_expert", torch.zeros(c.num_experts),
                                 persistent=False)
        else:
            self.expert_bias = self.local_tokens_per_expert = None
        # [routed, kept] tokens per expert while --moe-per-layer-logging counts them
        # (`paratron.training.moe_logging.count_expert_load`); None otherwise.
        self.load_counts: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, *, seq_length: int, aux_loss_scale=1.0,
                token_groups: tuple = (), token_split: int = 1):
        """token_groups: the groups over which the micro-batch's tokens are split
        (token_split ranks in all), for the load-balancing counts."""
        c = self.config
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            # Kept in fp32 when the model is cast to half precision: bias steps of 1e-3
            # and token counts need it.
            self.expert_bias.data = self.expert_bias.data.float()
            self.local_tokens_per_expert.data = self.local_tokens_per_expert.data.float()
        logits = F.linear(wide(tokens), wide(self.weight))
        training = self.training and torch.is_grad_enabled()
        losses: dict[str, torch.Tensor] = {}
        if training and c.moe_z_loss_coeff:
            value = z_loss(logits) / token_split
            logits = MoEAuxLossAutoScaler.apply(logits, value * c.moe_z_loss_coeff,
                                                aux_loss_scale)
            losses["z_loss"] = value.detach()
        probs, routing_map = topk_routing(
            logits, self.topk, score_function=c.moe_router_score_function,
            pre_softmax=c.moe_router_pre_softmax, num_groups=c.moe_router_num_groups,
            group_topk=c.moe_router_group_topk,
            scaling_factor=c.moe_router_topk_scaling_factor, expert_bias=self.expert_bias)
        routed = routing_map
        factor = c.moe_expert_capacity_factor
        if factor is not None and factor >= 0:
            probs, routing_map = apply_capacity(probs, routing_map, self.topk, factor,
                                                c.moe_token_drop_policy,
                                                c.moe_pad_expert_input_to_capacity)
        self._count_load(routed, routing_map)
        kind, coeff = c.moe_router_load_balancing_type, c.moe_aux_loss_coeff
        if training and kind != "none" and coeff and coeff > 0:
            scores = routing_scores(logits, c.moe_router_score_function)
            chosen = scores.topk(self.topk, dim=-1).indices
            aux_map = torch.zeros_like(scores).scatter(1, chosen, 1.0)
            batch = 1
            if kind == "seq_aux_loss":
                # [s*b, E] -> [s, b*E]: each sequence's experts counted apart.
                batch = tokens.shape[0] // seq_length
                scores = scores.reshape(seq_length, -1)
                aux_map = aux_map.reshape(seq_length, -1)
            counts = _all_reduce_over(aux_map.sum(dim=0), list(token_groups))
            total = scores.shape[0] * token_split
            value = switch_load_balancing_loss(scores, counts, total, self.topk,
                                               self.num_experts) / batch
            probs = MoEAuxLossAutoScaler.apply(probs, value * coeff, aux_loss_scale)
            name = "seq_load_balancing_loss" if kind == "seq_aux_loss" else "load_balancing_loss"
            losses[name] = value.detach()
        if self.expert_bias is not None and training and not in_backward():
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map, losses

    def _count_load(self, routed: torch.Tensor, kept: torch.Tensor) -> None:
        """Add this forward's tokens per expert, chosen by top-k and kept after the
        capacity drop, on the device: forwards that build a graph only (not evaluation),
        once each (not again in activation recompute)."""
        if self.load_counts is None or not torch.is_grad_enabled() or in_backward():
            return
        self.load_counts[0] += routed.sum(dim=0)
        self.load_counts[1] += (routed & kept).sum(dim=0)


class ExpertLinear(nn.Module):
    """Stacked weights of this rank's experts, weight [local experts, out, in]: out (fc1)
    or in (fc2) is this rank's expert-TP slice. Run by `Experts`, not on its own."""

    def __init__(self, num_experts: int, first_expert: int, num_local_experts: int,
                 in_features: int, out_features: int, *, dim: int, fused: str | None,
                 init_std: float, etp_size: int, etp_rank: int):
        super().__init__()
        self.first_expert, self.init_std = first_expert, init_std
        self.etp_size, self.etp_rank = etp_size, etp_rank
        self.weight = set_layout(
            nn.Parameter(torch.empty(num_local_experts, out_features, in_features)),
            dim=dim, fused=fused, num_experts=num_experts)

    @torch.no_grad()
    def reset_parameters_from(self, generator_for: Callable[[str], torch.Generator]) -> None:
        """normal(0, init_std) per expert, each drawn whole from `generator_for(".e")`
        (e the global expert index) and sliced for this ETP rank: every EP/ETP layout
        starts from the same experts."""
        full_shape = [1, *self.weight.shape[1:]]
        full_shape[layout_of(self.weight).dim] *= self.etp_size
        for e in range(self.weight.shape[0]):
            full = torch.empty(full_shape, dtype=torch.float32)
            full.normal_(0.0, self.init_std, generator=generator_for(f".{self.first_expert + e}"))
            self.weight[e:e + 1].copy_(shard_tensor(full, self.weight, self.etp_size,
                                                    self.etp_rank))


def grouped_mm_fn():
    """torch's grouped matrix multiply (public from PyTorch 2.8), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(rows: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs `rows` against `weights` [experts, out, in] with
    its own kernel: on CUDA for bf16 on Hopper and Blackwell (elsewhere torch loops over
    the groups after copying the offsets to the host, a sync), on the CPU for fp32 and
    bf16 (only bf16 inside a torch.compile trace: its shape function takes no other
    dtype); in both with every row stride a multiple of 16 bytes."""
    if grouped_mm_fn() is None:
        return False
    if rows.device.type == "cuda":
        native = (rows.dtype == torch.bfloat16
                  and torch.cuda.get_device_capability(rows.device)[0] in (9, 10))
    else:
        dtypes = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32,
                                                                           torch.bfloat16)
        native = rows.device.type == "cpu" and rows.dtype in dtypes
    align = 16 // rows.element_size()
    return native and all(w.shape[1] % align == 0 and w.shape[2] % align == 0
                          for w in weights)


class Experts(nn.Module):
    """This rank's routed experts (linear_fc1 -> activation -> linear_fc2 each) run on
    rows grouped by expert.

    By default (--moe-grouped-gemm) they run without a host sync: one grouped GEMM per
    linear where torch has a kernel for the device, dtype and sizes
    (`grouped_mm_supported`). Elsewhere, and with --no-moe-grouped-gemm, they loop over
    the experts (Megatron's SequentialMLP), reading the row counts once per layer: one
    sync is cheaper than any sync-free alternative we know, all of which run every
    expert on every row.
    """

    def __init__(self, config, pg: ProcessGroups):
        super().__init__()
        c = config
        self.activation = c.mlp_activation()
        self.grouped_gemm = c.moe_grouped_gemm
        ffn = (c.moe_ffn_hidden_size or c.ffn_hidden_size) // pg.etp.size
        local = c.num_experts // pg.ep.size
        first = pg.ep.rank * local
        swiglu = self.activation == "swiglu"
        common = dict(etp_size=pg.etp.size, etp_rank=pg.etp.rank)
        self.linear_fc1 = ExpertLinear(c.num_experts, first, local, c.hidden_size,
                                       2 * ffn if swiglu else ffn, dim=1,
                                       fused="gate_up" if swiglu else None,
                                       init_std=c.init_method_std, **common)
        self.linear_fc2 = ExpertLinear(c.num_experts, first, local, ffn, c.hidden_size,
                                       dim=2, fused=None,
                                       init_std=c.init_method_std
                                       / math.sqrt(2.0 * c.num_layers), **common)

    # FP8 experts (model/fp8.py) multiply through these: one expert at a time when
    # called, all at once through their `grouped`.
    matmul_fc1 = matmul_fc2 = staticmethod(F.linear)

    def forward(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """rows [n, h]: tokens_per_expert[e] rows for each local expert e in turn, then
        rows of no expert (their results are never used) -> [n, h], partial sums over
        the expert-TP slices when ETP > 1."""
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight
        if self.grouped_gemm and grouped_mm_supported(rows, w1, w2):
            offsets = tokens_per_expert.cumsum(0).to(torch.int32)
            h = activate(self._grouped(self.matmul_fc1, rows, w1, offsets), self.activation)
            return self._grouped(self.matmul_fc2, h, w2, offsets)
        return self._sequential(rows, tokens_per_expert.tolist(), w1, w2)

    @staticmethod
    def _grouped(matmul, rows, weight, offsets):
        if matmul is F.linear:
            return grouped_mm_fn()(rows, weight.transpose(1, 2), offs=offsets)
        return matmul.grouped(rows, weight, offsets)

    def _sequential(self, rows, sizes: list[int], w1, w2):
        groups = rows.split(sizes + [rows.shape[0] - sum(sizes)])
        outputs = [self.matmul_fc2(activate(self.matmul_fc1(x, w1[e]), self.activation), w2[e])
                   for e, x in enumerate(groups[:-1])]
        return torch.cat([*outputs, rows.new_zeros((groups[-1].shape[0], w2.shape[1]))])


class SharedExperts(MLP):
    """The always-on experts: a dense MLP of --moe-shared-expert-intermediate-size (all
    shared experts fused), tensor-parallel like the dense MLP. With
    --moe-shared-expert-gate (Qwen2-MoE) its output is scaled by sigmoid(x . gate_weight)."""

    def __init__(self, config, pg: ProcessGroups):
        super().__init__(config, pg, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
        self.gate_weight = None
        if getattr(config, "moe_shared_expert_gate", False):
            self.gate_weight = nn.Parameter(torch.empty(1, config.hidden_size))
            replicated(self.gate_weight, partial_grad=config.sequence_parallel)
            self.gate_init_std = config.init_method_std

    @torch.no_grad()
    def reset_parameters_from(self, generator_for: Callable[[str], torch.Generator]) -> None:
        """The gate (linear_fc1/fc2 are initialised as the dense MLP's)."""
        if self.gate_weight is not None:
            full = torch.empty(self.gate_weight.shape, dtype=torch.float32)
            full.normal_(0.0, self.gate_init_std, generator=generator_for(".gate_weight"))
            self.gate_weight.copy_(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class MoELayer(nn.Module):
    """forward(x [s, b, h]) -> [s, b, h]; under sequence parallelism x and the output
    are this rank's sequence shard [s/TP, b, h], as for the dense MLP.

    Attributes a training step drives: `aux_loss_scale` (gradient given to the aux and z
    losses in backward; set it to loss scale / (micro-batches x DP)), `last_aux_loss`,
    `last_z_loss` (values of the last training forward, without coefficients, for the
    whole micro-batch), and `moe_loss_totals` / `update_expert_bias` below.
    """

    def __init__(self, config, pg: ProcessGroups | None = None, layer_number: int | None = None):
        super().__init__()
        c = config
        self.pg = pg = pg or ProcessGroups.single()
        check_moe_config(c, pg.tp.size, pg.ep.size, pg.etp.size)
        self.config, self.layer_number = c, layer_number
        # Without sequence parallelism the TP ranks hold the same tokens: each dispatches
        # its 1/TP after routing them all.
        self.split_tokens = pg.tp.size > 1 and not c.sequence_parallel
        # Ranks over which one micro-batch's routed tokens are split (load-balancing counts).
        self.token_groups = []
        if pg.tp.size > 1 and c.sequence_parallel:
            self.token_groups.append(pg.tp.group)
        if pg.cp.size > 1:
            self.token_groups.append(pg.cp.group)
        self.token_split = (pg.tp.size if c.sequence_parallel else 1) * pg.cp.size
        self.router = TopKRouter(c, tokens_split_over_tp=c.sequence_parallel and pg.tp.size > 1)
        self.experts = Experts(c, pg)
        self.shared_experts = (SharedExperts(c, pg)
                               if c.moe_shared_expert_intermediate_size else None)
        self.dispatcher = build_dispatcher(c.moe_token_dispatcher_type, c.num_experts, pg)
        self.aux_loss_scale = 1.0
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self.loss_totals: dict[str, list] = {}
        # {name: [sum, forwards]} on the device while --moe-per-layer-logging counts
        # (`paratron.training.moe_logging.count_expert_load`); None otherwise.
        self.loss_log: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        probs, routing_map, losses = self.router(
            tokens, seq_length=s, aux_loss_scale=self.aux_loss_scale,
            token_groups=tuple(self.token_groups), token_split=self.token_split)
        self._record(losses)
        if self.split_tokens:
            tp, group = self.pg.tp.size, self.pg.tp.group
            if tokens.shape[0] % tp:
                raise ValueError(f"MoE without --sequence-parallel needs sequence x micro-batch "
                                 f"({tokens.shape[0]} tokens) divisible by TP {tp}")
            tokens = ScatterToSequenceParallelRegion.apply(tokens, group)
            probs = ScatterToSequenceParallelRegion.apply(probs, group)
            routing_map = routing_map.chunk(tp)[self.pg.tp.rank]
        max_rows, slots = self._row_bound(probs.shape[0], tokens.shape[0])
        rows, tokens_per_expert, plan = self.dispatcher.dispatch(tokens, probs, routing_map,
                                                                 max_rows, slots)
        rows = self.experts(rows, tokens_per_expert)
        out = self.dispatcher.combine(rows, plan)
        if self.split_tokens:
            out = GatherFromSequenceParallelRegion.apply(out, self.pg.tp.group, False)
        out = out.view(s, b, h)
        return out if shared is None else out + shared

    def _row_bound(self, routed_tokens: int, tokens: int) -> tuple[int, int]:
        """(Bound on the routed pairs of `tokens` tokens, bound on one token's pairs),
        from shapes alone: k per token, fewer under capacity, each expert its capacity
        of the `routed_tokens` (the router's tokens) when padded to it."""
        c, experts, k = self.config, self.config.num_experts, self.config.moe_router_topk
        factor = c.moe_expert_capacity_factor
        if factor is None or factor < 0:
            return tokens * k, k
        keep = min(expert_capacity(routed_tokens, experts, k, factor), routed_tokens)
        slots = experts if c.moe_pad_expert_input_to_capacity else k
        return min(tokens * slots, experts * keep), slots

    def _record(self, losses: dict[str, torch.Tensor]) -> None:
        if not losses or in_backward():
            return
        names = sorted(losses)
        values = torch.stack([losses[n] for n in names])
        if self.token_groups:
            values = _all_reduce_over(values.clone(), self.token_groups)
        for name, value in zip(names, values):
            total = self.loss_totals.setdefault(name, [torch.zeros_like(value), 0])
            total[0] = total[0] + value
            total[1] += 1
            if name == "z_loss":
                self.last_z_loss = value
            else:
                self.last_aux_loss = value
            if self.loss_log is not None:
                entry = torch.stack([value.double(), value.new_ones((), dtype=torch.float64)])
                logged = self.loss_log.get(name)
                self.loss_log[name] = entry if logged is None else logged + entry


def moe_layers(modules: nn.Module | Iterable[nn.Module]) -> list[MoELayer]:
    """The MoE layers in a model or list of model chunks."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    return [m for module in modules for m in module.modules() if isinstance(m, MoELayer)]


def moe_loss_totals(modules, reset: bool = True) -> dict[str, tuple[torch.Tensor, int]]:
    """{name: (sum of the values, number of layer forwards)} over this rank's MoE layers
    since the last reset; name is load_balancing_loss, seq_load_balancing_loss or z_loss
    (values without coefficients, each for a whole micro-batch). Summing both over the
    pipeline stages and data-parallel ranks and dividing gives Megatron's logged mean
    over layers and micro-batches."""
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for layer in moe_layers(modules):
        for name, (value, count) in layer.loss_totals.items():
            if name in out:
                value, count = out[name][0] + value, out[name][1] + count
            out[name] = (value, count)
        if reset:
            layer.loss_totals = {}
    return out


@torch.no_grad()
def update_expert_bias(modules, pg: ProcessGroups, rate: float | None = None) -> None:
    """Aux-loss-free balancing, once per step after the optimizer: each expert's bias moves
    by `rate` (--moe-router-bias-update-rate, default 1e-3) towards the experts that got
    fewer tokens than average over the step's whole batch (all DP x CP ranks, and TP
    under sequence parallelism). Every rank of a pipeline stage must call it."""
    routers = [layer.router for layer in moe_layers(modules)
               if layer.router.expert_bias is not None]
    if not routers:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    if pg.dp_cp.size > 1:
        dist.all_reduce(counts, group=pg.dp_cp.group)
    if routers[0].tokens_split_over_tp:
        dist.all_reduce(counts, group=pg.tp.group)
    for router, count in zip(routers, counts):
        step = rate if rate is not None else getattr(router.config,
                                                     "moe_router_bias_update_rate", 1e-3)
        router.expert_bias += torch.sign(count.mean() - count) * step
        router.local_tokens_per_expert.zero_()
