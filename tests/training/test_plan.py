"""`paratron plan`: its numbers are what the Trainer allocates, its activation estimate
is what autograd saves, and the command prints a table and a recommendation.

Weights, gradient buffers and optimizer state are counted from the tensors a real
Trainer holds after one step (each storage once) and must equal the plan exactly. The
saved activations of one micro-batch are measured with saved_tensors_hooks (each
storage once, parameters excluded) and must be within ACTIVATION_RTOL of the estimate
(CPU kernels: the plan is asked with device="cpu", whose dropout masks are in the
model dtype). The parameter count of Qwen2.5-7B is checked against a hand count.
"""

import pytest

from paratron.cli.plan import main as plan_main
from paratron.cli.args import parse_args
from paratron.parallel.pipeline import Chunk
from paratron.training.memory_plan import (GIB, Layout, chunk_saved_bytes, layout_config,
                                           model_parameters, plan, rank_chunks,
                                           recommend)
from paratron.training.trainer import Trainer
from tests.helpers.plan import (ACTIVATION_RTOL, TINY, held_state_bytes, measured_saved_bytes,
                                planned_state_bytes)
from tests.helpers.training import PatternData

LLAMA = ("--swiglu --normalization RMSNorm --position-embedding-type rope "
         "--disable-bias-linear --group-query-attention --num-query-groups 2 "
         "--hidden-dropout 0").split()
GPT2 = "--openai-gelu --hidden-dropout 0.1 --max-position-embeddings 32".split()
MLA_MOE = LLAMA[:6] + ("--hidden-dropout 0 --multi-latent-attention --kv-lora-rank 32 "
                       "--qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 24 "
                       "--q-lora-rank 24 --num-experts 4 --moe-router-topk 2 "
                       "--moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 48 "
                       "--moe-layer-freq ([0]+[1]*1) --moe-router-pre-softmax "
                       "--moe-aux-loss-coeff 0.01").split()
# MLA whose value head is narrower than its query head (as DeepSeek's): padded for SDPA.
NARROW_V = [("8" if prev == "--v-head-dim" else flag)
            for prev, flag in zip([None] + MLA_MOE, MLA_MOE)]
FULL_RECOMPUTE = ("--recompute-granularity full --recompute-method uniform "
                  "--recompute-num-layers 1").split()


def _trainer(*flags):
    cfg = parse_args(TINY + list(flags))
    return Trainer(cfg, (PatternData(cfg.data.seq_length, 100), None, None),
                   log=lambda line: None)


@pytest.mark.parametrize("flags", [LLAMA, GPT2, MLA_MOE], ids=["llama", "gpt2", "mla-moe"])
def test_state_bytes_equal_the_trainer_single_process(flags):
    trainer = _trainer(*flags)
    trainer.train_step()
    held = held_state_bytes(trainer)
    assert held["optimizer_moments"] == 2 * held["main_weights"] > 0
    assert planned_state_bytes(trainer.cfg) == held


def test_fp32_has_no_main_weight_copies():
    cfg = parse_args([a for a in TINY if a != "--bf16"] + LLAMA)
    trainer = Trainer(cfg, (PatternData(32, 100), None, None), log=lambda line: None)
    trainer.train_step()
    held = held_state_bytes(trainer)
    assert held["main_weights"] == 0
    assert planned_state_bytes(trainer.cfg) == held


@pytest.mark.parametrize("flags", [LLAMA, LLAMA + FULL_RECOMPUTE, GPT2, GPT2 + FULL_RECOMPUTE,
                                   MLA_MOE, MLA_MOE + FULL_RECOMPUTE, NARROW_V],
                         ids=["llama", "llama-full-recompute", "gpt2-dropout",
                              "gpt2-full-recompute", "mla-moe", "mla-moe-full-recompute",
                              "mla-narrow-v"])
def test_saved_activation_estimate(flags):
    trainer = _trainer(*flags)
    measured = measured_saved_bytes(trainer)
    estimate = chunk_saved_bytes(trainer.cfg, rank_chunks(trainer.cfg, 0)[0], device="cpu")
    assert estimate == pytest.approx(measured, rel=ACTIVATION_RTOL)


def test_full_recompute_keeps_only_layer_inputs():
    plain, recomputed = (measured_saved_bytes(_trainer(*LLAMA + extra))
                         for extra in ([], FULL_RECOMPUTE))
    assert recomputed < plain / 3


def test_qwen25_7b_parameter_count_by_hand():
    """Untied embedding and output (152064 x 3584 each); per layer QKV 3584 -> 28 + 2 x 4
    heads of 128 with bias, output 3584 x 3584, SwiGLU 3 x 3584 x 18944, two RMSNorms;
    final norm: 7,615,616,512 (the published size)."""
    cfg = parse_args("--model-size qwen2.5-7b --lr 1e-4 --train-iters 1".split())
    h, vocab, qkv = 3584, 152064, (28 + 8) * 128
    layer = h * qkv + qkv + h * h + 3 * h * 18944 + 2 * h
    by_hand = 2 * vocab * h + 28 * layer + h
    chunk = Chunk(0, range(28), is_first=True, is_last=True)
    assert sum(p.numel for p in model_parameters(cfg, chunk)) == by_hand == 7_615_616_512


