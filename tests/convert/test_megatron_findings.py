"""What checkpoints written by Megatron-Core itself showed about the importer, one test
per finding.

* Megatron-Core 0.16 stores --norm-epsilon as `layernorm_epsilon` (earlier releases as
  `norm_epsilon`) and --apply-layernorm-1p as `layernorm_zero_centered_gamma`.
* Megatron's GeLU is tanh-approximated while its fused bias-GeLU kernel is on (the
  default; off without biases or with --no-bias-gelu-fusion): an import of a GPT-2 run,
  and a Paratron run from the same flags, compute that GeLU.
* A GPT-2 import (qkv and linear biases) and a dense multi-latent-attention model export
  to Hugging Face; Megatron's MLA without --qk-layernorm (identity latent norms) imports.

Logits are compared with Megatron-Core's own (`logits.npy`) on the manifest's tokens.
MLA cannot be written by Megatron-Core 0.16.1 without Transformer Engine (see the
manifest), so its checkpoint is written here in the legacy layout from a Paratron model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from paratron.cli.args import parse_args  # noqa: E402
from paratron.convert.errors import ConversionError  # noqa: E402
from paratron.convert.hf_config import transformer_config  # noqa: E402
from paratron.convert.hf_export import save_hf_folder  # noqa: E402
from paratron.convert.hf_loader import load_hf_model  # noqa: E402
from paratron.convert.megatron_args import config_from_args  # noqa: E402
from paratron.convert.megatron_legacy import read_megatron_checkpoint  # noqa: E402
from paratron.convert.streaming import StreamedModel, model_layout  # noqa: E402
from paratron.model.gpt import GPTModel  # noqa: E402
from paratron.model.identity import model_identity, saved_model_config  # noqa: E402
from tests.helpers.hf_utils import randomize  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron"
TOKENS = torch.tensor(json.loads((FIXTURES / "MANIFEST.json").read_text())["tokens"])


def _read(folder: Path) -> StreamedModel:
    return read_megatron_checkpoint(folder, trust_pickle=True, warn=lambda line: None)


def _state(streamed: StreamedModel) -> dict[str, torch.Tensor]:
    return {key.split("/", 1)[1]: t for group in streamed.groups() for key, t in group.items()}


def _logits(config, state) -> torch.Tensor:
    model = GPTModel(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(TOKENS)


def _megatron_logits(arch: str, layout: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / arch / layout / "logits.npy"))


def _saved_args(arch: str, **changes) -> argparse.Namespace:
    """The args Megatron-Core 0.16's parse_args leaves for a fixture's run: --norm-epsilon
    under layernorm_epsilon only."""
    args = json.loads((FIXTURES / arch / "tp1" / "args.json").read_text())
    return argparse.Namespace(**{**args, **changes})


# ------------------------------------------------------------------ norms
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_norm_epsilon_is_read_where_megatron_core_stores_it(arch):
    config = config_from_args(_saved_args(arch), Path("args"))
    assert config.norm_epsilon == 1e-6
    state = _state(_read(FIXTURES / arch / "tp1" / "torch"))
    expected = _megatron_logits(arch, "tp1")
    assert (_logits(config, state) - expected).abs().max() < 1e-5
    default = dataclasses.replace(config, norm_epsilon=1e-5)  # what the importer read
    assert (_logits(default, state) - expected).abs().max() > 1e-4


def test_norm_epsilon_of_older_megatron_releases_is_read():
    args = _saved_args("qwen2")
    del args.layernorm_epsilon
    args.norm_epsilon = 1e-6
    assert config_from_args(args, Path("args")).norm_epsilon == 1e-6


@pytest.mark.parametrize("name", ["layernorm_zero_centered_gamma", "apply_layernorm_1p"])
def test_layernorm_1p_is_refused_under_either_stored_name(name):
    args = _saved_args("gpt2")
    delattr(args, "apply_layernorm_1p" if name != "apply_layernorm_1p"
            else "layernorm_zero_centered_gamma")
    setattr(args, name, True)
    with pytest.raises(ConversionError, match="the run used --apply-layernorm-1p") as info:
        config_from_args(args, Path("args"))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ GeLU
@pytest.mark.parametrize("layout", ["tp1", "tp2xpp2"])
def test_gpt2_run_with_bias_gelu_fusion_imports_with_tanh_gelu(layout):
    streamed = _read(FIXTURES / "gpt2" / layout / "torch")
    assert streamed.config.mlp_activation() == "gelu_tanh"
    got = _logits(streamed.config, _state(streamed))
    assert (got - _megatron_logits("gpt2", layout)).abs().max() < 1e-5


@pytest.mark.parametrize("changes,activation", [
    ({}, "gelu_tanh"),
    ({"bias_gelu_fusion": False}, "gelu"),
    ({"bias_gelu_fusion": False, "add_bias_linear": False}, "gelu"),  # validate_args
    ({"openai_gelu": True, "bias_gelu_fusion": False}, "gelu"),  # ignored by Megatron-Core
])
def test_imported_gelu_is_the_one_megatron_core_computes(changes, activation):
    config = config_from_args(_saved_args("gpt2", **changes), Path("args"))
    assert config.mlp_activation() == activation


_TRAIN_FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 8 "
                "--max-position-embeddings 8 --micro-batch-size 1 --global-batch-size 1 "
                "--lr 1e-3 --train-iters 1 --mock-data --vocab-size 64 --device cpu").split()


@pytest.mark.parametrize("flags,activation", [
    ([], "gelu_tanh"),
    (["--no-bias-gelu-fusion"], "gelu"),
    (["--disable-bias-linear"], "gelu"),
    (["--openai-gelu", "--no-bias-gelu-fusion"], "gelu_tanh"),  # GPT-2's own GeLU
    (["--swiglu"], "swiglu"),
])
def test_train_flags_give_megatrons_gelu(flags, activation):
    assert parse_args(_TRAIN_FLAGS + flags).model.mlp_activation() == activation


def test_a_checkpoint_recorded_before_the_flag_keeps_its_exact_gelu():
    record = dataclasses.asdict(parse_args(_TRAIN_FLAGS).model)
    del record["bias_gelu_fusion"]  # as a Paratron run wrote it before the flag existed
    assert saved_model_config(record).mlp_activation() == "gelu"


# ------------------------------------------------------------------ Hugging Face export
def _exported_and_back(streamed: StreamedModel, folder: Path):
    """save_hf_folder, then (transformers' model, Paratron's import of the folder)."""
    save_hf_folder(streamed, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return hf.eval(), load_hf_model(folder)


def test_gpt2_import_exports_to_hugging_face_and_back(tmp_path):
    streamed = _read(FIXTURES / "gpt2" / "tp1" / "torch")
    hf, (config, model) = _exported_and_back(streamed, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())[
        "activation_function"] == "gelu_new"
    with torch.no_grad():
        got = hf(input_ids=TOKENS).logits
    assert (got - _megatron_logits("gpt2", "tp1")).abs().max() < 1e-5
    assert model_identity(config) == model_identity(streamed.config)
    imported, back = _state(streamed), model.state_dict()
    assert all(torch.equal(imported[name], back[name]) for name in imported)


def _streamed(model: GPTModel) -> StreamedModel:
    layout, state = model_layout(model.config), model.state_dict()
    return StreamedModel(config=model.config, vocab_size=model.config.padded_vocab_size,
                         groups=lambda: ({layout.key(n): state[n] for n in names}
                                         for names in layout.groups),
                         num_groups=len(layout.groups), source="test")


def _mla_model(**changes) -> GPTModel:
    config = transformer_config(dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
        qk_pos_emb_head_dim=8, v_head_dim=8, normalization="RMSNorm", norm_epsilon=1e-6,
        swiglu=True, add_bias_linear=False, position_embedding_type="rope",
        max_position_embeddings=32, padded_vocab_size=256, hidden_dropout=0.0,
        attention_dropout=0.0, untie_embeddings_and_output_weights=True, **changes))
    model = GPTModel(config).eval()
    randomize(model)
    return model


def test_dense_mla_model_exports_to_hugging_face_and_back(tmp_path):
    model = _mla_model()
    hf, (config, back) = _exported_and_back(_streamed(model), tmp_path / "hf")
    with torch.no_grad():
        expected = model(TOKENS)
        assert (hf(input_ids=TOKENS).logits - expected).abs().max() < 1e-5
    assert model_identity(config) == model_identity(model.config)
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in model.state_dict().items())


# ------------------------------------------------------------------ MLA without qk-layernorm
def _write_legacy(folder: Path, model: GPTModel, args: argparse.Namespace) -> None:
    """A TP1 PP1 Megatron-LM legacy checkpoint (Paratron's names are Megatron-Core's)."""
    rank = folder / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1,
                "model": model.state_dict()}, rank / "model_optim_rng.pt")
    (folder / "latest_checkpointed_iteration.txt").write_text("1")


def test_mla_without_qk_layernorm_imports_with_identity_latent_norms(tmp_path):
    model = _mla_model(mla_latent_layernorm=False)
    fields = {k: v for k, v in dataclasses.asdict(model.config).items()
              if k != "mla_latent_layernorm"}  # a Paratron setting, not a Megatron one
    args = argparse.Namespace(**fields, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=1)
    assert not args.qk_layernorm
    _write_legacy(tmp_path / "megatron", model, args)
    streamed = _read(tmp_path / "megatron")
    assert not streamed.config.mla_latent_layernorm
    with torch.no_grad():
        expected = model(TOKENS)
    assert torch.equal(_logits(streamed.config, _state(streamed)), expected)
    normalised = _mla_model()  # the same weights with RMSNorm latents compute otherwise
    normalised.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert (normalised(TOKENS) - expected).abs().max() > 1e-3
    with pytest.raises(ConversionError, match="mla_latent_layernorm=False would read back"):
        save_hf_folder(streamed, tmp_path / "hf")  # DeepSeek-V2 always has the norms
    assert not (tmp_path / "hf").exists()
