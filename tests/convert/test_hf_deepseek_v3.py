"""DeepSeek-V3 (and Kimi-K2, Moonlight) checkpoints load into Paratron, give the logits
`transformers` gives, and are written back tensor for tensor; FP8 block-scaled
checkpoints, as DeepSeek publishes them, load as their hand-dequantized weights.

Tiny random `transformers` models built offline as in test_hf_logits_moe, with the
router's `e_score_correction_bias` drawn large enough to change which experts are
chosen (checked), so a bias that is lost or added to the weights cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from paratron.cli.args import parse_args  # noqa: E402
from paratron.cli.convert import main as convert  # noqa: E402
from paratron.convert.errors import ConversionError  # noqa: E402
from paratron.convert.hf_config import hf_to_paratron_fields, transformer_config  # noqa: E402
from paratron.convert.hf_export import hf_config_from_paratron, save_hf_folder  # noqa: E402
from paratron.convert.hf_loader import load_hf_model  # noqa: E402
from paratron.convert.hf_mapping import to_hf_state_dict  # noqa: E402
from paratron.convert.hf_source import read_hf_folder  # noqa: E402
from paratron.model.config import moe_layer_pattern  # noqa: E402
from tests.helpers.hf_utils import (VOCAB, copy_model, edit_config, max_logit_diff,
                                    one_line_error, randomize, saved_once,
                                    few_threads)  # noqa: F401 - an autouse fixture

MLA = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=128, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, moe_intermediate_size=24,
           n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
           num_hidden_layers=3, num_mtp_layers=0)
CASES = {
    # DeepSeek-V3's routing: 4 of 8 experts within the best 2 of 4 groups (a group
    # scored by its top 2 biased scores), a low-rank query.
    "q_lora_node_limited": dict(MLA, q_lora_rank=48, num_experts_per_tok=4, n_group=4,
                                topk_group=2, routed_scaling_factor=2.5),
    # Kimi-K2 / Moonlight: one group, no low-rank query, YaRN (K2's beta 1 / 1).
    "no_q_lora_one_group_yarn": dict(
        MLA, q_lora_rank=None, num_experts_per_tok=3, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, max_position_embeddings=16 * 32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                         "original_max_position_embeddings": 16, "beta_fast": 1.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # Moonlight's rms_norm_eps 1e-5, which transformers uses everywhere but in the
    # latent norms (1e-6): a wrong epsilon there moves the logits by more than 1e-5.
    "moonlight_norm_epsilon": dict(MLA, q_lora_rank=None, num_experts_per_tok=3, n_group=1,
                                   topk_group=1, rms_norm_eps=1e-5),
}



def _hf_model(overrides: dict):
    config = transformers.AutoConfig.for_model("deepseek_v3", **overrides)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager")
    randomize(model)  # the router bias too
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, folder), built once."""
    return saved_once(tmp_path_factory, lambda case: _hf_model(CASES[case]))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, saved):
    hf_model, folder = saved(case)
    config, model = load_hf_model(folder)
    assert moe_layer_pattern(config) == [False, True, True]
    assert max_logit_diff(hf_model, model) < 1e-5


def test_the_bias_changes_the_choice(saved):
    """Without its expert bias the model computes something else: the test above sees
    the bias."""
    hf_model, folder = saved("q_lora_node_limited")
    _, model = load_hf_model(folder)
    for name, buffer in model.named_buffers():
        if name.endswith("router.expert_bias"):
            buffer.zero_()
    assert max_logit_diff(hf_model, model) > 1e-3


def test_latent_norms_keep_their_own_epsilon(saved):
    """Moonlight's norms: rms_norm_eps 1e-5, the latent norms 1e-6 as transformers has
    them; the latent norms at 1e-5 would compute another model."""
    hf_model, folder = saved("moonlight_norm_epsilon")
    config, model = load_hf_model(folder)
    assert (config.norm_epsilon, config.mla_latent_norm_epsilon) == (1e-5, 1e-6)
    for name, module in model.named_modules():
        if name.endswith("kv_layernorm"):
            module.eps = 1e-5
    assert max_logit_diff(hf_model, model) > 1e-5
    with pytest.raises(ConversionError, match="Hugging Face's DeepSeek models keep 1e-06"):
        hf_config_from_paratron(dataclasses.replace(config, mla_latent_norm_epsilon=1e-5),
                                "deepseek_v3", VOCAB, torch.float32)


def test_megatron_format_refuses_two_epsilons(saved, tmp_path, capsys):
    _, folder = saved("moonlight_norm_epsilon")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "megatron",
                    "--load-dir", str(folder), "--save-dir", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "one epsilon for all norms" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["q_lora_node_limited", "no_q_lora_one_group_yarn"])