def test_tensor_parallel_halves_the_sharded_parameters():
    """At TP2 every matrix is split except the replicated norms: the hand count is half
    of the TP1 count plus half of the norm weights."""
    base = parse_args("--model-size qwen2.5-7b --lr 1e-4 --train-iters 1 "
                      "--global-batch-size 8".split())
    counts = {}
    for tp in (1, 2):
        cfg = layout_config(base, Layout(2, tp=tp))
        counts[tp] = sum(p.numel for p in model_parameters(cfg, rank_chunks(cfg, 0)[0]))
    norms = (2 * 28 + 1) * 3584
    assert counts[2] == (counts[1] - norms) // 2 + norms


def _plan_output(capsys, preset):
    rc = plan_main(["--model-size", preset, "--num-gpus", "8", "--gpu-memory-gb", "80",
                    "--seq-length", "4096", "--micro-batch-size", "1",
                    "--global-batch-size", "64", "--bf16", "--use-distributed-optimizer"])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("preset", ["qwen2.5-7b", "deepseek-v2-lite"])
def test_cli_prints_table_and_recommendation(capsys, preset):
    rc, out = _plan_output(capsys, preset)
    assert rc == 0, out.err
    assert out.err == ""
    for column in ("layout", "weights", "grads", "optimizer", "activations", "total GiB"):
        assert column in out.out
    assert f"{preset} on 8 x 80 GiB" in out.out
    lines = [line for line in out.out.splitlines() if line.startswith("recommendation: ")]
    assert len(lines) == 1 and "--tensor-model-parallel-size" in lines[0]
    if preset == "deepseek-v2-lite":
        assert "--expert-model-parallel-size" in lines[0]


@pytest.mark.parametrize("preset", ["qwen2.5-7b", "deepseek-v2-lite"])
def test_recommendation_follows_the_rule(preset):
    """The pick fits; every layout with fewer model-parallel ranks (or as few and a
    smaller EP) needs recompute or does not fit."""
    base = parse_args(f"--model-size {preset} --seq-length 4096 --micro-batch-size 1 "
                      f"--global-batch-size 64 --bf16 --use-distributed-optimizer "
                      f"--lr 1e-4 --train-iters 1".split(), check=False)
    candidates, refused = plan(base, 8)
    assert candidates and all(why for _, why in refused)
    budget = 72 * GIB
    best = recommend(candidates, budget)
    assert best is not None and best.needs_recompute(budget) is False
    assert best.memory.total <= budget
    for c in candidates:
        smaller = ((c.layout.model_parallel, c.layout.ep)
                   < (best.layout.model_parallel, best.layout.ep))
        if smaller:
            assert c.needs_recompute(budget) is not False, c.layout.label()


@pytest.mark.parametrize("args,needle", [
    ("--model-size qwen2.5-7b --num-gpus 0 --gpu-memory-gb 80 --global-batch-size 8",
     "--num-gpus must be positive"),
    ("--model-size qwen2.5-7b --num-gpus 8 --global-batch-size 8", "--gpu-memory-gb"),
    ("--model-size qwen2.5-7b --num-gpus 8 --gpu-memory-gb 80", "--global-batch-size is required"),
    ("--model-size qwen-7b --num-gpus 8 --gpu-memory-gb 80 --global-batch-size 8",
     "unknown preset"),
    ("--model-size qwen2.5-7b --num-gpus 8 --gpu-memory-gb 80 --global-batch-size 8 "
     "--num-query-groups 3", "--num-query-groups"),
    ("--model-size qwen2.5-7b --num-gpus 8 --gpu-memory-gb 80 --global-batch-size 8 "
     "--tensor-model-parallel-size 16", "no split of 8 GPUs"),
    ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
     "--num-gpus 2 --gpu-memory-gb 1 --global-batch-size 2", "vocabulary size is unknown"),
    ("--model-size qwen2.5-7b --num-gpus 8 --gpu-memory-gb 80 --global-batch-size 8 "
     "--optimizer-cpu-offload", "--optimizer-cpu-offload"),
    ("--model-size qwen2.5-7b --num-gpus 8 --gpu-memory-gb 80 --global-batch-size 8 "
     "--tensor-model-paralel-size 2", "did you mean"),
])
def test_cli_bad_input_is_one_line(capsys, args, needle):
    rc = plan_main(args.split())
    out = capsys.readouterr()
    assert rc == 2
    assert out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("paratron plan: error: ")
    assert needle in out.err


def test_cli_reports_when_nothing_fits(capsys):
    rc = plan_main("--model-size qwen2.5-7b --num-gpus 2 --gpu-memory-gb 16 --seq-length 4096 "
                   "--global-batch-size 8 --bf16".split())
    out = capsys.readouterr()
    assert rc == 1
    assert "recommendation: none fits" in out.out
