"""Per-rank optimizer memory with the distributed optimizer falls as DP grows.

bf16 weights, fp32 gradient buffer, and fp32 main weights + Adam moments sharded over
DP (ZeRO-1): per parameter 2 (weight) + 4 (gradient) + 12 / DP bytes (4 main weight,
4 exp_avg, 4 exp_avg_sq). The bytes are counted from the tensors a rank actually holds
after one step, each storage once, and compared with that formula applied to the
parameter count worked out by hand from the model sizes.
"""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist_utils import run_distributed
from tests.helpers.memory_utils import storage_bytes
from paratron.cli.args import parse_args
from paratron.parallel.process_groups import ProcessGroups
from paratron.training.trainer import Trainer
from tests.helpers.training import PatternData

LAYERS, HIDDEN, HEADS, SEQ, VOCAB = 2, 64, 4, 16, 128
FLAGS = (f"--num-layers {LAYERS} --hidden-size {HIDDEN} --num-attention-heads {HEADS} "
         f"--seq-length {SEQ} --max-position-embeddings {SEQ} --position-embedding-type rope "
         f"--padded-vocab-size {VOCAB} --micro-batch-size 1 --lr 1e-3 --device cpu --bf16 "
         "--use-distributed-optimizer --train-iters 1 --eval-interval 1000 --eval-iters 0 "
         "--log-interval 1000 --hidden-dropout 0 --attention-dropout 0 "
         "--num-workers 0").split()


def _param_count():
    """Tied embedding + per layer (LayerNorm weight+bias, qkv, proj, LayerNorm, fc1 with
    ffn = 4h, fc2, all with biases) + final LayerNorm."""
    h, ffn = HIDDEN, 4 * HIDDEN
    layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * ffn + ffn) + (ffn * h + h)
    return VOCAB * h + LAYERS * layer + 2 * h




def _rank_memory():
    pg = ProcessGroups.build(1, 1)
    dp = pg.dp.size
    cfg = parse_args(FLAGS + ["--global-batch-size", str(dp),
                              "--world-size", str(dist.get_world_size())])
    trainer = Trainer(cfg, (PatternData(SEQ, 120), None, None), pg=pg, log=lambda line: None)
    trainer.train_step()
    trainer.model.finish_param_gather()
    params = list(trainer.model.module.parameters())
    optimizer = trainer.optimizer.optimizer
    mains = [s.main for s in trainer.optimizer.segments]
    moments = [optimizer.state[m][k] for m in mains for k in ("exp_avg", "exp_avg_sq")]
    other_state = [v for m in mains for k, v in optimizer.state[m].items()
                   if k not in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v)]
    weight_ptrs = {p.untyped_storage().data_ptr() for p in params}
    return {
        "dtypes": sorted({str(p.dtype) for p in params}),
        "grad_dtypes": sorted({str(p.main_grad.dtype) for p in params}),
        "main_dtypes": sorted({str(m.dtype) for m in mains + moments}),
        "mains_alias_weights": any(m.untyped_storage().data_ptr() in weight_ptrs
                                   for m in mains),
        "weights": storage_bytes(params),
        "grads": storage_bytes([p.main_grad for p in params]),
        "main": storage_bytes(mains),
        "adam": storage_bytes(moments),
        "other_state": storage_bytes(other_state),
        "main_numel": sum(m.numel() for m in mains),
        "param_numel": sum(p.numel() for p in params),
    }


@pytest.fixture(scope="module")
def memory():
    return {dp: run_distributed(dp, _rank_memory, timeout=120) for dp in (1, 2, 4)}


def test_hand_count_is_the_model_parameter_count(memory):
    assert memory[1][0]["param_numel"] == _param_count() == 108_288


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_bytes_per_parameter_are_2_plus_4_plus_12_over_dp(memory, dp):
    n = _param_count()
    expected = {"weights": 2 * n, "grads": 4 * n, "main": 4 * n / dp, "adam": 8 * n / dp}
    for rank, m in enumerate(memory[dp]):
        assert m["dtypes"] == ["torch.bfloat16"]
        assert m["grad_dtypes"] == ["torch.float32"]
        assert m["main_dtypes"] == ["torch.float32"]
        assert not m["mains_alias_weights"]
        for what, value in expected.items():
            assert m[what] == pytest.approx(value, rel=0.1), f"dp {dp} rank {rank}: {what}"
        total = m["weights"] + m["grads"] + m["main"] + m["adam"] + m["other_state"]
        assert total == pytest.approx((2 + 4 + 12 / dp) * n, rel=0.1), f"dp {dp} rank {rank}"


@pytest.mark.parametrize("dp", [2, 4])
def test_main_weights_and_moments_are_sharded_not_replicated(memory, dp):
    """Every parameter element has its main weight on exactly one rank of the group."""
    assert sum(m["main_numel"] for m in memory[dp]) == _param_count()


def test_optimizer_memory_falls_as_dp_grows(memory):
    def optimizer_bytes(dp):
        return max(m["main"] + m["adam"] for m in memory[dp])
    assert optimizer_bytes(1) > optimizer_bytes(2) > optimizer_bytes(4)
    assert optimizer_bytes(4) == pytest.approx(optimizer_bytes(1) / 4, rel=0.1)
