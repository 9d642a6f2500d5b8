"""Multi-token prediction (DeepSeek-V3; Megatron-Core's MultiTokenPredictionBlock).

Module k of D takes the previous depth's hidden state (for k = 1 the main model's output,
after its final norm) and the embedding of the tokens k steps ahead, normalises each
(`hnorm`, `enorm`), projects their concatenation [embedding; hidden] back to the hidden
size (`eh_proj`), runs one transformer layer of the kind of the model's last layer and its
own `final_layernorm`; the shared output layer then predicts token t+k+1. Its loss is the
mean over the positions whose target exists (labels and loss mask rolled k steps left,
zero-filled, as Megatron's `roll_tensor`). The D losses join the backward with weight
--mtp-loss-scaling-factor / D without changing the lm loss the model returns, and are
logged beside it as `mtp_k loss`. The modules live on the last pipeline stage, which holds
a copy of the embedding for them.
"""

from __future__ import annotations

import torch
from torch import nn

from paratron.model.moe import MoEAuxLossAutoScaler
from paratron.model.transformer import TransformerLayer, build_layer_norm
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.tensor_parallel import (ColumnParallelLinear,
                                               ScatterToSequenceParallelRegion)


def roll_left(x: torch.Tensor) -> torch.Tensor:
    """One step left along the last (sequence) dimension, the last position zero."""
    rolled = torch.roll(x, shifts=-1, dims=-1)
    rolled[..., -1] = 0
    return rolled


class MultiTokenPredictionLayer(nn.Module):
    """One depth: norms, projection, a transformer layer and the final norm."""

    def __init__(self, config, pg: ProcessGroups):
        super().__init__()
        c = config
        self.group, self.sequence_parallel = pg.tp.group, c.sequence_parallel
        self.enorm = build_layer_norm(c)
        self.hnorm = build_layer_norm(c)
        # Column-parallel, gathered: every rank gets the whole projection, as Megatron.
        self.eh_proj = ColumnParallelLinear(2 * c.hidden_size, c.hidden_size, bias=False,
                                            gather_output=True, pg=pg,
                                            init_std=c.init_method_std,
                                            sequence_parallel=c.sequence_parallel)
        self.mtp_model_layer = TransformerLayer(c, c.num_layers - 1, pg)
        self.final_layernorm = build_layer_norm(c)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, rotary=None,
                attention_mask=None) -> torch.Tensor:
        x = torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1)
        x = self.eh_proj(x)  # [s, b, h] whole; back to this rank's shard under SP
        if self.sequence_parallel:
            x = ScatterToSequenceParallelRegion.apply(x, self.group)
        return self.final_layernorm(self.mtp_model_layer(x, rotary, attention_mask))


class MultiTokenPrediction(nn.Module):
    """The D modules of the last stage. `backward_scale` is the gradient their weighted
    loss gets, as the lm loss's (the trainer sets it each step); `loss_totals` holds the
    sum of each depth's loss over the micro-batches since the last read, `forwards` their
    number."""

    def __init__(self, config, pg: ProcessGroups):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MultiTokenPredictionLayer(config, pg)
                                    for _ in range(config.mtp_num_layers))
        self.backward_scale = 1.0
        self.loss_totals: torch.Tensor | None = None
        self.forwards = 0

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                position_ids: torch.Tensor, embedding: nn.Module, rotary=None,
                attention_mask=None) -> list[torch.Tensor]:
        """Each depth's output hidden state [s, b, h] (sequence shards under SP)."""
        outputs = []
        for layer in self.layers:
            input_ids, position_ids = roll_left(input_ids), roll_left(position_ids)
            hidden = layer(hidden, embedding(input_ids, position_ids), rotary, attention_mask)
            outputs.append(hidden)
        return outputs

    def attach_losses(self, lm_loss: torch.Tensor, outputs: list[torch.Tensor],
                      labels: torch.Tensor, loss_mask: torch.Tensor | None,
                      token_loss) -> torch.Tensor:
        """`lm_loss` unchanged, its backward also giving each depth's loss its weighted
        gradient. `token_loss(hidden, labels)` is the model's per-token loss [b, s]."""
        weight = self.config.mtp_loss_scaling_factor / len(self.layers)
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None \
            else loss_mask.float()
        losses = []
        for hidden in outputs:
            labels, mask = roll_left(labels), roll_left(mask)
            loss = (token_loss(hidden, labels).float() * mask).sum() / mask.sum().clamp(min=1)
            losses.append(loss.detach())
            lm_loss = MoEAuxLossAutoScaler.apply(lm_loss, loss * weight, self.backward_scale)
        losses = torch.stack(losses).double()
        self.loss_totals = losses if self.loss_totals is None else self.loss_totals + losses
        self.forwards += 1
        return lm_loss


def mtp_modules(chunks) -> list[MultiTokenPrediction]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, MultiTokenPrediction)]


def logged_mtp_losses(config) -> list[str]:
    """Megatron's names of the MTP losses in the log: `mtp_1 loss`, ..."""
    return [f"mtp_{k + 1} loss" for k in range(config.mtp_num_layers or 0)]


def set_mtp_backward_scale(chunks, scale) -> None:
    """The gradient each module's weighted loss gets in the coming backward passes."""
    for module in mtp_modules(chunks):
        module.backward_scale = scale


@torch.no_grad()
def mtp_loss_sums(chunks, pg: ProcessGroups) -> torch.Tensor:
    """[sum, micro-batches] of each depth's loss since the last call, summed over the
    stages and DP ranks (float64, on the device, nothing read): sum / micro-batches is
    Megatron's logged mean over micro-batches and data-parallel ranks."""
    depths = chunks[0].config.mtp_num_layers or 0
    sums = torch.zeros(depths, 2, dtype=torch.float64,
                       device=next(chunks[0].parameters()).device)
    if not depths:
        return sums.flatten()
    for module in mtp_modules(chunks):
        if module.loss_totals is not None:
            sums[:, 0] += module.loss_totals
            sums[:, 1] += module.forwards
        module.loss_totals, module.forwards = None, 0
    return pg.all_reduce(sums.flatten(), "pp", "dp")
