"""GPTModel: embedding -> transformer block -> output layer, with Megatron-Core names.

One pipeline stage's model: the first stage owns the embedding, the last owns the final
norm, output layer and loss; at PP=1 one model owns everything. The forward takes token
ids on the first stage or the previous stage's hidden state [s, b, h] otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paratron.model.rotary import build_rotary
from paratron.model.transformer import TransformerBlock
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import full_shape, shard_tensor
from paratron.parallel.tensor_parallel import (ColumnParallelLinear,
                                               ScatterToSequenceParallelRegion,
                                               VocabParallelEmbedding,
                                               vocab_parallel_cross_entropy)


class LanguageModelEmbedding(nn.Module):
    """Word embeddings (+ learned absolute positions), dropout; output [s, b, h], or
    this rank's sequence shard [s/TP, b, h] under sequence parallelism."""

    def __init__(self, config, pg: ProcessGroups | None = None):
        super().__init__()
        c = config
        self.pg = pg or ProcessGroups.single()
        self.sequence_parallel = c.sequence_parallel
        learned = c.position_embedding_type == "learned_absolute"
        # Without positions to add, the partial lookups go straight to sequence shards.
        self.reduce_scatter = c.sequence_parallel and not learned
        self.word_embeddings = VocabParallelEmbedding(
            c.padded_vocab_size, c.hidden_size, pg=self.pg, init_std=c.init_method_std,
            reduce_scatter_embeddings=self.reduce_scatter)
        self.position_embeddings = None
        if learned:
            self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.dropout = c.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.reduce_scatter:
            x = x.contiguous()
        else:
            if self.position_embeddings is not None:
                x = x + self.position_embeddings(position_ids)
            x = x.transpose(0, 1).contiguous()
            if self.sequence_parallel:
                x = ScatterToSequenceParallelRegion.apply(x, self.pg.tp_group)
        if not self.sequence_parallel or not self.training or self.dropout == 0:
            return F.dropout(x, self.dropout, self.training)
        with self.pg.rng.fork():  # each rank holds different tokens: its own masks
            return F.dropout(x, self.dropout, self.training)


class GPTModel(nn.Module):
    def __init__(self, config, pg: ProcessGroups | None = None, *,
                 pre_process: bool = True, post_process: bool = True,
                 layer_numbers: range | None = None):
        super().__init__()
        c = config
        if c.padded_vocab_size is None:
            raise ValueError("config.padded_vocab_size must be set before building the model")
        self.config, self.pg = c, pg or ProcessGroups.single()
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings = not c.untie_embeddings_and_output_weights
        layer_numbers = layer_numbers if layer_numbers is not None else range(c.num_layers)
        self.embedding = LanguageModelEmbedding(c, self.pg) if pre_process else None
        self.rotary_pos_emb = build_rotary(c)
        self.decoder = TransformerBlock(c, layer_numbers, post_process, self.pg)
        self.output_layer = None
        if post_process:
            # Tied embeddings on a single stage: the output layer borrows the embedding.
            self.output_layer = ColumnParallelLinear(
                c.hidden_size, c.padded_vocab_size, bias=False, pg=self.pg,
                init_std=c.init_method_std, sequence_parallel=c.sequence_parallel,
                skip_weight_param_allocation=self.share_embeddings and pre_process)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's initialisation: normal(0, std) everywhere, std/sqrt(2L) for the
        output projections of each layer, zero biases, unit norm weights.

        Each TP rank draws the whole tensor and keeps its shard, so a sharded model
        starts from exactly the weights of the single-process one.
        """
        tp, rank = self.pg.tp_size, self.pg.tp_rank
        for module in self.modules():
            std = getattr(module, "init_std", None)
            if std is not None:
                weight = module.weight
                if weight is not None:
                    full = torch.empty(full_shape(weight, tp), dtype=torch.float32)
                    full.normal_(0.0, std)
                    weight.copy_(shard_tensor(full, weight, tp, rank))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, self.config.init_method_std)

    def shared_output_weight(self) -> torch.Tensor | None:
        """The embedding table when the output layer is tied to it, else None."""
        if self.output_layer.weight is None:
            return self.embedding.word_embeddings.weight
        return None

    def forward(self, input_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Returns per-token loss [b, s] with labels, logits [b, s, v/TP] without them,
        or the hidden state [s, b, h] on a stage that is not the last."""
        batch_ids = input_ids if input_ids is not None else labels
        if position_ids is None:
            s = batch_ids.shape[1] if batch_ids is not None else hidden_states.shape[0]
            b = batch_ids.shape[0] if batch_ids is not None else hidden_states.shape[1]
            device = batch_ids.device if batch_ids is not None else hidden_states.device
            position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        x = self.embedding(input_ids, position_ids) if self.pre_process else hidden_states
        rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
        x = self.decoder(x, rotary, attention_mask)
        if not self.post_process:
            return x
        logits = self.output_layer(x, weight=self.shared_output_weight()).transpose(0, 1)
        if labels is None:
            return logits.contiguous()
        return vocab_parallel_cross_entropy(logits, labels, self.pg)
