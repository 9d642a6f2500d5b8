"""Hugging Face <-> Paratron tensor names and layouts: one table per architecture.

A table maps each Paratron parameter (its Megatron-Core name, `{i}` standing for the
layer) to the Hugging Face tensors it is made of and an invertible `Transform`, so one
table serves reading (`to_paratron`) and writing (`to_hf`), and a round trip tests both.
A table lists every parameter an architecture can have; the model built from the config
decides which it has, so tables need no conditions (Llama, Qwen2 and Qwen3 share one).

Routed experts come as per-expert tensors (`experts.{j}.gate_proj`, ..., `{j}` expanded
over `config.num_experts`: the Hub's files and `save_pretrained`) or fused
`experts.gate_up_proj` [E, 2I, h] / `experts.down_proj` [E, h, I] (transformers 5 in
memory); reading takes what the files hold, writing the per-expert layout unless asked.
Tensors here are whole; cutting them into TP shards reads each parameter's `ParamLayout`.
"""

from __future__ import annotations

import abc

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from paratron.convert.errors import ConversionError

Tensors = list[torch.Tensor]


class Transform(abc.ABC):
    """An invertible change of layout between Hugging Face and Paratron tensors.

    Both directions take and return lists so that transforms chain; a rule's chain
    turns its Hugging Face tensors into exactly one Paratron tensor. `config` is the
    TransformerConfig, which supplies head counts and sizes.
    """

    @abc.abstractmethod
    def to_paratron(self, tensors: Tensors, config) -> Tensors:
        """Hugging Face tensors -> the Paratron tensor (a one-element list)."""

    @abc.abstractmethod
    def to_hf(self, tensors: Tensors, config) -> Tensors:
        """The Paratron tensor -> the Hugging Face tensors."""


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
class PerExpert(Transform):
    """One tensor per expert (or `per_expert` of them, through `inner`) <-> the experts
    stacked along a leading dimension, as Paratron's [E, out, in] expert weights.

    The Hugging Face tensors come expert by expert: expert 0's `per_expert` tensors,
    then expert 1's, and so on."""

    inner: Transform
    per_expert: int = 1

    def to_paratron(self, tensors, config):
        n = self.per_expert
        if len(tensors) % n:
            raise ConversionError(f"{len(tensors)} expert tensors are not a multiple of {n}")
        experts = []
        for start in range(0, len(tensors), n):
            (one,) = self.inner.to_paratron(list(tensors[start:start + n]), config)
            experts.append(one)
        return [torch.stack(experts)]

    def to_hf(self, tensors, config):
        (stacked,) = tensors
        return [t for expert in stacked.unbind(0) for t in self.inner.to_hf([expert], config)]


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
EXPERTS_GATE_UP = PerExpert(GATE_UP, 2)
EXPERTS = PerExpert(IDENTITY)

PER_EXPERT, FUSED = "per_expert", "fused"
EXPERT_LAYOUTS = (PER_EXPERT, FUSED)


@dataclass(frozen=True)
class Rule:
    """The Hugging Face tensors (names with `{i}` for the layer and, for per-expert
    tensors, `{j}` for the expert) one Paratron tensor is made of.

    layout: the expert layout this rule belongs to, when a table lists several ways of
    storing the same tensor ("" when there is only one)."""

    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    layout: str = ""

    @property
    def per_expert(self) -> bool:
        return any("{j}" in h for h in self.hf)


def _one(hf_name: str) -> Rule:
    return Rule((hf_name,))


