"""Parallel layouts written as short tokens ("tp2 sp", "pp2 vpp2", "ep2 tp2", "dp2 distopt")
and the `paratron train` flags and world size each one means."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from paratron.options import ConfigError

# sizeN tokens and their flags (dpN only sets the world size) and the switches.
SIZES = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
         "vpp": "--num-virtual-stages-per-pipeline-rank", "cp": "--context-parallel-size",
         "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size",
         "dp": None}
SWITCHES = {"sp": ["--sequence-parallel"], "distopt": ["--use-distributed-optimizer"],
            "overlap": ["--overlap-grad-reduce", "--overlap-param-gather"]}
# Flags that --layouts sets: refused among the training flags, where they would make
# the one-process reference a parallel run.
LAYOUT_FLAGS = ({flag for flag in SIZES.values() if flag}
                | {flag for flags in SWITCHES.values() for flag in flags}
                | {"--num-layers-per-virtual-pipeline-stage", "--world-size", "--rank",
                   "--init-method"})


@dataclass(frozen=True)
class Layout:
    """One layout: its text, sizes and the flags that select it."""

    text: str
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    dp: int = 1
    flags: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def parse_layout(text: str) -> Layout:
    """A layout from its tokens; without dpN, the smallest data-parallel size the expert
    layout needs (EP x expert-TP must divide TP x CP x DP)."""
    sizes: dict[str, int] = {}
    flags: list[str] = []
    for token in text.split():
        match = re.fullmatch(r"([a-z]+)(\d+)", token)
        if match and match[1] in SIZES and int(match[2]) > 0:
            name, size = match[1], int(match[2])
            if name in sizes:
                raise ConfigError(f"layout {text!r}: {name} is given twice")
            sizes[name] = size
            if SIZES[name]:
                flags += [SIZES[name], str(size)]
        elif token in SWITCHES:
            flags += SWITCHES[token]
        else:
            known = ", ".join([f"{name}N" for name in SIZES] + list(SWITCHES))
            raise ConfigError(f"layout {text!r}: unknown token {token!r} (known: {known})")
    if not flags and "dp" not in sizes:
        raise ConfigError(f"layout {text!r} is the one-process run itself; give parallel "
                          f"sizes such as 'tp2 sp'")
    tp, cp, ep = sizes.get("tp", 1), sizes.get("cp", 1), sizes.get("ep", 1)
    etp = sizes.get("etp")
    experts = ep * (tp if etp is None else etp)
    dp = sizes.get("dp", experts // math.gcd(experts, tp * cp))
    return Layout(" ".join(text.split()), tp=tp, pp=sizes.get("pp", 1), cp=cp, ep=ep, etp=etp,
                  dp=dp, flags=tuple(flags))


def refuse_layout_flags(train_flags: list[str]) -> None:
    """The training flags describe the model and data; layouts come from --layouts."""
    for token in train_flags:
        if token.split("=", 1)[0] in LAYOUT_FLAGS:
            raise ConfigError(f"{token.split('=', 1)[0]} is a layout setting: give it in "
                              f"--layouts (e.g. --layouts \"tp2 sp\"), the reference is "
                              f"one process")
