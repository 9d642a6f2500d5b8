"""Hugging Face checkpoints load into Paratron and give the logits `transformers` gives.

Each case builds a tiny random `transformers` model offline, saves it as safetensors,
loads the folder with `load_hf_model` and compares logits on the same tokens (fp32,
eval mode). Weights are drawn far from their initial values (norm weights away from
one, biases away from zero) so a swapped or dropped tensor cannot go unnoticed.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from paratron.convert.hf_config import SUPPORTED_MODEL_TYPES  # noqa: E402
from paratron.convert.hf_loader import load_hf_model  # noqa: E402
from paratron.convert.hf_mapping import to_hf_state_dict  # noqa: E402
from tests.helpers.hf_utils import VOCAB, max_logit_diff, one_line_error, randomize

TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name -> (model_type, config overrides)
CASES = {
    "gpt2_tied": ("gpt2", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt2_untied": ("gpt2", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 n_inner=96, tie_word_embeddings=False)),
    "gpt2_exact_gelu": ("gpt2", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     activation_function="gelu")),
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, intermediate_size=96)),
    "llama_mha_tied_biases": ("llama", dict(num_key_value_heads=4, intermediate_size=96,
                                            attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=True)),
    "llama3_rope_scaling": ("llama", dict(num_key_value_heads=2, intermediate_size=96,
                                          rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama_linear_rope": ("llama", dict(num_key_value_heads=1, intermediate_size=96,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2_tied_qkv_bias": ("qwen2", dict(num_key_value_heads=2, intermediate_size=96,
                                          rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3_untied_head_dim": ("qwen3", dict(num_key_value_heads=2, intermediate_size=96,
                                            head_dim=32, rope_theta=1000000.0,
                                            tie_word_embeddings=False)),
}



def _hf_model(model_type: str, **overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model)
    return model.eval()


def _save(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder



@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    hf_model = _hf_model(model_type, **overrides)
    folder = _save(hf_model, tmp_path)
    config, model = load_hf_model(folder)
    assert config.untie_embeddings_and_output_weights == (
        not hf_model.config.tie_word_embeddings)
    assert max_logit_diff(hf_model, model) < 1e-5


@pytest.mark.parametrize("case", ["gpt2_untied", "llama_mha_tied_biases",
                                  "qwen2_tied_qkv_bias", "qwen3_untied_head_dim"])
def test_round_trip_reproduces_the_files(case, tmp_path):
    """Paratron -> Hugging Face layout gives back the stored tensors bit for bit."""
    model_type, overrides = CASES[case]
    folder = _save(_hf_model(model_type, **overrides), tmp_path)
    _, model = load_hf_model(folder)
    stored = load_file(folder / "model.safetensors")
    written = to_hf_state_dict(model, model_type)
    assert written.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(written[name], tensor), name


def test_sharded_checkpoint(tmp_path):
    hf_model = _hf_model("qwen2", num_key_value_heads=2, intermediate_size=96)
    folder = _save(hf_model, tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    _, model = load_hf_model(folder)
    assert max_logit_diff(hf_model, model) < 1e-5


def test_hub_style_gpt2_names_and_buffers(tmp_path):
    """The Hub's GPT-2 files lack the `transformer.` prefix and store the causal-mask
    buffers `attn.bias` / `attn.masked_bias`; both are read as such."""
    hf_model = _hf_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    folder = _save(hf_model, tmp_path)
    tensors = {name.removeprefix("transformer."): t
               for name, t in load_file(folder / "model.safetensors").items()}
    for i in range(TINY["num_hidden_layers"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, folder / "model.safetensors")
    _, model = load_hf_model(folder)
    assert max_logit_diff(hf_model, model) < 1e-5


def test_bf16_weights_keep_fp32_rotary_frequencies(tmp_path):
    hf_model = _hf_model("qwen3", num_key_value_heads=2, intermediate_size=96, head_dim=32)
    _, model = load_hf_model(_save(hf_model, tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert max_logit_diff(hf_model, model) < 0.2


@pytest.fixture
def llama_folder(tmp_path):
    return _save(_hf_model("llama", num_key_value_heads=2, intermediate_size=96), tmp_path)


def test_unsupported_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 8}))
    one_line_error(tmp_path, "'bert'", ", ".join(SUPPORTED_MODEL_TYPES))
    assert SUPPORTED_MODEL_TYPES == ("gpt2", "llama", "qwen2", "qwen3", "mixtral", "qwen3_moe",
                                     "deepseek_v2", "deepseek_v3", "kimi_k2")


def test_unrepresentable_config_is_refused(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["attention_bias"] = True
    (llama_folder / "config.json").write_text(json.dumps(config))
    one_line_error(llama_folder, "attention_bias")


def test_missing_tensor_names_it(llama_folder):
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path)
    one_line_error(llama_folder, "model.layers.1.self_attn.k_proj.weight",
                    "decoder.layers.1.self_attention.linear_qkv.weight")


def test_unused_tensor_names_it(llama_folder):
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path)
    one_line_error(llama_folder, "model.layers.0.mlp.extra.weight", "model.safetensors")


def test_shape_mismatch_names_file_and_tensor(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (llama_folder / "config.json").write_text(json.dumps(config))
    one_line_error(llama_folder, "model.safetensors:", "mlp.gate_proj.weight", "[96, 64]",
                    "[128, 64]")


def test_missing_shard_names_it(tmp_path):
    folder = _save(_hf_model("llama", num_key_value_heads=2, intermediate_size=96),
                   tmp_path, max_shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    one_line_error(folder, shard.name, "missing")


def test_tied_copy_of_output_layer_must_match(tmp_path):
    folder = _save(_hf_model("qwen2", num_key_value_heads=2, intermediate_size=96,
                             tie_word_embeddings=True), tmp_path)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    embeddings = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embeddings.clone()}, path)
    load_hf_model(folder)  # an identical stored copy is accepted
    save_file({**tensors, "lm_head.weight": embeddings + 1}, path)
    one_line_error(folder, "lm_head.weight", "tie_word_embeddings")
