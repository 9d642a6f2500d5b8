"""FP8 compute for the transformer layers' linear layers, through torchao.

With `--fp8-format`, every column-parallel, row-parallel and replicated (MLA) linear layer
inside the transformer layers multiplies in float8 as torchao's `Float8Linear` does: the
input and the weight are cast to e4m3 with a tensorwise scale (the largest magnitude
mapped to e4m3's largest value, divided by 2**--fp8-margin), multiplied by
`torch._scaled_mm`, and in the backward the output gradient is cast too (e5m2 with
`hybrid`, e4m3 with `e4m3`); `--fp8-recipe rowwise` takes torchao's row-wise recipe
instead (one power-of-2 scale per row of each operand).

Routed experts multiply in FP8 too, with torchao's `rowwise_with_gw_hp` recipe: one scale
per token row (the rows that meet at an expert come from several micro-batches under
expert parallelism, and must not share a scale) and the weight gradient in the model
dtype. Where torch has a grouped GEMM for the device they go through one per direction
(`Float8Matmul.grouped`), bit for bit the per-expert loop. Embeddings, the output layer,
norms, the router and attention itself keep the model dtype, as in Megatron. Weights,
main weights, optimizer state and checkpoints do not change: FP8 is compute only, so any
checkpoint resumes with or without it.

Scales do not depend on the layout. A tensorwise scale belongs to the whole logical tensor,
so its amax is reduced (max) over every group that splits that tensor: a TP-sharded
weight over TP, a sequence-parallel or TP-split activation over TP, a context-parallel
shard of the sequence over CP. A TP2 or CP2 FP8 run therefore casts exactly the values a
one-process FP8 run casts, up to the last bits of values that TP and CP sum in another
order; one that lies on a rounding midpoint rounds the other way. Under --fp64 those sums
agree to ~1e-16 (the float8 products are summed in fp64 too), and every layout trains
bit for bit like one process. `enable_fp8(layers, config, pg)` switches the layers on
after the model is built, so the model code knows nothing of it (as torchao's module
swap); a multi-token-prediction depth's transformer layer counts as the last layer.
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

RECIPES = ("tensorwise", "rowwise")  # the --fp8-recipe choices Paratron computes
INSTALL = "pip install 'paratron[fp8]' (torchao)"


def check_fp8(m) -> None:
    """Refuse what FP8 cannot run, in one line: no torchao, a recipe not implemented."""
    if m.fp8 is None:
        return
    if m.fp8_recipe not in RECIPES:
        raise ConfigError(f"--fp8-recipe {m.fp8_recipe} is not implemented in Paratron; "
                          f"use tensorwise (one dynamic scale per tensor) or rowwise (one "
                          f"per row)")
    if m.fp8_margin < 0:
        raise ConfigError(f"--fp8-margin must be 0 or more, got {m.fp8_margin}")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"--fp8-format needs torchao: {INSTALL}")


def _import_torchao() -> None:
    """Import torchao outside any torch.compile trace, where `_torchao` then only looks
    it up. Three harmless warnings are silenced: torchao's optional CUDA kernels that do
    not load here, torch's note on torchao's enum, and inductor's compile cache, which
    cannot hash torchao's float8 tensors (it compiles uncached)."""
    for name in ("torchao", "torch.utils._pytree", "torch._inductor.codecache"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _torchao()


def _torchao():
    """torchao's float8 pieces (imported by `_import_torchao`)."""
    from torchao.float8 import float8_linear, float8_training_tensor, float8_utils
    return float8_linear, float8_training_tensor, float8_utils


def _group_max(amax: torch.Tensor, groups: tuple) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


class _Float8Linear(torch.autograd.Function):
    """x W^T in float8 as torchao's `matmul_with_hp_or_float8_args` computes it (the same
    casts and GEMMs for the same config), with every amax reduced over its groups. One
    function for both directions, so no float8 tensor crosses an autograd boundary
    (torch.compile needs that); the backward casts again from the saved inputs, which
    for a tensorwise scale gives the forward's values."""

    @staticmethod
    def forward(ctx, x, weight, matmul):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.matmul, ctx.shape = matmul, x.shape
        y = _mm(matmul.cast(x2, "input"), matmul.cast(weight.t(), "weight"))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        matmul = ctx.matmul
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = _mm(matmul.cast(g2, "grad"), matmul.cast(weight.t(), "weight_gi").t())
        grad_w = _mm(matmul.cast(g2, "grad_gw").t(), matmul.cast(x2, "input_gw"))
        return grad_x.reshape(ctx.shape), grad_w.to(weight.dtype), None


class _Float8GroupedMM(torch.autograd.Function):
    """rows [R, K] times the weight [E, N, K] of the expert whose rows they are (the first
    offsets[0] rows expert 0's, ...), in float8 as the per-expert loop multiplies them,
    with one grouped GEMM per direction and no host sync. The weight gradient stays in
    the model dtype (the experts' recipe)."""

    @staticmethod
    def forward(ctx, rows, weight, offsets, matmul):
        ctx.save_for_backward(rows, weight, offsets)
        ctx.matmul = matmul
        wt = weight.transpose(1, 2)
        return _grouped_product(matmul.cast_values(rows, "input"),
                                matmul.cast_values(wt, "weight"), offsets, rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        from paratron.model.moe import grouped_mm_fn
        rows, weight, offsets = ctx.saved_tensors
        matmul = ctx.matmul
        bits, scale = matmul.cast_values(weight.transpose(1, 2), "weight_gi")
        grad_rows = _grouped_product(matmul.cast_values(grad, "grad"),
                                     (bits.transpose(1, 2), scale.transpose(1, 2)), offsets,
                                     grad.dtype)
        grad_w = grouped_mm_fn()(grad.t(), rows, offs=offsets)
        return grad_rows, grad_w.to(weight.dtype), None, None


def _grouped_product(a, b, offsets, dtype) -> torch.Tensor:
    """a [R, K] times b [E, K, N] by the groups of rows `offsets` bounds, both given as
    (float8 values, scale): the values, exact in `dtype`, go through one grouped GEMM,
    and the product is divided by the row's and the expert column's scales (powers of 2:
    exactly, as a scaled GEMM does). Rows past the last offset belong to no expert."""
    from paratron.model.moe import grouped_mm_fn
    (qa, sa), (qb, sb) = a, b
    y = grouped_mm_fn()(qa.to(dtype), qb.to(dtype), offs=offsets)
    row = torch.arange(qa.shape[0], device=qa.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets, row, right=True).clamp_(max=qb.shape[0] - 1)
    return (y.float() / (sa * sb[:, 0][expert])).to(dtype)


def _mm(a, b) -> torch.Tensor:
    """The product of two casts: torchao's scaled matmul, or for an fp64 model (--fp64)
    the float8 values multiplied in fp64, whose sums split over ranks agree with whole
    ones to ~1e-16 (torchao's emulation would sum in fp32, and round each rank's part)."""
    if a.dtype != torch.float64:
        return torch.mm(a, b)
    _, tensor, _ = _torchao()

    def fp64(t):
        if isinstance(t, tensor.Float8TrainingTensor):
            return t._data.double() / t._scale.double()
        return t
    return torch.mm(fp64(a), fp64(b))


# Each cast of torchao's linear: the tensor it casts (x [T, K], w^T [K, N] or the output
# gradient g [T, N]), the axis a row-wise scale runs along, and its config's name.
_CASTS = {"input": ("x", -1, "cast_config_input"),
          "weight": ("wt", 0, "cast_config_weight"),
          "grad": ("g", -1, "cast_config_grad_output"),
          "weight_gi": ("wt", -1, "cast_config_weight_for_grad_input"),
          "grad_gw": ("g", 0, "cast_config_grad_output_for_grad_weight"),
          "input_gw": ("x", 0, "cast_config_input_for_grad_weight")}
# The dimensions (tokens T, contraction K, output N) of each tensor, in order.
_DIMS = {"x": "TK", "wt": "KN", "g": "TN"}


@dataclasses.dataclass(frozen=True)
class Float8Matmul:
    """`F.linear` in float8 for one layer: its format, margin and recipe (torchao's
    `tensorwise` or `rowwise`, and `rowwise_with_gw_hp` for routed experts), and the process groups
    that split its tokens, its contraction (input) dimension and its output dimension.
    `token_groups` None: the tokens come from several micro-batches (routed experts), so
    no scale may span them; the recipe never asks for one."""

    fp8_format: str
    margin: int
    token_groups: tuple | None = ()
    in_groups: tuple = ()
    out_groups: tuple = ()
    recipe: str = "tensorwise"
    wgrad: bool = True  # False: the weight gradient in the model dtype (--no-fp8-wgrad)
    config: object = dataclasses.field(init=False, repr=False, compare=False)
    mm_configs: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):  # made here, outside any torch.compile trace
        _import_torchao()
        config = torchao_config(self.fp8_format, self.recipe, self.wgrad)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "mm_configs", {
            emulate: _mm_config(dataclasses.replace(config, emulate=emulate))
            for emulate in (False, True)})

    def mm_config(self, dtype: torch.dtype):
        """torch._scaled_mm gives row-wise scaled products in bf16 only, so an fp32 model
        (the CPU checks) multiplies row-wise float8 values in fp32 (torchao's emulation:
        the same float8 values, no bf16 rounding of partial sums split over ranks)."""
        return self.mm_configs[self.recipe != "tensorwise" and dtype == torch.float32]

    def groups(self, role: str, rowwise: bool) -> tuple:
        """The groups an amax of `role` is reduced over: those splitting the dimensions
        it spans (all of its tensor's, or the one axis of a row-wise scale)."""
        tensor, axis, _ = _CASTS[role]
        dims = _DIMS[tensor][axis] if rowwise else _DIMS[tensor]
        by_dim = {"T": self.token_groups, "K": self.in_groups, "N": self.out_groups}
        if any(by_dim[d] is None for d in dims):
            raise ValueError(f"FP8 {role} scale would span tokens of several micro-batches")
        return tuple(g for d in dims for g in by_dim[d])

    @torch.no_grad()
    def _scale(self, t: torch.Tensor, role: str, cast, dims) -> torch.Tensor:
        """The scale of `t` for `role`, over the given dims (None: all of them)."""
        _, _, utils = _torchao()
        rowwise = cast.scaling_granularity.value == "axiswise"
        amax = t.abs().max() if dims is None else torch.amax(t.abs(), dim=dims, keepdim=True)
        amax = _group_max(amax.float(), self.groups(role, rowwise))
        scale = utils.amax_to_scale(amax, cast.target_dtype,
                                    self.config.round_scales_to_power_of_2)
        return scale / 2.0 ** self.margin if self.margin else scale

    def cast(self, t: torch.Tensor, role: str):
        """`t` in float8 for `role` (as is when the recipe keeps that operand precise)."""
        _, tensor, _ = _torchao()
        _, axis, name = _CASTS[role]
        cast = getattr(self.config, name)
        if cast.scaling_type.value == "disabled":
            return t
        rowwise = cast.scaling_granularity.value == "axiswise"
        axis = axis if rowwise else None
        gemm_role = {"x": tensor.GemmInputRole.INPUT, "wt": tensor.GemmInputRole.WEIGHT,
                     "g": tensor.GemmInputRole.GRAD_OUTPUT}[_CASTS[role][0]]
        return tensor.hp_tensor_and_scale_to_float8(
            t, self._scale(t, role, cast, axis), cast.target_dtype, self.mm_config(t.dtype),
            gemm_role, axis)

    @torch.no_grad()
    def cast_values(self, t: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`t` (a matrix, or a stack [E, ...] of one per expert, each scaled on its own)
        in float8 for `role`, as `cast` does: its float8 values and their scale."""
        _, _, utils = _torchao()
        _, axis, name = _CASTS[role]
        cast = getattr(self.config, name)
        if cast.scaling_granularity.value == "axiswise":
            dims = axis if axis < 0 else axis - 2  # the matrix's axis, from the end
        else:
            dims = (-2, -1) if t.dim() > 2 else None
        scale = self._scale(t, role, cast, dims)
        return utils.to_fp8_saturated(t.float() * scale, cast.target_dtype), scale

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        y = _Float8Linear.apply(x, weight, self)
        return y if bias is None else y + bias.to(y.dtype)

    def grouped(self, rows: torch.Tensor, weight: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
        """Each expert's rows times its weight [E, N, K]^T in one grouped GEMM (the
        experts' recipe only: it keeps the weight gradient in the model dtype)."""
        if getattr(self.config, _CASTS["grad_gw"][2]).scaling_type.value != "disabled":
            raise ValueError(f"a grouped FP8 GEMM needs a recipe with a precise weight "
                             f"gradient, not {self.recipe}")
        return _Float8GroupedMM.apply(rows, weight, offsets, self)


@functools.cache
def torchao_config(fp8_format: str, recipe: str = "tensorwise", wgrad: bool = True):
    """torchao's Float8LinearConfig for a Megatron --fp8-format and a torchao recipe:
    e4m3 everywhere, or e5m2 output gradients with `hybrid`; without `wgrad` the weight
    gradient's operands are not cast."""
    from torchao.float8 import Float8LinearConfig, ScalingType
    config = Float8LinearConfig.from_recipe_name(recipe)
    grad = torch.float8_e5m2 if fp8_format == "hybrid" else torch.float8_e4m3fn
    casts = {name: dataclasses.replace(getattr(config, name), target_dtype=grad)
             for name in ("cast_config_grad_output", "cast_config_grad_output_for_grad_weight")}
    if not wgrad:
        for name in ("cast_config_grad_output_for_grad_weight",
                     "cast_config_input_for_grad_weight"):
            casts[name] = dataclasses.replace(casts.get(name, getattr(config, name)),
                                              scaling_type=ScalingType.DISABLED)
    return dataclasses.replace(config, **casts)


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


def enable_fp8(layers: list[tuple[str, nn.Module]], config, pg) -> None:
    """Switch the linear layers of `layers` ((name, TransformerLayer) pairs, each layer
    chosen by its `layer_number`) to FP8 as the config says; each dimension an FP8 GEMM
    multiplies must be a multiple of 16, and a layer that is not is named."""
    from paratron.model.mla import ReplicatedLinear
    from paratron.model.moe import Experts
    from paratron.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if config.fp8 is None:
        return
    _import_torchao()
    tp = (pg.tp.group,) if pg.tp.size > 1 else ()
    cp = (pg.cp.group,) if pg.cp.size > 1 else ()
    etp = (pg.etp.group,) if pg.etp.size > 1 else ()
    sp_tp = tp if config.sequence_parallel else ()
    fp8 = functools.partial(Float8Matmul, config.fp8, config.fp8_margin)
    dense = functools.partial(fp8, recipe=config.fp8_recipe, wgrad=config.fp8_wgrad)
    chosen = set(fp8_layer_numbers(config))
    for prefix, layer in layers:
        if layer.layer_number not in chosen:
            continue
        for name, module in layer.named_modules():
            where = f"{prefix}.{name}"
            if isinstance(module, ColumnParallelLinear):  # output split over TP
                _check_sizes(where, module.weight.shape)
                module.matmul = dense(token_groups=cp, out_groups=tp)
            elif isinstance(module, RowParallelLinear):  # input split over TP
                _check_sizes(where, module.weight.shape)
                module.matmul = dense(token_groups=cp, in_groups=tp)
            elif isinstance(module, ReplicatedLinear):  # tokens split under SP
                _check_sizes(where, module.weight.shape)
                module.matmul = dense(token_groups=sp_tp + cp)
            elif isinstance(module, Experts):
                # Rows of several micro-batches (EP): one scale per row, never across
                # them, and the weight gradient in the model dtype (torchao's recipe).
                _check_sizes(where, module.linear_fc1.weight.shape[1:])
                _check_sizes(where, module.linear_fc2.weight.shape[1:])
                rowwise = functools.partial(fp8, token_groups=None, recipe="rowwise_with_gw_hp")
                module.matmul_fc1 = rowwise(out_groups=etp)
                module.matmul_fc2 = rowwise(in_groups=etp)


def _check_sizes(where: str, shape) -> None:
    for size in shape:
        if size % 16:
            raise ConfigError(f"--fp8-format: {where} multiplies a dimension of {size} per "
                              f"rank, which FP8 GEMMs cannot take (a multiple of 16); change "
                              f"the size or keep the layer in bf16")