def _layouts(*rules: Rule) -> tuple[Rule, ...]:
    """Alternative ways of storing one tensor; the first is the one written by default."""
    return rules


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

    rules: Paratron name (layers as `{i}`) -> a Rule, or a tuple of Rules for tensors
    stored in more than one layout (read from whichever the files hold).
    ignored: patterns (full match) of stored tensors that are buffers, not weights.
    prefix_aliases: (prefix, alternative) pairs for older checkpoints that spell
    names differently (GPT-2 on the Hub has no `transformer.` prefix).
    """

    name: str
    rules: dict[str, Rule | tuple[Rule, ...]]
    ignored: tuple[str, ...] = ()
    prefix_aliases: tuple[tuple[str, str], ...] = ()

    def layouts(self, name: str) -> tuple[tuple[Rule, ...], int | None]:
        """The rules (one per stored layout) for a Paratron tensor name and its layer
        index (None outside layers)."""
        match = _LAYER.match(name)
        layer = int(match.group(1)) if match else None
        template = _LAYER.sub("decoder.layers.{i}.", name) if match else name
        if template not in self.rules:
            raise ConversionError(f"no Hugging Face {self.name} source for Paratron "
                                  f"tensor {name}")
        rules = self.rules[template]
        return (rules if isinstance(rules, tuple) else (rules,)), layer

    def maps(self, name: str) -> bool:
        """Whether the table has a rule for Paratron tensor `name`."""
        return _LAYER.sub("decoder.layers.{i}.", name) in self.rules

    def rule(self, name: str, layout: str | None = None) -> tuple[Rule, int | None]:
        """The rule for a Paratron tensor name (the one of `layout` where the table has
        several, else the default) and its layer index (None outside layers)."""
        rules, layer = self.layouts(name)
        if layout is not None and len(rules) > 1:
            if layout not in EXPERT_LAYOUTS:
                raise ConversionError(f"unknown expert layout {layout!r}; use "
                                      f"{' or '.join(EXPERT_LAYOUTS)}")
            return next((r for r in rules if r.layout == layout), rules[0]), layer
        return rules[0], layer

    @staticmethod
    def _names(rule: Rule, layer: int | None, layer_offset: int,
               num_experts: int | None) -> tuple[str, ...]:
        i = None if layer is None else layer + layer_offset
        if not rule.per_expert:
            return tuple(h.format(i=i) if i is not None else h for h in rule.hf)
        if not num_experts:
            raise ConversionError(f"per-expert tensors {rule.hf[0]} need the number of "
                                  f"experts")
        return tuple(h.format(i=i, j=j) for j in range(num_experts) for h in rule.hf)

    def hf_names(self, name: str, layer_offset: int = 0, config=None,
                 layout: str | None = None) -> tuple[str, ...]:
        """Hugging Face names of a Paratron tensor (in `layout` where several exist);
        `layer_offset` turns a pipeline stage's local layer index into the global one,
        `config` gives the number of experts of per-expert tensors."""
        rule, layer = self.rule(name, layout)
        return self._names(rule, layer, layer_offset, getattr(config, "num_experts", None))

    def candidates(self, name: str, config, layer_offset: int = 0
                   ) -> list[tuple[Rule, tuple[str, ...]]]:
        """Every stored layout of a Paratron tensor: (rule, Hugging Face names)."""
        rules, layer = self.layouts(name)
        experts = getattr(config, "num_experts", None)
        return [(r, self._names(r, layer, layer_offset, experts)) for r in rules]

    def spellings(self, hf_name: str) -> Iterator[str]:
        """The canonical name, then the alternative spellings older files may use."""
        yield hf_name
        for prefix, alternative in self.prefix_aliases:
            if hf_name.startswith(prefix):
                yield alternative + hf_name[len(prefix):]

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.ignored)

    def to_paratron(self, name: str, tensors: Tensors, config,
                    layout: str | None = None) -> torch.Tensor:
        """The Paratron tensor `name` from its Hugging Face tensors (in `hf_names` order)."""
        (out,) = self.rule(name, layout)[0].transform.to_paratron(list(tensors), config)
        return out

    def to_hf(self, name: str, tensor: torch.Tensor, config, layer_offset: int = 0,
              layout: str | None = None) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors, by name, that the Paratron tensor `name` becomes."""
        parts = self.rule(name, layout)[0].transform.to_hf([tensor], config)
        return dict(zip(self.hf_names(name, layer_offset, config, layout), parts,
                        strict=True))


