"""Model and optimizer state as logical tensors: global names, unsharded shapes.

Every parameter is described by its global name (`GPTModel.global_name`) and full shape,
whatever layout holds it: `model/<name>` (model dtype), `optim/main/<name>` (fp32 main
weights, when the model is not fp32), `optim/<key>/<name>` (AdamW `exp_avg`,
`exp_avg_sq`, SGD `momentum_buffer`) and `buffer/<name>` (e.g. the MoE expert bias).

Saving moves nothing between ranks for a parameter that a rank holds whole (no TP or EP
split): each data-parallel rank writes its share of it as blocks of the logical tensor
(`Chunk`s at offsets) -- an even split of the weights and, under the distributed
optimizer, the elements its segments own. A parameter split over TP or EP is put back
together (optimizer segments by a sum over the group that shards them, then the TP and
expert shards gathered) and written whole by one rank, the writers spread over a stage's
ranks. The tied output layer (`tied="copy"`) is not written.

Loading reads the logical tensors a rank's parameters need and keeps its part, so a
checkpoint from any TP / PP / DP / EP / virtual-stage layout, distributed optimizer on or
off, loads into any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from paratron.parallel.expert_parallel import expert_gather, expert_shard
from paratron.parallel.sharding import full_shape, gather_tensor, layout_of, shard_tensor

TIED_EMBEDDING = "embedding.word_embeddings.weight"
VOCAB_ROWS = (TIED_EMBEDDING, "output_layer.weight")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _unwrap(model) -> nn.Module:
    return getattr(model, "module", model)


@dataclass
class ParamEntry:
    name: str           # global name
    source: str         # logical tensor it is stored under (the embedding for a tied copy)
    param: nn.Parameter
    chunk: object       # the model chunk (DataParallel or module) holding it

    @property
    def is_copy(self) -> bool:  # also the last stage's embedding copy for its MTP modules
        return layout_of(self.param).tied == "copy"

    @property
    def expert(self) -> bool:
        return layout_of(self.param).expert


def param_entries(models) -> list[ParamEntry]:
    """Every parameter of every chunk, with its global name, in a fixed order."""
    out = []
    for chunk in models:
        module = _unwrap(chunk)
        for name, p in module.named_parameters():
            gname = module.global_name(name)
            source = TIED_EMBEDDING if layout_of(p).tied == "copy" else gname
            out.append(ParamEntry(gname, source, p, chunk))
    return out


def buffer_entries(models) -> list[tuple[str, torch.Tensor]]:
    """Persistent buffers (not parameters) with global names."""
    out = []
    for chunk in models:
        module = _unwrap(chunk)
        params = {id(p) for p in module.parameters()}
        for name, t in module.state_dict(keep_vars=True).items():
            if id(t) not in params and isinstance(t, torch.Tensor):
                out.append((module.global_name(name), t))
    return out


# ------------------------------------------------------------------ gather / shard
def _all_gather(t: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    send = t.contiguous()
    wire = send.float() if send.dtype in (torch.bfloat16, torch.float16) else send
    parts = [torch.empty_like(wire) for _ in range(size)]
    dist.all_gather(parts, wire, group=group)
    return [p.to(t.dtype) for p in parts]


def gather_logical(local: torch.Tensor, param: nn.Parameter, pg) -> torch.Tensor:
    """The unsharded tensor from every rank's `local` (shaped like `param`)."""
    if layout_of(param).expert:
        etp = _all_gather(local, pg.etp.size, pg.etp.group)
        per_ep = _all_gather(torch.stack(etp), pg.ep.size, pg.ep.group)
        return expert_gather([list(x.unbind(0)) for x in per_ep], param)
    return gather_tensor(_all_gather(local, pg.tp.size, pg.tp.group), param)


