"""`paratron plan` for DeepSeek-V3-shaped runs: layers that do not split evenly over the
pipeline stages (61) get an uneven first stage, which the recommendation's flags name;
tensor parallelism stays within a node's GPUs (--gpus-per-node)."""

from __future__ import annotations

import pytest

from paratron.cli.args import parse_args
from paratron.cli.plan import main as plan_main
from paratron.parallel.config import rank_chunks
from paratron.training.memory_plan import (Layout, candidate_layouts, first_stage_layers,
                                           layout_config)

# A seven-layer DeepSeek-V3-style model: MLA, sigmoid routing with the expert bias.
TINY_V3 = ("--num-layers 7 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
           "--max-position-embeddings 32 --vocab-size 128 --micro-batch-size 1 "
           "--global-batch-size 16 --swiglu --normalization RMSNorm "
           "--position-embedding-type rope --disable-bias-linear "
           "--untie-embeddings-and-output-weights --multi-latent-attention "
           "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 8 --v-head-dim 8 "
           "--num-experts 4 --moe-ffn-hidden-size 16 --moe-router-topk 2 "
           "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
           "--moe-layer-freq ([0]+[1]*6) --use-distributed-optimizer").split()


def _base(*extra):
    return parse_args(TINY_V3 + ["--lr", "1e-4", "--train-iters", "1", *extra], check=False)


def test_first_stage_takes_the_remainder():
    v3 = parse_args(["--model-size", "deepseek-v3", "--lr", "1e-4", "--train-iters", "1"],
                    check=False)
    assert [first_stage_layers(v3, pp) for pp in (1, 2, 4, 8, 16, 32, 61)] == [
        None, 30, 13, 5, 1, None, None]
    given = parse_args(["--model-size", "deepseek-v3", "--lr", "1e-4", "--train-iters", "1",
                        "--decoder-first-pipeline-num-layers", "4"], check=False)
    assert first_stage_layers(given, 8) is None  # the flags place the layers


def test_uneven_layout_is_what_the_trainer_runs():
    cfg = layout_config(_base(), Layout(4, pp=4, first_stage_layers=1))
    layers = [sum(len(c.layers) for c in rank_chunks(cfg, rank)) for rank in range(4)]
    assert layers == [1, 2, 2, 2]


def test_recommendation_names_the_uneven_split(capsys):
    code = plan_main(["--num-gpus", "4", "--gpu-memory-gb", "80", "--max-rows", "50",
                      "--pipeline-model-parallel-size", "4", *TINY_V3])
    out = capsys.readouterr().out
    assert code == 0 and "TP1 PP4 (first 1) CP1 DP1 EP1" in out
    (line,) = [x for x in out.splitlines() if x.startswith("recommendation: ")]
    assert "--pipeline-model-parallel-size 4 --decoder-first-pipeline-num-layers 1" in line


def test_tensor_parallelism_stays_within_a_node():
    base = _base()
    assert {layout.tp for layout in candidate_layouts(base, 16)} == {1, 2, 4, 8, 16}
    assert {layout.tp for layout in candidate_layouts(base, 16, max_tp=4)} == {1, 2, 4}
    assert {layout.tp for layout in candidate_layouts(base, 16, {"tp": 16}, max_tp=4)} == {16}


def test_gpus_per_node_must_be_positive(capsys):
    assert plan_main(["--num-gpus", "4", "--gpu-memory-gb", "80", "--gpus-per-node", "0",
                      *TINY_V3]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpus-per-node must be positive" in err


@pytest.mark.parametrize("preset, pp", [("deepseek-v3", 8), ("kimi-k2", 16),
                                        ("moonlight-16b-a3b", 3)])
def test_presets_plan(preset, pp):
    """The presets are usable as --model-size: a layout of theirs validates."""
    base = parse_args(["--model-size", preset, "--lr", "1e-4", "--train-iters", "1",
                       "--seq-length", "4096", "--micro-batch-size", "1",
                       "--global-batch-size", "1024", "--bf16", "--use-distributed-optimizer",
                       "--expert-tensor-parallel-size", "1"], check=False)
    layout = Layout(2 * pp * 16, tp=2, pp=pp, ep=16, etp=1,
                    first_stage_layers=first_stage_layers(base, pp))
    assert layout_config(base, layout).model.moe_router_enable_expert_bias