_L = "model.layers.{i}."
_P = "decoder.layers.{i}."

# Pieces shared by Llama and its descendants, dense and MoE.
_LLAMA_ENDS = {
    EMBEDDING: _one("model.embed_tokens.weight"),
    _P + "input_layernorm.weight": _one(_L + "input_layernorm.weight"),
    _P + "pre_mlp_layernorm.weight": _one(_L + "post_attention_layernorm.weight"),
    "decoder.final_layernorm.weight": _one("model.norm.weight"),
    OUTPUT: _one("lm_head.weight"),
}
_LLAMA_ATTENTION = {
    **_weight_and_bias(_P + "self_attention.linear_qkv",
                       [_L + f"self_attn.{x}_proj" for x in "qkv"], QKV, QKV),
    _P + "self_attention.q_layernorm.weight": _one(_L + "self_attn.q_norm.weight"),
    _P + "self_attention.k_layernorm.weight": _one(_L + "self_attn.k_norm.weight"),
    **_weight_and_bias(_P + "self_attention.linear_proj", _L + "self_attn.o_proj"),
}


def _swiglu_mlp(paratron: str, hf: str) -> dict[str, Rule]:
    """A dense SwiGLU block: gate_proj and up_proj fused into linear_fc1."""
    return {**_weight_and_bias(paratron + "linear_fc1", [hf + "gate_proj", hf + "up_proj"],
                               GATE_UP, GATE_UP),
            **_weight_and_bias(paratron + "linear_fc2", hf + "down_proj")}


def _routed_experts(per_expert: str, fused: str, gate_up_down=("gate_proj", "up_proj",
                                                               "down_proj")
                    ) -> dict[str, tuple[Rule, ...]]:
    """The stacked expert weights, from per-expert tensors `{per_expert}{j}.<name>.weight`
    or the fused `{fused}gate_up_proj` [E, 2I, h] ([gate; up] per expert, as Paratron)
    and `{fused}down_proj` [E, h, I]."""
    gate, up, down = (f"{per_expert}{{j}}.{n}.weight" for n in gate_up_down)
    return {
        _P + "mlp.experts.linear_fc1.weight": _layouts(
            Rule((gate, up), EXPERTS_GATE_UP, PER_EXPERT),
            Rule((fused + "gate_up_proj",), IDENTITY, FUSED)),
        _P + "mlp.experts.linear_fc2.weight": _layouts(
            Rule((down,), EXPERTS, PER_EXPERT),
            Rule((fused + "down_proj",), IDENTITY, FUSED)),
    }


_LLAMA_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

LLAMA = Architecture("llama", {
    **_LLAMA_ENDS, **_LLAMA_ATTENTION, **_swiglu_mlp(_P + "mlp.", _L + "mlp."),
}, ignored=_LLAMA_IGNORED)

# Qwen3-MoE: Qwen3's attention (q/k norms); MoE layers hold the router `mlp.gate` and the
# experts, the layers in mlp_only_layers (or off decoder_sparse_step) a dense MLP.
QWEN3_MOE = Architecture("qwen3_moe", {
    **_LLAMA_ENDS, **_LLAMA_ATTENTION, **_swiglu_mlp(_P + "mlp.", _L + "mlp."),
    _P + "mlp.router.weight": _one(_L + "mlp.gate.weight"),
    **_routed_experts(_L + "mlp.experts.", _L + "mlp.experts."),
}, ignored=_LLAMA_IGNORED)

# Mixtral: Mistral's attention; every layer MoE. The checkpoints name the block
# `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down); transformers 5's fused
# layout renames the block `mlp`.
MIXTRAL = Architecture("mixtral", {
    **_LLAMA_ENDS, **_LLAMA_ATTENTION,
    _P + "mlp.router.weight": _layouts(
        Rule((_L + "block_sparse_moe.gate.weight",), IDENTITY, PER_EXPERT),
        Rule((_L + "mlp.gate.weight",), IDENTITY, FUSED)),
    **_routed_experts(_L + "block_sparse_moe.experts.", _L + "mlp.experts.",
                      ("w1", "w3", "w2")),
}, ignored=_LLAMA_IGNORED)

