"""Crafted Megatron pickles whose unpickling would run code: a marker file appears if it
does. `payloads` names each one; `craft` puts one into a copy of a real fixture file."""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import torch

from paratron.checkpoint.safe_pickle import load_pickle, load_torch


class Payload:
    """An object whose unpickling calls `call(*args)`."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _function_named(qualified: str):
    """A function that pickles as the global `qualified` (inside `registered`)."""
    module, name = qualified.rsplit(".", 1)

    def function(*args):
        return os.system(*args)

    function.__module__, function.__qualname__, function.__name__ = module, name, name
    return function


@contextlib.contextmanager
def registered(*objects):
    """Make functions or classes defined under `megatron.*` module names picklable (pickle
    looks them up there), only inside the block: Megatron itself is never installed."""
    fakes = {}
    for obj in objects:
        if not obj.__module__.startswith("megatron"):
            continue
        parts = obj.__module__.split(".")
        for i in range(1, len(parts) + 1):
            fakes.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(fakes[obj.__module__], obj.__qualname__, obj)
    added = [name for name in fakes if name not in sys.modules]
    sys.modules.update({name: fakes[name] for name in added})
    try:
        yield
    finally:  # only these: a module imported meanwhile stays
        for name in added:
            del sys.modules[name]


def payloads(marker: Path) -> dict[str, tuple[Payload, str]]:
    """name: (an object that would create `marker` when unpickled, a word of the global
    it names)."""
    touch = f"touch {marker}"
    return {
        "os_system": (Payload(os.system, touch), "system"),
        "builtins_eval": (Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "eval"),
        "subprocess_popen": (Payload(subprocess.Popen, ["touch", str(marker)]), "Popen"),
        "torch_load": (Payload(torch.load, str(marker)), "torch.serialization.load"),
        "functools_partial": (Payload(functools.partial(os.system, touch)),
                              "functools.partial"),
        "megatron_function": (Payload(_function_named("megatron.training.utils.print_rank_0"),
                                      touch), "megatron.training.utils.print_rank_0"),
        "enum_looking_function": (Payload(_function_named("megatron.core.enums.ModelType"),
                                          touch, 1), "megatron.core.enums.ModelType"),
    }


def write_pickle(path: Path, obj, *megatron_globals) -> None:
    with registered(*megatron_globals):
        path.write_bytes(pickle.dumps(obj, protocol=4))


def write_torch(path: Path, obj, *megatron_globals) -> None:
    with registered(*megatron_globals):
        torch.save(obj, path)


def craft(path: Path, payload: Payload) -> None:
    """Put `payload` into the real Megatron file `path` in place: into a `.metadata`'s
    storage_meta, or a `torch.save` file's args."""
    if path.name == ".metadata":
        metadata = load_pickle(path)
        metadata.storage_meta = payload
        write_pickle(path, metadata, payload.call)
    else:
        state = load_torch(path, mmap=False)  # the file is rewritten below
        state["args"].payload = payload
        write_torch(path, state, payload.call)
