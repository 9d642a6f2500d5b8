"""Megatron-LM's legacy checkpoints (`--ckpt-format torch`) as Paratron logical tensors.

On disk (Megatron's `get_checkpoint_name`):

    <load>/latest_checkpointed_iteration.txt            "1000" or "release"
    <load>/iter_0001000/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt

with the TP rank, the PP rank (when PP > 1) and the EP rank (when EP > 1). Each file is a
pickle of `args` (the model config), `checkpoint_version` and `model` (`model0`, ...
with virtual stages) under Megatron-Core names with stage-local layer numbers, read by
`safe_pickle.load_torch`, which runs no code in them; `--trust-pickle` unpickles in full
only a file holding a global that reader refuses. Layer numbers are made global with
Paratron's own stage split (which follows Megatron's), TP shards are put together by
`gather_tensor` (Paratron declares Megatron's sharding), Transformer Engine's fused norms
become separate norms, `_extra_state` is dropped, and local expert K of EP rank e becomes
global expert e * (E / EP) + K. `torch_dist` folders are megatron_dist.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Callable

import torch

from paratron.checkpoint.safe_pickle import (RefusedGlobalError, load_torch,
                                             load_torch_in_full)
from paratron.checkpoint.untrusted import UntrustedFileError
from paratron.convert.errors import ConversionError
from paratron.convert.hf_mapping import OUTPUT
from paratron.convert.megatron_args import config_from_args
from paratron.convert.streaming import StreamedModel, model_layout
from paratron.parallel.expert_parallel import expert_gather
from paratron.parallel.pipeline import model_chunks
from paratron.parallel.sharding import gather_tensor, layout_of

FILE = "model_optim_rng.pt"
LATEST = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED = {"mlp.experts.weight1": "mlp.experts.linear_fc1.weight",
            "mlp.experts.weight2": "mlp.experts.linear_fc2.weight"}
# Transformer Engine fuses a norm into the linear that follows it.
FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_q_proj.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_q_down_proj.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def rank_folder(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    """Megatron's `mp_rank_TT[_PPP][_EEE]` name of a rank's folder at PP `pp`, EP `ep`."""
    return (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
            + (f"_{ep_rank:03d}" if ep > 1 else ""))


def load_required(path: Path, missing: str):
    """A Megatron torch file read with no code run; a missing or refused file is one
    ConversionError (`missing` says what its absence means)."""
    if not path.is_file():
        raise ConversionError(f"{path}: missing; {missing}")
    try:
        return load_torch(path)
    except UntrustedFileError as exc:
        raise ConversionError(str(exc)) from None


def iteration_dir(load_dir: Path) -> Path:
    if any(_RANK_DIR.match(p.name) for p in load_dir.iterdir() if p.is_dir()):
        return load_dir
    latest = load_dir / LATEST
    if not latest.is_file():
        raise ConversionError(f"--load-dir {load_dir}: no {LATEST} and no mp_rank_XX "
                              f"folders; not a Megatron-LM checkpoint")
    text = latest.read_text().strip()
    if text == "release":
        return load_dir / "release"
    if not text.isdigit():
        raise ConversionError(f"{latest}: expected an iteration number or 'release', got "
                              f"{text[:40]!r}")
    return load_dir / f"iter_{int(text):07d}"


def check_names(found: set[str], layout, where) -> None:
    """Refuse a checkpoint whose tensors are not exactly the model its args describe."""
    expected = {n for group in layout.groups for n in group}
    extra = sorted(found - expected)
    if extra:
        raise ConversionError(f"{where}: tensor {extra[0]} does not belong to the model "
                              f"the saved args describe ({len(extra)} such tensors)")
    missing = sorted(expected - found)
    if missing:
        raise ConversionError(f"{where}: no tensor for {missing[0]} ({len(missing)} "
                              f"missing)")


def _once(warn: Callable[[str], None]) -> Callable[[str], None]:
    """`warn` saying each distinct line once (one per refused global, not per file)."""
    said: set[str] = set()

    def once(line: str) -> None:
        if line not in said:
            said.add(line)
            warn(line)
    return once


def _load(path: Path, trust_pickle: bool, warn: Callable[[str], None]) -> dict:
    """A `model_optim_rng.pt` read with no code run; in full only with --trust-pickle and
    only when the safe reader refuses a global in it."""
    try:
        state = load_torch(path)
    except RefusedGlobalError as exc:
        if not trust_pickle:
            raise ConversionError(f"{exc}; if the checkpoint comes from a source you trust, "
                                  f"--trust-pickle unpickles such files in full") from None
        warn(f"WARNING: --trust-pickle: unpickling {FILE} files holding "
             f"{exc.global_name} in full; only do this for checkpoints from a trusted "
             f"source")
        try:
            state = load_torch_in_full(path)
        except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file
            raise ConversionError(f"{path}: not a readable Megatron-LM checkpoint file "
                                  f"({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:160]})") from None
    except UntrustedFileError as exc:
        raise ConversionError(str(exc)) from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not Megatron-LM's "
                              f"checkpoint dict")
    return state


@dataclasses.dataclass
class _Shard:
    tp: int
    pp: int
    ep: int
    path: Path
    state: dict | None = None


def _paratron_name(local: str, layers: range) -> tuple[str, int | None] | None:
    """(Paratron global name, local expert index or None) of a Megatron key, or None for
    entries that are not weights (`_extra_state`)."""
    if local.endswith("_extra_state"):
        return None
    match = _LAYER.match(local)
    if not match:
        return local, None
    layer, rest = layers[int(match.group(1))], match.group(2)
    rest = FUSED_NORMS.get(rest, rest)
    expert = None
    if (m := _LOCAL_EXPERT.match(rest)):
        expert, rest = int(m.group(1)), "mlp.experts." + m.group(2)
    elif rest in _GROUPED:
        expert, rest = -1, _GROUPED[rest]  # all local experts in one tensor
    return f"decoder.layers.{layer}.{rest}", expert


def read_megatron_checkpoint(load_dir: str | Path, *, trust_pickle: bool,
                             warn: Callable[[str], None]) -> StreamedModel:
    """A Megatron-LM legacy checkpoint as a stream of Paratron layer groups."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise ConversionError(f"--load-dir {load_dir}: not a folder")
    folder = iteration_dir(load_dir)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: missing ({LATEST} names it)")
    found = sorted((p, _RANK_DIR.match(p.name)) for p in folder.iterdir() if p.is_dir())
    found = [(p, m) for p, m in found if m]
    if not found:
        raise ConversionError(f"{folder}: no mp_rank_XX folders")
    load = functools.partial(_load, trust_pickle=trust_pickle, warn=_once(warn))
    first = found[0][0] / FILE
    if not first.is_file():
        raise ConversionError(f"{first}: missing")
    head = load(first)
    args = head.get("args")
    if args is None:
        raise ConversionError(f"{first}: holds no 'args'; cannot tell the model's shape")
    if head.get("checkpoint_version", 0) < 3.0:
        raise ConversionError(f"{first}: checkpoint_version {head.get('checkpoint_version')} "
                              f"(before 3.0 the QKV layout differs); re-save it with a "
                              f"recent Megatron-LM")
    config = config_from_args(args, first)
    tp = args.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size
    ep = getattr(args, "expert_model_parallel_size", 1) or 1
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    if etp not in (1, tp):
        raise ConversionError(f"{first}: expert tensor-parallel size {etp} with TP {tp}; "
                              f"Paratron reads expert TP equal to TP or 1")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    split = dict(first=getattr(args, "decoder_first_pipeline_num_layers", None),
                 last=getattr(args, "decoder_last_pipeline_num_layers", None))
    shards: dict[tuple[int, int, int], _Shard] = {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                path = folder / rank_folder(t, p, e, pp, ep) / FILE
                if not path.is_file():
                    raise ConversionError(f"{path}: missing (the checkpoint was saved at TP "
                                          f"{tp} x PP {pp} x EP {ep})")
                shards[t, p, e] = _Shard(t, p, e, path)
    shards[0, 0, 0].state = head
    layout = model_layout(config)
    local_experts = (config.num_experts or 0) // ep
    tied = not config.untie_embeddings_and_output_weights

    # Where every Paratron tensor's pieces are: name -> {(tp, ep): [(pp, key, expert)]}.
    where: dict[str, dict[tuple[int, int], list]] = {}
    for (t, p, e), shard in shards.items():
        if shard.state is None:
            shard.state = load(shard.path)
        chunks = model_chunks(config.num_layers, pp, p, vpp, **split)
        for c, chunk in enumerate(chunks):
            key = "model" if vpp == 1 else f"model{c}"
            state = shard.state.get(key)
            if state is None:
                raise ConversionError(f"{shard.path}: holds no '{key}' state dict")
            for local in state:
                named = _paratron_name(local, chunk.layers)
                if named is None or (named[0] == OUTPUT and tied):
                    continue  # not a weight, or the last stage's copy of the embedding
                if named[0].startswith(("language_model.", "encoder.")):
                    raise ConversionError(f"{shard.path}: {local} is a legacy (non-Core) "
                                          f"Megatron model; Paratron reads Megatron-Core "
                                          f"checkpoints (--use-mcore-models)")
                where.setdefault(named[0], {}).setdefault((t, e), []).append(
                    (shard, key, local, named[1]))
    check_names(set(where), layout, folder)

    def piece(entries, param) -> torch.Tensor:
        """One (TP, EP) rank's tensor: experts stacked, others as stored."""
        shard, key, local, expert = entries[0]
        if expert is None:
            return shard.state[key][local]
        if expert == -1:  # GroupedMLP: [h, E_local * out] or [E_local * in, h]
            w = shard.state[key][local]
            if local.endswith("weight1"):
                return w.view(local_experts, w.shape[0], -1).transpose(1, 2)
            return w.view(local_experts, -1, w.shape[1]).transpose(1, 2)
        by_index = {x[3]: x for x in entries}
        return torch.stack([by_index[k][0].state[by_index[k][1]][by_index[k][2]]
                            for k in range(local_experts)])

    def assemble(name: str) -> torch.Tensor:
        param = layout.params.get(name)
        ranks = where[name]
        if param is not None and layout_of(param).expert:
            etp_ranks = range(tp) if etp == tp else range(1)
            full = expert_gather([[piece(ranks[t, e], param) for t in etp_ranks]
                                  for e in range(ep)], param)
        else:
            parts = [piece(ranks[t, 0], param) for t in range(tp)]
            full = gather_tensor(parts, param) if param is not None else parts[0]
            if tuple(full.shape) != tuple(layout.shape(name)) and tp > 1 and \
                    parts[0].dim() and parts[0].shape[0] * tp == layout.shape(name)[0]:
                full = torch.cat(parts)  # an older Megatron split this one by rows
        if tuple(full.shape) != tuple(layout.shape(name)):
            shard, _, local, _ = ranks[min(ranks)][0]
            raise ConversionError(f"{shard.path}: {local} gives {name} the shape "
                                  f"{list(full.shape)}, the saved args imply "
                                  f"{list(layout.shape(name))}")
        return full.clone()

    def groups():
        for names in layout.groups:
            yield {layout.key(n): assemble(n) for n in names}

    return StreamedModel(config=config, vocab_size=config.padded_vocab_size, groups=groups,
                         num_groups=len(layout.groups), source=str(folder))
