"""A tiny DeepSeek-V3 (MLA with a low-rank query, sigmoid routing with the aux-loss-free
expert bias and node-limited groups, a shared expert, the first layer dense, the
sequence-wise aux loss) trains exactly like one process at EP2 x TP2 and with the
distributed optimizer (DP2) over 10 iterations, expert biases included; and the bias
moves the load towards balance on a skewed task.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from paratron.cli.args import parse_args
from paratron.model.moe import moe_layers
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.dist_utils import run_distributed
from tests.helpers.training import PatternData, train_on_patterns
from tests.helpers.weights import full_weights

V3 = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
      "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
      "--device cpu --micro-batch-size 2 --global-batch-size 8 --eval-interval 1000 "
      "--eval-iters 0 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
      "--adam-eps 1e-4 --num-workers 0 --train-iters 10 --swiglu --normalization RMSNorm "
      "--position-embedding-type rope --disable-bias-linear "
      "--untie-embeddings-and-output-weights --multi-latent-attention --q-lora-rank 12 "
      "--kv-lora-rank 16 --qk-head-dim 8 --qk-pos-emb-head-dim 4 --v-head-dim 8 "
      "--num-experts 8 --moe-ffn-hidden-size 16 --moe-layer-freq ([0]+[1]*1) "
      "--moe-shared-expert-intermediate-size 16 --moe-router-topk 4 "
      "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
      "--moe-router-bias-update-rate 1e-3 --moe-router-num-groups 4 "
      "--moe-router-group-topk 2 --moe-router-topk-scaling-factor 2.5 "
      "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-3 "
      "--moe-token-dispatcher-type alltoall").split()
LAYOUTS = {  # world, (tp, pp, ep), flags
    "ep2_tp2": (4, (2, 1, 2), ["--expert-model-parallel-size", "2",
                               "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ep2_dp2_distopt": (4, (1, 1, 2), ["--expert-model-parallel-size", "2",
                                       "--use-distributed-optimizer"]),
}


def _expert_biases(trainer) -> dict:
    """Each MoE layer's expert bias, by global name (replicated on every rank)."""
    out = {}
    for model in trainer.models:
        module = model.module
        for name, buffer in module.named_buffers():
            if name.endswith("router.expert_bias"):
                out[module.global_name(name)] = buffer.clone().numpy()
    return out


def _train(flags, pg=None):
    trainer, state = train_on_patterns(flags, pg)
    return state.losses, trainer.moe_losses, full_weights(trainer), _expert_biases(trainer)


def _rank(flags, tp, pp, ep):
    pg = ProcessGroups.build(tp, pp, 1, ep)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.fixture(scope="module")
def reference():
    return _train(V3)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_deepseek_v3_equals_single_process(reference, layout):
    ref_losses, ref_moe, ref_weights, ref_biases = reference
    assert any(np.abs(b).max() > 0 for b in ref_biases.values())  # the biases moved
    world, sizes, extra = LAYOUTS[layout]
    results = run_distributed(world, _rank, V3 + extra, *sizes, timeout=300)
    weights = {}
    for losses, moe, rank_weights, biases in results:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert moe.keys() == ref_moe.keys() and moe
        for name, value in moe.items():
            np.testing.assert_allclose(value, ref_moe[name], rtol=1e-5)
        assert biases.keys() == ref_biases.keys()
        for name, bias in biases.items():
            np.testing.assert_array_equal(bias, ref_biases[name], err_msg=name)
        weights.update(rank_weights)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------- load balance
class SkewedData(PatternData):
    """Few distinct tokens: similar hidden states, so an untrained router sends most of
    them to the same experts."""

    def __getitem__(self, i):
        sample = super().__getitem__(i)
        sample["tokens"] = sample["tokens"] % 3
        sample["labels"] = sample["labels"] % 3
        return sample


def _load_cv(trainer, data) -> float:
    """Coefficient of variation (std / mean) of the tokens each expert receives, over
    the MoE layers, on a fixed batch."""
    counts = []
    hooks = [layer.router.register_forward_hook(
        lambda module, args, out: counts.append(out[1].sum(dim=0).float()))
        for layer in moe_layers(trainer.models)]
    batch = torch.tensor(np.stack([data[i]["tokens"] for i in range(64)]))
    model = trainer.models[0].module
    model.eval()
    with torch.no_grad():
        model(batch)
    model.train()
    for hook in hooks:
        hook.remove()
    return float(np.mean([(c.std(unbiased=False) / c.mean()).item() for c in counts]))


def _cv_before_after(rate: str) -> tuple[float, float]:
    flags = V3 + ["--train-iters", "80", "--lr", "0", "--moe-aux-loss-coeff", "0",
                  "--moe-router-bias-update-rate", rate]
    data = SkewedData(16, 120)
    trainer = Trainer(parse_args(flags), (data, None, None), log=lambda line: None)
    before = _load_cv(trainer, data)
    trainer.train()
    return before, _load_cv(trainer, data)


def test_expert_bias_moves_load_towards_balance():
    """With the weights frozen (lr 0) only the bias changes the routing: the load's
    coefficient of variation falls with it and stays where it was without it."""
    before, after = _cv_before_after("1e-3")  # Megatron's default rate
    frozen_before, frozen_after = _cv_before_after("0")
    assert before > 0.5, before  # the task is skewed
    assert after < 0.5 * before, (before, after)
    assert frozen_after == pytest.approx(frozen_before)
