"""Megatron's pickles read with no code run (paratron.checkpoint.safe_pickle).

The fixtures written by Megatron-Core read to the same values as an unrestricted unpickler
gives, with Megatron absent (its enums as inert stand-ins) and never imported when present;
crafted files whose objects call os.system, eval, subprocess or torch.load are refused in
one line naming the file and the global, and their marker file never appears.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import importlib.util
import pickle
import random
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from paratron.checkpoint.safe_pickle import (InertEnum, RefusedGlobalError, load_pickle,
                                             load_torch)
from paratron.checkpoint.untrusted import UntrustedFileError
from tests.helpers.pickle_payloads import (craft, payloads, registered, write_pickle,
                                           write_torch)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
METADATA = sorted(FIXTURES.glob("*/*/torch_dist/iter_*/.metadata"))
TORCH_FILES = sorted(FIXTURES.glob("*/*/torch_dist/iter_*/common.pt")) + \
    sorted(FIXTURES.glob("*/tp2xpp2/torch/iter_*/mp_rank_*/model_optim_rng.pt"))
ATTN_BACKEND = "megatron.core.transformer.enums.AttnBackend"


class _Reference(pickle.Unpickler):
    """An unrestricted unpickler, but with Megatron's enums (absent here) as stand-ins."""

    def find_class(self, module, name):
        if module.startswith("megatron."):
            return functools.partial(InertEnum, f"{module}.{name}")
        return super().find_class(module, name)


_REFERENCE_PICKLE = types.ModuleType("reference_pickle")
_REFERENCE_PICKLE.Unpickler = _Reference
_REFERENCE_PICKLE.load = pickle.load


def _assert_same(got, want, where="") -> None:
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, argparse.Namespace):
        _assert_same(vars(got), vars(want), where)
    else:
        assert got == want, (where, got, want)


