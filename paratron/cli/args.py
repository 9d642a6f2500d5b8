"""Megatron-LM's flags (plus a --model-size preset and a --config YAML file) read into the
config tree, and a run written back out as a --config file. The parser is generated from
the tree's fields, so it cannot drift from it. Precedence: built-in defaults < preset <
`--config file.yaml` < command line."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from typing import Any

from paratron.config import SECTIONS, Config, config_of, finalize, validate
from paratron.model.config import UNRECORDED_VALUES
from paratron.options import ConfigError, fields_with_flags, flags_of, number_problem
from paratron.parallel.launch import launched_world_size, launcher_rank


def parse_number(text: Any, kind: type) -> Any:
    """`text` (a command-line or YAML value) as an int or a float. An integer may be
    written as 1e9 or 64.0 when its value is whole; anything else is returned as is,
    for `number_problem` to name."""
    if isinstance(text, str):
        try:
            return kind(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return text
        text = value
    if kind is int and isinstance(text, float) and math.isfinite(text) and text == int(text):
        return int(text)
    return text


class NumberType:
    """argparse `type` of a numeric flag: converts with `parse_number`, so that NaN,
    infinities and fractions of integers are invalid values like any other text. The
    range is left to the command (`check_numbers` for the config tree's flags, which
    also sees the values that come from elsewhere)."""

    def __init__(self, kind: type):
        self.kind = kind
        self.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"

    def __call__(self, text):
        value = parse_number(text, self.kind)
        if number_problem(value, self.kind, None):
            raise ValueError(text)
        return value


# Flags that only steer Megatron's own kernels or launch machinery. Accepted so that
# existing scripts run unchanged; they change nothing in Paratron: (flag, takes a value).
NO_EFFECT_FLAGS = [
    ("--use-mcore-models", False), ("--use-legacy-models", False),
    ("--transformer-impl", True), ("--attention-backend", True),
    ("--no-masked-softmax-fusion", False), ("--no-bias-swiglu-fusion", False),
    ("--no-bias-dropout-fusion", False),
    ("--no-rope-fusion", False), ("--no-gradient-accumulation-fusion", False),
    ("--no-persist-layer-norm", False), ("--no-async-tensor-model-parallel-allreduce", False),
    ("--attention-softmax-in-fp32", False), ("--apply-query-key-layer-scaling", False),
    ("--use-flash-attn", False), ("--tensorboard-queue-size", True),
    ("--tensorboard-log-interval", True), ("--accumulate-allreduce-grads-in-fp32", False),
    ("--moe-permute-fusion", False),
    ("--create-attention-mask-in-dataloader", False),
    ("--no-create-attention-mask-in-dataloader", False),
    ("--empty-unused-memory-level", True), ("--num-dataset-builder-threads", True),
    ("--distributed-timeout-seconds-after-init", True), ("--manual-gc", False),
    ("--log-world-size-to-tensorboard", False), ("--use-cpu-initialization", False),
    ("--check-for-nan-in-loss-and-grad", False),  # the default; --no-... turns it off
    ("--moe-grouped-gemm", False),  # the default; --no-... turns it off
    ("--cross-entropy-loss-fusion", False),  # the default; --no-... turns it off
    ("--fp8-interval", True),  # deprecated and ignored by Megatron too
]
# Megatron flags of what Paratron does not have: refused in one line that says so and
# what to do, rather than as unknown flags.
_DELAYED = ("configures Megatron's delayed FP8 scaling, which Paratron does not "
            "implement: each tensor is scaled by its current amax (--fp8-recipe "
            "tensorwise or rowwise); drop the flag")
NOT_IMPLEMENTED_FLAGS = {
    "--fp8-amax-history-len": _DELAYED,
    "--fp8-amax-compute-algo": _DELAYED,
    "--fp8-param-gather": ("keeps weights in FP8 for the distributed optimizer's "
                           "all-gather; in Paratron FP8 is compute only and weights stay "
                           "in the model dtype; drop the flag"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and names the closest known flag."""

    def error(self, message):
        raise ConfigError(message)


