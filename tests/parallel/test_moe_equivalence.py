"""Mixtures of experts train exactly like one process (fp32, dropless): EP2, EP2 x TP2,
EP2 x DP2 with the distributed optimizer, and MoE with PP2; a DeepSeek-V2-style model
(MLA, shared experts, first layer dense) and a Qwen3-MoE-style one."""

import numpy as np
import pytest
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.process_groups import ProcessGroups
from tests.helpers.training import train_on_patterns
from tests.helpers.weights import full_weights

COMMON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
          "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
          "--device cpu --micro-batch-size 2 --global-batch-size 8 --eval-interval 1000 "
          "--eval-iters 0 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
          "--adam-eps 1e-4 --num-workers 0 --train-iters 6 --swiglu --normalization RMSNorm "
          "--position-embedding-type rope --disable-bias-linear "
          "--untie-embeddings-and-output-weights --num-experts 4 --moe-ffn-hidden-size 16 "
          "--moe-router-topk 2 --moe-aux-loss-coeff 0.01 "
          "--moe-token-dispatcher-type alltoall").split()
ARCHS = {
    "qwen3_moe": "--group-query-attention --num-query-groups 2 --qk-layernorm".split(),
    "deepseek_v2": ("--multi-latent-attention --kv-lora-rank 16 --qk-head-dim 8 "
                    "--qk-pos-emb-head-dim 4 --v-head-dim 8 --moe-layer-freq ([0]+[1]*1) "
                    "--moe-shared-expert-intermediate-size 32 --moe-router-pre-softmax "
                    "--moe-router-load-balancing-type seq_aux_loss "
                    "--moe-router-topk-scaling-factor 1.0").split(),
}
LAYOUTS = {  # world, (tp, pp, ep), flags
    "ep2": (2, (1, 1, 2), ["--expert-model-parallel-size", "2"]),
    "ep2_tp2": (4, (2, 1, 2), ["--expert-model-parallel-size", "2",
                               "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ep2_dp2_distopt": (4, (1, 1, 2), ["--expert-model-parallel-size", "2",
                                       "--use-distributed-optimizer"]),
    "pp2": (2, (1, 2, 1), ["--pipeline-model-parallel-size", "2"]),
}


def _train(flags, pg=None):
    trainer, state = train_on_patterns(flags, pg)
    return state.losses, trainer.moe_losses, full_weights(trainer)


def _rank(flags, tp, pp, ep):
    pg = ProcessGroups.build(tp, pp, 1, ep)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.fixture(scope="module")
def references():
    return {arch: _train(COMMON + extra) for arch, extra in ARCHS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_moe_equals_single_process(references, arch, layout):
    ref_losses, ref_moe, ref_weights = references[arch]
    world, sizes, extra = LAYOUTS[layout]
    results = run_distributed(world, _rank, COMMON + ARCHS[arch] + extra, *sizes, timeout=300)
    weights = {}
    for losses, moe, rank_weights in results:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert moe.keys() == ref_moe.keys() and moe
        for name, value in moe.items():  # the logged aux loss of the last step
            np.testing.assert_allclose(value, ref_moe[name], rtol=1e-5)
        weights.update(rank_weights)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
