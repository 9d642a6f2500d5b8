"""Megatron-LM's distributed-optimizer state as Paratron optimizer tensors.

Megatron's DistributedOptimizer keeps no per-parameter state on disk: each tensor- and
pipeline-parallel rank (`dp_group_idx_<model-parallel rank>`) has one flat buffer per
bucket, for the fp32 main weights (`param`) and each Adam moment, laid out as its
`_ParamAndGradBuffer` lays out gradients: the rank's parameters in reverse registration
order, each starting at a multiple of 64 elements, a new bucket when one reaches the
bucket size (only with --overlap-grad-reduce) and the tied embedding in a bucket of its own
under pipeline parallelism. `torch_dist` stores each bucket as a global tensor
(`...bucket_idx_B.exp_avg`, sharding `dp_reshardable`, Megatron's default); the legacy
format stores the buckets of a rank back to back in `mp_rank_*/distrib_optim.pt`.

This module rebuilds that layout from the saved args, checks it against the sizes Megatron
recorded, cuts every parameter's state out of the buffers and puts the TP shards together
as the model importer does. A wrong layout cannot pass silently: every rebuilt main weight,
cast to the model's dtype, must equal the stored model weight bit for bit, or the
conversion stops with nothing written. What Paratron
cannot carry (MoE or MLA parameters, virtual pipeline stages, another sharding type or
optimizer) is named in a note and the conversion keeps the weights only.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import torch

from paratron.checkpoint.safe_pickle import load_torch
from paratron.checkpoint.untrusted import UntrustedFileError
from paratron.convert.errors import ConversionError
from paratron.convert.hf_mapping import OUTPUT
from paratron.convert.megatron_legacy import FILE, load_required, rank_folder
from paratron.convert.streaming import ModelLayout, StreamedModel, model_layout
from paratron.parallel.pipeline import model_chunks
from paratron.parallel.sharding import gather_tensor, shard_tensor
from paratron.model.config import TransformerConfig

DISTRIB_OPTIM = "distrib_optim.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")
EMBEDDING = "embedding.word_embeddings.weight"
_ALIGN = 64  # Megatron starts every parameter at a multiple of 64 elements
_BUCKET_KEY = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\."
                         r"dtype_\((torch\.\w+), (torch\.\w+)\)\.bucket_idx_(\d+)\.(\w+)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# Registration order of a transformer layer's modules, as `parameters()` yields them. The
# local spec has its own norm modules; Transformer Engine's fuses each norm into the
# linear layer after it (the norm's weights come first there).
_LOCAL_ORDER = ("input_layernorm", "self_attention.linear_proj", "self_attention.linear_qkv",
                "self_attention.q_layernorm", "self_attention.k_layernorm",
                "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2")
_TE_ORDER = ("self_attention.linear_proj", "input_layernorm", "self_attention.linear_qkv",
             "self_attention.q_layernorm", "self_attention.k_layernorm",
             "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2")
_TOP_ORDER = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
              "decoder.layers.", "decoder.final_layernorm.weight",
              "decoder.final_layernorm.bias", OUTPUT)


class NotCarried(Exception):
    """Why a checkpoint's optimizer state cannot travel (the weights still can)."""


@dataclasses.dataclass
class OptimizerCarry:
    """A Megatron run's optimizer and progress, ready for a Paratron checkpoint.

    `tensors(names, weights)` gives the optimizer tensors of one layer group
    (`optim/main/<name>`, `optim/exp_avg/<name>`, `optim/exp_avg_sq/<name>`), after
    checking the main weights against `weights`, that group's model tensors as stored."""

    iteration: int
    train_state: dict
    optimizer: dict              # metadata.json's "optimizer" entry
    settings: dict[str, dict]    # run-config sections to record: {"optimizer": {...}, ...}
    tensors: Callable[[list[str], dict], dict]


