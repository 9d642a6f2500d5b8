"""Per-GPU memory of a parallel layout, read off the model itself, and a layout to pick.

The figures are what Paratron allocates on one rank, so `paratron plan` can be checked
against a real Trainer tensor by tensor: the rank's chunks are built as the trainer builds
them, on the meta device with sizes-only process groups, wrapped in the real
`DataParallel`, and read. Weights and fp32 gradient buffers (buckets padded to the group
that reduces them) come from those buffers; fp32 main weights and Adam moments from the
optimizer's own segments; activations from `paratron.training.activation_memory`;
communication is the pipeline's receive buffers plus the larger of the distributed
optimizer's reduce-scatter outputs and all-gather sources (after backward, when the
activations are freed).

`recommend` picks, among the layouts under (1 - headroom) x GPU memory: no recompute
added (a third more compute), then the fewest model-parallel ranks TP x PP x CP (data
parallelism's one reduction overlaps backward), the smallest EP (fewer all-to-alls),
fewer pipeline stages, less CP, and the least memory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch

from paratron.config import Config, finalize, resolve_vocab_size, validate
from paratron.model.config import moe_layer_pattern
from paratron.model.gpt import GPTModel
from paratron.options import ConfigError
from paratron.parallel.data_parallel import DataParallel
from paratron.parallel.config import rank_chunks
from paratron.parallel.pipeline import Chunk
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.activation_memory import (FP32, ActivationShape, chunk_saved_bytes,
                                                 layers_by_kind, layout_groups,
                                                 stage_activation_bytes)
from paratron.training.optimizer import build_segments
from paratron.training.trainer import build_models, params_dtype

GIB = 2 ** 30


# ------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class Layout:
    """Sizes of one way to place the run on `world` GPUs (etp defaults to tp);
    first_stage_layers: an uneven pipeline's first stage (`first_stage_layers`)."""

    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    first_stage_layers: int | None = None

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def label(self) -> str:
        first = f" (first {self.first_stage_layers})" if self.first_stage_layers else ""
        return f"TP{self.tp} PP{self.pp}{first} CP{self.cp} DP{self.dp} EP{self.ep}"