def test_megatron_format_round_trip(case, saved, tmp_path):
    """Through Megatron-LM's format at TP2 and back: the latent norms travel as Megatron's
    --qk-layernorm MLA norms, the expert bias as its buffer; every tensor comes back."""
    _, folder = saved(case)
    common = ["--model-type", "GPT"]
    assert convert(common + ["--loader", "hf", "--saver", "megatron", "--load-dir",
                             str(folder), "--save-dir", str(tmp_path / "megatron"),
                             "--target-tensor-parallel-size", "2"]) == 0
    assert convert(common + ["--loader", "megatron", "--saver", "hf", "--load-dir",
                             str(tmp_path / "megatron"), "--save-dir", str(tmp_path / "hf")]) == 0
    stored = load_file(folder / "model.safetensors")
    back = {}
    for path in (tmp_path / "hf").glob("*.safetensors"):
        back.update(load_file(path))
    assert back.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_reproduces_the_files(case, saved):
    _, folder = saved(case)
    _, model = load_hf_model(folder)
    stored = load_file(folder / "model.safetensors")
    written = to_hf_state_dict(model, "deepseek_v3")
    assert written.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(written[name], tensor), name


def test_config_fields(saved):
    config, _ = load_hf_model(saved("q_lora_node_limited")[1])
    assert (config.moe_router_score_function, config.moe_router_enable_expert_bias) == (
        "sigmoid", True)
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (4, 2)
    assert config.moe_router_topk_scaling_factor == 2.5 and config.q_lora_rank == 48
    assert config.moe_shared_expert_intermediate_size == 24
    config, _ = load_hf_model(saved("no_q_lora_one_group_yarn")[1])
    assert config.moe_router_num_groups is None and config.q_lora_rank is None
    assert (config.rotary_scaling_factor, config.beta_fast, config.beta_slow) == (32.0, 1.0, 1.0)


def test_kimi_k2_model_type(saved, tmp_path):
    """Kimi-K2's config.json calls DeepSeek-V3's architecture kimi_k2; written back, it
    keeps the name."""
    hf_model, folder = saved("no_q_lora_one_group_yarn")
    folder = copy_model(folder, tmp_path / "in")
    edit_config(folder, model_type="kimi_k2")
    _, model = load_hf_model(folder)
    assert max_logit_diff(hf_model, model) < 1e-5
    source = read_hf_folder(folder)
    save_hf_folder(source, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "kimi_k2"
    assert written["architectures"] == ["DeepseekV3ForCausalLM"]


def test_saver_writes_deepseek_v3(saved, tmp_path):
    """--saver hf: the stored tensors, the bias in fp32 under --bf16, and a config.json
    transformers reads as the same model."""
    hf_model, folder = saved("q_lora_node_limited")
    save_hf_folder(read_hf_folder(folder), tmp_path / "out")
    stored, written = load_file(folder / "model.safetensors"), load_file(
        tmp_path / "out" / "model.safetensors")
    assert written.keys() == stored.keys()
    assert all(torch.equal(written[n], t) for n, t in stored.items())
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager")
    _, model = load_hf_model(folder)
    assert max_logit_diff(back.eval(), model) < 1e-5
    save_hf_folder(read_hf_folder(folder), tmp_path / "bf16", dtype=torch.bfloat16)
    half = load_file(tmp_path / "bf16" / "model.safetensors")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert half[bias].dtype == torch.float32 and torch.equal(half[bias], stored[bias])
    assert half["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("changes, fragment", [
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(num_experts_per_tok=3), "topk_group 2"),
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(quantization_config={"quant_method": "compressed-tensors"}), "compressed-tensors"),
    (dict(quantization_config="fp8"), "quant_method 'fp8'"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e5m2",
                               "weight_block_size": [128, 128]}), "fmt 'e5m2'"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128]}),
     "weight_block_size"),
])
def test_unrepresentable_config_is_refused(changes, fragment, saved, tmp_path):
    folder = copy_model(saved("q_lora_node_limited")[1], tmp_path)
    edit_config(folder, **changes)
    one_line_error(folder, fragment)


