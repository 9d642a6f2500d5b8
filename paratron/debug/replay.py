"""Re-run one saved training iteration on the CPU at one process, watching every op.

A checkpoint records the run's settings (`Config.to_dict()`) and its counters (iteration,
consumed samples), and a batch is a pure function of the data settings and the samples
consumed before it. So the global batch of iteration N is rebuilt from the newest
checkpoint saved before N, whatever layout wrote it: the checkpoint's weights load at
one process, the steps between it and N run as the Trainer runs them, and step N runs
under a `paratron.debug.probe.StepProbe` (per-module statistics, each sample's loss,
the first op to produce a NaN/Inf). The step itself is the Trainer's own `train_step`,
so its loss is the one the run logged.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from paratron.checkpoint import files
from paratron.checkpoint.checkpointing import load_checkpoint
from paratron.checkpoint.megatron_folder import megatron_load_problem
from paratron.cli.args import config_to_yaml, parse_args
from paratron.config import SECTIONS, Config, config_of, recorded_settings
from paratron.debug.probe import StepProbe, non_finite_parameters
from paratron.inference.loading import checkpoint_tokenizer
from paratron.options import ConfigError, fields_with_flags
from paratron.training.moe_logging import (count_expert_load, format_expert_load,
                                           layer_expert_load)
from paratron.training.pretrain import build_datasets
from paratron.training.trainer import Trainer

# Replay runs eagerly on the CPU: a compiled layer would hide its ops from the watch.
_REPLAY_SETTINGS = {"device": "cpu", "torch_compile": False}
# The settings that say where a run's samples come from; a checkpoint imported from
# Megatron-LM records none of them.
DATA_SOURCES = ("data_path", "train_data_path", "mock_data", "data_path_config")


class ReplayError(ValueError):
    """A replay that cannot be done as asked, in one line."""


# ----------------------------------------------------------------- the run's settings
def find_checkpoint_before(load_dir: str, iteration: int,
                           log: Callable[[str], None]) -> tuple[int, Path]:
    """(iteration, directory) of the newest complete checkpoint in `load_dir` saved
    before `iteration` (its weights are those iteration `iteration` started from)."""
    if not Path(load_dir).is_dir():
        raise ReplayError(f"--load {load_dir}: no such directory")
    problem = megatron_load_problem(load_dir)
    if problem:
        raise ReplayError(problem)
    saved = files.list_iterations(load_dir)
    if not saved:
        raise ReplayError(f"--load {load_dir}: no checkpoint (iter_<iteration>/ folders)")
    for found in (i for i in saved if i < iteration):
        path = files.checkpoint_dir(load_dir, found)
        problems = files.verify_checkpoint(path)
        if not problems:
            return found, path
        log(f"WARNING: checkpoint {path} is incomplete or corrupt ({problems[0]}); trying "
            f"an older one")
    raise ReplayError(f"--iteration {iteration}: no such iteration to replay from --load "
                      f"{load_dir}: it holds no complete checkpoint before it (the oldest "
                      f"is iteration {saved[-1]}; a checkpoint of iteration N holds the "
                      f"weights after N)")


def replay_config(saved: dict, overrides: dict, where: Path,
                  log: Callable[[str], None]) -> Config:
    """The run's Config from the checkpoint's record, at one process on the CPU, with the
    flags given on the command line (`overrides`, by Megatron dest name) on top."""
    defaults = Config()
    try:
        recorded = recorded_settings(saved, where)
    except ConfigError as error:
        raise ReplayError(str(error)) from None
    known = {f.name for section in SECTIONS
             for f in fields_with_flags(type(getattr(defaults, section)))}
    flat = {k: v for k, v in recorded.items() if k in known}
    data = saved.get("data") or {}
    if not any(data.get(key) for key in DATA_SOURCES):
        absent = (f"{where}: the checkpoint records no data settings (imported from "
                  f"Megatron-LM?)")
        if not any(overrides.get(key) for key in DATA_SOURCES):
            raise ReplayError(f"{absent}; give the run's data flags: --data-path (or "
                              f"--mock-data), --split, --seq-length, --train-iters, the "
                              f"batch sizes and --seed as the run had them")
        log(f" {absent}: the data flags given here build the batches")
    flat.update(overrides)
    flat.update(_REPLAY_SETTINGS)
    return _read_as_flags(flat, where)


def _read_as_flags(values: dict, where: Path) -> Config:
    """`values` (Megatron dest names) read as `paratron train --config` reads its file, so
    a recorded value of the wrong kind or outside its flag's choices is refused in one
    line like a flag, and the tree is finalized and validated as a run's."""
    with tempfile.TemporaryDirectory() as folder:
        settings = Path(folder) / "settings.yaml"
        try:
            settings.write_text(config_to_yaml(config_of(values)), encoding="utf-8")
            return parse_args(["--config", str(settings)], prog="paratron replay")
        except (TypeError, ValueError) as error:  # a ConfigError, or a record of another kind
            message = str(error).replace(f"--config {settings}: ", "")
            raise ReplayError(f"the run's settings from {where}: {message}") from None