def first_stage_layers(base: Config, pp: int) -> int | None:
    """The first stage's layers when --num-layers does not split evenly over `pp`
    stages and the flags place no layers themselves: every other stage takes
    ceil(layers / pp) and the first, which also holds the embedding, the rest (61
    DeepSeek-V3 layers over 8 stages: 5 + 7 x 8). None when the split is even, given,
    or impossible."""
    p, layers = base.parallel, base.model.num_layers
    placed = (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers,
              p.num_layers_per_virtual_pipeline_stage, p.num_virtual_stages_per_pipeline_rank)
    if (any(v is not None for v in placed) or p.account_for_embedding_in_pipeline_split
            or p.account_for_loss_in_pipeline_split or layers % pp == 0):
        return None
    first = layers - (pp - 1) * -(-layers // pp)
    return first if first >= 1 else None


def layout_config(base: Config, layout: Layout) -> Config:
    """A copy of `base` run on `layout`, finalized and validated (ConfigError if the
    trainer would refuse it), with the padded vocabulary resolved for its TP size."""
    cfg = copy.deepcopy(base)
    p = cfg.parallel
    p.world_size = layout.world
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.context_parallel_size, p.expert_model_parallel_size = layout.cp, layout.ep
    p.expert_tensor_parallel_size = layout.etp
    if layout.first_stage_layers:
        p.decoder_first_pipeline_num_layers = layout.first_stage_layers
    finalize(cfg, layout.world)
    validate(cfg)
    cfg.model.padded_vocab_size = resolve_vocab_size(cfg, None)
    return cfg


# ------------------------------------------------------------------ the model
def meta_chunk(cfg: Config, pg: ProcessGroups, chunk: Chunk) -> GPTModel:
    """One model chunk of the rank `pg` describes, on the meta device."""
    with torch.device("meta"):
        return GPTModel(cfg.model, pg, pre_process=chunk.is_first,
                        post_process=chunk.is_last, layer_numbers=chunk.layers)


def rank_models(cfg: Config, pg: ProcessGroups) -> list[DataParallel]:
    """This rank's model chunks as the trainer builds them, on the meta device."""
    with torch.device("meta"):
        return build_models(cfg, pg, rank_chunks(cfg, pg.pp.rank), "meta",
                            params_dtype(cfg.training))


@dataclass(frozen=True)
class ParamShape:
    name: str
    numel: int


def model_parameters(cfg: Config, chunk: Chunk) -> list[ParamShape]:
    """The parameters of one model chunk on one rank, in `module.parameters()` order."""
    model = meta_chunk(cfg, layout_groups(cfg), chunk)
    return [ParamShape(name, p.numel()) for name, p in model.named_parameters()]


# ------------------------------------------------------------------ weights and state
@dataclass
class StateBytes:
    weights: int = 0
    grads: int = 0
    main_weights: int = 0
    optimizer_moments: int = 0
    reduce_scatter: int = 0     # fp32 outputs of every bucket's reduce-scatter
    param_gather: int = 0       # model-dtype sources of the weight all-gathers

    @property
    def optimizer(self) -> int:
        return self.main_weights + self.optimizer_moments


def moment_bytes(optimizer_config) -> int:
    """Optimizer state bytes per updated element: Adam's two fp32 moments, SGD's
    momentum (none without it)."""
    o = optimizer_config
    return (2 if o.optimizer == "adam" else int(o.sgd_momentum != 0)) * FP32


def state_bytes(cfg: Config, pp_rank: int = 0, dp_rank: int = 0,
                edp_rank: int = 0) -> StateBytes:
    """Weights, fp32 gradient buffers and optimizer state held by one rank. The rank in
    the DP x CP group (dense weights) and in the expert-DP group matter only with the
    distributed optimizer; rank 0 holds the most (padding ends the last shard)."""
    moments, out = moment_bytes(cfg.optimizer), StateBytes()
    with torch.device("meta"):
        for model in rank_models(cfg, layout_groups(cfg, pp_rank, dp_rank, edp_rank)):
            if model.sharded:
                out.weights += sum(buf.param_data.nbytes for buf in model.buffers)
            else:
                out.weights += sum(p.nbytes for p in model.module.parameters())
            out.grads += sum(buf.data.nbytes for buf in model.buffers)
            segments = build_segments(model)
            out.grads += sum(s.grad.numel() * FP32 for s in segments  # --fp64's fp32 copy
                             if s.grad.dtype != torch.float32)
            out.main_weights += sum(s.main.nbytes for s in segments
                                    if s.main is not s.model_view)
            out.optimizer_moments += moments * sum(s.grad.numel() for s in segments)
            for buf in [b for b in model.buffers if model.sharded and b.dp_size > 1]:
                shards = [bucket.shard_size for bucket in buf.buckets]
                out.reduce_scatter += sum(shards) * buf.data.element_size()
                gather = sum(shards) if model.overlap_param_gather else max(shards)
                out.param_gather = max(out.param_gather,
                                       gather * buf.param_data.element_size())
    return out


# ------------------------------------------------------------------ per GPU
@dataclass
class RankMemory:
    """Bytes one GPU holds, by kind. The data-parallel buffers exist only after
    backward, when the activations are gone, so the total takes the larger phase."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    pipeline_buffers: int   # activation and gradient receive buffers between stages
    dp_buffers: int         # reduce-scatter outputs or weight all-gather sources

    @property
    def communication(self) -> int:
        return self.pipeline_buffers + self.dp_buffers

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer
                + max(self.activations + self.pipeline_buffers, self.dp_buffers))


def rank_memory(cfg: Config, state: StateBytes, pp_rank: int = 0,
                device: str = "cuda") -> RankMemory:
    """Pipeline rank `pp_rank`'s memory, given the `state_bytes` it holds."""
    pipeline = 0
    if cfg.parallel.pipeline_model_parallel_size > 1:
        a = ActivationShape.of(cfg, layout_groups(cfg), device)
        pipeline = 2 * a.hidden_bytes(cfg.model.hidden_size)
    return RankMemory(state.weights, state.grads, state.optimizer,
                      stage_activation_bytes(cfg, pp_rank, device), pipeline,
                      max(state.reduce_scatter, state.param_gather))


def stage_states(cfg: Config) -> list[StateBytes]:
    """`state_bytes` of each pipeline rank at data-parallel rank 0 (which owns the most);
    recompute leaves them unchanged."""
    return [state_bytes(cfg, r) for r in range(cfg.parallel.pipeline_model_parallel_size)]


def peak_rank_memory(cfg: Config, states: list[StateBytes],
                     device: str = "cuda") -> RankMemory:
    """The busiest pipeline rank, given `stage_states(cfg)`."""
    return max((rank_memory(cfg, state, r, device) for r, state in enumerate(states)),
               key=lambda mem: mem.total)


# ------------------------------------------------------------------ before launching
def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def minimum_rank_bytes(cfg: Config, pp_rank: int = 0, device: str = "cuda") -> int:
    """A lower bound of what one rank of pipeline stage `pp_rank` allocates: its weights,
    fp32 gradients and optimizer state (sharded over DP x CP with the distributed
    optimizer, bucket padding left out) and the activations of the micro-batches the
    1F1B schedule keeps in flight (one per stage ahead, one only when interleaved).
    Unlike `rank_memory` it builds one layer of each kind, not every layer, so absurd
    settings are refused in a moment rather than planned tensor by tensor."""
    t, pg = cfg.training, layout_groups(cfg, pp_rank)
    width = params_dtype(t).itemsize
    kinds = moe_layer_pattern(cfg.model)
    per_kind = {kind: _numel(layer) for kind, layer in layers_by_kind(cfg.model, pg).items()}
    elements = activations = 0
    chunks = rank_chunks(cfg, pp_rank)
    for chunk in chunks:
        ends = meta_chunk(cfg, pg, dataclasses.replace(chunk, layers=range(0)))
        elements += _numel(ends) + sum(per_kind[kinds[n]] for n in chunk.layers)
        activations += chunk_saved_bytes(cfg, chunk, device)
    micro = t.global_batch_size // (t.micro_batch_size * pg.dp.size)
    in_flight = min(pg.pp.size - pp_rank, micro) if len(chunks) == 1 else 1
    state = moment_bytes(cfg.optimizer) + (FP32 if width != FP32 else 0)
    if cfg.parallel.use_distributed_optimizer:
        state /= pg.dp_cp.size
    grads = max(width, FP32) + (FP32 if width > FP32 else 0)  # --fp64: an fp32 copy too
    return int(elements * (width + grads + state) + activations * in_flight)


def device_memory_bytes(device: str) -> int:
    """Memory of the device a rank runs on: the GPU's (LOCAL_RANK's) total, or for the
    CPU the machine's physical memory, lowered to the container's limit when one is
    set (cgroup v2 or v1)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))
                                                ).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as fh:
                total = min(total, int(fh.read().strip()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            continue
    return total


def run_device(cfg: Config) -> str:
    """"cuda" or "cpu": where `paratron train` will run (--device auto picks CUDA when
    present)."""
    if cfg.training.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.training.device


def check_fits_device(cfg: Config, tokenizer_vocab_size: int | None = None) -> None:
    """Refuse, in one line and before anything is allocated, a run whose smallest
    possible footprint (`minimum_rank_bytes` of the first and last pipeline stages)
    exceeds the memory of its device; on a CPU the ranks of this machine share it.
    Meant to run before the process group exists, once the config is validated."""
    device = run_device(cfg)
    est = copy.deepcopy(cfg)
    try:
        est.model.padded_vocab_size = resolve_vocab_size(est, tokenizer_vocab_size)
    except ConfigError:  # known only once the tokenizer is read: leave it out
        est.model.padded_vocab_size = 0
    pp = cfg.parallel.pipeline_model_parallel_size
    need = max(minimum_rank_bytes(est, r, device) for r in {0, pp - 1})
    ranks = 1 if device == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    have = device_memory_bytes(device)
    if need * ranks > have:
        per = f" x {ranks} ranks" if ranks > 1 else ""
        raise ConfigError(
            f"this run needs at least {gib(need)} GiB per rank{per} (weights, gradients, "
            f"optimizer state, activations) but the {device} has {gib(have)} GiB; lower "
            f"--num-layers, --hidden-size, --seq-length or --micro-batch-size, or split "
            f"the model over more ranks ('paratron plan' shows the layouts)")


# ------------------------------------------------------------------ planning
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)


@dataclass
class Candidate:
    layout: Layout
    memory: RankMemory
    recompute_memory: RankMemory | None  # with full recompute added, when not asked for

    def needs_recompute(self, budget: float) -> bool | None:
        """False: fits as asked; True: fits only with full recompute; None: neither."""
        if self.memory.total <= budget:
            return False
        if self.recompute_memory is not None and self.recompute_memory.total <= budget:
            return True
        return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(base: Config, num_gpus: int, pinned: dict[str, int] | None = None,
                      max_tp: int | None = None) -> list[Layout]:
    """Every TP x PP x CP (x EP for MoE) split of `num_gpus` GPUs, sizes named in
    `pinned` (tp, pp, cp, ep) held fixed; layers that do not split evenly over the
    stages are placed by `first_stage_layers`. TP above `max_tp` (a node's GPUs: its
    all-reduces run in every layer) is left out unless pinned."""
    pinned = pinned or {}
    out = []
    sizes = _divisors(num_gpus)
    experts = base.model.num_experts
    tps = [tp for tp in sizes if max_tp is None or tp <= max_tp]
    for tp in [pinned["tp"]] if "tp" in pinned else tps:
        for pp in [pinned["pp"]] if "pp" in pinned else sizes:
            for cp in [pinned["cp"]] if "cp" in pinned else sizes:
                if num_gpus % (tp * pp * cp):
                    continue
                eps = [pinned["ep"]] if "ep" in pinned else (sizes if experts else [1])
                for ep in eps:
                    out.append(Layout(num_gpus, tp, pp, cp, ep,
                                      base.parallel.expert_tensor_parallel_size,
                                      first_stage_layers(base, pp)))
    return out


def plan(base: Config, num_gpus: int, pinned: dict[str, int] | None = None,
         device: str = "cuda", max_tp: int | None = None
         ) -> tuple[list[Candidate], list[tuple[Layout, str]]]:
    """Memory of every layout the trainer would accept, and why the others are refused."""
    candidates, refused = [], []
    asked_recompute = base.model.recompute_granularity == "full"
    layouts = candidate_layouts(base, num_gpus, pinned, max_tp)
    if not layouts:  # pinned sizes that do not divide the GPUs: let validation say so
        sizes = {dim: (pinned or {}).get(dim, 1) for dim in ("tp", "pp", "cp", "ep")}
        layouts = [Layout(num_gpus, **sizes, etp=base.parallel.expert_tensor_parallel_size)]
    for layout in layouts:
        try:
            cfg = layout_config(base, layout)
        except ConfigError as exc:
            refused.append((layout, str(exc)))
            continue
        states, with_recompute = stage_states(cfg), None
        if not asked_recompute:
            rc = copy.deepcopy(cfg)
            for key, value in FULL_RECOMPUTE.items():
                setattr(rc.model, key, value)
            with_recompute = peak_rank_memory(rc, states, device)
        candidates.append(Candidate(layout, peak_rank_memory(cfg, states, device),
                                    with_recompute))
    return candidates, refused


def preference(candidate: Candidate, budget: float) -> tuple:
    """The sort key of the recommendation rule in the module docstring (fitting layouts
    first)."""
    needs = candidate.needs_recompute(budget)
    lay = candidate.layout
    memory = candidate.memory if not needs else candidate.recompute_memory
    return (needs is None, bool(needs), lay.model_parallel, lay.ep, lay.pp, lay.cp,
            memory.total)


def recommend(candidates: list[Candidate], budget: float) -> Candidate | None:
    """The preferred layout that fits in `budget` bytes per GPU, or None."""
    fitting = [c for c in candidates if c.needs_recompute(budget) is not None]
    return min(fitting, key=lambda c: preference(c, budget)) if fitting else None


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"
