"""Generation with a key/value cache: greedy ids equal `transformers` `generate`, cached
steps equal full recomputation, sampling keeps to hand-computed top-k / top-p sets, and
`paratron generate` runs end to end on a checkpoint written by `paratron train`.

Hugging Face models are tiny random ones built offline (weights far from their initial
values, as in test_hf_logits), loaded with `load_hf_model`, compared in fp32.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers.hf_utils import VOCAB, randomize  # noqa: E402
from paratron.cli.generate import main as generate_main  # noqa: E402
from paratron.convert.hf_loader import load_hf_model  # noqa: E402
from paratron.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from paratron.inference import (InferenceParams, Sampling, check_generation_layout,  # noqa: E402
                                generate, load_paratron_model, top_k_mask, top_p_mask)
from paratron.parallel.process_groups import ProcessGroups  # noqa: E402

TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
CASES = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama_gqa": dict(model_type="llama", num_key_value_heads=2, intermediate_size=96),
    "qwen3": dict(num_key_value_heads=2, intermediate_size=96, head_dim=32),
    "deepseek_v2_mla_moe": dict(
        model_type="deepseek_v2", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, q_lora_rank=None, intermediate_size=96, moe_intermediate_size=24,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=1),
}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> (transformers model, Paratron model), built once."""
    cache = {}

    def get(case):
        if case not in cache:
            overrides = dict(CASES[case])
            model_type = overrides.pop("model_type", case)
            config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
            extra = {"experts_implementation": "eager"} if model_type == "deepseek_v2" else {}
            hf = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", **extra)
            randomize(hf)
            folder = tmp_path_factory.mktemp(case)
            hf.eval().save_pretrained(folder)
            cache[case] = hf, load_hf_model(folder)[1]
        return cache[case]
    return get


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_generate(case, models):
    """One prompt alone, and two prompts of different lengths in one left-padded batch:
    every row's ids are what transformers generates for that prompt alone."""
    hf, model = models(case)
    eos = hf.generation_config.eos_token_id
    prompts = [_prompt(7, 1), _prompt(4, 2)]
    expected = [_hf_greedy(hf, p) for p in prompts]
    assert generate(model, prompts[:1], NEW_TOKENS, eod=eos) == expected[:1]
    assert generate(model, prompts, NEW_TOKENS, eod=eos) == expected


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa", "deepseek_v2_mla_moe"])
def test_cached_steps_equal_full_recomputation(case, models):
    """Prefill then one token a step through the cache: each step's logits equal those
    of the whole sequence run again from scratch."""
    _, model = models(case)
    tokens = torch.tensor([_prompt(6, 3), _prompt(6, 4)])
    cache = InferenceParams(2, 6 + 8)
    worst = 0.0
    with torch.no_grad():
        step = tokens
        for _ in range(8):
            cached = model(step, inference_params=cache)[:, -1]
            cache.advance(step.shape[1])
            full = model(tokens)[:, -1]
            worst = max(worst, (cached - full).abs().max().item())
            step = cached.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], dim=1)
    assert worst < 1e-5, worst


def test_top_k_one_is_greedy(models):
    _, model = models("llama_gqa")
    prompts = [_prompt(5, 5), _prompt(9, 6)]
    assert generate(model, prompts, NEW_TOKENS, sampling=Sampling(top_k=1, seed=3)) \
        == generate(model, prompts, NEW_TOKENS)


def test_same_seed_same_sample(models):
    _, model = models("qwen3")
    prompts = [_prompt(5, 7)]

    def draw(seed):
        return generate(model, prompts, NEW_TOKENS,
                        sampling=Sampling(top_p=0.95, temperature=1.5, seed=seed))
    first = draw(11)
    assert draw(11) == first
    assert draw(12) != first


# Fixed logits: probabilities 0.40 0.25 0.15 0.10 0.06 0.04, in a shuffled order.
PROBS = [0.06, 0.25, 0.04, 0.40, 0.10, 0.15]
LOGITS = torch.tensor([PROBS]).log()
RANKED = [3, 1, 5, 4, 0, 2]  # token ids from most to least likely


@pytest.mark.parametrize("sampling,expected", [
    (Sampling(top_k=3), {3, 1, 5}),
    (Sampling(top_p=0.6), {3, 1}),          # mass before token 5 is 0.65 >= 0.6
    (Sampling(top_p=0.7), {3, 1, 5}),       # 0.65 < 0.7 keeps it; 0.80 drops token 4
    (Sampling(top_p=0.3), {3}),             # the most likely token always stays
    # top-4 renormalised: 0.444 0.278 0.167 0.111; mass before token 5 is 0.722 >= 0.7
    (Sampling(top_k=4, top_p=0.7), {3, 1}),
    (Sampling(top_k=2, temperature=5.0), {3, 1}),
])
def test_sampling_draws_only_from_the_hand_computed_set(sampling, expected):
    assert set(sampling.allowed(LOGITS / sampling.temperature)[0].nonzero()[:, 0].tolist()) \
        == expected
    drawn = sampling.sample(LOGITS.expand(4000, -1))
    assert set(drawn.tolist()) == expected  # every member drawn, nothing else


