"""Hugging Face -> `paratron convert` -> TP2 x PP2 (x EP2) -> save_checkpoint ->
`paratron convert` -> Hugging Face gives back every tensor bit for bit, for the seven
architectures and DeepSeek-V3 (with and without a low-rank query; the routers' expert
biases included); in between, the model run at TP2 x PP2 gives the logits
`transformers` gives (fp32, < 1e-5).

All seven go through one spawn of four gloo ranks. Dense models run at TP2 x PP2; the
mixtures of experts at TP2 x PP2 with EP2 (expert TP 1), which four ranks allow. The
GPT-2 case has a vocabulary of 250, padded to 256 on import (128 x TP2) and trimmed back
on export.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tests.helpers.dist_utils import run_distributed  # noqa: E402
from tests.helpers.hf_utils import randomize  # noqa: E402
from paratron.checkpoint import find_latest_valid, load_checkpoint, read_metadata, save_checkpoint  # noqa: E402
from paratron.cli.convert import main as convert  # noqa: E402
from paratron.convert.hf_config import transformer_config  # noqa: E402
from paratron.model.gpt import GPTModel  # noqa: E402
from paratron.parallel.pipeline import model_chunks  # noqa: E402
from paratron.parallel.process_groups import ProcessGroups  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
MOE = dict(num_key_value_heads=2, intermediate_size=96, num_experts_per_tok=2)
CASES = {  # name: (model_type, vocabulary, overrides)
    "gpt2": ("gpt2", 250, dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("llama", 256, dict(num_key_value_heads=2, intermediate_size=96)),
    "qwen2": ("qwen2", 256, dict(num_key_value_heads=2, intermediate_size=96,
                                 tie_word_embeddings=True)),
    "qwen3": ("qwen3", 256, dict(num_key_value_heads=2, intermediate_size=96, head_dim=32)),
    "qwen3_moe": ("qwen3_moe", 256, dict(MOE, head_dim=16, moe_intermediate_size=24,
                                         num_experts=4, norm_topk_prob=True,
                                         mlp_only_layers=[0])),
    "mixtral": ("mixtral", 256, dict(MOE, num_local_experts=4)),
    "deepseek_v2": ("deepseek_v2", 256, dict(
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        q_lora_rank=None, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1)),
}
V3 = dict(num_hidden_layers=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
          qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, moe_intermediate_size=24,
          n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
          n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
          num_mtp_layers=0)
CASES.update({"deepseek_v3": ("deepseek_v3", 256, dict(V3, q_lora_rank=48)),
              "deepseek_v3_no_q_lora": ("deepseek_v3", 256, dict(V3, q_lora_rank=None))})
IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))


def _hf_model(model_type, vocab, overrides):
    config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab,
                                               **{**TINY, **overrides})
    kwargs = {"experts_implementation": "eager"} if "experts" in str(overrides) else {}
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          **kwargs)
    randomize(model)
    return model.eval()


def _run_at_layout(cases: dict) -> dict:
    """On every rank: load each imported checkpoint at TP2 x PP2 (EP2 for experts), run
    the tokens through the pipeline, gather the last stage's logits over TP, and save the
    model again from this layout."""
    out, layouts = {}, {}
    for name, (path, save_dir) in cases.items():
        meta = read_metadata(path)
        config = transformer_config({k: v for k, v in meta["config"]["model"].items()
                                     if k not in ("sequence_parallel", "cp_comm_type")})
        ep = meta["config"]["parallel"]["expert_model_parallel_size"]
        if ep not in layouts:
            layouts[ep] = ProcessGroups.build(2, 2, 1, ep, 1 if ep > 1 else None)
        pg = layouts[ep]
        (chunk,) = model_chunks(config.num_layers, 2, pg.pp.rank)
        model = GPTModel(config, pg, pre_process=chunk.is_first, post_process=chunk.is_last,
                         layer_numbers=chunk.layers).eval()
        load_checkpoint(path, [model], pg, load_rng=False)
        with torch.no_grad():
            if chunk.is_first:
                hidden = model(IDS)
                dist.send(hidden, pg.pp_ranks[1])
                logits = None
            else:
                hidden = torch.empty(IDS.shape[1], IDS.shape[0], config.hidden_size)
                dist.recv(hidden, pg.pp_ranks[0])
                local = model(hidden_states=hidden)
                parts = [torch.empty_like(local) for _ in range(pg.tp.size)]
                dist.all_gather(parts, local.contiguous(), group=pg.tp.group)
                logits = torch.cat(parts, dim=-1)
        save_checkpoint(save_dir, 5, [model], pg, config=meta["config"], save_rng=False)
        out[name] = logits
    return out


def _convert(*flags) -> None:
    assert convert(["--model-type", "GPT", *flags]) == 0


@pytest.mark.slow
def test_architectures_round_trip_through_tp2_pp2(tmp_path):
    originals, hf_models, cases = {}, {}, {}
    for name, (model_type, vocab, overrides) in CASES.items():
        hf_models[name] = _hf_model(model_type, vocab, overrides)
        folder = tmp_path / f"{name}-hf"
        hf_models[name].save_pretrained(folder, max_shard_size="60KB")
        originals[name] = {k: v for f in folder.glob("*.safetensors") for k, v in
                           load_file(f).items()}
        moe = ["--target-expert-parallel-size", "2"] if "experts" in str(overrides) else []
        _convert("--loader", "hf", "--saver", "paratron", "--load-dir", str(folder),
                 "--save-dir", str(tmp_path / f"{name}-paratron"),
                 "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                 *moe)
        _, path = find_latest_valid(tmp_path / f"{name}-paratron")
        cases[name] = (str(path), str(tmp_path / f"{name}-resaved"))
        parallel = read_metadata(path)["config"]["parallel"]
        assert (parallel["tensor_model_parallel_size"], parallel["pipeline_model_parallel_size"],
                parallel["expert_model_parallel_size"]) == (2, 2, 2 if moe else 1)

    results = run_distributed(4, _run_at_layout, cases, timeout=300)

    for name, (model_type, vocab, _) in CASES.items():
        with torch.no_grad():
            expected = hf_models[name](input_ids=IDS).logits
        last_stage = results[2][name]  # rank 2: TP rank 0 of the last stage
        assert last_stage.shape[-1] == (256 if vocab == 250 else vocab)
        diff = (last_stage[..., :vocab] - expected).abs().max().item()
        assert diff < 1e-5, (name, diff)

        back = tmp_path / f"{name}-back"
        _convert("--loader", "paratron", "--saver", "hf", "--load-dir",
                 str(tmp_path / f"{name}-resaved"), "--save-dir", str(back),
                 "--max-shard-size", "60KB")
        written = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
        assert written.keys() == originals[name].keys(), name
        for key, tensor in originals[name].items():
            assert torch.equal(written[key], tensor), (name, key)
        assert json.loads((back / "config.json").read_text())["model_type"] == model_type
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
        with torch.no_grad():
            diff = (reloaded(input_ids=IDS).logits - expected).abs().max().item()
        assert diff < 1e-5, (name, diff)
