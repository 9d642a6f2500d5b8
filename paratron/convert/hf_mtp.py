"""Multi-token prediction layers in Hugging Face DeepSeek-V3 checkpoints.

DeepSeek-V3 stores MTP module k (0-based) as decoder layer num_hidden_layers + k
(`num_nextn_predict_layers` of them), which `transformers` does not build: the layer's
attention and MLP under the decoder layers' names, plus `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm` (the module's final norm), and copies of the shared embedding
(`embed_tokens`) and output head (`shared_head.head`). Paratron holds the module as
Megatron-Core does, `mtp.layers.{k}.` with its transformer layer under
`mtp_model_layer.`, and shares the embedding and output layer with the main model: the
copies are checked equal on reading and written back on writing.
"""

from __future__ import annotations

import re

import torch

from paratron.convert import hf_mapping
from paratron.convert.errors import ConversionError
from paratron.convert.hf_mapping import DEEPSEEK_V3, EMBEDDING, OUTPUT, Architecture, Rule

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


def mtp_fields(hf: dict) -> dict:
    """The TransformerConfig fields of a config.json's MTP layers (none without them)."""
    depth = hf.get("num_nextn_predict_layers") or 0
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConversionError(f"config.json ({hf.get('model_type')}): "
                              f"num_nextn_predict_layers {depth!r} must be a whole number")
    return {"mtp_num_layers": depth} if depth else {}


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


def architecture(model_type: str) -> Architecture:
    """The table for a Hugging Face `model_type`; DeepSeek-V3's (and Kimi-K2's) also
    reads and writes the MTP layers of a model that has them."""
    arch = hf_mapping.architecture(model_type)
    if arch is not DEEPSEEK_V3:
        return arch
    return MTPArchitecture(arch.name, arch.rules, arch.ignored, arch.prefix_aliases)
