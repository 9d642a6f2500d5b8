"""Pipeline layouts train exactly like one process: PP2, PP4, interleaved PP2 x 2 virtual
stages, PP2 x TP2 x DP2, an uneven 3|2|2 split; tied and untied embeddings."""

import numpy as np
import pytest
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.process_groups import ProcessGroups
from tests.helpers.training import train_on_patterns
from tests.helpers.weights import full_weights

COMMON = ("--hidden-size 32 --num-attention-heads 4 --seq-length 16 "
          "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
          "--device cpu --micro-batch-size 1 --global-batch-size 8 --eval-interval 5 "
          "--eval-iters 1 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
          "--adam-eps 1e-4 --num-workers 0 --train-iters 10 --swiglu --normalization RMSNorm "
          "--position-embedding-type rope --disable-bias-linear --group-query-attention "
          "--num-query-groups 2").split()

LAYOUTS = {
    "pp2": (2, 4, ["--pipeline-model-parallel-size", "2"]),
    "pp4": (4, 4, ["--pipeline-model-parallel-size", "4"]),
    "pp2_vpp2": (2, 4, ["--pipeline-model-parallel-size", "2",
                        "--num-virtual-stages-per-pipeline-rank", "2"]),
    "pp2_tp2_dp2": (8, 4, ["--pipeline-model-parallel-size", "2",
                           "--tensor-model-parallel-size", "2", "--sequence-parallel",
                           "--use-distributed-optimizer", "--overlap-grad-reduce"]),
    "pp3_uneven_3_2_2": (3, 7, ["--pipeline-model-parallel-size", "3",
                                "--decoder-first-pipeline-num-layers", "3"]),
}



def _train(flags, pg=None):
    trainer, state = train_on_patterns(flags, pg, valid=True)
    return state.losses, full_weights(trainer)


def _rank(flags, tp, pp):
    pg = ProcessGroups.build(tp, pp)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.fixture(scope="module")
def references():
    return {(layers, tied): _train(COMMON + ["--num-layers", str(layers)]
                                   + ([] if tied else ["--untie-embeddings-and-output-weights"]))
            for layers in (4, 7) for tied in (True, False)}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.slow
def test_pipeline_equals_single_process(references, layout, tied):
    world, layers, extra = LAYOUTS[layout]
    ref_losses, ref_weights = references[layers, tied]
    flags = COMMON + ["--num-layers", str(layers)] + extra
    if not tied:
        flags.append("--untie-embeddings-and-output-weights")
    tp = 2 if "--tensor-model-parallel-size" in extra else 1
    pp = int(extra[extra.index("--pipeline-model-parallel-size") + 1])
    results = run_distributed(world, _rank, flags, tp, pp, timeout=300)
    weights = {}
    for losses, rank_weights in results:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        weights.update(rank_weights)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
