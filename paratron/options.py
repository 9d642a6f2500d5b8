"""The settings' building blocks: a field that carries its command-line flag, the rules
every number obeys, and the one-line refusal. The config tree's owners (the model, the
run) and the parser generated from it all need them, so they import nothing above."""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any


class ConfigError(ValueError):
    """A refused configuration; the message is one line naming the flag and the fix."""


def opt(default: Any, help: str, *, flag: str | None = None, type=None, choices=None,
        action: str | None = None, nargs=None, group: str | None = None, metavar=None,
        positive: bool = False, maximum: int | None = None):
    """A config field with its command-line flag.

    `flag` defaults to `--` + the field name with dashes; booleans become switches
    (store_true, or store_false when the default is True and the flag negates it).
    Numbers (`type` int or float) are finite and not negative; `positive` also refuses
    zero (a size, a divisor, an interval) and `maximum` caps them (see `number_problem`).
    """
    meta = dict(help=help, flag=flag, type=type, choices=choices, action=action,
                nargs=nargs, group=group, metavar=metavar, positive=positive,
                maximum=maximum)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Seeds numpy's legacy generator takes are below 2**32; Paratron adds rank offsets
# (100 per pipeline stage, 2718 + TP rank, 1024 + 100 per expert rank) to --seed.
MAX_SEED = 2 ** 31 - 1


def number_problem(value: Any, kind: type, positive: bool | None = False,
                   maximum: int | None = None) -> str | None:
    """What is wrong with `value` as a setting of numeric type `kind` (int or float), or
    None. Every number Paratron takes is a count, a size, a rate or a coefficient: NaN,
    infinities and negative values mean nothing for any of them and would otherwise
    surface steps later as a traceback in torch or numpy, or as a silently broken run.
    `positive` None checks the kind only (the range is checked elsewhere)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not an integer" if kind is int else "is not a number"
    if kind is int and not isinstance(value, int):
        return "is not a whole number"
    if not math.isfinite(value):
        return "is not a finite number"
    if positive is None:
        return None
    if positive and value <= 0:
        return "must be positive"
    if value < 0:
        return "must be 0 or more"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum}"
    return None


def fields_with_flags(section_cls):
    """The fields of a settings dataclass that a user can set (those declared by `opt`)."""
    for f in fields(section_cls):
        if "help" in f.metadata:
            yield f


def flags_of(f) -> tuple[str, ...]:
    """A field's spellings on the command line (the first is the documented one)."""
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)


def check_numbers(values) -> None:
    """Refuse a numeric setting of the dataclass `values` that is not a finite,
    non-negative number of its field's type (or zero where the field must be positive),
    naming its flag. Values reach the tree from flags, --config files, presets,
    checkpoints' recorded configs and library calls; this is the one check they all
    pass."""
    for f in fields_with_flags(type(values)):
        m, value = f.metadata, getattr(values, f.name)
        if m["type"] not in (int, float) or value is None:
            continue
        problem = number_problem(value, m["type"], m["positive"], m["maximum"])
        if problem:
            raise ConfigError(f"{flags_of(f)[0]} {problem}, got {value!r}")
