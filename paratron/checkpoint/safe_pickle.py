"""Megatron-LM's pickled files read with no code in them run.

Megatron's checkpoints are pickles: a torch_dist folder's `.metadata` (torch's
`Metadata` dataclasses), its `common.pt` and the legacy `model_optim_rng.pt` (`torch.save`
files holding the run's argparse `args`, state dicts, optimizer and rng state). Unpickling
calls whatever function the file names, so a crafted file runs code the moment it is read.
Here every global a file names is looked up in a fixed table, never imported: containers,
numbers, strings and bytes are pickle's own; the table adds `torch.Size`, dtypes, layouts,
memory formats, `argparse.Namespace`, the `torch.distributed.checkpoint` metadata
dataclasses and numpy arrays, and tensors come through torch's own weights-only reader. A
member of an enum defined in Megatron (`megatron.*.CamelCase`, called with one int or
string) becomes an `InertEnum` carrying the class's name and the value, so Megatron need
not be installed and is not imported when it is. Anything else is refused in one line
naming the file and the global: `RefusedGlobalError`, an `UntrustedFileError`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import functools
import importlib
import io
import os
import pickle
import re
import types
from typing import BinaryIO

import torch

from paratron.checkpoint.untrusted import UntrustedFileError, regular_file

# Where an enum of Megatron's lives: a lowercase module path under `megatron`, a class name.
_MEGATRON_ENUM = re.compile(r"megatron(\.[a-z_][a-z0-9_]*)+\.[A-Z][A-Za-z0-9]*")
_DCP = "torch.distributed.checkpoint"
_DCP_CLASSES = {"metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                             "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                             "StorageMeta", "_MEM_FORMAT_ENCODING"),
                "filesystem": ("_StorageInfo",),
                "planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}
# Megatron-Core <= 0.15 pickled these dataclass subclasses (which add `mcore_data`) in
# `.metadata`; they read as the torch class they extend, the extra field kept.
_MCORE_ALIASES = {"megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata":
                  f"{_DCP}.metadata.Metadata",
                  "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan":
                  f"{_DCP}.planner.SavePlan"}
_NUMPY_FUNCTIONS = ("_reconstruct", "scalar")
_ENUM_VALUE_TYPES = (int, str)


class RefusedGlobalError(UntrustedFileError):
    """A pickle names a global (`global_name`) that the safe reader will not construct."""

    def __init__(self, where: str, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(f"{where}: holds a pickled {global_name}, which Paratron will not "
                         f"construct (it could run code)")


@dataclasses.dataclass(frozen=True, eq=False)
class InertEnum:
    """A pickled enum member whose class was not imported: the class's qualified name and
    the member's value. Equal to another with both the same, and to a real enum member of
    that class with that value."""

    qualname: str
    value: int | str

    def __eq__(self, other) -> bool:
        if isinstance(other, InertEnum):
            return (self.qualname, self.value) == (other.qualname, other.value)
        if isinstance(other, enum.Enum):
            cls = type(other)
            return (f"{cls.__module__}.{cls.__qualname__}" == self.qualname
                    and other.value == self.value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.qualname, self.value))

    def __str__(self) -> str:
        return f"{self.qualname.rsplit('.', 1)[-1]}({self.value!r})"

    def __reduce__(self):  # saved again, it reads back through the table
        return InertEnum, (self.qualname, self.value)


class _NotAnEnum(Exception):
    """A Megatron global used otherwise than as an enum member (`qualname`)."""

    def __init__(self, qualname: str) -> None:
        super().__init__(qualname)
        self.qualname = qualname


class _InertEnumClass:
    """What a Megatron enum class unpickles to: calling it with the member's value (as
    pickle does for an enum member) gives an `InertEnum`; creating an object of it or any
    other call is refused."""

    def __new__(cls, *args):
        if not isinstance(cls, type):  # pickle's NEWOBJ: `factory.__new__(factory, ...)`
            raise _NotAnEnum(cls.qualname)
        return super().__new__(cls)

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __call__(self, *args):
        if len(args) != 1 or type(args[0]) not in _ENUM_VALUE_TYPES:
            raise _NotAnEnum(self.qualname)
        return InertEnum(self.qualname, args[0])


def _numpy_globals() -> dict[str, object]:
    try:
        import numpy as np
    except ImportError:
        return {}
    found: dict[str, object] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            multiarray = importlib.import_module(module)
        except ImportError:
            continue
        for name in _NUMPY_FUNCTIONS:  # numpy 1 and 2 pickle under either module name
            found[f"numpy._core.multiarray.{name}"] = getattr(multiarray, name)
            found[f"numpy.core.multiarray.{name}"] = getattr(multiarray, name)
        break
    for code in np.typecodes["All"]:
        cls = type(np.dtype(code))
        found[f"{cls.__module__}.{cls.__name__}"] = cls
    return found


@functools.cache
def allowed_globals() -> dict[str, object]:
    """{qualified name: object} of every global the safe readers construct, besides
    torch's own tensor and storage rebuilding and Megatron's enums."""
    table: dict[str, object] = {"argparse.Namespace": argparse.Namespace,
                                "collections.OrderedDict": collections.OrderedDict,
                                f"{__name__}.InertEnum": InertEnum,
                                "torch.Size": torch.Size, "torch.device": torch.device,
                                "torch.serialization._get_layout": torch.serialization._get_layout}
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            table[f"torch.{name}"] = value
    try:
        for module, names in _DCP_CLASSES.items():
            loaded = importlib.import_module(f"{_DCP}.{module}")
            table.update({f"{_DCP}.{module}.{n}": getattr(loaded, n) for n in names})
        table.update({alias: table[real] for alias, real in _MCORE_ALIASES.items()})
    except (ImportError, AttributeError):
        pass  # a torch built without torch.distributed: its metadata is refused
    table.update(_numpy_globals())
    return table


def _resolve(name: str, where: str) -> object:
    """The object the global `name` stands for, or RefusedGlobalError."""
    found = allowed_globals().get(name)
    if found is not None:
        return found
    if _MEGATRON_ENUM.fullmatch(name):
        return _InertEnumClass(name)
    raise RefusedGlobalError(where, name)


def _where(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else \
        str(getattr(source, "name", "a pickled object"))


def _unreadable(where: str, what: str, exc: BaseException) -> UntrustedFileError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line.split("error:", 1)[1].strip() for line in lines
                   if "WeightsUnpickler error:" in line), lines[0] if lines else "")
    detail = f": {reason[:200]}" if reason else ""
    return UntrustedFileError(f"{where}: not a readable {what} ({type(exc).__name__}"
                              f"{detail})")


class _SafeUnpickler(pickle._Unpickler):
    """Python's own unpickler, with globals from the table only, objects made by calling
    only those, and state set only on instances of the table's classes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, where: str) -> None:
        super().__init__(file)
        self.where = where
        table = allowed_globals().values()
        self.classes = tuple({v for v in table if isinstance(v, type)})
        self.callables = {id(v) for v in table if callable(v)}

    def find_class(self, module: str, name: str):
        return _resolve(f"{module}.{name}", self.where)

    def _check_callable(self, func) -> None:
        if id(func) not in self.callables and not isinstance(func, _InertEnumClass):
            raise pickle.UnpicklingError(f"calls a {type(func).__name__}, not an allowed "
                                         f"global")

    def load_reduce(self):
        self._check_callable(self.stack[-2])
        super().load_reduce()

    def load_newobj(self):
        self._check_new(self.stack[-2])
        super().load_newobj()

    def load_newobj_ex(self):
        self._check_new(self.stack[-3])
        super().load_newobj_ex()

    def _check_new(self, cls) -> None:
        if isinstance(cls, _InertEnumClass):
            raise _NotAnEnum(cls.qualname)
        if not (isinstance(cls, type) and cls in self.classes):
            raise pickle.UnpicklingError(f"creates a {cls!r}, not an allowed class")

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in self.classes:  # a class object itself is never built
            raise pickle.UnpicklingError(f"sets the state of a {type(inst).__name__}")
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None:
            setstate(inst, state)
            return
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for attributes, store in ((state, vars(inst).__setitem__),
                                  (slots, functools.partial(setattr, inst))):
            for key, value in (attributes or {}).items():
                if type(key) is not str or key.startswith("__"):
                    raise pickle.UnpicklingError(f"sets the attribute {key!r}")
                store(key, value)

    def load_refused(self):
        raise pickle.UnpicklingError("uses the INST/OBJ opcodes (pickle protocol 0/1 "
                                     "objects)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.INST[0]] = load_refused
    dispatch[pickle.OBJ[0]] = load_refused


def _read_bytes(source) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            return fh.read()
    return source.read()


def load_pickle(source: str | os.PathLike | BinaryIO) -> object:
    """The object a raw pickle file (a torch_dist `.metadata`) holds, read with no code
    run: UntrustedFileError for a global outside the table or a malformed file."""
    where = _where(source)
    try:
        data = _read_bytes(source)
    except OSError as error:
        raise UntrustedFileError(f"{where}: cannot be read ({error.strerror})") from None
    try:
        return _SafeUnpickler(io.BytesIO(data), where).load()
    except UntrustedFileError:
        raise
    except _NotAnEnum as exc:
        raise RefusedGlobalError(where, exc.qualname) from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle fails in any way
        raise _unreadable(where, "pickle", exc) from None


def load_torch(source: str | os.PathLike | BinaryIO, *, mmap: bool = True) -> object:
    """The object a `torch.save` zip file holds, read on the CPU through torch's
    weights-only unpickler with the table's globals (and Megatron's enums) allowed:
    UntrustedFileError for any other global or a malformed file. `mmap` maps the file's
    tensors instead of reading them (a path only)."""
    where = _where(source)
    is_path = isinstance(source, (str, os.PathLike))
    if is_path:
        regular_file(source)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception as exc:  # noqa: BLE001 - not a zip, or a pickle torch cannot scan
        raise _unreadable(where, "torch.save file", exc) from None
    finally:
        if not is_path:
            source.seek(0)
    extra = [(_resolve(name, where), name) for name in sorted(names)]
    if any(name.startswith("numpy.") for name in names):  # a dtype's state names its class
        extra += [(cls, name) for name, cls in _numpy_globals().items()
                  if isinstance(cls, type)]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(source, map_location="cpu", weights_only=True,
                              mmap=mmap and is_path)
    except _NotAnEnum as exc:
        raise RefusedGlobalError(where, exc.qualname) from None
    except Exception as exc:  # noqa: BLE001 - torch refuses or cannot parse
        raise _unreadable(where, "torch.save file", exc) from None


class _InFullUnpickler(pickle.Unpickler):
    """Python's unpickler as is (it imports and calls what the file names), but with
    Megatron's enums as inert stand-ins, so a trusted file reads without Megatron."""

    def find_class(self, module: str, name: str):
        if _MEGATRON_ENUM.fullmatch(f"{module}.{name}"):
            return _InertEnumClass(f"{module}.{name}")
        return super().find_class(module, name)


_IN_FULL = types.ModuleType("in_full_pickle")
_IN_FULL.Unpickler, _IN_FULL.load = _InFullUnpickler, pickle.load


def load_torch_in_full(source: str | os.PathLike | BinaryIO, *, mmap: bool = True) -> object:
    """A `torch.save` file unpickled in full: it RUNS whatever code the file names, so only
    for a file the user said they trust, and only for what `load_torch` refuses. Megatron's
    enums read as in `load_torch`; errors propagate as torch raises them."""
    is_path = isinstance(source, (str, os.PathLike))
    try:
        return torch.load(source, map_location="cpu", weights_only=False,
                          mmap=mmap and is_path, pickle_module=_IN_FULL)
    except _NotAnEnum as exc:
        raise RefusedGlobalError(_where(source), exc.qualname) from None
