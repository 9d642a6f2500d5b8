"""The Megatron-Core fixtures are present and whole.

The importer tests compare against these files, so a fixture folder that lost a shard or a
manifest that names a missing file would turn those tests into false failures (or, worse,
skip paths silently). This checks the committed outputs of tools/make_megatron_fixtures.py
without Megatron installed.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
ARCHITECTURES = {"gpt2", "llama", "qwen2", "qwen3", "qwen3_moe_sequential", "mixtral_grouped",
                 "deepseek_v2", "deepseek_v2_lite"}


def _manifest():
    return json.loads((ROOT / "MANIFEST.json").read_text())


def _produced_architectures(manifest):
    """Every architecture, less those the manifest names as not produced (with the reason)."""
    missing = {entry.get("architecture") for entry in manifest["not_produced"]}
    assert all(entry["reason"] for entry in manifest["not_produced"])
    return ARCHITECTURES - missing


def _fixtures():
    return _manifest()["fixtures"]


def test_manifest_records_versions_and_every_architecture():
    manifest = _manifest()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", manifest["megatron_core"])
    assert manifest["torch"]
    assert {f["architecture"] for f in manifest["fixtures"]} == _produced_architectures(manifest)
    for fixture in manifest["fixtures"]:
        assert fixture["megatron_core"] == manifest["megatron_core"]
        assert fixture["command"].startswith("OMP_NUM_THREADS=1 python tools/")
        assert fixture["format"] in ("torch", "torch_dist")


def test_each_architecture_has_both_formats_at_the_required_layouts():
    manifest = _manifest()
    have = {(f["architecture"], f["layout"], f["format"]) for f in manifest["fixtures"]}
    for arch in _produced_architectures(manifest):
        layouts = ["tp1", "tp2", "pp2", "tp2xpp2"]
        if arch in ("qwen3_moe_sequential", "mixtral_grouped", "deepseek_v2"):
            layouts += ["ep2", "pp2xep2"]
        for layout in layouts:
            for fmt in ("torch", "torch_dist"):
                assert (arch, layout, fmt) in have, (arch, layout, fmt)


def _legacy_names(fixture):
    """Folder names ``megatron.training.checkpointing.get_checkpoint_name`` gives each rank."""
    names = set()
    for tp in range(fixture["tp"]):
        for pp in range(fixture["pp"]):
            for ep in range(fixture["ep"]):
                name = f"mp_rank_{tp:02d}"
                name += f"_{pp:03d}" if fixture["pp"] > 1 else ""
                name += f"_{ep:03d}" if fixture["ep"] > 1 else ""
                names.add(name)
    return names


@pytest.mark.parametrize("fixture", _fixtures(),
                         ids=lambda f: f"{f['architecture']}-{f['layout']}-{f['format']}")
def test_fixture_files_are_complete(fixture):
    folder = ROOT / fixture["path"]
    assert (folder / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    iteration = folder / "iter_0000001"
    if fixture["format"] == "torch_dist":
        for name in (".metadata", "common.pt", "metadata.json"):
            assert (iteration / name).is_file(), name
        shards = sorted(p.name for p in iteration.glob("__*_*.distcp"))
        assert len(shards) >= fixture["world_size"]
        assert json.loads((iteration / "metadata.json").read_text())["sharded_backend"] \
            == "torch_dist"
    else:
        folders = {p.name for p in iteration.iterdir()}
        assert folders == _legacy_names(fixture)
        for name in folders:
            assert (iteration / name / "model_optim_rng.pt").stat().st_size > 0


@pytest.mark.parametrize("fixture", [f for f in _fixtures() if f["format"] == "torch"],
                         ids=lambda f: f"{f['architecture']}-{f['layout']}")
def test_logits_have_the_recorded_shape(fixture):
    manifest = _manifest()
    tokens = np.asarray(manifest["tokens"])
    args = json.loads((ROOT / fixture["args"]).read_text())
    logits = np.load(ROOT / fixture["logits"])
    assert logits.dtype == np.float32
    assert logits.shape == (*tokens.shape, args["padded_vocab_size"])
    assert np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("fixture", [f for f in _fixtures() if f["format"] == "torch"],
                         ids=lambda f: f"{f['architecture']}-{f['layout']}")
def test_args_hold_only_what_megatron_core_stores(fixture):
    """Since core_v0.16.0 ``--norm-epsilon`` is stored as ``layernorm_epsilon`` alone; a
    fixture whose args also carried ``norm_epsilon`` hid an importer that read the wrong one."""
    args = json.loads((ROOT / fixture["args"]).read_text())
    assert "norm_epsilon" not in args
    assert args["layernorm_epsilon"] == fixture["flags"]["layernorm_epsilon"]