# ------------------------------------------------------------------ parameter layout
def _order_key(name: str, te: bool) -> tuple:
    """Where `name` (a Paratron name) comes in Megatron's `parameters()`."""
    match = _LAYER.match(name)
    if match:
        layer, module, kind = match.groups()
        order = _TE_ORDER if te else _LOCAL_ORDER
        if module not in order:
            raise NotCarried(f"the optimizer state of {module} parameters is not carried "
                             f"(MoE and multi-latent attention layers)")
        return (_TOP_ORDER.index("decoder.layers."), int(layer), order.index(module),
                kind == "bias")
    if name not in _TOP_ORDER:
        raise NotCarried(f"the optimizer state of {name} is not carried")
    return (_TOP_ORDER.index(name),)


def stage_parameters(layout: ModelLayout, config: TransformerConfig, pp: int, stage: int,
                     args) -> list[str]:
    """The Paratron names of one pipeline stage's parameters in Megatron's order (a tied
    output layer on the last stage of several appears as `output_layer.weight`)."""
    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    layers = model_chunks(config.num_layers, pp, stage, 1, first=first, last=last)[0].layers
    names = []
    for name in layout.params:
        match = _LAYER.match(name)
        if match:
            if int(match.group(1)) in layers:
                names.append(name)
        elif name.startswith("embedding."):
            if stage == 0:
                names.append(name)
        elif stage == pp - 1:
            names.append(name)
    tied = not config.untie_embeddings_and_output_weights
    if tied and pp > 1 and stage == pp - 1:
        names.append(OUTPUT)
    te = getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine"
    return sorted(names, key=lambda n: _order_key(n, te))


