"""Memory savers under parallel layouts train exactly like one plain process: activation
offload across pipeline stages (with full recompute), optimizer offload with the
distributed optimizer over two data-parallel ranks."""

import numpy as np
import pytest
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from paratron.parallel.process_groups import ProcessGroups
from tests.helpers.flags import COMMON, LLAMA
from tests.helpers.training import train_on_patterns
from tests.helpers.weights import full_weights

FLAGS = COMMON + LLAMA + ["--num-layers", "4", "--train-iters", "4"]
LAYOUTS = {
    # Layers 0-1 on stage 0, 2-3 on stage 1: only the first stage offloads.
    "pp2_activation_offload_full_recompute": (
        2, 1, 2, ["--pipeline-model-parallel-size", "2", "--cpu-offloading",
                  "--cpu-offloading-num-layers", "2", "--recompute-granularity", "full",
                  "--recompute-method", "uniform"]),
    "dp2_distopt_optimizer_offload_half": (
        2, 1, 1, ["--use-distributed-optimizer", "--optimizer-cpu-offload",
                  "--optimizer-offload-fraction", "0.5"]),
    "tp2_activation_and_optimizer_offload": (
        2, 2, 1, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                  "--cpu-offloading", "--cpu-offloading-num-layers", "1",
                  "--optimizer-cpu-offload"]),
}


def _train(flags, pg=None):
    trainer, state = train_on_patterns(flags, pg)
    losses = state.losses
    packed = sum(m.module.decoder.activation_offload.packed for m in trainer.models)
    offloaded = len(trainer.optimizer.offloaded), len(trainer.optimizer.segments)
    return losses, full_weights(trainer), packed, offloaded


def _rank(flags, tp, pp):
    pg = ProcessGroups.build(tp, pp)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.fixture(scope="module")
def reference():
    return _train(FLAGS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_offload_layouts_equal_single_process(reference, layout):
    world, tp, pp, extra = LAYOUTS[layout]
    ref_losses, ref_weights, _, _ = reference
    results = run_distributed(world, _rank, FLAGS + extra, tp, pp, timeout=240)
    weights = {}
    for losses, rank_weights, _, _ in results:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        weights.update(rank_weights)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    packed = [r[2] for r in results]
    offloaded = [r[3] for r in results]
    if "--cpu-offloading" not in extra:
        assert packed == [0] * world
    elif pp == 2:
        assert packed[0] > 0 and packed[1] == 0  # rank 0 is stage 0
    else:
        assert all(p > 0 for p in packed)
    if "--optimizer-cpu-offload" in extra:
        fraction = 0.5 if "0.5" in extra else 1.0
        for moved, total in offloaded:
            assert 0 < moved <= total and (moved == total) == (fraction == 1.0)
    else:
        assert all(moved == 0 for moved, _ in offloaded)