# ----------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    iteration: int
    loaded_iteration: int
    first_sample: int  # index of the first sample replayed
    loss: float | None  # the iteration's lm loss (None when one micro-batch ran)
    probe: StepProbe
    bad_parameters: list[str]
    expert_load: list  # `ExpertLoad` of each MoE layer, this step
    capacity: bool  # whether a capacity drops tokens


def load_replay(load_dir: str, iteration: int, overrides: dict,
                log: Callable[[str], None] = print):
    """(trainer at one process with the weights saved before `iteration`, checkpoint
    iteration, tokenizer or None when the checkpoint holds none)."""
    loaded, path = find_checkpoint_before(load_dir, iteration, log)
    meta = files.read_metadata(path)
    cfg = replay_config(meta.get("config") or {}, overrides, path, log)
    if iteration > cfg.training.train_iters:
        raise ReplayError(f"--iteration {iteration}: no such iteration: the run trains "
                          f"{cfg.training.train_iters} iterations")
    tokenizer = checkpoint_tokenizer(load_dir, cfg)
    datasets = build_datasets(cfg, tokenizer)
    trainer = Trainer(cfg, datasets, tokenizer_vocab_size=tokenizer.vocab_size, log=log)
    with_optimizer = meta.get("optimizer") is not None
    if not with_optimizer and iteration - 1 > loaded:
        steps = (f"iteration {loaded + 1}" if iteration - 1 == loaded + 1 else
                 f"iterations {loaded + 1} to {iteration - 1}")
        log(f"WARNING: {path} holds no optimizer state: {steps} start the optimizer "
            f"afresh, unlike the run")
    try:
        load_checkpoint(path, trainer.models, trainer.pg,
                        trainer.optimizer if with_optimizer else None, log=log)
    except (KeyError, ValueError) as error:  # state the recorded settings do not fit
        raise ReplayError(f"--load {load_dir}: {path.name} does not fit its recorded "
                          f"settings ({error})") from None
    for key, value in meta.get("train_state", {}).items():
        if hasattr(trainer.state, key):
            setattr(trainer.state, key, value)
    trainer.state.iteration = loaded
    trainer._moe_bookkeeping(stepped=False)  # the loaded loss scale's aux-loss scale
    folder = Path(load_dir) / files.TOKENIZER_DIR
    return trainer, loaded, tokenizer if files.read_tokenizer_info(folder) else None


