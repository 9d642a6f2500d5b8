"""Hugging Face mixtures of experts (Mixtral, Qwen3-MoE, DeepSeek-V2) load into Paratron
and give the logits `transformers` gives; written back, they give the stored tensors.

As in test_hf_logits: tiny random `transformers` models built offline, saved as
safetensors (per-expert tensors, as `save_pretrained` writes by default and as the Hub's
checkpoints hold, or transformers 5's fused `gate_up_proj` / `down_proj`), loaded with
`load_hf_model`, compared in fp32 on the same tokens. Weights are drawn far from their
initial values so that a swapped expert, gate/up half or norm cannot go unnoticed.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from paratron.model.config import moe_layer_pattern  # noqa: E402
from paratron.convert.hf_loader import load_hf_model  # noqa: E402
from paratron.convert.hf_mapping import to_hf_state_dict  # noqa: E402
from tests.helpers.hf_utils import (VOCAB, copy_model, edit_config, max_logit_diff,
                                    one_line_error, randomize, saved_once,
                                    few_threads)  # noqa: F401 - an autouse fixture

TINY = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
           intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8,
           num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1)
# DeepSeek-V2's YaRN (factor 40, mscale = mscale_all_dim = 0.707) on a short original
# context, so the ramp between extrapolated and interpolated frequencies is exercised.
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                 "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                 "mscale": 0.707, "mscale_all_dim": 0.707}
# mscale != mscale_all_dim: the cos/sin tables are scaled too.
UNEVEN_YARN = dict(DEEPSEEK_YARN, factor=8.0, mscale=1.0, mscale_all_dim=0.5)

# name -> (model_type, config overrides)
CASES = {
    "deepseek_v2_q_lora_yarn": ("deepseek_v2", dict(
        MLA, num_hidden_layers=3, q_lora_rank=48, routed_scaling_factor=2.5,
        max_position_embeddings=16 * 40, rope_parameters=DEEPSEEK_YARN)),
    "deepseek_v2_lite_group_limited": ("deepseek_v2", dict(
        MLA, num_hidden_layers=3, q_lora_rank=None, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, rope_parameters=UNEVEN_YARN)),
    "deepseek_v2_default_rope_tied": ("deepseek_v2", dict(
        MLA, num_hidden_layers=2, q_lora_rank=None, routed_scaling_factor=1.5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mixtral": ("mixtral", dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3_moe_renormalised_sparse_step": ("qwen3_moe", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
        moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=2)),
    "qwen3_moe_unnormalised_dense_first_yarn": ("qwen3_moe", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=16, intermediate_size=96,
        moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
        mlp_only_layers=[0],
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
}

# Which layers are MoE, as transformers builds them.
MOE_LAYERS = {
    "deepseek_v2_q_lora_yarn": [False, True, True],
    "deepseek_v2_lite_group_limited": [False, True, True],
    "deepseek_v2_default_rope_tied": [False, True],
    "mixtral": [True, True],
    "qwen3_moe_renormalised_sparse_step": [False, True, False, True],
    "qwen3_moe_unnormalised_dense_first_yarn": [False, True, True],
}




def _hf_model(case: str):
    model_type, overrides = CASES[case]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager")
    randomize(model)
    return model.eval()



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, folder with per-expert tensors), built once."""
    return saved_once(tmp_path_factory, _hf_model)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, saved):
    hf_model, folder = saved(case)
    config, model = load_hf_model(folder)
    assert moe_layer_pattern(config) == MOE_LAYERS[case]
    diff = max_logit_diff(hf_model, model)
    assert diff < 1e-5, diff


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_reproduces_the_files(case, saved):
    """Paratron -> Hugging Face layout gives back the stored tensors bit for bit."""
    model_type = CASES[case][0]
    _, folder = saved(case)
    _, model = load_hf_model(folder)
    stored = load_file(folder / "model.safetensors")
    written = to_hf_state_dict(model, model_type)
    assert written.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(written[name], tensor), name


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v2_q_lora_yarn",
                                  "qwen3_moe_renormalised_sparse_step"])
