"""Paratron logical tensors written as Megatron-LM's legacy checkpoint (`--ckpt-format torch`).

The inverse of megatron_legacy.py, in the layout `save_checkpoint` gives a model-only
checkpoint:

    <save>/latest_checkpointed_iteration.txt                  "release"
    <save>/release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt

each file a dict of `args`, `checkpoint_version` 3.0, `iteration` and `model`, the rank's
Megatron-Core state dict with stage-local layer numbers. "release" is what Megatron loads
as weights only: it starts at iteration 0 and looks for no optimizer or RNG state, which a
conversion does not have. TP shards are cut by `shard_tensor` from Paratron's own sharding
declarations (which are Megatron's), experts go to EP rank e as SequentialMLP's
`local_experts.K` (expert TP equal to TP, Megatron's default), and every linear layer has
the `_extra_state` entry (None) that Megatron-Core's local layers write and a strict load
expects. A tied output layer is stored again on the last stage when PP > 1, as Megatron
does (with PP 1 only its `_extra_state` is). `args` is an argparse.Namespace of builtins
and torch dtypes only, built from the TransformerConfig, so Megatron and Paratron's safe
reader both read it. One pipeline stage (all its TP and EP ranks) is in memory at a time,
because each rank's file is one pickle; virtual pipeline stages (model0, model1, ...) are
not written.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from paratron.convert.errors import ConversionError
from paratron.convert.hf_mapping import OUTPUT
from paratron.convert.megatron_legacy import FILE, LATEST, rank_folder
from paratron.convert.paratron_io import TargetLayout, target_config
from paratron.convert.streaming import (StreamedModel, cast, model_layout, progress,
                                        resize_vocab, staged_output)
from paratron.model.config import TransformerConfig, moe_layer_pattern
from paratron.parallel.pipeline import model_chunks
from paratron.parallel.sharding import layout_of, shard_tensor

RELEASE = "release"
EMBEDDING = "embedding.word_embeddings.weight"
_SCALARS = (bool, int, float, str, type(None), torch.dtype)
# TransformerConfig fields that describe training or Paratron's own run, not the model.
_NOT_ARGS = {"sequence_parallel", "cp_comm_type", "moe_layer_freq", "norm_epsilon"}


def _builtin(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_builtin(v) for v in value)
    return isinstance(value, _SCALARS)


def megatron_args(model: TransformerConfig, target: TargetLayout,
                  dtype: torch.dtype) -> argparse.Namespace:
    """The Namespace Megatron's --use-checkpoint-args reads back as this model."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(TransformerConfig)
              if f.name not in _NOT_ARGS and _builtin(getattr(model, f.name))}
    pattern = moe_layer_pattern(model)
    fields.update(
        layernorm_epsilon=model.norm_epsilon, norm_epsilon=model.norm_epsilon,
        moe_layer_freq=1 if all(pattern) or not model.num_experts else [int(x) for x in pattern],
        group_query_attention=model.num_query_groups != model.num_attention_heads,
        # Megatron's MLA normalises its latents under --qk-layernorm (identities without).
        qk_layernorm=model.qk_layernorm or (model.multi_latent_attention
                                            and model.mla_latent_layernorm),
        tensor_model_parallel_size=target.tp, pipeline_model_parallel_size=target.pp,
        expert_model_parallel_size=target.ep,
        expert_tensor_parallel_size=target.tp if model.num_experts else None,
        decoder_first_pipeline_num_layers=target.first_stage_layers,
        virtual_pipeline_model_parallel_size=None, moe_grouped_gemm=False,
        transformer_impl="local", ckpt_format="torch", use_distributed_optimizer=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0)
    return argparse.Namespace(**fields)


def _megatron_key(name: str, stage_layers: range) -> str:
    """The stage-local Megatron-Core key of a Paratron tensor name."""
    if name.startswith("decoder.layers."):
        layer, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(layer) - stage_layers.start}.{rest}"
    return name


def _has_extra_state(key: str) -> bool:
    module = key.rsplit(".", 2)
    return key.endswith(".weight") and (module[-2].startswith("linear_")
                                        or module[-2] == "output_layer")


