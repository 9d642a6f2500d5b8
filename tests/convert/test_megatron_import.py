"""Megatron-Core's checkpoints, both formats, imported from the committed fixtures.

* Every fixture in tests/fixtures/megatron/MANIFEST.json (each architecture, layout and
  format) read through the function `paratron convert --loader megatron` uses gives, in
  a one-process Paratron model, the logits Megatron-Core computed (fp32, within 1e-5).
* A torch_dist folder and the legacy files of the same run give the same tensors bit for
  bit; one converted at TP2 x PP2 (x EP2) loads at another layout.
* A damaged or foreign torch_dist folder is refused in one line with nothing written.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from paratron.checkpoint.safe_pickle import load_pickle, load_torch
from paratron.cli.convert import main as convert
from paratron.convert.megatron_dist import read_megatron
from paratron.convert.streaming import StreamedModel
from paratron.model.gpt import GPTModel
from tests.helpers.checkpoint import checkpoint_logits

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
TOKENS = torch.tensor(MANIFEST["tokens"])
DIST = {(f["architecture"], f["layout"]): f for f in MANIFEST["fixtures"]
        if f["format"] == "torch_dist"}
LLAMA = FIXTURES / "llama" / "tp2xpp2" / "torch_dist"


def _read(folder: Path) -> StreamedModel:
    return read_megatron(folder, trust_pickle=False, warn=pytest.fail)


def _state(streamed: StreamedModel) -> dict[str, torch.Tensor]:
    return {key.split("/", 1)[1]: t for group in streamed.groups() for key, t in group.items()}


def _megatron_logits(fixture: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / fixture["logits"]))


@pytest.mark.parametrize("fixture", MANIFEST["fixtures"],
                         ids=lambda f: f"{f['architecture']}-{f['layout']}-{f['format']}")
def test_import_gives_megatron_cores_logits(fixture):
    streamed = _read(FIXTURES / fixture["path"])
    model = GPTModel(streamed.config).eval()
    model.load_state_dict(_state(streamed))
    with torch.no_grad():
        logits = model(TOKENS)
    assert (logits - _megatron_logits(fixture)).abs().max() <= 1e-5


@pytest.mark.parametrize("key", sorted(DIST), ids="-".join)
def test_torch_dist_and_legacy_files_hold_the_same_tensors(key):
    folder = FIXTURES / DIST[key]["path"]
    dist, legacy = _state(_read(folder)), _state(_read(folder.parent / "torch"))
    assert dist.keys() == legacy.keys()
    for name, tensor in dist.items():
        assert torch.equal(tensor, legacy[name]), name


def test_layer_groups_are_read_one_at_a_time():
    streamed = _read(LLAMA)
    names = [sorted(group) for group in streamed.groups()]
    assert len(names) == streamed.num_groups == streamed.config.num_layers + 2
    assert all(n.startswith("model/decoder.layers.0.") for n in names[1])


@pytest.mark.parametrize("arch", sorted({a for a, _ in DIST}))
def test_converted_at_tp2_pp2_loads_at_one_process(arch, tmp_path, capsys):
    fixture = DIST[arch, "tp2xpp2"]
    ep = ["--target-expert-parallel-size", "2"] if "moe" in arch else []
    out = tmp_path / "paratron"
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(FIXTURES / fixture["path"]), "--save-dir", str(out),
                    "--target-tensor-parallel-size", "2",
                    "--target-pipeline-parallel-size", "2", *ep]) == 0, \
        capsys.readouterr().err
    path = next(out.glob("iter_*"))
    logits = checkpoint_logits(path, TOKENS)
    assert (logits - _megatron_logits(fixture)).abs().max() <= 1e-5


# ------------------------------------------------------------------ bad input
def _iteration(folder: Path) -> Path:
    return folder / "iter_0000001"


def _rewrite_metadata(folder: Path, change) -> None:
    path = _iteration(folder) / ".metadata"
    metadata = load_pickle(path)
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _rewrite_args(folder: Path, **changes) -> None:
    path = _iteration(folder) / "common.pt"
    common = load_torch(path, mmap=False)
    vars(common["args"]).update(changes)
    torch.save(common, path)


def _truncate(folder: Path) -> None:
    path = max(_iteration(folder).glob("*.distcp"), key=lambda p: p.stat().st_size)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _relabel_dtype(metadata) -> None:
    metadata.state_dict_metadata["decoder.final_layernorm.weight"].properties.dtype = \
        torch.float16


def _add_encoder(metadata) -> None:
    tensors = metadata.state_dict_metadata
    tensors["encoder.final_layernorm.weight"] = tensors["decoder.final_layernorm.weight"]


def _drop_chunk(metadata) -> None:
    metadata.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"].chunks.pop()


def _escape(metadata) -> None:
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"


BAD = {  # damage, words the one line must hold
    "missing distcp": (lambda f: (_iteration(f) / "__0_0.distcp").unlink(),
                       ["__0_0.distcp", "missing"]),
    "truncated distcp": (_truncate, ["truncated"]),
    "chunk disagrees with .metadata": (
        lambda f: _rewrite_metadata(f, _relabel_dtype),
        ["decoder.final_layernorm.weight", "torch.float32", "torch.float16"]),
    "chunks leave a gap": (lambda f: _rewrite_metadata(f, _drop_chunk),
                           ["decoder.layers.self_attention.linear_qkv.weight", "uncovered"]),
    "another model's args": (lambda f: _rewrite_args(f, hidden_size=48),
                             ["embedding.word_embeddings.weight", "[256, 32]", "[256, 48]"]),
    "hybrid model": (lambda f: _rewrite_args(f, hybrid_override_pattern="M*M*"),
                     ["hybrid", "Mamba"]),
    "encoder-decoder names": (lambda f: _rewrite_metadata(f, _add_encoder),
                              ["encoder.final_layernorm.weight", "encoder-decoder"]),
    "path outside the folder": (lambda f: _rewrite_metadata(f, _escape),
                                ["elsewhere.distcp", "outside"]),
    "missing .metadata": (lambda f: (_iteration(f) / ".metadata").unlink(),
                          [".metadata", "missing"]),
    "unknown sharded_backend": (
        lambda f: (_iteration(f) / "metadata.json").write_text(
            json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1})),
        ["metadata.json", "zarr"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_torch_dist_is_one_line_and_leaves_nothing(case, tmp_path, capsys):
    damage, words = BAD[case]
    folder = tmp_path / "in"
    shutil.copytree(LLAMA, folder)
    damage(folder)
    code = convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(folder), "--save-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("paratron convert: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ------------------------------------------------------------------ other Megatron-Core names
def _per_layer_names(state: dict[str, torch.Tensor], experts: int) -> dict[str, torch.Tensor]:
    """Paratron's tensors under the names Megatron-Core gives models whose layers differ
    (`--moe-layer-freq`) with `singleton_local_shards`: one key per layer and per expert,
    a SwiGLU fc1 as its `_w` (gate) and `_v` (up) halves."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("mlp.experts.linear_fc1.weight"):
            prefix = name.replace("mlp.experts.", "mlp.experts.experts.{}.")
            for g in range(experts):
                gate, up = tensor[g].chunk(2)
                out[prefix.format(g) + "_w"], out[prefix.format(g) + "_v"] = gate, up
        elif name.endswith("mlp.linear_fc1.weight"):
            out[name + "_w"], out[name + "_v"] = tensor.chunk(2)
        elif name.endswith("mlp.experts.linear_fc2.weight"):
            for g in range(experts):
                out[name.replace("mlp.experts.", f"mlp.experts.experts.{g}.")] = tensor[g]
        else:
            out[name] = tensor
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe_sequential"])
def test_per_layer_and_per_expert_names_with_swiglu_halves(arch, tmp_path):
    from torch.distributed.checkpoint import save

    source = FIXTURES / DIST[arch, "tp1"]["path"]
    streamed = _read(source)
    state = _state(streamed)
    folder = tmp_path / "iter_0000001"
    with warnings.catch_warnings():  # "assuming ... a single process": it is one
        warnings.simplefilter("ignore", UserWarning)
        save(_per_layer_names(state, streamed.config.num_experts or 0),
             checkpoint_id=str(folder), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copy(_iteration(source) / name, folder / name)
    # torch records the folder as a PosixPath, Megatron-Core's writer as a string
    written = pickle.loads((folder / ".metadata").read_bytes())  # written just above
    written.storage_meta.checkpoint_id = str(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(written))
    names = load_pickle(folder / ".metadata").state_dict_metadata
    assert any(n.endswith("linear_fc1.weight_w") for n in names)
    assert not any(n.startswith("decoder.layers.mlp") or ".experts.experts.linear" in n
                   for n in names)
    got = _state(_read(folder))
    assert got.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