# DeepSeek-V2: multi-latent attention, whose tensors keep their Hugging Face names
# (q_proj or q_a_proj / q_a_layernorm / q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
# kv_b_proj, o_proj: same row layouts as Paratron's); the first first_k_dense_replace
# layers dense, the others MoE with always-on shared experts (all fused into one MLP).
_A = _P + "self_attention."
_S = _L + "self_attn."
DEEPSEEK_V2 = Architecture("deepseek_v2", {
    **_LLAMA_ENDS,
    _A + "linear_q_proj.weight": _one(_S + "q_proj.weight"),
    _A + "linear_q_down_proj.weight": _one(_S + "q_a_proj.weight"),
    _A + "q_layernorm.weight": _one(_S + "q_a_layernorm.weight"),
    _A + "linear_q_up_proj.weight": _one(_S + "q_b_proj.weight"),
    _A + "linear_kv_down_proj.weight": _one(_S + "kv_a_proj_with_mqa.weight"),
    _A + "kv_layernorm.weight": _one(_S + "kv_a_layernorm.weight"),
    _A + "linear_kv_up_proj.weight": _one(_S + "kv_b_proj.weight"),
    _A + "linear_proj.weight": _one(_S + "o_proj.weight"),
    **_swiglu_mlp(_P + "mlp.", _L + "mlp."),
    _P + "mlp.router.weight": _one(_L + "mlp.gate.weight"),
    **_routed_experts(_L + "mlp.experts.", _L + "mlp.experts."),
    **_swiglu_mlp(_P + "mlp.shared_experts.", _L + "mlp.shared_experts."),
}, ignored=_LLAMA_IGNORED)

# DeepSeek-V3 (and Kimi-K2, Moonlight): V2's tensors plus the router's aux-loss-free
# bias, a buffer that transformers keeps in fp32. The multi-token prediction layers,
# stored as layer num_hidden_layers, are added by their own rules.


# ------------------------------------------------------------------ multi-token prediction
# DeepSeek-V3 stores MTP module k (0-based) as decoder layer num_hidden_layers + k
# (`num_nextn_predict_layers` of them), which `transformers` does not build: the layer's
# attention and MLP under the decoder layers' names, plus `enorm`, `hnorm`, `eh_proj`,
# `shared_head.norm` (the module's final norm), and copies of the shared embedding
# (`embed_tokens`) and output head (`shared_head.head`). Paratron holds the module as
# Megatron-Core does, `mtp.layers.{k}.` with its transformer layer under
# `mtp_model_layer.`, and shares the embedding and output layer with the main model: the
# copies are checked equal on reading and written back on writing.
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.")
_INNER = "mtp_model_layer."
# The module's own tensors: Paratron name after `mtp.layers.{k}.` -> Hugging Face name
# after `model.layers.{num_hidden_layers + k}.`.
MTP_TENSORS = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
}
# The shared tensors each module's layer stores a copy of.
SHARED_COPIES = {EMBEDDING: "embed_tokens.weight", OUTPUT: "shared_head.head.weight"}