# ------------------------------------------------------------------ Megatron-Core's files
@pytest.mark.parametrize("path", METADATA, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_metadata_reads_as_unrestricted_pickle_does(path):
    got = load_pickle(path)
    with open(path, "rb") as fh:
        want = pickle.load(fh)
    assert type(got) is type(want) and got == want
    assert got.all_local_plans == want.all_local_plans and got.storage_meta == want.storage_meta
    assert got.storage_data == want.storage_data


@pytest.mark.parametrize("path", TORCH_FILES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_torch_files_read_as_unrestricted_torch_load_does(path):
    got = load_torch(path)
    want = torch.load(path, weights_only=False, pickle_module=_REFERENCE_PICKLE)
    _assert_same(got, want)
    backend = got["args"].attention_backend
    assert backend == InertEnum(ATTN_BACKEND, 5) and str(backend) == "AttnBackend(5)"
    assert got["args"].params_dtype is torch.float32


def test_megatron_is_never_imported(tmp_path, monkeypatch):
    """With a `megatron` package importable, reading its files imports nothing of it."""
    marker = tmp_path / "IMPORTED"
    package = tmp_path / "megatron" / "core" / "transformer"
    package.mkdir(parents=True)
    for folder in (package.parent.parent, package.parent, package):
        (folder / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "enums.py").write_text("import enum\nclass AttnBackend(enum.Enum):\n"
                                      "    auto = 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("megatron") is not None
    folder = FIXTURES / "gpt2" / "tp2xpp2"
    args = load_torch(next(folder.glob("torch_dist/iter_*/common.pt")))["args"]
    load_torch(next(folder.glob("torch/iter_*/mp_rank_00_000/model_optim_rng.pt")))
    load_pickle(next(folder.glob("torch_dist/iter_*/.metadata")))
    assert not marker.exists() and "megatron" not in sys.modules
    assert isinstance(args.attention_backend, InertEnum)


def test_inert_enum_compares_with_the_real_member():
    class AttnBackend(enum.Enum):
        flash = 1
        auto = 5

    AttnBackend.__module__, AttnBackend.__qualname__ = ATTN_BACKEND.rsplit(".", 1)
    inert = InertEnum(ATTN_BACKEND, 5)
    assert inert == AttnBackend.auto and AttnBackend.auto == inert
    assert inert != AttnBackend.flash and inert != 5
    assert inert == InertEnum(ATTN_BACKEND, 5) and inert != InertEnum("megatron.x.Other", 5)
    assert len({inert, InertEnum(ATTN_BACKEND, 5)}) == 1


def _training_state() -> dict:
    """What a Megatron training checkpoint holds besides the weights (CPU stand-ins for
    the CUDA rng states, which are ByteTensors too)."""
    weight = torch.randn(4, 3)
    return {
        "args": argparse.Namespace(params_dtype=torch.bfloat16, lr=3e-4, seq_length=128,
                                   layers=[1, 2]),
        "checkpoint_version": 3.0, "iteration": 7,
        "model": {"decoder.weight": weight},
        "optimizer": {"optimizer": {"state": {0: {"step": torch.tensor(7.0),
                                                  "exp_avg": torch.randn(4, 3),
                                                  "exp_avg_sq": torch.rand(4, 3)}},
                                    "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95),
                                                      "eps": 1e-8, "params": [0]}]},
                      "fp32_from_fp16_params": [[weight.double()]]},
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 7, "decay_style": "cosine"},
        "rng_state": [{"random_rng_state": random.getstate(),
                       "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state(),
                       "cuda_rng_state": torch.get_rng_state(),
                       "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}],
        "numpy": {"scalar": np.float64(1.5), "array": np.arange(6, dtype=np.int32),
                  "dtype": np.dtype("uint32")},
    }


def test_training_state_round_trips(tmp_path):
    state = _training_state()
    torch.save(state, tmp_path / "model_optim_rng.pt")
    got = load_torch(tmp_path / "model_optim_rng.pt")
    _assert_same(got, state)
    rng = got["rng_state"][0]
    random.setstate(rng["random_rng_state"])
    np.random.set_state(rng["np_rng_state"])
    draws = (random.random(), np.random.rand())
    random.setstate(state["rng_state"][0]["random_rng_state"])
    np.random.set_state(state["rng_state"][0]["np_rng_state"])
    assert draws == (random.random(), np.random.rand())


def test_raw_pickle_of_rng_and_numpy_state_round_trips(tmp_path):
    state = {k: v for k, v in _training_state().items() if k in ("opt_param_scheduler",
                                                                "numpy")}
    state["rng"] = {"random": random.getstate(), "numpy": np.random.get_state()}
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(state, protocol=4))
    _assert_same(load_pickle(tmp_path / "state.pkl"), state)


def test_old_megatron_core_metadata_class_reads_as_torchs(tmp_path):
    """Megatron-Core <= 0.15 pickled MCoreMetadata: torch's Metadata with `mcore_data`."""
    real = load_pickle(METADATA[0])

    @dataclasses.dataclass
    class MCoreMetadata(type(real)):
        mcore_data: dict | None = None

    MCoreMetadata.__module__ = "megatron.core.dist_checkpointing.strategies.torch"
    MCoreMetadata.__qualname__ = "MCoreMetadata"
    saved = MCoreMetadata(state_dict_metadata=real.state_dict_metadata,
                          mcore_data={"embedding": {"nd_reformulated_orig_global_shape": None}})
    with registered(MCoreMetadata):
        (tmp_path / ".metadata").write_bytes(pickle.dumps(saved, protocol=4))
    got = load_pickle(tmp_path / ".metadata")
    assert type(got) is type(real) and got.state_dict_metadata == real.state_dict_metadata
    assert got.mcore_data == saved.mcore_data


# ------------------------------------------------------------------ crafted files
def _refusal(call, path: Path) -> str:
    with pytest.raises(UntrustedFileError) as caught:
        call(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize("name", list(payloads(Path("MARKER"))))
@pytest.mark.parametrize("kind", [".metadata", "common.pt", "model_optim_rng.pt", "raw",
                                  "torch.save"])
def test_code_payload_is_refused_and_never_runs(kind, name, tmp_path):
    marker = tmp_path / "MARKER"
    payload, word = payloads(marker)[name]
    if kind in ("raw", "torch.save"):
        path = tmp_path / "crafted"
        (write_pickle if kind == "raw" else write_torch)(path, {"x": [payload]},
                                                         payload.call)
    else:
        source = next(FIXTURES.glob(f"gpt2/tp2xpp2/*/iter_*/**/{kind}"))
        path = tmp_path / kind
        shutil.copyfile(source, path)
        craft(path, payload)
    reader = load_pickle if kind in (".metadata", "raw") else load_torch
    with pytest.raises(RefusedGlobalError) as caught:
        reader(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: holds a pickled "), message
    assert word in caught.value.global_name and "will not construct" in message
    assert not marker.exists()


def _opcodes(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


# A protocol-2 pickle that would set an attribute on the class argparse.Namespace itself.
_BUILD_ON_A_CLASS = _opcodes(b"cargparse\nNamespace\n", b"N}X\x06\x00\x00\x00markerK\x01s",
                             b"\x86b")


@pytest.mark.parametrize("data", [b"", b"not a pickle", _BUILD_ON_A_CLASS,
                                  _opcodes(b"(cargparse\nNamespace\no"),
                                  _opcodes(b"X\x03\x00\x00\x00abc)R"),
                                  _opcodes(b"ctorch\nSize\n)R}b")],
                         ids=["empty", "text", "build_on_a_class", "obj_opcode",
                              "call_a_string", "build_on_torch_size"])
def test_malformed_pickle_is_one_line(data, tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(data)
    assert "not a readable pickle" in _refusal(load_pickle, path)
    assert not hasattr(argparse.Namespace, "marker")


def test_truncated_files_are_one_line(tmp_path):
    for source, reader in ((METADATA[0], load_pickle), (TORCH_FILES[0], load_torch)):
        path = tmp_path / source.name
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        assert "not a readable" in _refusal(reader, path)
    assert "not a readable torch.save file" in _refusal(load_torch, METADATA[0])
    assert "cannot be read" in _refusal(load_torch, tmp_path / "missing.pt")


def test_megatron_class_built_not_called_is_refused(tmp_path):
    """A Megatron class is only ever an enum here: one pickled as an object is refused."""
    path = tmp_path / ".metadata"
    path.write_bytes(_opcodes(b"cmegatron.core.dist_checkpointing.mapping\nShardedTensor\n",
                              b")\x81"))
    with pytest.raises(RefusedGlobalError) as caught:
        load_pickle(path)
    assert caught.value.global_name == "megatron.core.dist_checkpointing.mapping.ShardedTensor"
