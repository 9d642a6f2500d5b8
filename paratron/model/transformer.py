"""Pre-norm transformer layers and the block that stacks them (with recompute).

Activations are sequence-first, [s, b, h], as in Megatron, so sequence and context
parallelism later shard dimension 0 without copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from paratron.model.attention import SelfAttention
from paratron.model.config import moe_layer_pattern
from paratron.model.mla import MLASelfAttention
from paratron.model.mlp import MLP
from paratron.model.moe import MoELayer
from paratron.model.offload import ActivationOffload
from paratron.model.norms import build_norm
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import replicated


def _maybe_checkpoint(enabled: bool, pg: ProcessGroups, fn, *args):
    """Run fn, recomputing it in backward when enabled; RNG streams replay exactly."""
    if enabled:
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=pg.rng.checkpoint_contexts)
    return fn(*args)


def build_layer_norm(config) -> nn.Module:
    """A norm of the residual stream; on sequence shards its weights see only this
    rank's tokens, so under sequence parallelism their gradients are summed over TP."""
    norm = build_norm(config.normalization, config.hidden_size, config.norm_epsilon)
    return replicated(norm, partial_grad=config.sequence_parallel)


def recompute_plan(config, num_layers: int) -> list[tuple[list[int], bool]]:
    """A block's layers (local indices) in the chunks each run under one checkpoint, and
    whether full recompute replays the chunk in backward (when training). The memory
    planner reads the same plan."""
    c = config
    if c.recompute_granularity != "full":
        return [([i], False) for i in range(num_layers)]
    if c.recompute_method == "uniform":
        size = c.recompute_num_layers or 1
        return [(list(range(i, min(i + size, num_layers))), True)
                for i in range(0, num_layers, size)]
    return [([i], i < c.recompute_num_layers) for i in range(num_layers)]  # block


def compiles_as_one_graph(config, layer: "TransformerLayer") -> bool:
    """Whether --torch-compile captures `layer` whole (`fullgraph=True`), so that a graph
    break is an error rather than a silent split. It cannot across a dropout that forks
    the model-parallel RNG stream (attention dropout; hidden dropout under sequence
    parallelism), the TP and CP collectives inside a layer, or an MoE layer's dispatch,
    whose shapes depend on the routing; those layers compile in pieces."""
    c, pg = config, layer.pg
    forks_rng = c.attention_dropout > 0 or (c.sequence_parallel and c.hidden_dropout > 0)
    return not (forks_rng or isinstance(layer.mlp, MoELayer) or pg.tp.size > 1
                or pg.cp.size > 1)


class TransformerLayer(nn.Module):
    """x + drop(attn(norm(x))), then h + drop(mlp(norm(h)))."""

    def __init__(self, config, layer_number: int, pg: ProcessGroups | None = None):
        super().__init__()
        c = config
        self.pg = pg or ProcessGroups.single()
        self.layer_number = layer_number
        self.hidden_dropout = c.hidden_dropout
        self.sequence_parallel = c.sequence_parallel
        self.input_layernorm = build_layer_norm(c)
        attention = MLASelfAttention if c.multi_latent_attention else SelfAttention
        self.self_attention = attention(c, layer_number, self.pg)
        self.pre_mlp_layernorm = build_layer_norm(c)
        is_moe = bool(c.num_experts) and moe_layer_pattern(c)[layer_number]
        self.mlp = MoELayer(c, self.pg, layer_number) if is_moe else MLP(c, self.pg)
        selective = (c.recompute_modules or []) if c.recompute_granularity == "selective" else []
        self.recompute_norm = "layernorm" in selective
        self.recompute_mlp = "mlp" in selective

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel or not self.training or self.hidden_dropout == 0:
            return F.dropout(x, self.hidden_dropout, self.training)
        with self.pg.rng.fork():  # sequence shards differ across TP ranks: own masks
            return F.dropout(x, self.hidden_dropout, self.training)

    def forward(self, x, rotary=None, attention_mask=None, inference_params=None):
        recompute_norm = self.recompute_norm and self.training
        h = _maybe_checkpoint(recompute_norm, self.pg, self.input_layernorm, x)
        x = x + self._dropout(self.self_attention(h, rotary, attention_mask, inference_params))
        h = _maybe_checkpoint(recompute_norm, self.pg, self.pre_mlp_layernorm, x)
        h = _maybe_checkpoint(self.recompute_mlp and self.training, self.pg, self.mlp, h)
        return x + self._dropout(h)


class TransformerBlock(nn.Module):
    """The layers a pipeline stage owns, and the final norm on the last stage.

    `layers` keeps its local index (0..n-1) in parameter names; `layer_offset` says which
    global layer the first one is, for initialisation and conversion.
    """

    def __init__(self, config, layer_numbers: range, post_process: bool,
                 pg: ProcessGroups | None = None):
        super().__init__()
        c = config
        self.config, self.pg = c, pg or ProcessGroups.single()
        self.layer_offset = layer_numbers.start
        self.layers = nn.ModuleList(TransformerLayer(c, n, self.pg)
                                    for n in layer_numbers)
        self.final_layernorm = build_layer_norm(c) if post_process else None
        self.activation_offload = ActivationOffload.from_config(c)
        if c.torch_compile:  # in place: parameter names stay the same
            for layer in self.layers:
                layer.compile(backend=c.torch_compile_backend,
                              fullgraph=compiles_as_one_graph(c, layer))

    def forward(self, x, rotary=None, attention_mask=None, inference_params=None):
        """inference_params: the key/value cache of generation (eval mode only)."""
        for chunk, recomputed in recompute_plan(self.config, len(self.layers)):
            def run(h, chunk=chunk):
                for i in chunk:
                    h = self.layers[i](h, rotary, attention_mask, inference_params)
                return h
            with self.activation_offload([self.layers[i] for i in chunk]):
                x = _maybe_checkpoint(recomputed and self.training, self.pg, run, x)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x