def test_draw_frequencies_follow_the_renormalised_nucleus():
    drawn = Sampling(top_p=0.7, seed=0).sample(LOGITS.expand(20000, -1))
    kept = [PROBS[t] for t in RANKED[:3]]
    for token, p in zip(RANKED[:3], kept):
        share = (drawn == token).float().mean().item()
        assert math.isclose(share, p / sum(kept), abs_tol=0.015), (token, share)


def test_masks_by_hand():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -2.0]])
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True, False]]
    assert top_p_mask(logits, 0.99).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(top_k=-1), "--top-k"), (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(temperature=0.0), "--temperature"), (dict(greedy=True, top_k=5), "--greedy"),
])
def test_bad_sampling_values_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Sampling(**kwargs)


@pytest.mark.parametrize("sizes,flag", [(dict(pp=2), "--pipeline-model-parallel-size"),
                                        (dict(cp=2), "--context-parallel-size")])
def test_pipeline_and_context_parallel_are_refused(sizes, flag):
    with pytest.raises(ValueError, match=flag):
        check_generation_layout(ProcessGroups.sizes_only(world_size=2, **sizes))


# ---------------------------------------------------------------- the command line
def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = generate_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n"
                      "a cache keeps the keys and values of earlier tokens\n" * 30)
    train_bpe_tokenizer([str(corpus)], str(folder), vocab_size=300)
    corpus.unlink()
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, bpe_folder):
    """A checkpoint saved by `paratron train` (2 iterations, mock data, the BPE above);
    the tokenizer's own folder is removed afterwards, so only the copy beside the
    checkpoints remains."""
    from paratron.cli.train import main as train_main

    root = tmp_path_factory.mktemp("run")
    tokenizer = root / "tok"
    shutil.copytree(bpe_folder, tokenizer)
    save = root / "save"
    flags = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
             "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type "
             "rope --disable-bias-linear --seq-length 16 --max-position-embeddings 64 "
             "--micro-batch-size 2 --global-batch-size 2 --train-iters 2 --lr 1e-3 "
             "--mock-data --tokenizer-type HuggingFaceTokenizer --device cpu --num-workers 0 "
             "--eval-iters 0 --log-interval 100").split()
    assert train_main(flags + ["--tokenizer-model", str(tokenizer), "--save", str(save)]) == 0
    shutil.rmtree(tokenizer)
    return save


def _recomputed_greedy(model, prompt: list[int], n: int, vocab: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence again at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1, :vocab]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_cli_generates_from_a_trained_checkpoint(trained_run, capsys):
    from paratron.data.tokenizer import build_tokenizer

    code, out, err = _run_cli(capsys, "--load", trained_run, "--prompt", "the quick brown",
                              "--prompt", "a cache", "--max-new-tokens", 6, "--ignore-eos",
                              "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["the quick brown", "a cache"]
    tokenizer = build_tokenizer("HuggingFaceTokenizer",
                                tokenizer_model=str(trained_run / "tokenizer"))
    _, model, iteration = load_paratron_model(trained_run, ProcessGroups.single(),
                                              log=lambda line: None)
    assert iteration == 2
    for row in rows:
        expected = _recomputed_greedy(model, tokenizer.encode(row["prompt"]), 6,
                                      tokenizer.vocab_size)
        assert row["token_ids"] == expected
        assert row["completion"] == tokenizer.decode(expected)


def test_cli_hf_folder_equals_transformers(bpe_folder, tmp_path, capsys):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bpe_folder)
    config = transformers.AutoConfig.for_model(
        "llama", **{**TINY, "vocab_size": 320}, num_key_value_heads=2, intermediate_size=96,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(hf)
    hf.eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt = "the lazy dog"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                           do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    code, out, err = _run_cli(capsys, "--hf", tmp_path, "--prompt", prompt,
                              "--max-new-tokens", 8)
    assert code == 0, err
    assert out == prompt + tokenizer.decode(expected) + "\n"


@pytest.mark.parametrize("args,fragment", [
    (["--load", "{missing}"], "no such directory"),
    (["--load", "{empty}"], "no complete checkpoint"),
    (["--hf", "{empty}"], "config.json"),
    (["--load", "{run}", "--top-k", "-2"], "--top-k"),
    (["--load", "{run}", "--temperature", "0"], "--temperature"),
    (["--load", "{run}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--load", "{run}", "--prompt-file", "{missing}"], "--prompt-file"),
    (["--load", "{run}", "--tensor-model-parallel-size", "2"], "launch exactly 2"),
])
def test_cli_refusals_are_one_line(args, fragment, trained_run, tmp_path, capsys):
    places = {"missing": tmp_path / "nothing", "empty": tmp_path, "run": trained_run}
    argv = [a.format(**places) for a in args]
    if "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "4"]
    if "--prompt-file" not in argv:
        argv += ["--prompt", "the"]
    code, out, err = _run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("paratron generate: error:"), err
    assert fragment in err, err