def test_fused_expert_layout(case, saved, tmp_path):
    """transformers 5's fused experts (`mlp.experts.gate_up_proj` [E, 2I, h],
    `mlp.experts.down_proj` [E, h, I]; Mixtral's block renamed `mlp`) read and written."""
    model_type = CASES[case][0]
    hf_model, _ = saved(case)
    hf_model.save_pretrained(tmp_path, save_original_format=False)
    stored = load_file(tmp_path / "model.safetensors")
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in stored)
    _, model = load_hf_model(tmp_path)
    assert max_logit_diff(hf_model, model) < 1e-5
    written = to_hf_state_dict(model, model_type, expert_layout="fused")
    assert written.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(written[name], tensor), name


def test_deepseek_config_fields(saved):
    config, _ = load_hf_model(saved("deepseek_v2_q_lora_yarn")[1])
    assert config.multi_latent_attention and config.q_lora_rank == 48
    assert (config.kv_lora_rank, config.qk_head_dim, config.qk_pos_emb_head_dim,
            config.v_head_dim) == (32, 16, 16, 16)
    assert config.moe_shared_expert_intermediate_size == 2 * 24
    assert config.moe_router_pre_softmax and config.moe_router_topk_scaling_factor == 2.5
    assert (config.rotary_scaling_factor, config.mscale, config.mscale_all_dim,
            config.original_max_position_embeddings) == (40.0, 0.707, 0.707, 16)
    assert not config.rotary_interleaved
    config, _ = load_hf_model(saved("deepseek_v2_lite_group_limited")[1])
    assert config.q_lora_rank is None
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (4, 2)


@pytest.mark.parametrize("case, changes, fragment", [
    ("deepseek_v2_default_rope_tied", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek_v2_default_rope_tied", dict(topk_method="noaux_tc"), "noaux_tc"),
    ("deepseek_v2_default_rope_tied",
     dict(rope_parameters=dict(DEEPSEEK_YARN, mscale=None)), "mscale_all_dim"),
    ("deepseek_v2_default_rope_tied",
     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "'linear'"),
    ("deepseek_v2_default_rope_tied", dict(attention_bias=True), "attention_bias"),
    ("mixtral", dict(sliding_window=4096), "sliding"),
    ("mixtral", dict(num_experts_per_tok=1), "num_experts_per_tok 1"),
    ("qwen3_moe_renormalised_sparse_step", dict(use_sliding_window=True), "sliding"),
])
def test_unrepresentable_config_is_refused(case, changes, fragment, saved, tmp_path):
    folder = copy_model(saved(case)[1], tmp_path)
    edit_config(folder, **changes)
    one_line_error(folder, fragment)


def test_missing_expert_names_it(saved, tmp_path):
    folder = copy_model(saved("qwen3_moe_renormalised_sparse_step")[1], tmp_path)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.3.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path)
    one_line_error(folder, "model.layers.3.mlp.experts.5.up_proj.weight",
                    "decoder.layers.3.mlp.experts.linear_fc1.weight")


def test_expert_count_mismatch_names_it(saved, tmp_path):
    folder = copy_model(saved("mixtral")[1], tmp_path)
    edit_config(folder, num_local_experts=3)
    one_line_error(folder, "model.safetensors:", "block_sparse_moe.gate.weight", "[4, 64]",
                    "[3, 64]")


def test_leftover_expert_names_it(saved, tmp_path):
    folder = copy_model(saved("mixtral")[1], tmp_path)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for w in ("w1", "w2", "w3"):
        tensors[f"model.layers.1.block_sparse_moe.experts.4.{w}.weight"] = torch.zeros(2)
    save_file(tensors, path)
    one_line_error(folder, "block_sparse_moe.experts.4.", "not used")