def build_parser(prog: str = "paratron train") -> argparse.ArgumentParser:
    """The Megatron-compatible parser, generated from the config tree."""
    parser = _Parser(prog=prog, allow_abbrev=False,
                     description="Train a GPT-style model. Flags follow Megatron-LM.")
    top = parser.add_argument_group("configuration")
    top.add_argument("--config", metavar="FILE.yaml",
                     help="YAML file keyed by flag names; the command line overrides it.")
    top.add_argument("--model-size", metavar="NAME",
                     help="Preset of published hyper-parameters (e.g. gpt2-124m, llama3-8b, "
                          "qwen2.5-7b, qwen3-8b); any flag overrides it.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section in SECTIONS:
        cls = Config.__dataclass_fields__[section].default_factory
        for f in fields_with_flags(cls):
            m = f.metadata
            name = m["group"] or cls.GROUP
            group = groups.get(name) or groups.setdefault(name, parser.add_argument_group(name))
            kwargs = dict(dest=f.name, help=m["help"], default=argparse.SUPPRESS)
            if f.type in ("bool", bool) or isinstance(f.default, bool):
                kwargs["action"] = "store_false" if f.default is True else "store_true"
            else:
                for key in ("type", "choices", "nargs", "metavar"):
                    if m[key] is not None:
                        kwargs[key] = m[key]
                if m["type"] in (int, float):
                    kwargs["type"] = NumberType(m["type"])
            group.add_argument(*flags_of(f), **kwargs)
    compat = parser.add_argument_group(
        "accepted for compatibility with Megatron-LM scripts (no effect in Paratron)")
    for flag, takes_value in NO_EFFECT_FLAGS:
        compat.add_argument(flag, dest="_ignored_" + flag[2:].replace("-", "_"),
                            default=argparse.SUPPRESS,
                            **({"nargs": "?"} if takes_value else {"action": "store_true"}),
                            help="no effect")
    return parser


def _reject_unknown(unknown: list[str], parser) -> None:
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    for token in unknown:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name in NOT_IMPLEMENTED_FLAGS:
                raise ConfigError(f"{name} {NOT_IMPLEMENTED_FLAGS[name]}")
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else "; see 'paratron train --help'"
            raise ConfigError(f"unknown flag {name}{hint}")
    if unknown:
        raise ConfigError(f"unexpected argument {unknown[0]!r}; values follow their flag")


# A --config file lists flags: a few hundred values at most (long --data-path blends
# included). Larger files, or aliases that expand past this, are refused unread.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000


def _expanded_nodes(node, memo: dict, open_nodes: set) -> int:
    """Nodes of a composed YAML document with every alias expanded, as `safe_load`'s
    result would hold them (counted once per node, so an alias bomb costs nothing)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise ConfigError("an alias refers to a node that contains it")
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    memo[key] = 1 + sum(_expanded_nodes(child, memo, open_nodes) for child in children)
    open_nodes.discard(key)
    return memo[key]


def _read_yaml(path: str) -> Any:
    """A --config file's document, refused in one line when it is not a regular file,
    too large, not YAML, or expands (through aliases) past YAML_MAX_NODES values."""
    import yaml

    try:
        with open(path, "rb") as fh:
            if not os.path.isfile(path):
                raise ConfigError(f"--config {path}: not a regular file")
            text = fh.read(YAML_MAX_BYTES + 1)
    except OSError as exc:
        reason = "file not found" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise ConfigError(f"--config {path}: {reason}") from None
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"--config {path}: larger than {YAML_MAX_BYTES >> 20} MiB; a "
                          f"flag file is a short list of flags")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > YAML_MAX_NODES:
            raise ConfigError(f"more than {YAML_MAX_NODES} values once its aliases are "
                              f"expanded")
        return loader.construct_document(node)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}{line}: not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply") from None
    finally:
        loader.dispose()


def _yaml_defaults(path: str, parser) -> dict[str, Any]:
    """Read a YAML file keyed by flag names (dashes or underscores, with or without --)."""
    doc = _read_yaml(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    out = {}
    for key, value in doc.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        action = by_flag.get(flag)
        if action is None:
            close = difflib.get_close_matches(flag, list(by_flag), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0].lstrip('-')}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} is a switch; give true or false")
            # A switch set to true in YAML behaves like passing the flag.
            if value:
                out[action.dest] = action.const
            continue
        if action.nargs in ("*", "+") and not isinstance(value, list):
            value = str(value).split()
        elif action.type is not None and value is not None:
            try:
                value = ([action.type(v) for v in value] if isinstance(value, list)
                         else action.type(value))
            except (TypeError, ValueError):
                raise ConfigError(f"--config {path}: {key} expects "
                                  f"{action.type.__name__}, got {value!r}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config {path}: {key} must be one of "
                              f"{', '.join(map(str, action.choices))}")
        out[action.dest] = value
    return out


def parse_args(argv: list[str] | None = None, prog: str = "paratron train",
               check: bool = True) -> Config:
    """Parse Megatron-style flags (plus preset and YAML) into a finalized Config,
    validated unless `check` is False (parsing alone, as the flag-compatibility test does)."""
    from paratron.model.presets import PRESETS

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    ns, unknown = parser.parse_known_args(argv)
    _reject_unknown(unknown, parser)
    values: dict[str, Any] = {}
    if getattr(ns, "model_size", None):
        if ns.model_size not in PRESETS:
            close = difflib.get_close_matches(ns.model_size, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"--model-size {ns.model_size}: unknown preset{hint} "
                              f"(known: {', '.join(PRESETS)})")
        values.update(PRESETS[ns.model_size])
    if getattr(ns, "config", None):
        values.update(_yaml_defaults(ns.config, parser))
    values.update({k: v for k, v in vars(ns).items()
                   if k not in ("config", "model_size") and not k.startswith("_ignored_")})
    cfg = config_of(values, getattr(ns, "model_size", None))
    world_size = launched_world_size(cfg.parallel.world_size)
    finalize(cfg, world_size)
    if check:
        if cfg.checkpoint.use_checkpoint_args:  # the architecture comes from --load
            _apply_checkpoint_args(cfg, log=print if launcher_rank() == 0 else lambda _: None)
            finalize(cfg, world_size)
        validate(cfg)
    return cfg


def _apply_checkpoint_args(cfg: Config, log) -> None:
    """--use-checkpoint-args: the model's architecture comes from the newest complete
    checkpoint in --load (what the command line says about it is overridden, with a
    note), before the tree is validated, as Megatron reads a checkpoint's args."""
    from paratron.checkpoint.files import find_latest_valid, read_metadata
    from paratron.checkpoint.megatron_folder import megatron_load_problem

    load = cfg.checkpoint.load
    if load is None:
        raise ConfigError("--use-checkpoint-args needs --load <checkpoint directory>")
    problem = megatron_load_problem(load)
    if problem:
        raise ConfigError(problem)
    found = find_latest_valid(load, log=log)
    if found is None:
        raise ConfigError(f"--use-checkpoint-args: --load {load} holds no complete "
                          f"checkpoint to take the model from")
    model = (read_metadata(found[1]).get("config") or {}).get("model")
    if not model:
        raise ConfigError(f"{found[1]}: the checkpoint records no model configuration; "
                          f"give the model flags instead of --use-checkpoint-args")
    changed = []
    for key, value in {**UNRECORDED_VALUES, **model}.items():
        if hasattr(cfg.model, key) and getattr(cfg.model, key) != value:
            changed.append(key)
            setattr(cfg.model, key, value)
    if changed:
        log(f"--use-checkpoint-args: from {found[1]}: {', '.join(sorted(changed))}")


# Settings of one launch, not of the run: left out of a saved --config file.
_LAUNCH_FIELDS = ("world_size", "rank", "local_rank", "init_method")


def config_to_yaml(cfg: Config) -> str:
    """The run as a `--config` file: every setting that differs from its default, keyed
    by its flag, so `paratron train --config FILE` rebuilds the same tree (the model
    size preset, if any, is spelled out)."""
    import yaml

    doc = {}
    for section in SECTIONS:
        values = getattr(cfg, section)
        defaults = type(values)()
        for f in fields_with_flags(type(values)):
            value = getattr(values, f.name)
            if f.name in _LAUNCH_FIELDS or value == getattr(defaults, f.name):
                continue
            if isinstance(f.default, bool) and f.default:  # a --no-... switch, now off
                value = True
            doc[flags_of(f)[0].lstrip("-")] = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(doc, sort_keys=True, allow_unicode=True)
