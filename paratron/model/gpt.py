"""GPTModel: embedding -> transformer block -> output layer, with Megatron-Core names.

One pipeline stage's model: the first stage owns the embedding, the last owns the final
norm, output layer and loss; at PP=1 one model owns everything. The forward takes token
ids on the first stage or the previous stage's hidden state [s, b, h] otherwise.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from paratron.model.fp8 import enable_fp8
from paratron.model.moe import moe_layers, moe_loss_totals, update_expert_bias
from paratron.model.mtp import MultiTokenPrediction
from paratron.model.rotary import build_rotary
from paratron.model.transformer import TransformerBlock
from paratron.parallel.cross_entropy import chunked_vocab_parallel_cross_entropy
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import full_shape, set_layout, shard_tensor
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
                x = ScatterToSequenceParallelRegion.apply(x, self.pg.tp.group)
        if not self.sequence_parallel or not self.training or self.dropout == 0:
            return F.dropout(x, self.dropout, self.training)
        with self.pg.rng.fork():  # each rank holds different tokens: its own masks
            return F.dropout(x, self.dropout, self.training)


class GPTModel(nn.Module):
    """One pipeline stage's part of the GPT, this tensor-parallel rank's shard of it.

    Holds `embedding` (first stage only, and a copy on the last for its multi-token
    prediction), `decoder` (this stage's layers, numbered globally from
    `decoder.layer_offset`; `global_name` turns a local parameter name into the
    checkpoint's), `output_layer` (last stage only; without weights of its own when tied
    to the embedding on the same stage) and `mtp` (last stage, with --mtp-num-layers).
    Takes token ids [b, s] on the first stage, else the previous stage's hidden state
    [s, b, h]; returns that hidden state to the next stage, or on the last the per-token
    loss [b, s] (logits [b, s, V/TP] when no labels are given).
    """

    def __init__(self, config, pg: ProcessGroups | None = None, *,
                 pre_process: bool = True, post_process: bool = True,
                 layer_numbers: range | None = None, init_seed: int = 0):
        super().__init__()
        c = config
        if c.padded_vocab_size is None:
            raise ValueError("config.padded_vocab_size must be set before building the model")
        self.config, self.pg = c, pg or ProcessGroups.single()
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings = not c.untie_embeddings_and_output_weights
        layer_numbers = layer_numbers if layer_numbers is not None else range(c.num_layers)
        predicts_ahead = post_process and bool(c.mtp_num_layers)
        has_embedding = pre_process or predicts_ahead
        self.embedding = LanguageModelEmbedding(c, self.pg) if has_embedding else None
        self.rotary_pos_emb = build_rotary(c)
        self.decoder = TransformerBlock(c, layer_numbers, post_process, self.pg)
        self.mtp = MultiTokenPrediction(c, self.pg) if predicts_ahead else None
        enable_fp8([(f"decoder.layers.{layer.layer_number}", layer)
                    for layer in self.decoder.layers], c, self.pg)
        if self.mtp is not None:  # each depth's layer is numbered as the last one
            enable_fp8([(f"mtp.layers.{depth}.mtp_model_layer", layer.mtp_model_layer)
                        for depth, layer in enumerate(self.mtp.layers)], c, self.pg)
        self.output_layer = None
        if post_process:
            # Tied embeddings on a single stage: the output layer borrows the embedding.
            self.output_layer = ColumnParallelLinear(
                c.hidden_size, c.padded_vocab_size, bias=False, pg=self.pg,
                init_std=c.init_method_std, sequence_parallel=c.sequence_parallel,
                skip_weight_param_allocation=self.share_embeddings and has_embedding)
        # The last stage's copy of the embedding (its MTP modules' or the tied output
        # layer's): kept equal to the first stage's by summing their gradients over the
        # embedding group.
        if self.embedding is not None and not pre_process:
            set_layout(self.embedding.word_embeddings.weight, tied="copy")
        elif self.output_layer is not None and self.share_embeddings and not pre_process:
            set_layout(self.output_layer.weight, tied="copy")
        copied = self.share_embeddings or bool(c.mtp_num_layers)
        if self.embedding is not None and copied and not post_process:
            set_layout(self.embedding.word_embeddings.weight, tied="embedding")
        self.reset_parameters(init_seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Megatron's initialisation: normal(0, std) everywhere, std/sqrt(2L) for the
        output projections of each layer, zero biases, unit norm weights.

        Each weight is drawn whole from a generator seeded by `seed` and its global
        name, and each TP rank keeps its shard: every layout (TP, pipeline stages,
        virtual stages) starts from exactly the single-process weights, and a tied
        output layer on the last stage starts equal to the first stage's embedding.
        """
        if any(p.is_meta for p in self.parameters()):
            return  # the memory planner's model: shapes only, no values to draw
        tp, rank = self.pg.tp.size, self.pg.tp.rank
        def generator(name: str) -> torch.Generator:
            return torch.Generator().manual_seed(seed * 1_000_003
                                                 + zlib.crc32(self.global_name(name).encode()))

        for name, module in self.named_modules():
            custom = getattr(module, "reset_parameters_from", None)
            if custom is not None:  # stacked experts: each expert drawn from its own name
                custom(lambda suffix, name=name: generator(name + suffix))
                continue
            std = getattr(module, "init_std", None)
            if std is None and isinstance(module, nn.Embedding):
                std = self.config.init_method_std
            weight = getattr(module, "weight", None)
            if std is None or weight is None:
                continue
            if module is self.output_layer and self.share_embeddings:
                name = "embedding.word_embeddings"  # the tied copy on the last stage
            full = torch.empty(full_shape(weight, tp), dtype=torch.float32)
            full.normal_(0.0, std, generator=generator(name))
            weight.copy_(shard_tensor(full, weight, tp, rank))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()

    def global_name(self, name: str) -> str:
        """A module name with its stage-local layer index made global."""
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"] and len(parts) > 2:
            parts[2] = str(self.decoder.layer_offset + int(parts[2]))
        return ".".join(parts)

    def shared_output_weight(self) -> torch.Tensor | None:
        """The embedding table when the output layer is tied to it, else None."""
        if self.output_layer.weight is None:
            return self.embedding.word_embeddings.weight
        return None

    def forward(self, input_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None,
                inference_params=None, loss_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Returns per-token loss [b, s] with labels, logits [b, s, v/TP] without them,
        or the hidden state [s, b, h] on a stage that is not the last.

        attention_mask: boolean [b, 1, s, s], True where attention is *not* allowed
        (Megatron's convention, as the datasets build it); None attends causally.
        inference_params (`paratron.inference.InferenceParams`): the tokens continue the
        cached ones; positions default to the cache length onwards, the attention mask
        comes from the cache, and every layer adds this step's keys and values to it.
        The caller advances the cache once the forward is done.
        input_ids and loss_mask [b, s] on the last stage feed multi-token prediction
        (training with labels only); its losses join the backward of the returned loss."""
        batch_ids = input_ids if input_ids is not None else labels
        offset = 0
        if inference_params is not None:
            if attention_mask is not None:
                raise ValueError("pass either attention_mask or inference_params: with a "
                                 "cache the mask is the cache's")
            offset = inference_params.sequence_len_offset
        s = batch_ids.shape[1] if batch_ids is not None else hidden_states.shape[0]
        if position_ids is None:
            b = batch_ids.shape[0] if batch_ids is not None else hidden_states.shape[1]
            device = batch_ids.device if batch_ids is not None else hidden_states.device
            position_ids = torch.arange(offset, offset + s, device=device).unsqueeze(0).expand(b, s)
        if inference_params is not None:
            allowed = inference_params.attention_mask(s, position_ids.device)
        else:  # the layers take SDPA's convention: True where attention is allowed
            allowed = None if attention_mask is None else ~attention_mask
        x = self.embedding(input_ids, position_ids) if self.pre_process else hidden_states
        rotary = self.rotary_pos_emb(position_ids) if self.rotary_pos_emb is not None else None
        x = self.decoder(x, rotary, allowed, inference_params)
        if not self.post_process:
            return x
        if labels is None:
            return self._logits(x).contiguous()
        loss = self._token_loss(x, labels)
        if self.mtp is not None and self.training:
            outputs = self.mtp(x, input_ids, position_ids, self.embedding, rotary, allowed)
            loss = self.mtp.attach_losses(loss, outputs, labels, loss_mask, self._token_loss)
        return loss

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer's logits [b, s, V/TP] of a last hidden state [s, b, h]."""
        return self.output_layer(hidden, weight=self.shared_output_weight()).transpose(0, 1)

    def _token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [b, s] of the logits of `hidden` against `labels`."""
        logits, c = self._logits(hidden), self.config
        if c.cross_entropy_loss_fusion:  # fp32 logits one chunk at a time
            backend = c.torch_compile_backend if c.torch_compile else None
            return chunked_vocab_parallel_cross_entropy(logits, labels, self.pg,
                                                        c.cross_entropy_chunk_size,
                                                        compile_backend=backend)
        return vocab_parallel_cross_entropy(logits, labels, self.pg)


def logged_moe_losses(config) -> list[str]:
    """The MoE losses Megatron logs, named by the config (so a stage without MoE layers
    joins the sums)."""
    return [name for name, logged in (
        ("load_balancing_loss", config.moe_router_load_balancing_type == "aux_loss"),
        ("seq_load_balancing_loss", config.moe_router_load_balancing_type == "seq_aux_loss"),
        ("z_loss", bool(config.moe_z_loss_coeff))) if logged and config.num_experts]


@torch.no_grad()
def moe_loss_sums(chunks: list[GPTModel], pg: ProcessGroups) -> torch.Tensor:
    """[sum, layer forwards] of each of `logged_moe_losses` since the last call, over every
    stage and DP rank, as one float64 tensor on the device that nothing reads here: sum /
    forwards is Megatron's logged mean over MoE layers and micro-batches."""
    names = logged_moe_losses(chunks[0].config)
    totals = moe_loss_totals(chunks)
    sums = torch.zeros(2 * len(names), dtype=torch.float64,
                       device=next(chunks[0].parameters()).device)
    if not names:
        return sums
    for i, name in enumerate(names):
        sums[2 * i], sums[2 * i + 1] = totals.get(name, (0.0, 0))
    return pg.all_reduce(sums, "pp", "dp")


@torch.no_grad()
def moe_bookkeeping(chunks: list[GPTModel], pg: ProcessGroups, aux_loss_scale: float,
                    stepped: bool) -> None:
    """The MoE layers' part of a training step after the optimizer's (and once before the
    first step): a step taken moves the expert biases; the next step's aux and z losses
    get `aux_loss_scale` on their gradient."""
    c = chunks[0].config
    if not c.num_experts:
        return
    if stepped and c.moe_router_enable_expert_bias:
        update_expert_bias(chunks, pg)
    for layer in moe_layers(chunks):
        layer.aux_loss_scale = aux_loss_scale
