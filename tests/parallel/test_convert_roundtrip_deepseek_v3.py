"""DeepSeek-V3 (with and without a low-rank query) through Hugging Face -> `paratron
convert` -> TP2 x PP2 x EP2 -> save_checkpoint -> `paratron convert` -> Hugging Face:
every tensor comes back bit for bit, the routers' expert biases included, and the model
run at that layout gives the logits `transformers` gives (fp32, < 1e-5). The steps are
test_convert_roundtrip's.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from paratron.checkpoint import find_latest_valid  # noqa: E402
from tests.helpers.dist_utils import run_distributed  # noqa: E402
from tests.parallel.test_convert_roundtrip import (IDS, _convert, _hf_model,  # noqa: E402
                                                   _run_at_layout)

VOCAB = 256
V3 = dict(num_hidden_layers=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
          qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, moe_intermediate_size=24,
          n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
          n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
          num_mtp_layers=0)
CASES = {"q_lora": dict(V3, q_lora_rank=48), "no_q_lora": dict(V3, q_lora_rank=None)}


def _v3_model(overrides: dict):
    model = _hf_model("deepseek_v3", VOCAB, overrides)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))
    return model


@pytest.mark.slow
def test_deepseek_v3_round_trips_through_tp2_pp2_ep2(tmp_path):
    originals, hf_models, cases = {}, {}, {}
    for name, overrides in CASES.items():
        hf_models[name] = _v3_model(overrides)
        folder = tmp_path / f"{name}-hf"
        hf_models[name].save_pretrained(folder, max_shard_size="60KB")
        originals[name] = {k: v for f in folder.glob("*.safetensors") for k, v in
                           load_file(f).items()}
        _convert("--loader", "hf", "--saver", "paratron", "--load-dir", str(folder),
                 "--save-dir", str(tmp_path / f"{name}-paratron"),
                 "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                 "--target-expert-parallel-size", "2")
        _, path = find_latest_valid(tmp_path / f"{name}-paratron")
        cases[name] = (str(path), str(tmp_path / f"{name}-resaved"))

    results = run_distributed(4, _run_at_layout, cases, timeout=300)

    for name in CASES:
        with torch.no_grad():
            expected = hf_models[name](input_ids=IDS).logits
        diff = (results[2][name] - expected).abs().max().item()
        assert diff < 1e-5, (name, diff)

        back = tmp_path / f"{name}-back"
        _convert("--loader", "paratron", "--saver", "hf", "--load-dir",
                 str(tmp_path / f"{name}-resaved"), "--save-dir", str(back),
                 "--max-shard-size", "60KB")
        written = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
        assert written.keys() == originals[name].keys(), name
        assert any(k.endswith("e_score_correction_bias") for k in written)
        for key, tensor in originals[name].items():
            assert torch.equal(written[key], tensor), (name, key)
        assert json.loads((back / "config.json").read_text())["model_type"] == "deepseek_v3"
