"""`paratron parity`: where a parallel layout parts from the one-process run.

Every layout trains the same iterations as one process, from the same initial weights
(each weight is drawn whole from its global name, whatever the layout) or the same
--load checkpoint, on the same batches (samples are a function of their index; DP rank r
of D holds micro-batch k x D + r of the global batch). Hooks record, per module by its
global name, each micro-batch's forward output and input gradient, then each parameter's
gradient after the DP/TP reductions and its updated weight; the layout's shards are put
back into global tensors (TP column/row splits, sequence-parallel and context-parallel
sequence splits, pipeline placement, expert shards) and compared with the reference's.

Under expert parallelism a token's rows inside the experts depend on the routing of the
whole layout, so the experts' own activations are not compared: the MoE layer's output
and input gradient stand for them, and the stacked expert weights and their gradients
are gathered over EP x expert-TP and compared whole.

The report is a table of the largest relative difference (max |layout - reference| over
max |reference|) per module and iteration, split by direction (forward outputs, backward
gradients, optimizer updates), then the first tensor beyond the tolerance in the order
an iteration computes them, or "equal within <tol>".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from paratron.cli.args import parse_args
from paratron.config import Config, pad_vocab_size
from paratron.debug.compare import DEFAULT_TOLERANCE, Difference, differences
from paratron.debug.layouts import Layout, parse_layout, refuse_layout_flags
from paratron.debug.recorder import DIRECTION
from paratron.debug.workers import FAULT_ENV, RankRecords, run_layout
from paratron.options import ConfigError
from paratron.training.moe_logging import format_expert_load

DIRECTIONS = ("forward", "backward", "optimizer")
ABBREVIATIONS = {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}


@dataclass
class LayoutReport:
    """A layout's differences from the reference and the first beyond the tolerance."""

    layout: str
    tolerance: float
    differences: list[Difference] = field(default_factory=list)
    expert_load: list[str] = field(default_factory=list)

    @property
    def first(self) -> Difference | None:
        return next((d for d in self.differences if not d.relative <= self.tolerance), None)

    def table(self) -> str:
        """Largest relative difference per module (rows, by layer, then in the order
        the reference first recorded them) and iteration and direction (columns); '-'
        where nothing was recorded."""
        iterations = sorted({d.key.iteration for d in self.differences})
        columns = [(i, direction) for i in iterations for direction in DIRECTIONS]
        worst: dict[str, dict] = {}
        for d in self.differences:
            cell = (d.key.iteration, DIRECTION[d.key.phase])
            row = worst.setdefault(d.key.module, {})
            row[cell] = max(row.get(cell, 0.0), d.relative)
        width = max([len(name) for name in worst] + [6])
        head = "".join(f"{f'it{i} {ABBREVIATIONS[direction]}':>9} " for i, direction in columns)
        lines = [f"{'module':<{width}}{head}".rstrip()]
        appearance = {name: i for i, name in enumerate(worst)}
        for name in sorted(worst, key=lambda name: (_layer_of(name), appearance[name])):
            cells = "".join(self._cell(worst[name].get(column)) for column in columns)
            lines.append(f"{name:<{width}}{cells}".rstrip())
        return "\n".join(lines)

    def _cell(self, value: float | None) -> str:
        """A difference in a column 10 wide, starred beyond the tolerance."""
        if value is None:
            return f"{'-':>9} "
        return f"{value:>9.1e}" + ("*" if not value <= self.tolerance else " ")

    def verdict(self) -> str:
        first = self.first
        if first is None:
            return f"{self.layout}: equal within {self.tolerance:g}"
        return (f"{self.layout}: first difference beyond {self.tolerance:g}: "
                f"{first.describe()}")


def expert_load_lines(reference: RankRecords, layout: RankRecords) -> list[str]:
    """Each MoE layer's global tokens per expert per iteration, the reference's, and
    whether the layout routed every token alike (counts: equal, or the routing parted)."""
    lines = []
    for iteration, loads in reference.expert_load.items():
        theirs = {load.layer: load for load in layout.expert_load.get(iteration, [])}
        for load in loads:
            other = theirs.get(load.layer)
            same = other is not None and other.tokens_per_expert == load.tokens_per_expert
            verdict = ("routed alike" if same else "routed differently: " + (
                "no count" if other is None else
                ", ".join(f"{n:g}" for n in other.tokens_per_expert)))
            lines.append(f" iteration {iteration} |" + format_expert_load(load) + f" {verdict}")
    return lines


