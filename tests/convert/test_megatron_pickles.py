"""`paratron convert --loader megatron` reads Megatron-Core's legacy files with no code run.

* Checkpoints written by Megatron-Core import without --trust-pickle and without Megatron
  installed (their args hold Megatron's enums), with the tensors torch's own weights-only
  reader gives.
* A `model_optim_rng.pt` whose object calls os.system, eval, subprocess or torch.load on
  unpickling is refused in one line, exit code 2, nothing at --save-dir, marker absent.
* --trust-pickle unpickles in full only a file holding a global the safe reader refuses,
  with a warning; it never unlocks a torch_dist folder's `.metadata` or `common.pt`.
"""

from __future__ import annotations

import argparse
import enum
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from paratron.cli.convert import main as convert
from paratron.convert.megatron_legacy import read_megatron_checkpoint
from tests.helpers.pickle_payloads import craft, payloads, write_torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
LEGACY = FIXTURES / "qwen3_moe_sequential" / "pp2xep2" / "torch"
ATTN_BACKEND = "megatron.core.transformer.enums.AttnBackend"


def _convert(tmp_path, folder: Path, *flags: str) -> int:
    return convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(folder), "--save-dir", str(tmp_path / "out"), *flags])


def _copy(tmp_path) -> tuple[Path, Path]:
    """A copy of the legacy fixture and its first rank's file."""
    folder = tmp_path / "in"
    shutil.copytree(LEGACY, folder)
    return folder, next(folder.glob("iter_*/mp_rank_00_000_000/model_optim_rng.pt"))


def _reference(path: Path) -> dict:
    """A Megatron file read by torch's weights-only path with Megatron's enum taken for a
    plain int: a reading independent of Paratron's safe reader."""
    with torch.serialization.safe_globals([argparse.Namespace, (int, ATTN_BACKEND)]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("layout", ["tp1", "pp2xep2"])
def test_megatron_core_checkpoint_imports_without_trust_pickle(layout, tmp_path, capsys):
    folder = FIXTURES / "qwen3_moe_sequential" / layout / "torch"
    assert _convert(tmp_path, folder) == 0
    assert "WARNING" not in capsys.readouterr().err
    streamed = read_megatron_checkpoint(folder, trust_pickle=False, warn=pytest.fail)
    got = {key.split("/", 1)[1]: t for group in streamed.groups() for key, t in group.items()}
    first = _reference(sorted(folder.glob("iter_*/mp_rank_*/model_optim_rng.pt"))[0])["model"]
    for name in ("embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight",
                 "decoder.layers.0.mlp.router.weight"):
        assert torch.equal(got[name], first[name]), name


@pytest.mark.parametrize("name", list(payloads(Path("MARKER"))))
def test_code_in_a_legacy_file_is_refused_and_never_runs(name, tmp_path, capsys):
    folder, first = _copy(tmp_path)
    marker = tmp_path / "MARKER"
    payload, word = payloads(marker)[name]
    craft(first, payload)
    assert _convert(tmp_path, folder) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paratron convert: error: {first}: "), lines
    assert word in lines[0] and "--trust-pickle" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


class AttnBackend(enum.Enum):
    """Megatron-Core's enum, as pickled, for a file written here."""

    auto = 5


AttnBackend.__module__, AttnBackend.__qualname__ = ATTN_BACKEND.rsplit(".", 1)


def test_trust_pickle_reads_in_full_only_what_the_safe_reader_refuses(tmp_path, capsys):
    """A harmless global outside the table: refused without the flag, read with it (and
    Megatron's enum still read without Megatron)."""
    folder, first = _copy(tmp_path)
    state = _reference(first)
    state["args"].attention_backend = AttnBackend.auto
    state["args"].data_path = [pathlib.PurePosixPath("/data/corpus")]
    write_torch(first, state, AttnBackend)
    assert _convert(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert "pathlib.PurePosixPath" in err and "--trust-pickle" in err
    assert not (tmp_path / "out").exists()
    assert _convert(tmp_path, folder, "--trust-pickle") == 0
    lines = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "--trust-pickle" in warnings[0], lines
    assert "pathlib.PurePosixPath" in warnings[0]


DIST = FIXTURES / "gpt2" / "tp2xpp2" / "torch_dist"


@pytest.mark.parametrize("trust", [False, True], ids=["plain", "trust_pickle"])
@pytest.mark.parametrize("file", [".metadata", "common.pt"])
@pytest.mark.parametrize("name", list(payloads(Path("MARKER"))))
def test_code_in_a_torch_dist_file_is_refused_even_with_trust_pickle(name, file, trust,
                                                                     tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(DIST, folder)
    target = next(folder.glob(f"iter_*/{file}"))
    marker = tmp_path / "MARKER"
    payload, word = payloads(marker)[name]
    craft(target, payload)
    assert _convert(tmp_path, folder, *(["--trust-pickle"] if trust else [])) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paratron convert: error: {target}: "), \
        lines
    assert word in lines[0] and "--trust-pickle" not in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