def shard_logical(full: torch.Tensor, param: nn.Parameter, pg) -> torch.Tensor:
    """This rank's part of the unsharded tensor `full` for `param`."""
    if layout_of(param).expert:
        return expert_shard(full, param, pg)
    return shard_tensor(full, param, pg.tp.size, pg.tp.rank)


def fit_vocab_rows(name: str, full: torch.Tensor, param: nn.Parameter, pg) -> torch.Tensor:
    """The vocabulary rows of `full` cut or zero-padded to this run's padded vocabulary.

    Megatron pads the vocabulary to a multiple of make-vocab-size-divisible-by x TP, so
    the same tokenizer gives more rows at TP4 than at TP1; the extra rows belong to no
    token. A checkpoint of another TP size therefore loads with its padding adjusted
    (the run's padded size is never below the tokenizer's, so no token's row is cut)."""
    if not name.endswith(VOCAB_ROWS):
        return full
    return resize_rows(full, full_shape(param, pg.tp.size)[0])


def resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with its first dimension cut to, or zero-padded up to, `rows`."""
    if t.shape[0] > rows:
        return t[:rows]
    if t.shape[0] < rows:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return t


def _writes(entry_index: int, expert: bool, pg) -> bool:
    """Whether this rank writes logical tensor number `entry_index` of its stage: one
    rank among those holding it whole, spread round-robin over the stage."""
    if expert:
        if pg.edp.rank != 0:
            return False
        return entry_index % (pg.ep.size * pg.etp.size) == pg.ep.rank * pg.etp.size + pg.etp.rank
    return pg.dp_cp.rank == 0 and entry_index % pg.tp.size == pg.tp.rank


# ------------------------------------------------------------------ segments
def segments_by_param(optimizer) -> dict[int, list]:
    """id(param) -> the optimizer's segments of that parameter (each knows its offset)."""
    out: dict[int, list] = {}
    for seg in optimizer.segments:
        out.setdefault(id(seg.param), []).append(seg)
    return out


def _sharding_group(entry: ParamEntry, pg):
    """(group, size) over which the distributed optimizer splits `entry`'s state."""
    if not getattr(entry.chunk, "sharded", False):
        return None, 1
    return (pg.edp.group, pg.edp.size) if entry.expert else (pg.dp_cp.group, pg.dp_cp.size)


def _flat_state(entry: ParamEntry, segments, get, pg) -> torch.Tensor:
    """The flattened local shard of one per-element optimizer quantity (`get(segment)`),
    assembled from this rank's segments and, under the distributed optimizer, the
    other data-parallel ranks' (disjoint slices: a sum puts them together)."""
    p = entry.param
    flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    for seg in segments:
        value = get(seg)
        flat[seg.offset:seg.offset + value.numel()] = value
    group, size = _sharding_group(entry, pg)
    if size > 1:
        dist.all_reduce(flat, group=group)
    return flat.view(p.shape)


def optimizer_state_keys(optimizer) -> list[str]:
    """The per-element state tensors of the wrapped torch optimizer (same on all
    ranks: every segment steps together)."""
    for state in optimizer.optimizer.state.values():
        return sorted(k for k, v in state.items()
                      if isinstance(v, torch.Tensor) and v.dim() > 0)
    return []


def optimizer_step_count(optimizer) -> float | None:
    """The torch optimizer's own `step` counter (AdamW bias correction), if any."""
    for state in optimizer.optimizer.state.values():
        step = state.get("step")
        return None if step is None else float(step)
    return None


@dataclass
class Chunk:
    """A block of logical tensor `name` (of `shape`) at `offsets` that this rank writes."""
    name: str
    shape: list[int]
    offsets: list[int]
    tensor: torch.Tensor

    @property
    def key(self) -> str:
        """Its key in the rank's file: the logical name when it is the whole tensor."""
        if list(self.tensor.shape) == self.shape:
            return self.name
        return f"{self.name}@{'_'.join(map(str, self.offsets))}"