# ------------------------------------------------------------------ FP8 checkpoints
BLOCK = 128
# Dimensions above and below the block and no multiple of it, so edge blocks are partial.
FP8_SHAPE = dict(MLA, hidden_size=160, intermediate_size=264, moe_intermediate_size=136,
                 kv_lora_rank=144, q_lora_rank=200, num_experts_per_tok=4, n_group=4,
                 topk_group=2, num_hidden_layers=2)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _quantized(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek's FP8 tensors: the linear weights of the layers, not the router's."""
    return (name.startswith("model.layers.") and tensor.dim() == 2
            and not name.endswith("mlp.gate.weight"))


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and its [ceil(rows/128), ceil(cols/128)] factors, block by
    block: each block's largest magnitude maps to the format's largest value."""
    rows, cols = weight.shape
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            scales[i, j] = block.abs().max() / FP8_MAX
            quantized[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (
                block / scales[i, j]).to(torch.float8_e4m3fn)
    return quantized, scales


def _by_hand(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each block times its factor, one block at a time, in bf16."""
    out = torch.empty(quantized.shape)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            out[rows, cols] = quantized[rows, cols].float() * scales[i, j]
    return out.to(torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory):
    """(FP8 folder as DeepSeek publishes it, the same weights dequantized by hand)."""
    model = _hf_model(FP8_SHAPE)
    plain = tmp_path_factory.mktemp("plain")
    model.save_pretrained(plain)
    tensors = load_file(plain / "model.safetensors")
    fp8, by_hand = {}, {}
    for name, tensor in tensors.items():
        if _quantized(name, tensor):
            quantized, scales = _quantize(tensor)
            fp8[name], fp8[name + "_scale_inv"] = quantized, scales
            by_hand[name] = _by_hand(quantized, scales)
        else:
            fp8[name] = by_hand[name] = tensor.to(torch.bfloat16)
    assert any(t.shape[0] % BLOCK and t.shape[0] > BLOCK for t in by_hand.values())
    config = json.loads((plain / "config.json").read_text())
    folders = []
    for kind, weights in (("fp8", fp8), ("by_hand", by_hand)):
        folder = tmp_path_factory.mktemp(kind)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        quant = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                         "weight_block_size": [BLOCK, BLOCK],
                                         "activation_scheme": "dynamic"}}
        (folder / "config.json").write_text(json.dumps(
            dict(config, **(quant if kind == "fp8" else {}))))
        folders.append(folder)
    return folders


def test_fp8_checkpoint_dequantizes_as_by_hand(fp8_folders):
    fp8, by_hand = fp8_folders
    got, want = read_hf_folder(fp8), read_hf_folder(by_hand)
    count = 0
    for got_group, want_group in zip(got.groups(), want.groups(), strict=True):
        assert got_group.keys() == want_group.keys()
        for key, tensor in want_group.items():
            assert got_group[key].dtype == torch.bfloat16, key
            assert torch.equal(got_group[key], tensor), key
            count += 1
    assert count > 20


def test_fp8_checkpoint_saves_without_quantization(fp8_folders, tmp_path):
    """--saver hf writes the dequantized bf16 weights and no quantization_config."""
    fp8, by_hand = fp8_folders
    save_hf_folder(read_hf_folder(fp8), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    written, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(
        by_hand / "model.safetensors")
    assert written.keys() == want.keys()
    assert all(torch.equal(written[n], t) for n, t in want.items())


def test_fp8_scale_of_wrong_shape_is_refused(fp8_folders, tmp_path):
    folder = copy_model(fp8_folders[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, folder / "model.safetensors")
    one_line_error(folder, name, "blocks of [128, 128]")


def test_fp8_without_quantization_config_is_refused(fp8_folders, tmp_path):
    folder = copy_model(fp8_folders[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(folder, "float8_e4m3fn", "quantization_config")


# ------------------------------------------------------------------ presets
# The published config.json files (Hugging Face Hub: deepseek-ai/DeepSeek-V3,
# moonshotai/Kimi-K2-Instruct, moonshotai/Moonlight-16B-A3B), their model keys.
_MLA_671B = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                 num_hidden_layers=61, n_shared_experts=1, kv_lora_rank=512, q_lora_rank=1536,
                 qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                 num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                 scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001,
                 seq_aux=True, moe_layer_freq=1, hidden_act="silu")
PUBLISHED = {
    "deepseek-v3": dict(
        _MLA_671B, model_type="deepseek_v3", num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, routed_scaling_factor=2.5, n_group=8,
        topk_group=4, first_k_dense_replace=3, max_position_embeddings=163840,
        rope_theta=10000, vocab_size=129280, num_nextn_predict_layers=1,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                      "type": "yarn"},
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                             "quant_method": "fp8", "weight_block_size": [128, 128]}),
    "kimi-k2": dict(
        _MLA_671B, model_type="kimi_k2", num_attention_heads=64, num_key_value_heads=64,
        n_routed_experts=384, routed_scaling_factor=2.827, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=131072, rope_theta=50000.0,
        vocab_size=163840, num_nextn_predict_layers=0,
        rope_scaling={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                      "type": "yarn"}),
    "moonlight-16b-a3b": dict(
        model_type="deepseek_v3", hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, routed_scaling_factor=2.446, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=50000.0, scoring_func="sigmoid", topk_method="noaux_tc",
        norm_topk_prob=True, aux_loss_alpha=0.001, seq_aux=True, vocab_size=163840,
        num_nextn_predict_layers=0),
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_presets_are_the_published_models(preset):
    """--model-size gives the model the published config.json describes (the aux-loss
    factor aside: the presets keep the DeepSeek-V3 paper's)."""
    hf = dict(PUBLISHED[preset])
    model = parse_args(["--model-size", preset, "--lr", "1e-4", "--train-iters", "1"]).model
    fields = hf_to_paratron_fields(hf)
    assert moe_layer_pattern(model) == moe_layer_pattern(transformer_config(fields))
    for key, value in fields.items():
        if key == "position_embedding_type":
            assert model.uses_yarn() == (value == "yarn")
        elif key not in ("moe_aux_loss_coeff", "moe_layer_freq"):
            assert getattr(model, key) == value, key
