"""Expert load per MoE layer: what --moe-per-layer-logging logs, and what `paratron
parity` and `paratron replay` show.

While counting is on (`count_expert_load`), each MoE router adds up on the device the
tokens its top-k sends to each expert and the tokens each expert keeps after the capacity
drop, and each MoE layer its load-balancing and z losses. Nothing is read until
`layer_expert_load` sums them over the micro-batches and the ranks into global per-layer
figures, the same at every layout, with one host read: training queues no extra wait.

TensorBoard / W&B tags, per MoE layer i (the 0-based transformer layer number, as in
Megatron-LM's per-layer tags):

* `moe/load_balancing_loss_layer_<i>` (or `moe/seq_load_balancing_loss_layer_<i>`) and
  `moe/z_loss_layer_<i>`: Megatron's names; the layer's loss without its coefficient,
  mean over the micro-batches and data-parallel ranks of the interval's iterations;
* `moe/tokens_per_expert_min_layer_<i>`, `moe/tokens_per_expert_max_layer_<i>`: the
  least and most loaded expert's tokens per iteration (mean over the interval),
  counted over the whole global batch and before any capacity drop;
* `moe/tokens_per_expert_cv_layer_<i>`: their coefficient of variation over the experts
  (population standard deviation / mean; 0 is perfect balance);
* `moe/dropped_token_fraction_layer_<i>` (with --moe-expert-capacity-factor): the share of
  the routed tokens that the capacity dropped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from paratron.model.gpt import logged_moe_losses
from paratron.model.moe import moe_layers
from paratron.parallel.process_groups import ProcessGroups


@dataclass(frozen=True)
class ExpertLoad:
    """One MoE layer's load over the counted forwards, summed over every rank.

    `tokens_per_expert`: tokens the router's top-k sent to each expert; `kept_per_expert`:
    those the expert processed after the capacity drop (the same without a capacity);
    `losses`: {Megatron name: mean per forward of the micro-batch's value} for the losses
    the layer computed."""

    layer: int
    tokens_per_expert: list[float]
    kept_per_expert: list[float]
    losses: dict[str, float]

    @property
    def min(self) -> float:
        return min(self.tokens_per_expert)

    @property
    def max(self) -> float:
        return max(self.tokens_per_expert)

    @property
    def cv(self) -> float:
        """Population standard deviation over mean of the experts' tokens (0 for none)."""
        mean = statistics.fmean(self.tokens_per_expert)
        return statistics.pstdev(self.tokens_per_expert) / mean if mean else 0.0

    @property
    def dropped_fraction(self) -> float:
        routed = sum(self.tokens_per_expert)
        return 1.0 - sum(self.kept_per_expert) / routed if routed else 0.0


def count_expert_load(models: nn.Module | list[nn.Module], on: bool = True) -> None:
    """Start counting in every MoE layer of `models` (a model, its chunks, or anything
    holding MoE layers), keeping counts already made; `on=False` stops and drops them.
    Forwards count when autograd is on (training, not evaluation) and not again in the
    activation-recompute forward of backward."""
    for layer in moe_layers(models):
        router = layer.router
        if not on:
            router.load_counts = layer.loss_log = None
        elif router.load_counts is None:
            router.load_counts = torch.zeros(2, router.num_experts, dtype=torch.float64,
                                             device=router.weight.device)
            layer.loss_log = {}


def _first_module(models: nn.Module | list[nn.Module]) -> nn.Module:
    first = models if isinstance(models, nn.Module) else models[0]
    return getattr(first, "module", first)  # the model inside DataParallel


@torch.no_grad()
def layer_expert_load(models: nn.Module | list[nn.Module], pg: ProcessGroups,
                      reset: bool = True) -> list[ExpertLoad]:
    """Every MoE layer's load since counting started or was last reset, over the whole
    model and every rank, ordered by layer. A collective: every rank calls it (a
    pipeline stage without MoE layers too). `reset` starts the next counts from zero."""
    first = _first_module(models)
    config = first.config
    if not config.num_experts:
        return []  # a dense model: every rank alike, no collective needed
    experts, names = config.num_experts, logged_moe_losses(config)
    # Per layer: routed and kept tokens per expert, [sum, forwards] per loss, present.
    table = torch.zeros(config.num_layers, 2 * experts + 2 * len(names) + 1,
                        dtype=torch.float64, device=next(first.parameters()).device)
    for index, layer in enumerate(moe_layers(models)):
        counts = layer.router.load_counts
        if counts is None:
            continue
        row = table[index if layer.layer_number is None else layer.layer_number]
        row[:2 * experts] = counts.flatten()
        for i, name in enumerate(names):
            if name in layer.loss_log:
                row[2 * experts + 2 * i:2 * experts + 2 * i + 2] = layer.loss_log[name]
        row[-1] = 1.0
        if reset:
            counts.zero_()
            layer.loss_log = {}
    # Ranks holding other tokens of the batch: DP (EP lies inside it), CP, and TP under
    # sequence parallelism. Each loss is replicated over the ranks of a micro-batch, its
    # forwards with it, so their ratio is the mean either way. PP gathers the layers.
    dims = ("dp", "cp", "pp", "tp") if config.sequence_parallel else ("dp", "cp", "pp")
    loads = []
    for number, row in enumerate(pg.all_reduce(table, *dims).tolist()):
        if row[-1] == 0.0:
            continue
        losses = {}
        for i, name in enumerate(names):
            total, forwards = row[2 * experts + 2 * i:2 * experts + 2 * i + 2]
            if forwards:
                losses[name] = total / forwards
        loads.append(ExpertLoad(number, row[:experts], row[experts:2 * experts], losses))
    return loads


def format_expert_load(load: ExpertLoad, scale: float = 1.0, capacity: bool = False) -> str:
    """One console line for a layer: tokens per expert (times `scale`, e.g. 1 / the
    iterations counted), its losses, and the dropped share when a capacity is set."""
    parts = [f" moe layer {load.layer}",
             f" tokens per expert min: {load.min * scale:.1f} max: {load.max * scale:.1f}"
             f" cv: {load.cv:.4f}"]
    parts += [f" {name}: {value:.6E}" for name, value in load.losses.items()]
    if capacity:
        parts.append(f" dropped tokens: {100.0 * load.dropped_fraction:.2f}%")
    return " |".join(parts) + " |"


def expert_load_scalars(load: ExpertLoad, scale: float = 1.0,
                        capacity: bool = False) -> dict[str, float]:
    """The layer's TensorBoard / W&B scalars by tag (see the module's docstring)."""
    i = load.layer
    scalars = {f"moe/{name}_layer_{i}": value for name, value in load.losses.items()}
    scalars[f"moe/tokens_per_expert_min_layer_{i}"] = load.min * scale
    scalars[f"moe/tokens_per_expert_max_layer_{i}"] = load.max * scale
    scalars[f"moe/tokens_per_expert_cv_layer_{i}"] = load.cv
    if capacity:
        scalars[f"moe/dropped_token_fraction_layer_{i}"] = load.dropped_fraction
    return scalars