class MTPArchitecture(Architecture):
    """A table whose decoder-layer rules also serve the MTP modules' transformer layers,
    with the modules' own tensors and the copies of the shared ones."""

    def layouts(self, name: str) -> tuple[tuple[Rule, ...], int | None]:
        match = _MTP.match(name)
        if match is None:
            return super().layouts(name)
        rest = name[match.end():]
        if rest.startswith(_INNER):
            return super().layouts(f"decoder.layers.{match.group(1)}.{rest[len(_INNER):]}")
        if rest not in MTP_TENSORS:
            raise ConversionError(f"no Hugging Face {self.name} source for Paratron "
                                  f"tensor {name}")
        return (Rule((f"model.layers.{{i}}.{MTP_TENSORS[rest]}",)),), int(match.group(1))

    def maps(self, name: str) -> bool:
        if _MTP.match(name) is None:
            return super().maps(name)
        try:
            self.layouts(name)
        except ConversionError:
            return False
        return True

    @staticmethod
    def _copies(name: str, config) -> tuple[str, ...]:
        depth = getattr(config, "mtp_num_layers", None) or 0
        if name not in SHARED_COPIES or not depth:
            return ()
        return tuple(f"model.layers.{config.num_layers + k}.{SHARED_COPIES[name]}"
                     for k in range(depth))

    @staticmethod
    def _offset(name: str, layer_offset: int, config) -> int:
        """MTP module k is Hugging Face layer num_hidden_layers + k on every stage."""
        return config.num_layers if _MTP.match(name) else layer_offset

    def hf_names(self, name: str, layer_offset: int = 0, config=None,
                 layout: str | None = None) -> tuple[str, ...]:
        names = super().hf_names(name, self._offset(name, layer_offset, config), config,
                                 layout)
        return names + self._copies(name, config)

    def candidates(self, name: str, config, layer_offset: int = 0
                   ) -> list[tuple[Rule, tuple[str, ...]]]:
        copies = self._copies(name, config)
        return [(rule, names + copies) for rule, names in
                super().candidates(name, config, self._offset(name, layer_offset, config))]

    def to_paratron(self, name: str, tensors, config, layout: str | None = None
                    ) -> torch.Tensor:
        copies = self._copies(name, config)
        if copies:
            tensors = list(tensors)
            own = tensors[:len(tensors) - len(copies)]
            for copy, tensor in zip(copies, tensors[len(own):]):
                if not torch.equal(tensor, own[0]):
                    raise ConversionError(f"{copy} differs from {self.hf_names(name)[0]}: "
                                          f"multi-token prediction shares that tensor")
            tensors = own
        return super().to_paratron(name, tensors, config, layout)

    def to_hf(self, name: str, tensor: torch.Tensor, config, layer_offset: int = 0,
              layout: str | None = None) -> dict[str, torch.Tensor]:
        rule = self.rule(name, layout)[0]
        parts = rule.transform.to_hf([tensor], config)
        # Copies of their own: safetensors stores no tensors that share memory.
        parts += [parts[0].clone() for _ in self._copies(name, config)]
        return dict(zip(self.hf_names(name, layer_offset, config, layout), parts,
                        strict=True))


DEEPSEEK_V3 = MTPArchitecture("deepseek_v3", {
    **DEEPSEEK_V2.rules,
    _P + "mlp.router.expert_bias": _one(_L + "mlp.gate.e_score_correction_bias"),
}, ignored=_LLAMA_IGNORED)

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
    "mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE, "deepseek_v2": DEEPSEEK_V2,
    "deepseek_v3": DEEPSEEK_V3, "kimi_k2": DEEPSEEK_V3,
}


def architecture(model_type: str) -> Architecture:
    """The table for a Hugging Face `model_type`."""
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"unsupported Hugging Face model_type {model_type!r}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def to_hf_state_dict(model, model_type: str, expert_layout: str = PER_EXPERT
                     ) -> dict[str, torch.Tensor]:
    """A Paratron model's weights under Hugging Face names and layouts (one stage, TP=1,
    EP=1).

    A tied output layer has no tensor of its own, so none is written for it, as in
    Hugging Face checkpoints with `tie_word_embeddings`. Routed experts are written one
    tensor per expert ("per_expert", as on the Hub and as `save_pretrained` writes), or
    as transformers 5's fused `gate_up_proj` / `down_proj` ("fused").
    """
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConversionError(f"unknown expert layout {expert_layout!r}; use "
                              f"{' or '.join(EXPERT_LAYOUTS)}")
    arch, config = architecture(model_type), model.config
    offset = model.decoder.layer_offset
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for hf_name, part in arch.to_hf(name, tensor, config, offset,
                                        expert_layout).items():
            out[hf_name] = part.contiguous()
    return out
