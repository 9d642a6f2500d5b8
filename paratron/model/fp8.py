"""FP8 compute for the transformer layers' linear layers, through torchao.

With `--fp8-format`, every column-parallel, row-parallel and replicated (MLA) linear layer
inside the transformer layers multiplies in float8 as torchao's `Float8Linear` does: the
input and the weight are cast to e4m3 with a tensorwise scale (the largest magnitude
mapped to e4m3's largest value, divided by 2**--fp8-margin), multiplied by
`torch._scaled_mm`, and in the backward the output gradient is cast too (e5m2 with
`hybrid`, e4m3 with `e4m3`). Embeddings, the output layer, norms, the router and attention
itself keep the model dtype, as in Megatron. Weights, main weights, optimizer state and
checkpoints do not change: FP8 is compute only, so any checkpoint resumes with or without
it.

Scales do not depend on the layout. A tensorwise scale belongs to the whole logical tensor,
so its amax is reduced (max) over every group that splits that tensor: a TP-sharded
weight over TP, a sequence-parallel or TP-split activation over TP, a context-parallel
shard of the sequence over CP. A TP2 or CP2 FP8 run therefore casts exactly the values a
one-process FP8 run casts. `enable_fp8(model, config, pg)` switches the layers on after the
model is built, so the model code knows nothing of it (as torchao's module swap).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging

import torch
import torch.distributed as dist
from torch import nn

from paratron.options import ConfigError

FORMATS = ("e4m3", "hybrid")
RECIPES = ("tensorwise",)  # of Megatron's --fp8-recipe choices, those Paratron computes
INSTALL = "pip install 'paratron[fp8]' (torchao)"


def check_fp8(m) -> None:
    """Refuse what FP8 cannot run, in one line: no torchao, a recipe not implemented."""
    if m.fp8 is None:
        return
    if m.fp8_recipe not in RECIPES:
        raise ConfigError(f"--fp8-recipe {m.fp8_recipe} is not implemented in Paratron; "
                          f"use {' or '.join(RECIPES)} (dynamic scaling of each tensor)")
    if m.fp8_margin < 0:
        raise ConfigError(f"--fp8-margin must be 0 or more, got {m.fp8_margin}")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"--fp8-format needs torchao: {INSTALL}")


def _torchao():
    """torchao's float8 pieces (imported on first use; its optional CUDA kernels that do
    not load here are not errors for this use, so their warnings are silenced)."""
    for name in ("torchao", "torch.utils._pytree"):  # the latter: torchao's enum, once
        logging.getLogger(name).setLevel(logging.ERROR)
    from torchao.float8 import float8_linear, float8_training_tensor, float8_utils
    return float8_linear, float8_training_tensor, float8_utils


def _group_max(amax: torch.Tensor, groups: tuple) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


class _Float8Linear(torch.autograd.Function):
    """x W^T in float8 as torchao's `matmul_with_hp_or_float8_args` computes it (the same
    casts and GEMMs), with every amax reduced over its groups. One function for both
    directions, so no float8 tensor crosses an autograd boundary (torch.compile needs
    that); the scales are saved and the casts redone in the backward."""

    @staticmethod
    def forward(ctx, x, weight, matmul):
        x_scale, w_scale = matmul.scale(x, "input"), matmul.scale(weight, "weight")
        ctx.save_for_backward(x, weight, x_scale, w_scale)
        ctx.matmul = matmul
        x8 = matmul.cast(x.reshape(-1, x.shape[-1]), x_scale, "input")
        y = torch.mm(x8, matmul.cast(weight, w_scale, "weight").t())
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, x_scale, w_scale = ctx.saved_tensors
        matmul = ctx.matmul
        grad = grad.reshape(-1, grad.shape[-1])
        g8 = matmul.cast(grad, matmul.scale(grad, "grad"), "grad")
        grad_x = torch.mm(g8, matmul.cast(weight, w_scale, "weight"))
        grad_w = torch.mm(g8.t(), matmul.cast(x.reshape(-1, x.shape[-1]), x_scale, "input"))
        return grad_x.reshape(*x.shape[:-1], grad_x.shape[-1]), grad_w, None


@dataclasses.dataclass(frozen=True)
class Float8Matmul:
    """`F.linear` in float8 for one layer: its format, its margin, and the process groups
    that split its input, its weight and its output gradient."""

    fp8_format: str
    margin: int
    input_groups: tuple = ()
    weight_groups: tuple = ()
    grad_groups: tuple = ()

    def dtype(self, role: str) -> torch.dtype:
        if role == "grad":
            return _linear_config(self.fp8_format).cast_config_grad_output.target_dtype
        return torch.float8_e4m3fn

    @torch.no_grad()
    def scale(self, t: torch.Tensor, role: str) -> torch.Tensor:
        """torchao's tensorwise scale of `t`, from the amax over `role`'s groups."""
        _, _, utils = _torchao()
        amax = _group_max(utils.tensor_to_amax(t).float(), getattr(self, f"{role}_groups"))
        scale = utils.amax_to_scale(amax, self.dtype(role))
        return scale / 2.0 ** self.margin if self.margin else scale

    def cast(self, t: torch.Tensor, scale: torch.Tensor, role: str):
        _, tensor, _ = _torchao()
        gemm_role = {"input": tensor.GemmInputRole.INPUT, "weight": tensor.GemmInputRole.WEIGHT,
                     "grad": tensor.GemmInputRole.GRAD_OUTPUT}[role]
        return tensor.hp_tensor_and_scale_to_float8(
            t, scale, self.dtype(role), _mm_config(_linear_config(self.fp8_format)), gemm_role)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        y = _Float8Linear.apply(x, weight, self)
        return y if bias is None else y + bias.to(y.dtype)


@functools.cache
def _linear_config(fp8_format: str):
    """torchao's Float8LinearConfig for a Megatron --fp8-format (tensorwise, dynamic)."""
    from torchao.float8 import CastConfig, Float8LinearConfig
    grad = torch.float8_e5m2 if fp8_format == "hybrid" else torch.float8_e4m3fn
    return Float8LinearConfig(cast_config_grad_output=CastConfig(target_dtype=grad))