def _layer_of(name: str) -> int:
    """A module's layer: the embedding before the first, the final norm and output layer
    after the last."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        return int(parts[2])
    return -1 if parts[0] == "embedding" else 1 << 30


def precision_of(cfg: Config) -> str:
    t = cfg.training
    return "bf16" if t.bf16 else "fp16" if t.fp16 else "fp64" if t.fp64 else "fp32"


def _run_config(argv: list[str]) -> Config:
    """A run's config: on the CPU (every run on gloo, exactly), writing nothing, and
    refusing a --load without a checkpoint (fresh weights would answer another
    question)."""
    cfg = parse_args(argv, prog="paratron parity")
    cfg.training.device = "cpu"
    cfg.checkpoint.save = None
    cfg.checkpoint.exit_on_missing_checkpoint = True
    return cfg


def reference_config(train_flags: list[str]) -> Config:
    """The one-process run; the training flags may not set a layout, and a --load folder
    must hold a checkpoint."""
    from paratron.training.run_checkpoints import find_checkpoint

    refuse_layout_flags(train_flags)
    cfg = _run_config(train_flags + ["--world-size", "1"])
    load = cfg.checkpoint.load
    if load is not None:
        if not Path(load).is_dir():
            raise ConfigError(f"--load {load}: no such folder")
        if find_checkpoint(load, required=False, log=lambda line: None) is None:
            raise ConfigError(f"--load {load}: no checkpoint in this folder")
    return cfg


def layout_config(train_flags: list[str], layout: Layout) -> Config:
    try:
        return _run_config(train_flags + list(layout.flags)
                           + ["--world-size", str(layout.world_size)])
    except ConfigError as exc:
        raise ConfigError(f"layout {layout.text!r}: {exc}") from None


def _pin_vocabulary(configs: list[Config], tp_sizes: list[int]) -> None:
    """Megatron pads the vocabulary to a multiple of TP, which would make the layouts
    different models (another output size, other initial weights): every run pads it for
    all the layouts' TP sizes at once, unless --padded-vocab-size or --load fixes it."""
    from paratron.training.pretrain import build_tokenizer_for

    m = configs[0].model
    if m.padded_vocab_size is not None or configs[0].checkpoint.load is not None:
        return
    tokenizer = build_tokenizer_for(configs[0])
    if tokenizer is None:
        raise ConfigError("no tokenizer: give --tokenizer-type with its files (or, with "
                          "--mock-data, --vocab-size)")
    padded = pad_vocab_size(tokenizer.vocab_size + m.extra_vocab_size,
                            m.make_vocab_size_divisible_by, math.lcm(*tp_sizes))
    for cfg in configs:
        cfg.model.padded_vocab_size = padded


def check_parity(train_flags: list[str], layouts: list[str], iterations: int = 2,
                 tolerance: float | None = None, log: Callable[[str], None] = print
                 ) -> list[LayoutReport]:
    """Compare each layout with the one-process run of `train_flags` over `iterations`
    iterations; one report per layout. Refusals (flags, layouts) come before any process
    starts. Tests name a fault to inject in the layouts' processes in the environment
    variable `FAULT_ENV` (see `paratron.debug.workers`)."""
    reference_cfg = reference_config(train_flags)
    parsed = [parse_layout(text) for text in layouts]
    configs = [layout_config(train_flags, layout) for layout in parsed]
    _pin_vocabulary([reference_cfg, *configs], [layout.tp for layout in parsed])
    fault = os.environ.get(FAULT_ENV) or None
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE[precision_of(reference_cfg)]
    log(f"reference: 1 process, {iterations} iteration{'s' * (iterations > 1)}")
    reference = run_layout(reference_cfg, (1, 1), 1, iterations, None, "reference")[0]
    reports = []
    for layout, cfg in zip(parsed, configs):
        log(f"layout {layout.text}: {layout.world_size} processes")
        ranks = run_layout(cfg, (layout.tp, layout.pp, layout.cp, layout.ep, layout.etp),
                           layout.world_size, iterations, fault, f"layout {layout.text!r}")
        report = LayoutReport(layout.text, tol, differences(reference.records, ranks),
                              expert_load_lines(reference, ranks[0]))
        log(report.table())
        for line in report.expert_load:
            log(line)
        log(report.verdict())
        reports.append(report)
    return reports
