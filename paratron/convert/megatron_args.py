"""Megatron-LM's saved argparse Namespace as a Paratron TransformerConfig.

Both checkpoint formats carry the run's `args` (the legacy files in each
`model_optim_rng.pt`, torch_dist folders in `common.pt`). Their names are the flag
destinations Paratron's config uses too, so most fields copy across; this module holds
the few places where Megatron stores a flag under another name, or where a flag changes
the function the weights compute in a way Paratron must follow or refuse.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from paratron.convert.errors import ConversionError
from paratron.convert.hf_config import _layer_pattern, transformer_config
from paratron.model.config import TransformerConfig

# Megatron arguments Paratron cannot represent: (name, the value Paratron computes, the
# flag). Since Megatron-Core 0.16 --apply-layernorm-1p is stored under its
# TransformerConfig name, before as apply_layernorm_1p.
_UNSUPPORTED_ARGS = (("apply_layernorm_1p", False, "--apply-layernorm-1p"),
                     ("layernorm_zero_centered_gamma", False, "--apply-layernorm-1p"),
                     ("apply_residual_connection_post_layernorm", False,
                      "--apply-residual-connection-post-layernorm"),
                     ("fp32_residual_connection", False, "--fp32-residual-connection"))
# Where Megatron stored --norm-epsilon, first found first: its TransformerConfig name
# (Megatron-Core 0.16 on, and early Megatron-LM's --layernorm-epsilon), else norm_epsilon.
_EPSILON_NAMES = ("layernorm_epsilon", "norm_epsilon")
# TransformerConfig fields not taken from args as they are: those that describe training,
# not the weights' model; norm_epsilon (see _EPSILON_NAMES); and --openai-gelu, which
# Megatron-Core models ignore (their GeLU is tanh-approximated by the fused bias-GeLU
# kernel, bias_gelu_fusion, or else exact).
_NOT_FROM_ARGS = {"sequence_parallel", "cp_comm_type", "use_rotary_position_embeddings",
                  "recompute_activations", "recompute_granularity", "recompute_method",
                  "recompute_num_layers", "recompute_modules", "vocab_size",
                  "make_vocab_size_divisible_by", "extra_vocab_size", "openai_gelu",
                  "norm_epsilon"}


def config_from_args(args, path: Path) -> TransformerConfig:
    """The model's TransformerConfig from Megatron's saved `args`; `path` names the file
    they came from in the one-line error a bad or unsupported Namespace gives."""
    for name, supported, flag in _UNSUPPORTED_ARGS:
        if getattr(args, name, supported) != supported:
            raise ConversionError(f"{path}: the run used {flag}, which Paratron does not "
                                  f"support")
    fields = {}
    for f in dataclasses.fields(TransformerConfig):
        if f.name in _NOT_FROM_ARGS or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and f.default is not None and not callable(f.default):
            continue
        fields[f.name] = value
    epsilon = next((getattr(args, n) for n in _EPSILON_NAMES
                    if getattr(args, n, None) is not None), None)
    if epsilon is not None:
        fields["norm_epsilon"] = epsilon
    if fields.get("multi_latent_attention") and not fields.get("qk_layernorm"):
        fields["mla_latent_layernorm"] = False  # Megatron's latent norms are identities
    freq = fields.get("moe_layer_freq")
    if isinstance(freq, (list, tuple)):
        fields["moe_layer_freq"] = _layer_pattern([bool(x) for x in freq])
    elif freq is not None:
        fields["moe_layer_freq"] = str(freq)
    if not getattr(args, "padded_vocab_size", None):
        raise ConversionError(f"{path}: args lack padded_vocab_size")
    fields["padded_vocab_size"] = args.padded_vocab_size
    try:
        return transformer_config(fields)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"{path}: the saved args describe no model Paratron builds "
                              f"({exc})") from None