def replay(trainer: Trainer, iteration: int, *, micro_batch: int | None = None,
           keep_tensors: bool = False, log: Callable[[str], None] = print) -> ReplayResult:
    """Run `trainer` (loaded by `load_replay`) up to iteration `iteration`, that one under
    a `StepProbe`."""
    loaded = trainer.state.iteration
    if micro_batch is not None and not 0 <= micro_batch < trainer.num_microbatches:
        raise ReplayError(f"--micro-batch {micro_batch}: out of range: iteration "
                          f"{iteration} has {trainer.num_microbatches} micro-batches at one "
                          f"process (0 to {trainer.num_microbatches - 1})")
    while trainer.state.iteration < iteration - 1:
        loss = trainer.train_step()[0]
        trainer.state.iteration += 1
        log(f" iteration {trainer.state.iteration:>7d} | lm loss: {loss:.6E} |")
    first_sample = (trainer.state.consumed_train_samples
                    + (micro_batch or 0) * trainer.cfg.training.micro_batch_size)
    bad = non_finite_parameters(trainer.models)
    probe = StepProbe(trainer.models, keep_tensors=keep_tensors)
    moe = bool(trainer.cfg.model.num_experts)
    if moe:
        count_expert_load(trainer.models)
    with probe.watching(trainer.stage, micro_batch):
        loss = trainer.train_step()[0]
    trainer.state.iteration += 1
    expert_load = layer_expert_load(trainer.models, trainer.pg) if moe else []
    factor = trainer.cfg.model.moe_expert_capacity_factor
    return ReplayResult(iteration, loaded, first_sample,
                        loss if micro_batch is None else None, probe, bad, expert_load,
                        factor is not None and factor >= 0)


# ----------------------------------------------------------------- report
def report(result: ReplayResult, tokenizer=None) -> list[str]:
    """The replay's console lines: loss, per-sample losses, the worst sample, the first
    non-finite op, statistics per module, expert load."""
    probe, out = result.probe, []
    if result.loss is not None:
        out.append(f" iteration {result.iteration:>7d} | lm loss: {result.loss:.6E} "
                   f"({result.loss!r}) |")
    losses = probe.sample_losses
    out.append(" loss per sample (index: loss):")
    for start in range(0, len(losses), 6):
        out.append("  " + "  ".join(f"{result.first_sample + i}: {losses[i]:.4f}"
                                    for i in range(start, min(start + 6, len(losses)))))
    worst = max(range(len(losses)), key=lambda i: math.inf if math.isnan(losses[i])
                else losses[i])
    tokens = probe.samples[worst].tolist()
    out.append(f" worst sample {result.first_sample + worst} (loss {losses[worst]:.4f}), "
               f"tokens: {tokens}")
    if tokenizer is not None:
        out.append(f" worst sample as text: {tokenizer.decode(tokens)!r}")
    for name in result.bad_parameters:
        out.append(f" parameter {name} holds NaN/Inf before the step")
    out.append(f" first NaN/Inf: {probe.first_non_finite or 'none'}")
    rows = [(name, probe.activations[name], probe.gradients.get(name))
            for name, _ in probe.modules() if name in probe.activations]
    width = max([len(name) for name in probe.weight_grads] + [len(row[0]) for row in rows])
    columns = f"{'max|x|':>11} {'rms':>11} {'nan/inf':>7}"
    out.append(f" {'module':<{width}}  {'output':<31}  output gradient")
    out.append(f" {'':<{width}}  {columns}  {columns}")
    out += [f" {name:<{width}}  {forward.cells()}  {backward.cells() if backward else ''}"
            for name, forward, backward in rows]
    out.append(f" {'parameter':<{width}}  gradient")
    out.append(f" {'':<{width}}  {columns}")
    out += [f" {name:<{width}}  {stats.cells()}" for name, stats in probe.weight_grads.items()]
    out += [format_expert_load(load, capacity=result.capacity) for load in result.expert_load]
    return out


def dump(result: ReplayResult, folder: str) -> Path:
    """Write the kept tensors of the replayed step to `<folder>/iteration_<N>.safetensors`."""
    probe = result.probe
    tensors = dict(probe.tensors)
    tensors["sample_loss"] = torch.tensor(probe.sample_losses, dtype=torch.float32)
    target = files.make_dir(folder) / f"iteration_{result.iteration:07d}.safetensors"
    save_file(tensors, str(target), metadata={
        "iteration": str(result.iteration), "first_sample": str(result.first_sample),
        "loaded_iteration": str(result.loaded_iteration)})
    return target

