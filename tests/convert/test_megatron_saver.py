"""`paratron convert --saver megatron`: Megatron-LM legacy checkpoints that re-import bit for
bit and hold the keys, shapes and dtypes Megatron-Core itself writes (the committed
fixtures under tests/fixtures/megatron are the independent reference)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from paratron.checkpoint.safe_pickle import load_torch
from paratron.cli.convert import main
from paratron.convert.megatron_dist import read_megatron

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
LAYOUTS = {"tp1": (1, 1, 1), "tp2xpp2": (2, 2, 1), "pp2xep2": (1, 2, 2), "ep2": (1, 1, 2),
           "tp2xpp2xep2": (2, 2, 2)}


def convert(arch: str, layout: str, save: Path, *extra: str) -> int:
    tp, pp, ep = LAYOUTS[layout]
    return main(["--model-type", "GPT", "--loader", "megatron", "--saver", "megatron",
                 "--load-dir", str(FIXTURES / arch / "tp1" / "torch"), "--save-dir", str(save),
                 "--target-tensor-parallel-size", str(tp),
                 "--target-pipeline-parallel-size", str(pp),
                 "--target-expert-parallel-size", str(ep), *extra])


def rank_files(folder: Path) -> dict[str, dict]:
    """{mp_rank_* folder name: its file's dict} of a legacy checkpoint's iteration."""
    return {p.parent.name: load_torch(p) for p in sorted(folder.glob("*/model_optim_rng.pt"))}


@pytest.mark.parametrize("arch,layout", [
    ("llama", "tp1"), ("llama", "tp2xpp2"), ("qwen2", "tp1"), ("qwen2", "tp2xpp2"),
    ("qwen3_moe_sequential", "tp1"), ("qwen3_moe_sequential", "tp2xpp2xep2"),
    ("gpt2", "tp2xpp2")])
def test_reimports_bit_for_bit(tmp_path, arch, layout):
    assert convert(arch, layout, tmp_path / "out") == 0
    source = read_megatron(FIXTURES / arch / "tp1" / "torch", trust_pickle=False,
                           warn=print)
    again = read_megatron(tmp_path / "out", trust_pickle=False, warn=print)
    # SequentialMLP's files say moe_grouped_gemm False: how Paratron runs experts, not weights.
    assert dataclasses.replace(again.config, moe_grouped_gemm=True) == \
        dataclasses.replace(source.config, moe_grouped_gemm=True)
    pairs = list(zip(source.groups(), again.groups()))
    assert len(pairs) == source.num_groups == again.num_groups
    for want, got in pairs:
        assert want.keys() == got.keys()
        for key in want:
            assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("arch,layout", [
    ("llama", "tp1"), ("llama", "tp2xpp2"), ("qwen2", "tp2xpp2"), ("gpt2", "tp1"),
    ("gpt2", "tp2xpp2"), ("qwen3_moe_sequential", "tp2xpp2"),
    ("qwen3_moe_sequential", "pp2xep2"), ("qwen3_moe_sequential", "ep2")])
def test_files_as_megatron_core_writes_them(tmp_path, arch, layout):
    assert convert(arch, layout, tmp_path / "out") == 0
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "release"
    ours = rank_files(tmp_path / "out" / "release")
    megatron = rank_files(FIXTURES / arch / layout / "torch" / "iter_0000001")
    assert ours.keys() == megatron.keys()
    for rank, theirs in megatron.items():
        mine = ours[rank]
        assert mine["checkpoint_version"] == theirs["checkpoint_version"] == 3.0
        assert set(mine["model"]) == set(theirs["model"]), rank
        for key, tensor in theirs["model"].items():
            if tensor is None:
                assert mine["model"][key] is None, key
            else:
                got = mine["model"][key]
                assert (got.shape, got.dtype) == (tensor.shape, tensor.dtype), key
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "tensor_model_parallel_size", "padded_vocab_size",
                     "pipeline_model_parallel_size", "expert_model_parallel_size",
                     "swiglu", "normalization", "add_bias_linear", "add_qkv_bias",
                     "untie_embeddings_and_output_weights", "layernorm_epsilon",
                     "qk_layernorm", "num_experts", "params_dtype"):
            want = getattr(theirs["args"], name, None)
            if want is not None:
                assert getattr(mine["args"], name) == want, name


def _builtins_only(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_builtins_only(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None), torch.dtype))


def test_args_hold_only_builtins(tmp_path):
    assert convert("qwen3_moe_sequential", "tp2xpp2xep2", tmp_path / "out", "--bf16") == 0
    for state in rank_files(tmp_path / "out" / "release").values():
        args = state["args"]
        assert type(args) is argparse.Namespace
        bad = {k: v for k, v in vars(args).items() if not _builtins_only(v)}
        assert not bad
        assert args.bf16 and args.params_dtype == torch.bfloat16 and not args.fp16
        assert all(t.dtype == torch.bfloat16 for t in state["model"].values()
                   if t is not None)


@pytest.mark.parametrize("tp,says", [(3, "num-attention-heads"), (4, "key/value groups")])
def test_bad_target_is_one_line_and_writes_nothing(tmp_path, capsys, tp, says):
    save = tmp_path / "out"
    assert main(["--model-type", "GPT", "--loader", "megatron", "--saver", "megatron",
                 "--load-dir", str(FIXTURES / "llama" / "tp1" / "torch"),
                 "--save-dir", str(save), "--target-tensor-parallel-size", str(tp)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err
    assert not save.exists() and list(tmp_path.iterdir()) == []


def test_megatron_core_read_back_record():
    """tools/megatron_read_back.py's committed record: Megatron-Core loaded the saver's files
    strictly at other layouts and gave the fixtures' logits within 1e-5."""
    record = json.loads((FIXTURES / "read_back" / "RECORD.json").read_text())
    assert record["megatron_core"] and record["torch"]
    cases = record["cases"]
    assert {c["architecture"] for c in cases} >= {"llama", "qwen2", "qwen3", "gpt2",
                                                  "qwen3_moe_sequential"}
    assert all(c["max_abs_diff"] <= 1e-5 and c["passed"] for c in cases)
    assert any(c["ep"] > 1 for c in cases) and any(c["tp"] > 1 and c["pp"] > 1 for c in cases)
