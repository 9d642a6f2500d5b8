"""DeepSeek-V3's multi-token prediction layers (stored as layers num_hidden_layers + k,
which `transformers` does not build) survive Hugging Face -> Paratron (TP2 x PP2 x EP2)
-> Hugging Face with every tensor equal, and land in Paratron's `mtp.layers.{k}`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from paratron.checkpoint import find_latest_valid, read_metadata  # noqa: E402
from paratron.cli.convert import main as convert  # noqa: E402
from paratron.convert.hf_loader import load_hf_model  # noqa: E402
from tests.helpers.hf_utils import VOCAB, one_line_error, randomize  # noqa: E402

LAYERS = 2
V3 = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
          max_position_embeddings=128, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
          qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, moe_intermediate_size=24,
          n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
          n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
          num_hidden_layers=LAYERS, num_mtp_layers=0)


def _with_mtp(folder, depth: int) -> dict[str, torch.Tensor]:
    """Turn a saved tiny DeepSeek-V3 into one with `depth` MTP layers stored as DeepSeek
    does: the last layer's tensors (random values) plus the module's own, and copies of
    the embedding and head. Returns every stored tensor."""
    tensors = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    last = f"model.layers.{LAYERS - 1}."
    for k in range(depth):
        layer = f"model.layers.{LAYERS + k}."
        for name, t in list(tensors.items()):
            if name.startswith(last):
                tensors[layer + name[len(last):]] = 0.1 * torch.randn(t.shape, generator=gen)
        h = V3["hidden_size"]
        for name, shape in (("enorm.weight", (h,)), ("hnorm.weight", (h,)),
                            ("shared_head.norm.weight", (h,)), ("eh_proj.weight", (h, 2 * h))):
            tensors[layer + name] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        tensors[layer + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[layer + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = depth
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """depth -> (folder, stored tensors)."""
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("deepseek_v3", **V3), attn_implementation="eager",
        experts_implementation="eager")
    randomize(model)
    out = {}
    for depth in (1, 2):
        folder = tmp_path_factory.mktemp(f"mtp{depth}")
        model.save_pretrained(folder)
        out[depth] = folder, _with_mtp(folder, depth)
    return out


def _convert(*flags) -> None:
    assert convert(["--model-type", "GPT", *flags]) == 0


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_layers_round_trip_through_tp2_pp2_ep2(hf_folders, depth, tmp_path):
    folder, original = hf_folders[depth]
    _convert("--loader", "hf", "--saver", "paratron", "--load-dir", str(folder),
             "--save-dir", str(tmp_path / "paratron"), "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2")
    _, path = find_latest_valid(tmp_path / "paratron")
    assert read_metadata(path)["config"]["model"]["mtp_num_layers"] == depth
    back = tmp_path / "back"
    _convert("--loader", "paratron", "--saver", "hf", "--load-dir", str(tmp_path / "paratron"),
             "--save-dir", str(back))
    written = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
    assert written.keys() == original.keys()
    assert any(k.startswith(f"model.layers.{LAYERS + depth - 1}.eh_proj") for k in written)
    for key, tensor in original.items():
        assert torch.equal(written[key], tensor), key
    assert json.loads((back / "config.json").read_text())["num_nextn_predict_layers"] == depth


def test_mtp_layers_load_into_the_modules(hf_folders):
    folder, stored = hf_folders[2]
    config, model = load_hf_model(folder)
    assert config.mtp_num_layers == 2
    layer = model.mtp.layers[1]
    pairs = {"eh_proj.weight": layer.eh_proj.weight, "enorm.weight": layer.enorm.weight,
             "shared_head.norm.weight": layer.final_layernorm.weight,
             "self_attn.kv_a_proj_with_mqa.weight":
                 layer.mtp_model_layer.self_attention.linear_kv_down_proj.weight,
             "mlp.gate.e_score_correction_bias": layer.mtp_model_layer.mlp.router.expert_bias}
    for hf_name, tensor in pairs.items():
        assert torch.equal(tensor, stored[f"model.layers.{LAYERS + 1}.{hf_name}"]), hf_name


def test_a_differing_copy_of_the_embedding_is_refused(hf_folders, tmp_path):
    folder, stored = hf_folders[1]
    tensors = dict(stored)
    tensors[f"model.layers.{LAYERS}.embed_tokens.weight"] = \
        tensors["model.embed_tokens.weight"] + 1.0
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    one_line_error(tmp_path, f"model.layers.{LAYERS}.embed_tokens.weight", "shares")


def test_megatron_format_is_refused(hf_folders, tmp_path, capsys):
    folder, _ = hf_folders[1]
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "megatron",
                    "--load-dir", str(folder), "--save-dir", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "multi-token prediction" in error
    assert not (tmp_path / "out").exists()