class _Stage:
    """The state dicts of one pipeline stage's TP x EP ranks, filled tensor by tensor."""

    def __init__(self, target: TargetLayout):
        self.target = target
        self.states = {(t, e): {} for t in range(target.tp) for e in range(target.ep)}

    def put(self, key: str, parts: dict[tuple[int, int], torch.Tensor]) -> None:
        for rank, tensor in parts.items():
            state = self.states[rank]
            state[key] = tensor.contiguous()
            if _has_extra_state(key):
                state[key[:-len("weight")] + "_extra_state"] = None

    def put_expert(self, key: str, full: torch.Tensor, param) -> None:
        """A stacked expert tensor [E, ...] as each EP rank's local_experts.K entries."""
        prefix, weight = key.rsplit(".experts.", 1)
        for e, local in enumerate(full.chunk(self.target.ep, dim=0)):
            for t in range(self.target.tp):
                piece = shard_tensor(local, param, self.target.tp, t)
                for k, expert in enumerate(piece.unbind(0)):
                    self.put(f"{prefix}.experts.local_experts.{k}.{weight}",
                             {(t, e): expert})


def _split(name: str, full: torch.Tensor, param, target: TargetLayout, stage: _Stage,
           stage_layers: range) -> None:
    key = _megatron_key(name, stage_layers)
    if param is not None and layout_of(param).expert:
        stage.put_expert(key, full, param)
        return
    shards = [full if param is None else shard_tensor(full, param, target.tp, t)
              for t in range(target.tp)]
    stage.put(key, {(t, e): shards[t] for t in range(target.tp) for e in range(target.ep)})


def save_megatron_checkpoint(model: StreamedModel, save_dir: str | Path, target: TargetLayout,
                             dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Megatron-LM legacy checkpoint at `save_dir`, crash-safely."""
    cfg = target_config(model.config, target, model.vocab_size)
    config = cfg.model
    if config.mtp_num_layers:
        raise ConversionError("multi-token prediction layers (--mtp-num-layers) are not "
                              "written in Megatron-LM's format; use --saver hf or paratron")
    latent = config.mla_latent_norm_epsilon
    if config.multi_latent_attention and latent not in (None, config.norm_epsilon):
        raise ConversionError(f"the latent norms' epsilon {latent:g} is not --norm-epsilon "
                              f"{config.norm_epsilon:g}; Megatron-LM has one epsilon for all "
                              f"norms")
    if config.num_query_groups % target.tp:
        raise ConversionError(f"--target-tensor-parallel-size {target.tp} does not divide the "
                              f"{config.num_query_groups} key/value groups; Megatron-Core "
                              f"needs whole groups on every TP rank")
    layout = model_layout(config)
    rows = config.padded_vocab_size
    stages = [model_chunks(config.num_layers, target.pp, p, 1,
                           first=target.first_stage_layers)[0] for p in range(target.pp)]
    tied = not config.untie_embeddings_and_output_weights
    final = Path(save_dir).resolve()
    with staged_output(save_dir) as tmp:
        folder = tmp / RELEASE
        folder.mkdir()
        stage_index, stage, embedding, args = 0, _Stage(target), None, None

        def write(p: int) -> None:
            for (t, e), state in stage.states.items():
                rank = folder / rank_folder(t, p, e, target.pp, target.ep)
                rank.mkdir()
                with open(rank / FILE, "xb") as f:
                    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0,
                                "model": state}, f)

        with progress(model.num_groups, "writing Megatron-LM checkpoint") as bar:
            for group in model.groups():
                group = cast(resize_vocab(group, rows), dtype)
                if args is None:
                    stored = next(t.dtype for t in group.values() if t.is_floating_point())
                    args = megatron_args(config, target, stored)
                for key, full in group.items():
                    name = key.split("/", 1)[1]
                    layer = name.split(".")[2] if name.startswith("decoder.layers.") else None
                    while layer is not None and int(layer) not in stages[stage_index].layers:
                        write(stage_index)
                        stage_index, stage = stage_index + 1, _Stage(target)
                    if name.startswith("decoder.final") or name == OUTPUT:
                        while stage_index < target.pp - 1:
                            write(stage_index)
                            stage_index, stage = stage_index + 1, _Stage(target)
                    if name == EMBEDDING:
                        embedding = full
                    _split(name, full, layout.params.get(name), target, stage,
                           stages[stage_index].layers)
                bar.update()
        if tied and target.pp > 1:
            _split(OUTPUT, embedding, layout.params[EMBEDDING], target, stage, range(0))
        elif tied:  # the output layer uses the embedding's weight; its extra state is kept
            for state in stage.states.values():
                state["output_layer._extra_state"] = None
        write(stage_index)
        with open(tmp / LATEST, "x") as f:
            f.write(RELEASE)
    return final