@functools.cache
def _mm_config(config):
    """The scaled-matmul settings torchao's Float8Linear derives from its config."""
    _, tensor, _ = _torchao()
    return tensor.LinearMMConfig(*(
        tensor.ScaledMMConfig(config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim)
        for gemm in (config.gemm_config_output, config.gemm_config_grad_input,
                     config.gemm_config_grad_weight)))


def fp8_layer_numbers(config) -> range | list[int]:
    """The (0-based) layers that compute in FP8: all, or all but the first and last ones
    --first-last-layers-bf16 keeps in the model dtype."""
    layers = range(config.num_layers)
    if not config.first_last_layers_bf16:
        return layers
    start, end = config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16
    return [n for n in layers if start <= n < config.num_layers - end]


def enable_fp8(layers: nn.ModuleList, config, pg) -> None:
    """Switch the linear layers of `layers` (TransformerLayers, numbered by their
    `layer_number`) to FP8 as the config says; each dimension an FP8 GEMM multiplies
    must be a multiple of 16, and a layer that is not is named."""
    from paratron.model.mla import ReplicatedLinear
    from paratron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if config.fp8 is None:
        return
    _torchao()  # imported here, never first inside a torch.compile trace
    tp = (pg.tp.group,) if pg.tp.size > 1 else ()
    cp = (pg.cp.group,) if pg.cp.size > 1 else ()
    sp_tp = tp if config.sequence_parallel else ()
    chosen = set(fp8_layer_numbers(config))
    for layer in layers:
        if layer.layer_number not in chosen:
            continue
        for name, module in layer.named_modules():
            if isinstance(module, ColumnParallelLinear):  # input whole over TP
                groups = dict(input_groups=cp, weight_groups=tp, grad_groups=tp + cp)
            elif isinstance(module, RowParallelLinear):  # input split over TP
                groups = dict(input_groups=tp + cp, weight_groups=tp, grad_groups=cp)
            elif isinstance(module, ReplicatedLinear):  # tokens split under SP
                groups = dict(input_groups=sp_tp + cp, weight_groups=(), grad_groups=sp_tp + cp)
            else:
                continue
            for size in module.weight.shape:
                if size % 16:
                    raise ConfigError(f"--fp8-format: decoder.layers.{layer.layer_number}."
                                      f"{name} multiplies a dimension of {size} per rank, "
                                      f"which FP8 GEMMs cannot take (a multiple of 16); "
                                      f"change the size or keep the layer in bf16")
            module.matmul = Float8Matmul(config.fp8, config.fp8_margin, **groups)
