"""`paratron convert`: Megatron-LM legacy import, refusals, and a trained run exported
for `transformers`.

* A Megatron-LM checkpoint is written here by hand in Megatron's documented layout (TP2
  x PP2 `mp_rank_TT_PPP/model_optim_rng.pt`, stage-local layer numbers, QKV interleaved
  per query group, [gate; up] halves per TP shard, TE-fused norms) from a tiny Qwen2's
  weights; imported, it gives the logits `transformers` gives.
* Bad input is refused in one line on stderr, with a non-zero exit, and nothing is left
  at --save-dir (nor a temporary folder beside it).
* `paratron train --save` -> `paratron convert --saver hf` -> `transformers` generates.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tests.helpers.checkpoint import checkpoint_logits  # noqa: E402
from tests.helpers.hf_utils import randomize  # noqa: E402
from tests.helpers.pickle_payloads import craft, payloads  # noqa: E402
from paratron.checkpoint import find_latest_valid  # noqa: E402
from paratron.cli.convert import main as convert  # noqa: E402
from paratron.convert.hf_config import transformer_config  # noqa: E402

GPT2_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpt2"
TINY_QWEN2 = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                  tie_word_embeddings=False)


def _hf(model_type="qwen2", **config):
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize(model)
    return model.eval()


# ------------------------------------------------------------------ Megatron-LM legacy
def _megatron_shards(hf_model, tp: int, pp: int) -> dict[tuple[int, int], dict]:
    """Megatron-Core state dicts of every (TP rank, PP rank), from a Qwen2's weights."""
    c = hf_model.config
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    heads, groups, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    per_stage = c.num_hidden_layers // pp
    out = {}
    for p in range(pp):
        for t in range(tp):
            state = {}
            if p == 0:
                state["embedding.word_embeddings.weight"] = \
                    sd["model.embed_tokens.weight"].chunk(tp)[t]
            for local in range(per_stage):
                i, L = p * per_stage + local, f"decoder.layers.{local}."
                a = f"model.layers.{p * per_stage + local}."
                rows = []
                for kind in ("weight", "bias"):
                    q = sd[a + f"self_attn.q_proj.{kind}"]
                    k = sd[a + f"self_attn.k_proj.{kind}"]
                    v = sd[a + f"self_attn.v_proj.{kind}"]
                    q = q.reshape(groups, heads // groups * d, *q.shape[1:])
                    k = k.reshape(groups, d, *k.shape[1:])
                    v = v.reshape(groups, d, *v.shape[1:])
                    mine = range(t * groups // tp, (t + 1) * groups // tp)
                    rows = [torch.cat([q[g], k[g], v[g]]) for g in mine]
                    state[L + f"self_attention.linear_qkv.{kind}"] = torch.cat(rows)
                state[L + "self_attention.linear_qkv.layer_norm_weight"] = \
                    sd[a + "input_layernorm.weight"]
                state[L + "self_attention.linear_proj.weight"] = \
                    sd[a + "self_attn.o_proj.weight"].chunk(tp, dim=1)[t]
                state[L + "mlp.linear_fc1.weight"] = torch.cat(
                    [sd[a + "mlp.gate_proj.weight"].chunk(tp)[t],
                     sd[a + "mlp.up_proj.weight"].chunk(tp)[t]])
                state[L + "mlp.linear_fc1.layer_norm_weight"] = \
                    sd[a + "post_attention_layernorm.weight"]
                state[L + "mlp.linear_fc2.weight"] = \
                    sd[a + "mlp.down_proj.weight"].chunk(tp, dim=1)[t]
                state[L + "self_attention.core_attention._extra_state"] = None
                assert i == p * per_stage + local
            if p == pp - 1:
                state["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
                state["output_layer.weight"] = sd["lm_head.weight"].chunk(tp)[t]
            out[t, p] = state
    return out


def _megatron_args(hf_model, tp, pp) -> argparse.Namespace:
    c = hf_model.config
    return argparse.Namespace(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
        group_query_attention=True, num_query_groups=c.num_key_value_heads,
        kv_channels=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, position_embedding_type="rope",
        rotary_base=c.rope_parameters["rope_theta"], normalization="RMSNorm",
        norm_epsilon=c.rms_norm_eps, swiglu=True, add_bias_linear=False, add_qkv_bias=True,
        untie_embeddings_and_output_weights=True, padded_vocab_size=c.vocab_size,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, hidden_dropout=0.0, attention_dropout=0.0,
        sequence_parallel=True, recompute_granularity="full", recompute_method="uniform")


def _write_megatron(folder: Path, args, shards: dict[str, dict], iteration) -> None:
    """Megatron's legacy layout: `<iter_XXXXXXX or release>/<rank folder>/model_optim_rng.pt`
    per rank folder name in `shards`, and `latest_checkpointed_iteration.txt`."""
    release = iteration == "release"
    for rank, state in shards.items():
        rank_dir = folder / ("release" if release else f"iter_{iteration:07d}") / rank
        rank_dir.mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0,
                    "iteration": 0 if release else iteration, "model": state},
                   rank_dir / "model_optim_rng.pt")
    (folder / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def _write_dense_megatron(folder: Path, hf_model, tp=2, pp=2) -> None:
    """The Qwen2 `hf_model` as Megatron's TP x PP files (iteration 10)."""
    shards = _megatron_shards(hf_model, tp, pp)
    _write_megatron(folder, _megatron_args(hf_model, tp, pp),
                    {f"mp_rank_{t:02d}_{p:03d}": state for (t, p), state in shards.items()}, 10)


def _imported_logit_diff(tmp_path, hf_model) -> float:
    """`paratron convert --loader megatron` of tmp_path/megatron, then the largest logit
    difference from `hf_model` on fixed tokens."""
    assert convert(["--model-type", "GPT", "--loader", "megatron", "--saver", "paratron",
                    "--load-dir", str(tmp_path / "megatron"),
                    "--save-dir", str(tmp_path / "out")]) == 0
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    got = checkpoint_logits(find_latest_valid(tmp_path / "out")[1], ids)
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
    return (got - expected).abs().max().item()


def test_megatron_legacy_tp2_pp2_import_matches_transformers(tmp_path, capsys):
    hf_model = _hf(**TINY_QWEN2)
    _write_dense_megatron(tmp_path / "megatron", hf_model)
    assert _imported_logit_diff(tmp_path, hf_model) < 1e-5
    assert "WARNING" not in capsys.readouterr().err  # read with no code run, no flag


def _megatron_moe_shards(hf_model, tp: int, ep: int) -> dict[tuple[int, int], dict]:
    """Megatron-Core state dicts of every (TP rank, EP rank) of a Qwen3-MoE, local-spec
    names (separate norms, q/k layernorm, SequentialMLP experts); expert TP = TP."""
    c = hf_model.config
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    heads, groups, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    local_experts = c.num_experts // ep
    out = {}
    for e in range(ep):
        for t in range(tp):
            state = {"embedding.word_embeddings.weight":
                     sd["model.embed_tokens.weight"].chunk(tp)[t]}
            for i in range(c.num_hidden_layers):
                L, a = f"decoder.layers.{i}.", f"model.layers.{i}."
                q = sd[a + "self_attn.q_proj.weight"].reshape(groups, heads // groups * d, -1)
                k = sd[a + "self_attn.k_proj.weight"].reshape(groups, d, -1)
                v = sd[a + "self_attn.v_proj.weight"].reshape(groups, d, -1)
                mine = range(t * groups // tp, (t + 1) * groups // tp)
                state[L + "self_attention.linear_qkv.weight"] = torch.cat(
                    [torch.cat([q[g], k[g], v[g]]) for g in mine])
                state[L + "self_attention.q_layernorm.weight"] = sd[a + "self_attn.q_norm.weight"]
                state[L + "self_attention.k_layernorm.weight"] = sd[a + "self_attn.k_norm.weight"]
                state[L + "self_attention.linear_proj.weight"] = \
                    sd[a + "self_attn.o_proj.weight"].chunk(tp, dim=1)[t]
                state[L + "input_layernorm.weight"] = sd[a + "input_layernorm.weight"]
                state[L + "pre_mlp_layernorm.weight"] = sd[a + "post_attention_layernorm.weight"]
                state[L + "mlp.router.weight"] = sd[a + "mlp.gate.weight"]
                gate_up, down = sd[a + "mlp.experts.gate_up_proj"], sd[a + "mlp.experts.down_proj"]
                for local in range(local_experts):
                    x = e * local_experts + local
                    gate, up = gate_up[x].chunk(2)
                    E = L + f"mlp.experts.local_experts.{local}."
                    state[E + "linear_fc1.weight"] = torch.cat([gate.chunk(tp)[t],
                                                                up.chunk(tp)[t]])
                    state[E + "linear_fc2.weight"] = down[x].chunk(tp, dim=1)[t]
            state["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
            state["output_layer.weight"] = sd["lm_head.weight"].chunk(tp)[t]
            out[t, e] = state
    return out


def test_megatron_legacy_moe_tp2_ep2_import_matches_transformers(tmp_path):
    """Expert folders mp_rank_TT_EEE (no pipeline part at PP1), experts split over TP."""
    hf_model = _hf("qwen3_moe", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=96, moe_intermediate_size=24, num_experts=4,
                   num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                   tie_word_embeddings=False)
    c = hf_model.config
    args = argparse.Namespace(**{
        **vars(_megatron_args(hf_model, 2, 1)), "ffn_hidden_size": c.intermediate_size,
        "kv_channels": c.head_dim, "add_qkv_bias": False, "qk_layernorm": True,
        "num_experts": c.num_experts, "moe_ffn_hidden_size": c.moe_intermediate_size,
        "moe_router_topk": c.num_experts_per_tok, "expert_model_parallel_size": 2,
        "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.001})
    shards = _megatron_moe_shards(hf_model, tp=2, ep=2)
    _write_megatron(tmp_path / "megatron", args,
                    {f"mp_rank_{t:02d}_{e:03d}": state for (t, e), state in shards.items()},
                    "release")
    assert _imported_logit_diff(tmp_path, hf_model) < 1e-5


def _megatron_mla_shards(hf_model, tp: int, ep: int) -> dict[tuple[int, int], dict]:
    """Megatron-Core state dicts of a DeepSeek-V2 (MLA without q-LoRA, dense first
    layer, shared expert, GroupedMLP experts) per (TP rank, EP rank)."""
    c = hf_model.config
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    local_experts = c.n_routed_experts // ep
    out = {}
    for e in range(ep):
        for t in range(tp):
            state = {"embedding.word_embeddings.weight":
                     sd["model.embed_tokens.weight"].chunk(tp)[t]}
            for i in range(c.num_hidden_layers):
                L, a = f"decoder.layers.{i}.", f"model.layers.{i}."
                A = L + "self_attention."
                state[A + "linear_q_proj.weight"] = sd[a + "self_attn.q_proj.weight"].chunk(tp)[t]
                state[A + "linear_kv_down_proj.weight"] = \
                    sd[a + "self_attn.kv_a_proj_with_mqa.weight"]
                state[A + "linear_kv_up_proj.layer_norm_weight"] = \
                    sd[a + "self_attn.kv_a_layernorm.weight"]
                state[A + "linear_kv_up_proj.weight"] = \
                    sd[a + "self_attn.kv_b_proj.weight"].chunk(tp)[t]
                state[A + "linear_proj.weight"] = sd[a + "self_attn.o_proj.weight"].chunk(tp, 1)[t]
                state[L + "input_layernorm.weight"] = sd[a + "input_layernorm.weight"]
                state[L + "pre_mlp_layernorm.weight"] = sd[a + "post_attention_layernorm.weight"]

                def fc1(gate, up):
                    return torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
                if i < c.first_k_dense_replace:
                    state[L + "mlp.linear_fc1.weight"] = fc1(sd[a + "mlp.gate_proj.weight"],
                                                             sd[a + "mlp.up_proj.weight"])
                    state[L + "mlp.linear_fc2.weight"] = \
                        sd[a + "mlp.down_proj.weight"].chunk(tp, 1)[t]
                    continue
                state[L + "mlp.router.weight"] = sd[a + "mlp.gate.weight"]
                S = a + "mlp.shared_experts."
                state[L + "mlp.shared_experts.linear_fc1.weight"] = fc1(
                    sd[S + "gate_proj.weight"], sd[S + "up_proj.weight"])
                state[L + "mlp.shared_experts.linear_fc2.weight"] = \
                    sd[S + "down_proj.weight"].chunk(tp, 1)[t]
                mine = range(e * local_experts, (e + 1) * local_experts)
                gate_up, down = sd[a + "mlp.experts.gate_up_proj"], sd[a + "mlp.experts.down_proj"]
                # GroupedMLP keeps [E_local, h, 2f/tp] as a [h, E_local * 2f/tp] parameter.
                w1 = torch.stack([fc1(*gate_up[x].chunk(2)).t() for x in mine])
                w2 = torch.stack([down[x].chunk(tp, 1)[t].t() for x in mine])
                state[L + "mlp.experts.weight1"] = w1.reshape(c.hidden_size, -1)
                state[L + "mlp.experts.weight2"] = w2.reshape(-1, c.hidden_size)
            state["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
            state["output_layer.weight"] = sd["lm_head.weight"].chunk(tp)[t]
            out[t, e] = state
    return out


def test_megatron_legacy_mla_grouped_experts_tp2_ep2_import_matches_transformers(tmp_path):
    hf_model = _hf("deepseek_v2", vocab_size=256, hidden_size=64, num_attention_heads=4,
                   num_key_value_heads=4, num_hidden_layers=2, intermediate_size=96,
                   moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                   n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                   kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   max_position_embeddings=64, tie_word_embeddings=False)
    c = hf_model.config
    args = argparse.Namespace(**{
        **vars(_megatron_args(hf_model, 2, 1)), "ffn_hidden_size": c.intermediate_size,
        "group_query_attention": False, "num_query_groups": None, "add_qkv_bias": False,
        "qk_layernorm": True, "multi_latent_attention": True, "q_lora_rank": None,
        "kv_lora_rank": 16, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16,
        "rotary_base": 10000.0, "num_experts": 4, "moe_ffn_hidden_size": 24,
        "moe_router_topk": 2, "moe_router_pre_softmax": True, "moe_layer_freq": [0, 1],
        "moe_shared_expert_intermediate_size": 24, "moe_grouped_gemm": True,
        "expert_model_parallel_size": 2, "moe_router_load_balancing_type": "aux_loss"})
    shards = _megatron_mla_shards(hf_model, tp=2, ep=2)
    _write_megatron(tmp_path / "megatron", args,
                    {f"mp_rank_{t:02d}_{e:03d}": state for (t, e), state in shards.items()}, 5)
    assert _imported_logit_diff(tmp_path, hf_model) < 1e-5


# ------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Llama as a sharded Hugging Face folder and as a Paratron checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    hf_model = _hf("llama", **{**TINY_QWEN2, "num_hidden_layers": 2})
    hf_model.save_pretrained(root / "hf", max_shard_size="40KB")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "paratron",
                    "--load-dir", str(root / "hf"), "--save-dir", str(root / "paratron")]) == 0
    _write_dense_megatron(root / "megatron", _hf(**{**TINY_QWEN2, "num_hidden_layers": 2}))
    return root


def _break_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))


def _wrong_shape(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(95, 64)
    save_file(tensors, shard, metadata={"format": "pt"})


def _missing_shard(folder):
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def _truncated(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])


def _flipped_byte(folder):
    shard = next((folder / "iter_0000000").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


def _other_config(folder):
    meta_path = folder / "iter_0000000" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["ffn_hidden_size"] = 128
    meta_path.write_text(json.dumps(meta))


def _pickled_code(folder):
    payload, _ = payloads(folder / "MARKER")["os_system"]
    craft(next(folder.glob("iter_*/mp_rank_*/model_optim_rng.pt")), payload)


HF_TO_PARATRON = ["--loader", "hf", "--saver", "paratron"]
PARATRON_TO_HF = ["--loader", "paratron", "--saver", "hf"]
MEGATRON = ["--loader", "megatron", "--saver", "paratron"]
BAD = {  # name: (source, damage, flags, words the message must contain)
    "unsupported_architecture": ("hf", _break_model_type, HF_TO_PARATRON, ["'bert'"]),
    "shape_mismatch": ("hf", _wrong_shape, HF_TO_PARATRON,
                       ["model.layers.1.mlp.up_proj.weight", "[95, 64]", "[96, 64]"]),
    "missing_shard": ("hf", _missing_shard, HF_TO_PARATRON, ["missing"]),
    "truncated_safetensors": ("hf", _truncated, HF_TO_PARATRON, ["safetensors"]),
    "checksum_mismatch": ("paratron", _flipped_byte, PARATRON_TO_HF, ["checksum mismatch"]),
    "another_model_than_the_preset": ("paratron", None,
                                      PARATRON_TO_HF + ["--model-size", "llama2-7b"],
                                      ["--model-size llama2-7b", "num_layers"]),
    "tensors_of_another_model": ("paratron", _other_config, PARATRON_TO_HF,
                                 ["linear_fc1.weight", "another model"]),
    "megatron_pickled_code": ("megatron", _pickled_code, MEGATRON,
                              ["model_optim_rng.pt", "system", "--trust-pickle"]),
    "target_tp_does_not_divide_heads": ("hf", None, HF_TO_PARATRON +
                                        ["--target-tensor-parallel-size", "3"],
                                        ["--target-tensor-parallel-size 3"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case, sources, tmp_path, capsys):
    source, damage, flags, words = BAD[case]
    folder = tmp_path / "in"
    shutil.copytree(sources / source, folder)
    if damage is not None:
        damage(folder)
    out = tmp_path / "out"
    code = convert(["--model-type", "GPT", *flags, "--load-dir", str(folder),
                    "--save-dir", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratron convert: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_export_refuses_a_model_without_a_hugging_face_equivalent(sources, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(sources / "paratron", folder)
    meta_path = folder / "iter_0000000" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["rotary_interleaved"] = True  # weights unchanged, model not
    meta_path.write_text(json.dumps(meta))
    code = convert(["--model-type", "GPT", *PARATRON_TO_HF, "--load-dir", str(folder),
                    "--save-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "rotary_interleaved" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ trained run -> HF
@pytest.mark.skipif(not GPT2_DATA.is_dir(), reason="needs ../shared/data/gpt2")
def test_trained_run_exports_and_transformers_generates(tmp_path):
    from paratron.cli.train import main as train

    save = tmp_path / "run"
    assert train(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                  "--seq-length", "16", "--max-position-embeddings", "16",
                  "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3",
                  "--lr", "1e-3", "--mock-data", "--tokenizer-type", "GPT2BPETokenizer",
                  "--vocab-file", str(GPT2_DATA / "gpt2-vocab.json"),
                  "--merge-file", str(GPT2_DATA / "gpt2-merges.txt"), "--device", "cpu",
                  "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0",
                  "--save", str(save)]) == 0
    export = tmp_path / "hf"
    assert convert(["--model-type", "GPT", *PARATRON_TO_HF, "--load-dir", str(save),
                    "--save-dir", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["vocab_size"] == 50257
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tokenizer("Paratron converts", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids)
    # The exported weights are the trained ones: same logits as the Paratron model.
    _, path = find_latest_valid(save)
    paratron = checkpoint_logits(path, ids)[..., :50257]
    with torch.no_grad():
        assert (model(input_ids=ids).logits - paratron).abs().max().item() < 1e-5


def test_uneven_first_stage_that_does_not_fit_is_one_line(tmp_path, capsys):
    """--target-decoder-first-pipeline-num-layers is checked like the training flag."""
    import transformers as tf
    config = tf.AutoConfig.for_model("llama", vocab_size=64, hidden_size=32,
                                     num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=48)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    from paratron.cli.convert import main
    code = main(["--model-type", "GPT", "--loader", "hf", "--saver", "paratron",
                 "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "out"),
                 "--target-pipeline-parallel-size", "2",
                 "--target-decoder-first-pipeline-num-layers", "3"])
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own bar
    assert code != 0 and line.startswith("paratron convert: error:") and \
        "3 on the first stage" in line and "first-pipeline-num-layers" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("run_setting", [{"torch_compile": True}, {"cpu_offloading": True},
                                         {"cross_entropy_loss_fusion": True},
                                         {"recompute_granularity": "full"}])
def test_settings_of_the_run_do_not_block_an_export(run_setting):
    """Export checks that config.json reads back as the same model with the test a resume
    applies (`model_identity`): how a run was executed is not part of the model."""
    import dataclasses
    from paratron.convert.hf_config import hf_to_paratron_fields
    from paratron.convert.hf_export import hf_config_from_paratron
    config = transformers.AutoConfig.for_model("llama", **{**TINY_QWEN2,
                                                           "num_hidden_layers": 2})
    base = transformer_config(hf_to_paratron_fields(config.to_dict()))
    hf = hf_config_from_paratron(dataclasses.replace(base, **run_setting), "llama", 256,
                                 torch.float32)
    assert hf["num_hidden_layers"] == base.num_layers
