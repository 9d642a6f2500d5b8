"""Multi-token prediction trains exactly like one process (fp32, 10 iterations): PP2 (the
modules on the last stage, with its copy of the embedding), EP2 x TP2 with sequence
parallelism and DP2 with the distributed optimizer, on a tiny DeepSeek-V3-like model
(MLA, sigmoid-routed experts with groups and the expert bias, a dense first layer, a
shared expert); the logged MTP losses included."""

import numpy as np
import pytest
import torch.distributed as dist

from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.sharding import gather_tensor, layout_of
from tests.helpers.dist_utils import run_distributed
from tests.helpers.training import train_on_patterns
from tests.helpers.weights import _all_gather, full_weights

COMMON = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
          "--max-position-embeddings 16 --lr 2e-3 --vocab-size 120 --padded-vocab-size 128 "
          "--device cpu --micro-batch-size 2 --global-batch-size 8 --eval-interval 1000 "
          "--eval-iters 0 --log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
          "--adam-eps 1e-4 --num-workers 0 --train-iters 10 --swiglu --normalization RMSNorm "
          "--position-embedding-type rope --disable-bias-linear --mtp-num-layers 2").split()
ARCHS = {
    "deepseek_v3": ("--untie-embeddings-and-output-weights --multi-latent-attention "
                    "--q-lora-rank 24 --kv-lora-rank 16 --qk-head-dim 8 "
                    "--qk-pos-emb-head-dim 4 --v-head-dim 8 --num-experts 4 "
                    "--moe-ffn-hidden-size 16 --moe-router-topk 2 --moe-layer-freq ([0]+[1]*1) "
                    "--moe-shared-expert-intermediate-size 32 "
                    "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
                    "--moe-router-num-groups 2 --moe-router-group-topk 1 "
                    "--moe-router-topk-scaling-factor 2.5 --moe-aux-loss-coeff 0.01 "
                    "--moe-router-load-balancing-type seq_aux_loss "
                    "--moe-token-dispatcher-type alltoall").split(),
    "dense_tied": [],
}
LAYOUTS = {  # world, (tp, pp, ep), flags
    "pp2": (2, (1, 2, 1), ["--pipeline-model-parallel-size", "2"]),
    "ep2_tp2": (4, (2, 1, 2), ["--expert-model-parallel-size", "2",
                               "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2_distopt": (2, (1, 1, 1), ["--use-distributed-optimizer"]),
}
CASES = [("deepseek_v3", layout) for layout in LAYOUTS] + [("dense_tied", "pp2")]
EMBEDDING = "embedding.word_embeddings.weight"


def _train(flags, pg=None):
    trainer, state = train_on_patterns(flags, pg)
    copies = {}  # the last stage's copy of the embedding, TP shards gathered
    for model in trainer.models:
        for name, p in model.module.named_parameters():
            if layout_of(p).tied == "copy":
                parts = _all_gather(p.detach(), trainer.pg.tp.size, trainer.pg.tp.group)
                copies[name] = gather_tensor(parts, p).float().numpy()
    return state.losses, trainer.moe_losses, full_weights(trainer), copies


def _rank(flags, tp, pp, ep):
    pg = ProcessGroups.build(tp, pp, 1, ep)
    return _train(flags + ["--world-size", str(dist.get_world_size())], pg)


@pytest.fixture(scope="module")
def references():
    return {arch: _train(COMMON + ARCHS[arch]) for arch in ARCHS}


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", CASES)
def test_mtp_training_equals_single_process(references, arch, layout):
    ref_losses, ref_logged, ref_weights, _ = references[arch]
    assert {"mtp_1 loss", "mtp_2 loss"} <= set(ref_logged)
    assert any(name.startswith("mtp.layers.1.") for name in ref_weights)
    world, sizes, extra = LAYOUTS[layout]
    results = run_distributed(world, _rank, COMMON + ARCHS[arch] + extra, *sizes, timeout=600)
    weights, copies = {}, {}
    for losses, logged, rank_weights, rank_copies in results:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert logged.keys() == ref_logged.keys()
        for name, value in logged.items():  # the last step's MTP (and MoE) losses
            np.testing.assert_allclose(value, ref_logged[name], rtol=1e-5, err_msg=name)
        weights.update(rank_weights)
        copies.update(rank_copies)
    assert set(weights) == set(ref_weights)
    for name, ref in ref_weights.items():
        np.testing.assert_allclose(weights[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    if layout == "pp2":  # the last stage's copy moved with the first stage's embedding
        assert list(copies) == [EMBEDDING]
        np.testing.assert_allclose(copies[EMBEDDING], ref_weights[EMBEDDING], rtol=1e-5,
                                   atol=1e-6)


def _losses(flags):
    return _rank(flags, 1, 2, 1)[:2]


@pytest.mark.slow
def test_mtp_at_pp2_resumes_exactly(tmp_path):
    """The last stage's copy of the embedding is saved once (as the embedding) and
    loaded back: a run stopped and resumed logs what the uninterrupted run logs."""
    flags = [f if f != "10" else "4" for f in COMMON + ARCHS["deepseek_v3"]]
    flags += LAYOUTS["pp2"][2]
    save = ["--save", str(tmp_path), "--save-interval", "2"]
    (whole, whole_logged), _ = run_distributed(2, _losses, flags)
    run_distributed(2, _losses, flags + save + ["--exit-interval", "2"])
    (resumed, resumed_logged), _ = run_distributed(2, _losses, flags + save
                                                   + ["--load", str(tmp_path)])
    assert resumed[-2:] == whole[2:]
    assert resumed_logged == whole_logged