def bucket_layout(params: list[tuple[str, int, bool]], bucket_size: int | None
                  ) -> list[tuple[int, dict[str, tuple[int, int]]]]:
    """Megatron's `_ParamAndGradBuffer` for the distributed optimizer: per bucket, its
    unpadded size and each parameter's (start, end) within it, for `params` given as
    (name, numel, shared embedding) in registration order."""
    buckets: list[tuple[int, dict]] = []
    current: dict[str, tuple[int, int]] = {}
    start = 0

    def close(end: int) -> None:
        nonlocal current, start
        buckets.append((end, current))
        current, start = {}, 0

    for name, numel, shared in reversed(params):
        start = -(-start // _ALIGN) * _ALIGN
        if shared and current:
            close(start)
        current[name] = (start, start + numel)
        start += numel
        if shared or (bucket_size is not None and start >= bucket_size):
            close(start)
    if current:
        close(start)
    return buckets


def _bucket_size(args, stage: int) -> int | None:
    """The gradient bucket size Megatron's DistributedDataParallel used on a stage."""
    if not getattr(args, "overlap_grad_reduce", False) or stage > 0 or \
            getattr(args, "overlap_param_gather_with_optimizer_step", False):
        return None
    size = getattr(args, "ddp_bucket_size", None)
    return size or max(40_000_000, 1_000_000 * (getattr(args, "data_parallel_size", 1) or 1))


# ------------------------------------------------------------------ reading the buffers
class _DistBuffers:
    """The flat bucket tensors of a torch_dist checkpoint, per model-parallel rank."""

    def __init__(self, folder: Path, chunks) -> None:
        self.folder, self.chunks = folder, chunks
        self.keys: dict[int, dict[tuple[int, int], dict[str, str]]] = {}
        for fqn in chunks.tensors:
            match = _BUCKET_KEY.match(fqn)
            if match:
                rank, gbuf, _, _, bucket, what = match.groups()
                per_rank = self.keys.setdefault(int(rank), {})
                per_rank.setdefault((int(gbuf), int(bucket)), {})[what] = fqn

    def object(self, key: str):
        """A pickled object Megatron saved under `key` (one shard), read safely."""
        info = self.chunks.storage.get((key, None))
        if info is None:
            raise ConversionError(f"{self.chunks.where}: no entry {key}; the optimizer state "
                                  f"is incomplete")
        return self.chunks.load(info, key)[0]

    def rank(self, mp_rank: int) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
        """(per bucket: quantity -> flat tensor, unpadded sizes Megatron recorded)."""
        found = self.keys.get(mp_rank)
        if not found:
            raise ConversionError(f"{self.folder}: no optimizer buffers for model-parallel "
                                  f"rank {mp_rank}; the optimizer state is incomplete")
        if {g for g, _ in found} != {0}:
            raise NotCarried("the optimizer state has several gradient buffers (mixed "
                             "dtypes or model chunks)")
        prefix = f"optimizer.distributed.dp_group_idx_{mp_rank}"
        recorded = self.object(f"{prefix}.per_bucket_numel_unpadded/shard_0_1")
        try:
            (sizes,) = recorded[0][0].values()
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            raise ConversionError(f"{self.folder}: {prefix}.per_bucket_numel_unpadded is "
                                  f"not Megatron's list of bucket sizes") from None
        buckets = []
        for index in range(len(found)):
            names = found.get((0, index))
            if names is None or not {"param", *MOMENTS} <= set(names):
                raise ConversionError(f"{self.folder}: bucket {index} of model-parallel rank "
                                      f"{mp_rank} lacks main weights or Adam moments")
            buckets.append({q: self.chunks.read(names[q], ()) for q in ("param", *MOMENTS)})
        return buckets, list(sizes)


def _legacy_buffers(path: Path, layout_sizes: list[int]) -> tuple[list[dict], list[int]]:
    """A legacy `distrib_optim.pt`: one coalesced buffer per quantity, cut into buckets."""
    state = load_required(path, "the optimizer state is incomplete")
    gbufs = [k for k in state if isinstance(k, int)] if isinstance(state, dict) else []
    if gbufs != [0] or not isinstance(state[0], dict) or len(state[0]) != 1:
        raise NotCarried(f"{path.name} holds several gradient buffers (mixed dtypes or "
                         f"model chunks)")
    (flat,) = state[0].values()
    if not state.get("buckets_coalesced", False) or not isinstance(flat, dict):
        raise NotCarried(f"{path.name} is in a format before buckets were coalesced")
    total = flat.get("numel_unpadded")
    buckets, start = [], 0
    for size in layout_sizes:
        piece = {}
        for q in ("param", *MOMENTS):
            t = flat.get(q)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != total:
                raise ConversionError(f"{path}: {q} is not a flat tensor of {total} values")
            piece[q] = t[start:start + size]
        buckets.append(piece)
        start += size
    return buckets, [total]


# ------------------------------------------------------------------ the carry
def _param_groups(state, where: str) -> list[dict]:
    groups = None
    if isinstance(state, list) and state and isinstance(state[0], dict):
        groups = state[0].get("param_groups")
    elif isinstance(state, dict):
        inner = state.get("optimizer", state)
        groups = inner.get("param_groups") if isinstance(inner, dict) else None
    if not isinstance(groups, list) or not groups or \
            not all(isinstance(g, dict) for g in groups):
        raise ConversionError(f"{where}: the optimizer's param_groups are missing")
    return groups


def _adam_settings(groups: list[dict], args) -> tuple[float, dict]:
    """(AdamW's step count, the optimizer settings) from Megatron's param groups."""
    if getattr(args, "optimizer", "adam") != "adam":
        raise NotCarried(f"the optimizer is {args.optimizer}; Paratron carries Adam's state")
    if any(g.get("decoupled_weight_decay") is False or g.get("adam_w_mode") is False
           for g in groups):
        raise NotCarried("the optimizer is Adam with L2 regularization, not AdamW")
    if any(g.get("lr_mult", 1.0) != 1.0 or g.get("is_decoupled_lr") for g in groups):
        raise NotCarried("parameter groups with their own learning rate (--decoupled-lr or "
                         "lr multipliers)")
    steps = {float(g["step"]) for g in groups if "step" in g}
    if len(steps) != 1:
        raise NotCarried("the param groups do not agree on Adam's step count")
    decayed = [g for g in groups if g.get("weight_decay", 0.0) > 0] or groups
    beta1, beta2 = decayed[0].get("betas", (args.adam_beta1, args.adam_beta2))
    return steps.pop(), {"adam_beta1": float(beta1), "adam_beta2": float(beta2),
                         "adam_eps": float(decayed[0].get("eps", args.adam_eps)),
                         "weight_decay": float(decayed[0].get("weight_decay", 0.0))}


def _run_settings(args, adam: dict) -> dict[str, dict]:
    """The run-config sections the Megatron run had, so that a resume with other flags
    is told what changed."""
    optimizer = {"optimizer": "adam", **adam}
    for name in ("lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_decay_samples",
                 "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction",
                 "lr_warmup_init", "lr_wsd_decay_style", "lr_wsd_decay_iters",
                 "lr_wsd_decay_samples", "clip_grad"):
        value = getattr(args, name, None)
        if value is not None:
            optimizer[name] = value
    training = {n: getattr(args, n) for n in ("train_iters", "global_batch_size",
                                              "micro_batch_size")
                if getattr(args, n, None) is not None}
    return {"optimizer": optimizer, "training": training}


def read_megatron_optimizer(model: StreamedModel, args, common: dict, folder: Path,
                            chunks=None) -> OptimizerCarry:
    """The distributed-optimizer state of the Megatron checkpoint at `folder` (torch_dist
    when its `.metadata`'s `chunks` are given, else legacy). Raises NotCarried for state that
    exists but cannot travel."""
    if not getattr(args, "use_distributed_optimizer", False):
        raise NotCarried("the run did not use the distributed optimizer "
                         "(--use-distributed-optimizer)")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    if vpp > 1 or model.config.num_experts or model.config.multi_latent_attention:
        raise NotCarried("the optimizer state of virtual pipeline stages, MoE and "
                         "multi-latent attention models is not carried yet")
    if (getattr(args, "num_distributed_optimizer_instances", 1) or 1) > 1:
        raise NotCarried("several distributed-optimizer instances")
    if getattr(args, "fp16", False):
        raise NotCarried("fp16 runs (the dynamic loss scaler's state) are not carried yet")
    if getattr(args, "rampup_batch_size", None):
        raise NotCarried("a batch-size ramp-up (the schedule counts samples)")
    config, tp = model.config, args.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size
    layout = model_layout(config)
    tied = not config.untie_embeddings_and_output_weights
    where = str(folder)
    if chunks is not None:
        sharding = (common.get("optimizer") or {}).get("param_state_sharding_type")
        if sharding != "dp_reshardable":
            raise NotCarried(f"the optimizer state is saved with sharding {sharding!r}; "
                             f"Paratron reads dp_reshardable (Megatron's default)")
        buffers = _DistBuffers(folder, chunks)
        groups = _param_groups(buffers.object("optimizer.distributed.dp_group_idx_0."
                                              "optimizer/shard_0_1"), where)
    else:
        groups = _param_groups(common.get("optimizer"), where)
    step_count, adam = _adam_settings(groups, args)

    def rank_state(t: int, stage: int, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """quantity -> {Paratron name: this TP rank's flat state} for one rank."""
        shapes = {}
        for n in names:
            param = layout.params[n if n in layout.params else EMBEDDING]
            shapes[n] = shard_tensor(torch.empty(param.shape, device="meta"), param, tp, t).shape
        params = [(n, shapes[n].numel(), tied and pp > 1 and n in (EMBEDDING, OUTPUT))
                  for n in names]
        plan = bucket_layout(params, _bucket_size(args, stage))
        planned = [size for size, _ in plan]
        mp_rank = t + tp * stage
        if chunks is not None:
            buckets, recorded = buffers.rank(mp_rank)
        else:
            path = folder / rank_folder(t, stage, 0, pp, 1) / DISTRIB_OPTIM
            buckets, recorded = _legacy_buffers(path, planned)
            planned = [sum(planned)]
        if recorded != planned or len(buckets) != len(plan):
            raise NotCarried(f"model-parallel rank {mp_rank}: Megatron's buckets hold "
                             f"{recorded} values, the layout Paratron rebuilds "
                             f"{planned}")
        out: dict[str, dict[str, torch.Tensor]] = {q: {} for q in ("param", *MOMENTS)}
        for (size, places), bucket in zip(plan, buckets):
            for q, flat in bucket.items():
                if flat.numel() != size or flat.dtype != torch.float32:
                    raise ConversionError(f"{where}: a {q} bucket of rank {mp_rank} holds "
                                          f"{flat.numel()} {flat.dtype} values, the layout "
                                          f"{size} float32")
                for n, (start, end) in places.items():
                    out[q][n] = flat[start:end].view(shapes[n])
        return out

    stage_names = [stage_parameters(layout, config, pp, p, args) for p in range(pp)]
    stage_of = {n: p for p in reversed(range(pp)) for n in stage_names[p]}
    cache: dict[int, list] = {}

    def stage_state(stage: int) -> list:
        """Every TP rank's state of one pipeline stage (one stage in memory at a time)."""
        if stage not in cache:
            cache.clear()
            cache[stage] = [rank_state(t, stage, stage_names[stage]) for t in range(tp)]
        return cache[stage]

    def tensors(names: list[str], weights: dict) -> dict:
        out = {}
        for name in names:
            if name not in layout.params:
                continue
            ranks = stage_state(stage_of[name])
            full = {q: gather_tensor([r[q][name] for r in ranks], layout.params[name])
                    for q in ("param", *MOMENTS)}
            stored = weights[f"model/{name}"]
            if not torch.equal(full["param"].to(stored.dtype), stored):
                raise ConversionError(f"{where}: the optimizer's main weights of {name} "
                                      f"are not the model's (a damaged checkpoint, or an "
                                      f"optimizer layout Paratron does not know); "
                                      f"--no-load-optim converts the weights alone")
            out[f"optim/main/{name}"] = full["param"].clone()
            for q in MOMENTS:
                out[f"optim/{q}/{name}"] = full[q].clone()
        return out

    # Every rank's layout is checked before anything is written.
    for stage in range(pp):
        stage_state(stage)
    iteration = int(common.get("iteration", getattr(args, "iteration", 0)))
    scheduler = common.get("opt_param_scheduler") or {}
    samples = scheduler.get("num_steps")
    batch = args.global_batch_size
    steps = iteration if samples is None else samples // batch
    if samples is not None and samples % batch:
        raise NotCarried(f"the scheduler counted {samples} samples, not whole batches of "
                         f"{batch}")
    train_state = {"iteration": iteration,
                   "consumed_train_samples": int(getattr(args, "consumed_train_samples", 0)),
                   "consumed_valid_samples": int(getattr(args, "consumed_valid_samples", 0))}
    meta = {"kind": "AdamW", "steps": steps, "step_count": step_count,
            "state_keys": list(MOMENTS), "loss_scaler": {"scale": 1.0}}
    return OptimizerCarry(iteration, train_state, meta, _run_settings(args, adam), tensors)






def carry_optimizer(model: StreamedModel, args, common: dict, folder: Path, **dist) -> None:
    """Attach the checkpoint's optimizer state to `model` (`model.optimizer`), or a note
    saying why it stays behind. `dist` holds torch_dist's `chunks`."""
    try:
        model.optimizer = read_megatron_optimizer(model, args, common, folder, **dist)
    except NotCarried as why:
        model.notes.append(f"the optimizer state is not converted: {why}; continue the run "
                           f"from the weights with --finetune")


def carry_legacy_optimizer(model: StreamedModel, folder: Path) -> None:
    """`carry_optimizer` for a legacy checkpoint folder (`iter_NNNNNNN/mp_rank_*`), whose
    first rank's file holds the args, the progress and the param groups."""
    first = min(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("mp_rank_"))
    try:
        head = load_torch(first / FILE)
    except UntrustedFileError as exc:
        model.notes.append(f"the optimizer state is not converted: {exc}")
        return
    if (first / DISTRIB_OPTIM).is_file() or head.get("optimizer"):
        carry_optimizer(model, head["args"], head, folder)
