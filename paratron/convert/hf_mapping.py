"""Hugging Face <-> Paratron tensor names and layouts: one table per architecture.

A table maps each Paratron parameter (its Megatron-Core name, `{i}` standing for the
layer) to the Hugging Face tensors it is made of and a `Transform` between the two
layouts. Transforms are invertible, so the same table serves reading a Hugging Face
checkpoint (`to_paratron`) and writing one (`to_hf`), and a round trip tests both.

A table lists every parameter an architecture *can* have (biases, q/k norms, learned
positions, an untied output layer); the model built from the config decides which it
has, so tables need no conditions. Llama, Qwen2 and Qwen3 name their tensors alike and
share one table.

The tensors here are whole (logical) tensors, as in the Hugging Face files; cutting
them into tensor-parallel shards is a separate step that reads each parameter's own
description of how it is split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from paratron.convert.errors import ConversionError

Tensors = list[torch.Tensor]


class Transform:
    """An invertible change of layout between Hugging Face and Paratron tensors.

    Both directions take and return lists so that transforms chain; a rule's chain
    turns its Hugging Face tensors into exactly one Paratron tensor. `config` is the
    TransformerConfig, which supplies head counts and sizes.
    """

    def to_paratron(self, tensors: Tensors, config) -> Tensors:
        raise NotImplementedError

    def to_hf(self, tensors: Tensors, config) -> Tensors:
        raise NotImplementedError


class Identity(Transform):
    """Same name, same layout (norms, embeddings, most Llama linears)."""

    def to_paratron(self, tensors, config):
        return list(tensors)

    def to_hf(self, tensors, config):
        return list(tensors)


class Transpose(Transform):
    """GPT-2's Conv1D stores weights as [in, out]; Paratron's linears use [out, in]."""

    def to_paratron(self, tensors, config):
        return [t.t() for t in tensors]

    def to_hf(self, tensors, config):
        return [t.t() for t in tensors]


@dataclass(frozen=True)
class Concat(Transform):
    """`parts` equal tensors stacked along the output dimension (SwiGLU's [gate; up])."""

    parts: int

    def to_paratron(self, tensors, config):
        return [torch.cat(tensors, dim=0)]

    def to_hf(self, tensors, config):
        (fused,) = tensors
        return list(fused.chunk(self.parts, dim=0))


class FuseQKV(Transform):
    """Separate q, k, v projections <-> Megatron's fused, group-major `linear_qkv`.

    Paratron's rows run, for each key/value group, over that group's query heads, then
    its key head, then its value head. Works for weights [out, in] and biases [out].
    """

    def to_paratron(self, tensors, config):
        q, k, v = tensors
        groups, d = config.num_query_groups, config.kv_channels
        rest = q.shape[1:]
        per_group = [q.reshape(groups, -1, *rest), k.reshape(groups, d, *rest),
                     v.reshape(groups, d, *rest)]
        return [torch.cat(per_group, dim=1).reshape(-1, *rest)]

    def to_hf(self, tensors, config):
        (fused,) = tensors
        groups, d = config.num_query_groups, config.kv_channels
        q_per_group = config.num_attention_heads // groups * d
        rest = fused.shape[1:]
        q, k, v = fused.reshape(groups, q_per_group + 2 * d, *rest).split(
            [q_per_group, d, d], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class SplitPackedQKV(Transform):
    """One tensor holding [all q; all k; all v] along the output dim <-> three tensors."""

    def to_paratron(self, tensors, config):
        (packed,) = tensors
        q = config.num_attention_heads * config.kv_channels
        kv = config.num_query_groups * config.kv_channels
        return list(packed.split([q, kv, kv], dim=0))

    def to_hf(self, tensors, config):
        return [torch.cat(tensors, dim=0)]


@dataclass(frozen=True)
class Chain(Transform):
    """Transforms applied in order towards Paratron, in reverse towards Hugging Face."""

    steps: tuple[Transform, ...]

    def to_paratron(self, tensors, config):
        for step in self.steps:
            tensors = step.to_paratron(tensors, config)
        return tensors

    def to_hf(self, tensors, config):
        for step in reversed(self.steps):
            tensors = step.to_hf(tensors, config)
        return tensors


IDENTITY = Identity()
TRANSPOSE = Transpose()
GATE_UP = Concat(2)
QKV = FuseQKV()
PACKED_QKV = Chain((SplitPackedQKV(), QKV))
CONV1D_PACKED_QKV = Chain((TRANSPOSE, SplitPackedQKV(), QKV))


@dataclass(frozen=True)
class Rule:
    """The Hugging Face tensors (names with `{i}`) one Paratron tensor is made of."""

    hf: tuple[str, ...]
    transform: Transform = IDENTITY


def _one(hf_name: str) -> Rule:
    return Rule((hf_name,))


def _weight_and_bias(paratron: str, hf: str | Sequence[str], weight: Transform = IDENTITY,
                     bias: Transform = IDENTITY) -> dict[str, Rule]:
    """Rules for a module's weight and bias; the model decides whether the bias exists."""
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    return {f"{paratron}.weight": Rule(tuple(f"{h}.weight" for h in hf), weight),
            f"{paratron}.bias": Rule(tuple(f"{h}.bias" for h in hf), bias)}


EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """One architecture's table, plus what its checkpoints hold besides weights.

    ignored: patterns (full match) of stored tensors that are buffers, not weights.
    prefix_aliases: (prefix, alternative) pairs for older checkpoints that spell
    names differently (GPT-2 on the Hub has no `transformer.` prefix).
    """

    name: str
    rules: dict[str, Rule]
    ignored: tuple[str, ...] = ()
    prefix_aliases: tuple[tuple[str, str], ...] = ()

    def rule(self, name: str) -> tuple[Rule, int | None]:
        """The rule for a Paratron tensor name and its layer index (None outside layers)."""
        match = _LAYER.match(name)
        layer = int(match.group(1)) if match else None
        template = _LAYER.sub("decoder.layers.{i}.", name) if match else name
        if template not in self.rules:
            raise ConversionError(f"no Hugging Face {self.name} source for Paratron "
                                  f"tensor {name}")
        return self.rules[template], layer

    def hf_names(self, name: str, layer_offset: int = 0) -> tuple[str, ...]:
        """Hugging Face names of a Paratron tensor; `layer_offset` turns a pipeline
        stage's local layer index into the global one."""
        rule, layer = self.rule(name)
        if layer is None:
            return rule.hf
        return tuple(h.format(i=layer + layer_offset) for h in rule.hf)

    def spellings(self, hf_name: str) -> Iterator[str]:
        """The canonical name, then the alternative spellings older files may use."""
        yield hf_name
        for prefix, alternative in self.prefix_aliases:
            if hf_name.startswith(prefix):
                yield alternative + hf_name[len(prefix):]

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.ignored)

    def to_paratron(self, name: str, tensors: Tensors, config) -> torch.Tensor:
        """The Paratron tensor `name` from its Hugging Face tensors (in `hf_names` order)."""
        (out,) = self.rule(name)[0].transform.to_paratron(list(tensors), config)
        return out

    def to_hf(self, name: str, tensor: torch.Tensor, config,
              layer_offset: int = 0) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors, by name, that the Paratron tensor `name` becomes."""
        parts = self.rule(name)[0].transform.to_hf([tensor], config)
        return dict(zip(self.hf_names(name, layer_offset), parts, strict=True))


_L = "model.layers.{i}."
_P = "decoder.layers.{i}."

LLAMA = Architecture("llama", {
    EMBEDDING: _one("model.embed_tokens.weight"),
    _P + "input_layernorm.weight": _one(_L + "input_layernorm.weight"),
    **_weight_and_bias(_P + "self_attention.linear_qkv",
                       [_L + f"self_attn.{x}_proj" for x in "qkv"], QKV, QKV),
    _P + "self_attention.q_layernorm.weight": _one(_L + "self_attn.q_norm.weight"),
    _P + "self_attention.k_layernorm.weight": _one(_L + "self_attn.k_norm.weight"),
    **_weight_and_bias(_P + "self_attention.linear_proj", _L + "self_attn.o_proj"),
    _P + "pre_mlp_layernorm.weight": _one(_L + "post_attention_layernorm.weight"),
    **_weight_and_bias(_P + "mlp.linear_fc1", [_L + "mlp.gate_proj", _L + "mlp.up_proj"],
                       GATE_UP, GATE_UP),
    **_weight_and_bias(_P + "mlp.linear_fc2", _L + "mlp.down_proj"),
    "decoder.final_layernorm.weight": _one("model.norm.weight"),
    OUTPUT: _one("lm_head.weight"),
}, ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))

_H = "transformer.h.{i}."

GPT2 = Architecture("gpt2", {
    EMBEDDING: _one("transformer.wte.weight"),
    "embedding.position_embeddings.weight": _one("transformer.wpe.weight"),
    **_weight_and_bias(_P + "input_layernorm", _H + "ln_1"),
    **_weight_and_bias(_P + "self_attention.linear_qkv", _H + "attn.c_attn",
                       CONV1D_PACKED_QKV, PACKED_QKV),
    **_weight_and_bias(_P + "self_attention.linear_proj", _H + "attn.c_proj", TRANSPOSE),
    **_weight_and_bias(_P + "pre_mlp_layernorm", _H + "ln_2"),
    **_weight_and_bias(_P + "mlp.linear_fc1", _H + "mlp.c_fc", TRANSPOSE),
    **_weight_and_bias(_P + "mlp.linear_fc2", _H + "mlp.c_proj", TRANSPOSE),
    **_weight_and_bias("decoder.final_layernorm", "transformer.ln_f"),
    OUTPUT: _one("lm_head.weight"),
}, ignored=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
    prefix_aliases=(("transformer.", ""),))

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": GPT2, "llama": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
}


def architecture(model_type: str) -> Architecture:
    """The table for a Hugging Face `model_type`."""
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"unsupported Hugging Face model_type {model_type!r}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def to_hf_state_dict(model, model_type: str) -> dict[str, torch.Tensor]:
    """A Paratron model's weights under Hugging Face names and layouts (one stage, TP=1).

    A tied output layer has no tensor of its own, so none is written for it, as in
    Hugging Face checkpoints with `tie_word_embeddings`.
    """
    arch, config = architecture(model_type), model.config
    offset = model.decoder.layer_offset
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for hf_name, part in arch.to_hf(name, tensor, config, offset).items():
            out[hf_name] = part.contiguous()
    return out