def flat_blocks(shape: list[int], start: int, stop: int) -> list[tuple[int, list, list]]:
    """Elements [start, stop) of a row-major tensor of `shape` as blocks (first flat
    index, offsets, sizes): one per partial row at either end, one for the whole rows
    between, recursively, so at most 2 x dims - 1 blocks, each contiguous in memory."""
    if start >= stop:
        return []
    if not shape:
        return [(start, [], [])]
    row = math.prod(shape[1:])
    first, last = -(-start // row), stop // row  # the whole rows are [first, last)

    def within(r: int, lo: int, hi: int) -> list:
        return [(r * row + b, [r, *o], [1, *z])
                for b, o, z in flat_blocks(shape[1:], lo - r * row, hi - r * row)]

    if first > last:  # start and stop inside one row
        return within(last, start, stop)
    out = within(first - 1, start, first * row) if start < first * row else []
    if last > first:
        out.append((first * row, [first] + [0] * (len(shape) - 1), [last - first, *shape[1:]]))
    if stop > last * row:
        out += within(last, last * row, stop)
    return out


def _host(t: torch.Tensor, snapshot: bool) -> torch.Tensor:
    """`t` in host memory: a copy when it is elsewhere or when `snapshot` asks for one (a
    background save writes while training changes the live tensors), else `t` itself."""
    return t.to("cpu", copy=snapshot).contiguous()


def _blocks(name: str, shape: list[int], flat: torch.Tensor, first: int, start: int,
            stop: int, snapshot: bool) -> list[Chunk]:
    """Chunks of elements [start, stop) of `name`, read from `flat`, which holds its
    elements from `first` on."""
    return [Chunk(name, shape, offsets, _host(
                flat[begin - first:begin - first + math.prod(sizes)].view(sizes), snapshot))
            for begin, offsets, sizes in flat_blocks(shape, start, stop)]


def _whole_here(entry: ParamEntry, pg) -> bool:
    """Whether this rank's parameter is the whole logical tensor (split over neither TP
    nor EP): then its data-parallel ranks each write a share without communication."""
    return not entry.expert and (pg.tp.size == 1 or layout_of(entry.param).dim is None)


def _own_share(entry: ParamEntry, quantities, segments, pg, snapshot: bool) -> list[Chunk]:
    """This data-parallel rank's share of a parameter held whole: an even split of the
    weights, and of the optimizer state the elements of its segments (its own part under
    the distributed optimizer, else the same even split)."""
    p, shape, rank, size = entry.param, list(entry.param.shape), pg.dp_cp.rank, pg.dp_cp.size
    lo, hi = p.numel() * rank // size, p.numel() * (rank + 1) // size
    out = _blocks(f"model/{entry.name}", shape, p.detach().reshape(-1), 0, lo, hi, snapshot)
    if _sharding_group(entry, pg)[1] > 1:
        lo, hi = 0, p.numel()
    for key, get in quantities:
        for seg in segments:
            value = get(seg)
            start, stop = max(seg.offset, lo), min(seg.offset + value.numel(), hi)
            out += _blocks(key, shape, value, seg.offset, start, stop, snapshot)
    return out


def _gathered(index: int, entry: ParamEntry, quantities, segments, pg,
              snapshot: bool) -> list[Chunk]:
    """A parameter split over TP or EP, put together whole (collectives: every rank
    calls it); one rank of those holding it writes it."""
    mine = _writes(index, entry.expert, pg)
    out = []
    for key, get in [(f"model/{entry.name}", None), *quantities]:
        local = entry.param.detach() if get is None else _flat_state(entry, segments, get, pg)
        full = gather_logical(local, entry.param, pg)
        if mine:
            out.append(Chunk(key, list(full.shape), [0] * full.dim(), _host(full, snapshot)))
    return out


def collect_chunks(models, pg, optimizer=None, *, snapshot: bool = False) -> list[Chunk]:
    """The blocks of logical tensors this rank writes, in host memory (copies of the live
    tensors with `snapshot`). Every rank must call it: a parameter split over TP or EP is
    gathered."""
    out: list[Chunk] = []
    entries = [e for e in param_entries(models) if not e.is_copy]
    segs = segments_by_param(optimizer) if optimizer is not None else {}
    keys = optimizer_state_keys(optimizer) if optimizer is not None else []
    state = optimizer.optimizer.state if optimizer is not None else {}
    for index, e in enumerate(entries):
        quantities = [(f"optim/{k}/{e.name}", lambda s, k=k: state[s.main][k].view(-1))
                      for k in keys]
        if optimizer is not None and e.param.dtype != torch.float32:
            quantities.insert(0, (f"optim/main/{e.name}", lambda s: s.main.view(-1)))
        segments = segs.get(id(e.param), [])
        if not _whole_here(e, pg):
            out += _gathered(index, e, quantities, segments, pg, snapshot)
        elif index % pg.tp.size == pg.tp.rank:
            out += _own_share(e, quantities, segments, pg, snapshot)
    if pg.dp_cp.rank == 0 and pg.tp.rank == 0:
        for name, t in buffer_entries(models):
            out.append(Chunk(f"buffer/{name}", list(t.shape), [0] * t.dim(),
                             _host(t.detach(), snapshot)))
    return out


# ------------------------------------------------------------------ loading
def _check_shape(name: str, got: torch.Tensor, want: torch.Size) -> None:
    if tuple(got.shape) != tuple(want):
        raise ValueError(f"checkpoint tensor {name}: shape {list(got.shape)} does not fit "
                         f"this model's {list(want)} (another model, or another vocabulary "
                         f"padding?)")


@torch.no_grad()
def load_model(models, pg, read) -> None:
    """Set every parameter and persistent buffer from `read(logical name)`."""
    for e in param_entries(models):
        full = fit_vocab_rows(e.source, read(f"model/{e.source}"), e.param, pg)
        local = shard_logical(full, e.param, pg)
        _check_shape(f"model/{e.source}", local, e.param.shape)
        e.param.data.copy_(local)
    for name, t in buffer_entries(models):
        value = read(f"buffer/{name}")
        _check_shape(f"buffer/{name}", value, t.shape)
        t.copy_(value)


@torch.no_grad()
def load_optimizer(models, pg, optimizer, read, keys: list[str],
                   step_count: float | None) -> None:
    """Set main weights and per-element optimizer state of this rank's segments from the
    checkpoint's `read` (a `TensorReader`)."""
    segs = segments_by_param(optimizer)
    state = optimizer.optimizer.state
    for e in param_entries(models):
        segments = segs.get(id(e.param), [])
        if not segments:
            continue

        def per_segment(name: str) -> list[torch.Tensor]:
            """`name`'s elements for each of the segments. A parameter held whole with
            the stored shape reads only those (a share of the checkpoint under the
            distributed optimizer); others read the logical tensor and reshard it."""
            if _whole_here(e, pg) and read.shape(name) == list(e.param.shape):
                return [read.flat(name, s.offset, s.offset + s.main.numel()).float()
                        .to(e.param.device) for s in segments]
            full = fit_vocab_rows(e.source, read(name).float(), e.param, pg)
            local = shard_logical(full, e.param, pg)
            _check_shape(name, local, e.param.shape)
            flat = local.reshape(-1).to(e.param.device)
            return [flat[s.offset:s.offset + s.main.numel()] for s in segments]

        main_name = f"optim/main/{e.source}"
        mains = per_segment(main_name if read.has(main_name) else f"model/{e.source}")
        for seg, main in zip(segments, mains):
            seg.main.copy_(main)
        for key in keys:
            for seg, values in zip(segments, per_segment(f"optim/{key}/{e.source}")):
                st = state[seg.main]
                st[key] = values.clone()
                if step_count is not None:
                    st["step"] = torch.tensor(step_count, dtype=torch.float32)
